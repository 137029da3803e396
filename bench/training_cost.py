"""Training cost of the callback: time per optimizer step (or per whole fit) in each phase relative to the dense run
of the same model in the same process, persistent memory the callback adds, and peak memory.

    python bench/training_cost.py                 # MLP on Fashion-MNIST and ResNet50 (CPU, batch 4 at 64x64)
    python bench/training_cost.py --quick         # < 2 minutes: the MLP, fewer repeats, no peak-memory runs
    python bench/training_cost.py --models mlp --rounds 5
    python bench/training_cost.py --compile       # the same with torch.compile(model) (inductor) for every run
    # the training-cost target (docs/results.md section 2): whole fits, 2 threads, 5 rounds
    python bench/training_cost.py --target mlp        # MLP 784-1024-1024-10, batch 256, 120 steps per fit
    python bench/training_cost.py --target resnet50   # ResNet50, batch 32 x 3x64x64, 6 steps per fit
    python bench/training_cost.py --target mlp --fused   # the same with sapp_lightning.fused's kernels

Each configuration is a Lightning fit with a one-phase plan (``[("sparse", 1.0)]`` and so on) that forces the
phase. By default a fit has ``2 x steps`` optimizer steps and only the second epoch is timed (the first warms up and
lets Lightning's ``ModelPruning`` prune at its epoch end); a step is timed from ``on_train_batch_start`` of a
callback placed before ``BlockPruning`` to ``on_train_batch_end`` of one placed after it, so the callback's own
hooks are inside, and the median step counts. With ``--whole-fit`` a fit is one epoch of ``steps`` steps and its
whole ``trainer.fit`` (set-up, data loading, every hook) is timed, after one untimed round of every configuration.
Configurations are interleaved round by round; the ratio is taken per round against that round's dense run, and
the median [min, max] over rounds is reported. ``--threads`` sets ``torch.set_num_threads`` (default 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import fashion_mnist, machine, memory_bandwidth, quiet, trainer_kwargs  # noqa: E402

# (label, algorithm or special, phase, attention phase?)
CONFIGS: list[tuple[str, str, str | None]] = [
    ("dense", "dense", None),
    ("sapp dense", "sapp", "dense"),
    ("sapp sparsify", "sapp", "sparsify"),
    ("sapp sparse", "sapp", "sparse"),
    ("acdc dense", "acdc", "dense"),
    ("acdc sparse", "acdc", "sparse"),
    ("magnitude sparse", "magnitude", "sparse"),
    ("powerprop dense", "powerprop", "dense"),
    ("powerprop sparse", "powerprop", "sparse"),
    ("ModelPruning l1 90%", "modelpruning", None),
]
QUICK_CONFIGS = ["dense", "sapp dense", "acdc sparse", "ModelPruning l1 90%"]
SPARSITY = 0.9


class _Clock:
    """Shared between a start callback (first in the list) and an end callback (last)."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.times: list[float] = []


def _clock_callbacks(clock: _Clock, first_epoch: int = 1):
    import pytorch_lightning as pl

    class Start(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.t0 = time.perf_counter()

    class End(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch >= first_epoch:  # by default the first epoch is warm-up
                clock.times.append(time.perf_counter() - clock.t0)

    return Start(), End()


def _random_images(n: int, shape: tuple[int, ...], classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(
        torch.randn(n, *shape, generator=g), torch.randint(classes, (n,), generator=g)
    )
    return data


@dataclasses.dataclass(frozen=True)
class Setting:
    """What one measurement runs: the model, its size, the steps per fit and how a fit is timed."""

    model: str = "mlp"
    hidden: tuple[int, ...] = (512, 512)  # the MLP's hidden layers
    batch: int = 4  # ResNet50's batch (the MLP's is the data module's, 256)
    steps: int = 30  # timed steps per fit
    whole_fit: bool = False  # time whole fits of ``steps`` steps instead of the steps of a second epoch


TARGETS = {  # the measurements behind the training-cost targets (docs/results.md section 2)
    "mlp": Setting("mlp", hidden=(1024, 1024), steps=120, whole_fit=True),
    "resnet50": Setting("resnet50", batch=32, steps=6, whole_fit=True),
}
TARGET_CONFIGS = [
    "dense",
    "sapp dense",
    "sapp sparse",
    "powerprop dense",
    "powerprop sparse",
    "acdc sparse",
    "magnitude sparse",
]


def build(setting: Setting, steps: int):
    """The LightningModule, train loader, block size and min_blocks of a benchmark model."""
    from sapp_lightning.app.models import MLP, ImageClassifier, resnet50

    if setting.model == "mlp":
        dm = fashion_mnist(batch_size=256)
        net = MLP(dm.input_shape, dm.num_classes, hidden=setting.hidden)
        loader = dm.train_dataloader()
        return ImageClassifier(net, dm.num_classes, lr=0.05), loader, 16, 100
    net = resnet50(num_classes=10)
    data = _random_images(setting.batch * steps, (3, 64, 64), 10)
    loader = torch.utils.data.DataLoader(data, batch_size=setting.batch, shuffle=False)
    return ImageClassifier(net, 10, lr=0.05), loader, 16, 100


def _pruned_shapes(setting: Setting) -> list[tuple[int, ...]]:
    """Weight shapes of the layers BlockPruning prunes in the benchmark model (16x16 blocks, min_blocks=100)."""
    from sapp_lightning.targets import candidate_layers

    module, _, block, min_blocks = build(setting, 1)
    return [tuple(c.module.weight.shape) for c in candidate_layers(module, block) if c.layout.num_blocks >= min_blocks]


def make_callback(algorithm: str, phase: str | None, block: int, min_blocks: int):
    from pytorch_lightning.callbacks import ModelPruning

    from sapp_lightning import BlockPruning

    if algorithm == "dense":
        return None
    if algorithm == "modelpruning":
        return ModelPruning("l1_unstructured", amount=SPARSITY, use_lottery_ticket_hypothesis=False, verbose=0)
    return BlockPruning(algorithm, SPARSITY, block, min_blocks=min_blocks, plan=[(phase, 1.0)])


def time_config(
    setting: Setting, algorithm: str, phase: str | None, seed: int, compiled: bool = False
) -> tuple[float, float]:
    """``(time, median step)`` in seconds: the median step time of the second epoch of a ``2 x steps`` fit (twice),
    or with ``setting.whole_fit`` the wall time of a one-epoch fit of ``steps`` steps and its median step (of
    ``torch.compile(module)`` if ``compiled``; compilation happens in the first, untimed epoch, or is part of the
    whole fit)."""
    import pytorch_lightning as pl

    pl.seed_everything(seed, verbose=False)
    module, loader, block, min_blocks = build(setting, setting.steps)
    clock = _Clock()
    start, end = _clock_callbacks(clock, first_epoch=0 if setting.whole_fit else 1)
    pruning = make_callback(algorithm, phase, block, min_blocks)
    callbacks = [start] + ([pruning] if pruning else []) + [end]
    epochs = 1 if setting.whole_fit else 2
    kwargs = trainer_kwargs() | {"limit_train_batches": setting.steps, "max_epochs": epochs}
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    t0 = time.perf_counter()
    trainer.fit(torch.compile(module) if compiled else module, loader)
    step = statistics.median(clock.times)
    return (time.perf_counter() - t0 if setting.whole_fit else step), step


def state_bytes(setting: Setting, algorithm: str, phase: str | None) -> dict[str, Any]:
    """Bytes of what the callback keeps during training (masks, logits, the logits' optimizer state) against the
    bytes of the model's weights, measured on a model after a few steps in the phase."""
    import pytorch_lightning as pl

    module, loader, block, min_blocks = build(setting, 4)
    weight_bytes = sum(p.nbytes for p in module.parameters())
    pruning = make_callback(algorithm, phase, block, min_blocks)
    captured: dict[str, Any] = {}

    class Capture(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            masks = [b for n, b in pl_module.named_buffers() if "block_mask" in n]
            logits = [p for n, p in pl_module.named_parameters() if n.endswith("logits")]
            ids = {id(p) for p in logits}
            opt_state = [
                t
                for opt in trainer.optimizers
                for p, st in opt.state.items()
                if id(p) in ids
                for t in st.values()
                if torch.is_tensor(t)
            ]
            captured.update(
                mask_bytes=sum(b.nbytes for b in masks),
                logit_bytes=sum(p.nbytes for p in logits),
                logit_optimizer_bytes=sum(t.nbytes for t in opt_state),
            )

    kwargs = trainer_kwargs() | {"limit_train_batches": 4, "max_epochs": 1}
    pl.Trainer(callbacks=[pruning, Capture()], **kwargs).fit(module, train_dataloaders=loader)
    extra = captured["mask_bytes"] + captured["logit_bytes"] + captured["logit_optimizer_bytes"]
    pruned = pruning.layers if hasattr(pruning, "layers") else []
    return dict(
        captured,
        weight_bytes=weight_bytes,
        pruned_weight_bytes=sum(layer.raw_weight.nbytes for layer in pruned),
        extra_bytes=extra,
        extra_fraction=extra / weight_bytes,
    )


def peak_rss_mib(setting: Setting, label: str, compiled: bool = False, threads: int = 1) -> float:
    """Peak resident memory of a fresh process that runs one configuration.

    Read from ``VmHWM`` in ``/proc/self/status``: Linux carries ``ru_maxrss`` across ``fork`` + ``execve``, so
    the child's ``ru_maxrss`` would report this (large) parent's peak instead of its own.
    """
    root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys, torch; sys.path.insert(0, {root!r}); torch.set_num_threads({threads});"
        "from bench.common import quiet; quiet(); from bench.training_cost import CONFIGS, Setting, time_config;"
        f"cfg = {{c[0]: c for c in CONFIGS}}[{label!r}];"
        f"time_config(Setting(**{dataclasses.asdict(setting)!r}), cfg[1], cfg[2], 0, {compiled});"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def run_model(
    setting: Setting, labels: list[str], rounds: int, peak: bool, compiled: bool = False, threads: int = 1
) -> dict[str, Any]:
    configs = [c for c in CONFIGS if c[0] in labels]
    assert configs[0][0] == "dense", "every measurement is a ratio to the dense run of its round"
    per_round: dict[str, list[float]] = {c[0]: [] for c in configs}
    step_ratios: dict[str, list[float]] = {c[0]: [] for c in configs}  # whole fits: the median step's ratio too
    times: dict[str, list[float]] = {c[0]: [] for c in configs}
    steps: dict[str, list[float]] = {c[0]: [] for c in configs}
    if setting.whole_fit:  # one untimed round: first-use costs (imports, data, allocator) hit no configuration
        for _, algorithm, phase in configs:
            time_config(setting, algorithm, phase, seed=0, compiled=compiled)
    for r in range(rounds):
        for label, algorithm, phase in configs:
            fit_time, step_time = time_config(setting, algorithm, phase, seed=r, compiled=compiled)
            times[label].append(fit_time)
            steps[label].append(step_time)
        for label in per_round:
            per_round[label].append(times[label][-1] / times["dense"][-1])
            step_ratios[label].append(steps[label][-1] / steps["dense"][-1])
        line = " ".join(f"{k}={v[-1]:.3f}" for k, v in per_round.items())
        print(f"[{setting.model} round {r + 1}/{rounds}] ratio to dense: {line}", flush=True)
    result: dict[str, Any] = {
        "setting": dataclasses.asdict(setting),
        "threads": threads,
        "steps_timed_per_round": setting.steps,
        "rounds": rounds,
        "compile": compiled,
        "configs": {},
    }
    unit = setting.steps if setting.whole_fit else 1  # whole fits: seconds per fit -> per step
    for label, algorithm, phase in configs:
        result["configs"][label] = {
            "ms_per_step_median": 1e3 * statistics.median(times[label]) / unit,
            "ratio_median": statistics.median(per_round[label]),
            "ratio_min": min(per_round[label]),
            "ratio_max": max(per_round[label]),
            "ratios": per_round[label],
        }
        if setting.whole_fit:
            result["configs"][label] |= {
                "ms_per_step_median_of_medians": 1e3 * statistics.median(steps[label]),
                "step_ratio_median": statistics.median(step_ratios[label]),
                "step_ratio_min": min(step_ratios[label]),
                "step_ratio_max": max(step_ratios[label]),
            }
        if algorithm in ("sapp", "acdc", "magnitude", "powerprop") and phase in ("sparse", "dense"):
            result["configs"][label]["memory"] = state_bytes(setting, algorithm, phase)
        if peak:
            result["configs"][label]["peak_rss_mib"] = peak_rss_mib(setting, label, compiled, threads)
            print(f"[{setting.model}] peak RSS {label}: {result['configs'][label]['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def target(label: str, setting: Setting | None = None) -> float | None:
    """The targets: SA++ and PowerPropagation (a reparametrized forward in every phase) 1.15x on the MLP, 1.10x on
    ResNet50 at batch 32; ACDC and magnitude 1.05x."""
    if label.startswith(("sapp", "powerprop")):
        return 1.10 if setting is not None and setting.model == "resnet50" and setting.batch >= 32 else 1.15
    if label in ("dense",) or label.startswith("ModelPruning"):
        return None
    return 1.05


def print_table(results: dict[str, Any]) -> None:
    if "bandwidth" in results:
        bw = results["bandwidth"]
        print(
            f"\nmemory bandwidth, {bw['threads']} thread(s), torch.mul(a, b, out=c) (2 reads + 1 write): "
            f"{bw['large_numel']:,} floats {bw['large_gbps']:.1f} GB/s; {bw['small_numel']:,} floats "
            f"{bw['small_gbps']:.1f} GB/s"
        )
    for model_name, res in results["models"].items():
        compiled = " (torch.compile)" if res.get("compile") else ""
        setting = Setting(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["setting"].items()})
        timed = "whole fits of" if setting.whole_fit else "x"
        print(
            f"\n{model_name}{compiled}: {res['rounds']} rounds {timed} {res['steps_timed_per_round']} steps, "
            f"{res['threads']} thread(s), {setting}"
        )
        step_column = " | median step's ratio [min, max]" if setting.whole_fit else ""
        print(
            "| configuration | ms/step | ratio to dense (median [min, max])"
            + step_column
            + " | target | met | callback state / weights |"
        )
        print("|---|---|---|" + ("---|" if setting.whole_fit else "") + "---|---|---|")
        for label, c in res["configs"].items():
            t = target(label, setting)
            met = "-" if t is None else ("yes" if c["ratio_median"] <= t else "**no**")
            mem = c.get("memory")
            mem_text = (
                f"{mem['extra_bytes']:,} B / {mem['weight_bytes']:,} B = {mem['extra_fraction']:.3%}" if mem else ""
            )
            step_cell = (
                f" | {c['step_ratio_median']:.3f} [{c['step_ratio_min']:.3f}, {c['step_ratio_max']:.3f}]"
                if setting.whole_fit
                else ""
            )
            print(
                f"| {label} | {c['ms_per_step_median']:.1f} | {c['ratio_median']:.3f} [{c['ratio_min']:.3f}, "
                f"{c['ratio_max']:.3f}]{step_cell} | {t or '-'} | {met} | {mem_text} |"
            )
        peaks = {k: c["peak_rss_mib"] for k, c in res["configs"].items() if "peak_rss_mib" in c}
        if peaks:
            dense = peaks.get("dense")
            print(
                "peak RSS (MiB): "
                + ", ".join(f"{k} {v:.0f}" + (f" ({v / dense:.3f}x)" if dense else "") for k, v in peaks.items())
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs="+", default=["mlp", "resnet50"], choices=["mlp", "resnet50"])
    p.add_argument("--target", choices=sorted(TARGETS), help="the target measurement (sets the options below)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, help="timed steps per fit (default: 30 MLP, 6 ResNet50)")
    p.add_argument("--whole-fit", action="store_true", help="time whole one-epoch fits of --steps steps")
    p.add_argument("--mlp-hidden", type=int, nargs="+", default=[512, 512], help="the MLP's hidden widths")
    p.add_argument("--batch", type=int, default=4, help="ResNet50's batch size")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default 1; 2 with --target)")
    p.add_argument("--configs", nargs="+", choices=[c[0] for c in CONFIGS], help="default: all")
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocess runs")
    p.add_argument("--compile", action="store_true", help="time torch.compile(model) (inductor) in every configuration")
    p.add_argument("--fused", action="store_true", help="sapp_lightning.fused kernels on (SAPP_FUSED_KERNELS=1)")
    p.add_argument("--out", type=Path, help="default: runs/training_cost.json (runs/training_cost_compiled.json)")
    args = p.parse_args(argv)
    quiet()
    if args.fused:  # the peak-memory subprocesses inherit the variable
        os.environ["SAPP_FUSED_KERNELS"] = "1"
        from sapp_lightning import fused

        if not fused.use_fused_kernels(True):
            raise SystemExit("--fused: the kernels could not be built")
    threads = args.threads or (2 if args.target else 1)
    torch.set_num_threads(threads)
    results: dict[str, Any] = {"machine": machine(), "fused_kernels": args.fused, "models": {}}
    if args.target:
        settings = [TARGETS[args.target]]
    else:
        settings = [
            Setting(
                model,
                hidden=tuple(args.mlp_hidden),
                batch=args.batch,
                steps=args.steps or (10 if args.quick else {"mlp": 30, "resnet50": 6}[model]),
                whole_fit=args.whole_fit,
            )
            for model in (["mlp"] if args.quick else args.models)
        ]
    if args.target or args.whole_fit:
        sizes = [math.prod(s) for s in _pruned_shapes(settings[0])]
        results["bandwidth"] = memory_bandwidth(threads, small_numel=sum(sizes))
    for setting in settings:
        if args.steps and args.target:
            setting = dataclasses.replace(setting, steps=args.steps)
        default = TARGET_CONFIGS if args.target else QUICK_CONFIGS if args.quick else [c[0] for c in CONFIGS]
        labels = ["dense"] + [c for c in (args.configs or default) if c != "dense"]
        rounds = 2 if args.quick else args.rounds
        peak = not (args.quick or args.no_peak)
        results["models"][setting.model] = run_model(setting, labels, rounds, peak, args.compile, threads)
    args.out = args.out or Path("runs/training_cost_compiled.json" if args.compile else "runs/training_cost.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print_table(results)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nwritten {args.out}; peak RSS of this process {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
