"""Training cost of the callback: time per optimizer step in each phase relative to the dense step of the same
model in the same process, persistent memory the callback adds, and peak memory.

    python bench/training_cost.py                 # MLP on Fashion-MNIST and ResNet50 (CPU, batch 4 at 64x64)
    python bench/training_cost.py --quick         # < 2 minutes: the MLP, fewer repeats, no peak-memory runs
    python bench/training_cost.py --models mlp --rounds 5
    python bench/training_cost.py --compile       # the same with torch.compile(model) (inductor) for every run

Each configuration is a Lightning fit of ``2 x steps`` optimizer steps with a one-phase plan (``[("sparse", 1.0)]``
and so on) that forces the phase; only the second epoch is timed (the first warms up and lets Lightning's
``ModelPruning`` prune at its epoch end). A step is timed from ``on_train_batch_start`` of a callback placed
before ``BlockPruning`` to ``on_train_batch_end`` of one placed after it, so the callback's own hooks are inside.
Configurations are interleaved round by round; the ratio is taken per round against that round's dense run, and
the median over rounds is reported. One thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import fashion_mnist, machine, quiet, trainer_kwargs  # noqa: E402

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


def _clock_callbacks(clock: _Clock):
    import pytorch_lightning as pl

    class Start(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.t0 = time.perf_counter()

    class End(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch >= 1:  # the first epoch is warm-up
                clock.times.append(time.perf_counter() - clock.t0)

    return Start(), End()


def _random_images(n: int, shape: tuple[int, ...], classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(
        torch.randn(n, *shape, generator=g), torch.randint(classes, (n,), generator=g)
    )
    return data


def build(model_name: str, steps: int):
    """The LightningModule, train loader, block size and min_blocks of a benchmark model."""
    from sapp_lightning.models import MLP, ImageClassifier, resnet50

    if model_name == "mlp":
        dm = fashion_mnist(batch_size=256)
        net = MLP(dm.input_shape, dm.num_classes)
        loader = dm.train_dataloader()
        return ImageClassifier(net, dm.num_classes, lr=0.05), loader, 16, 100
    net = resnet50(num_classes=10)
    data = _random_images(4 * steps, (3, 64, 64), 10)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    return ImageClassifier(net, 10, lr=0.05), loader, 16, 100


def make_callback(algorithm: str, phase: str | None, block: int, min_blocks: int):
    from pytorch_lightning.callbacks import ModelPruning

    from sapp_lightning import BlockPruning

    if algorithm == "dense":
        return None
    if algorithm == "modelpruning":
        return ModelPruning("l1_unstructured", amount=SPARSITY, use_lottery_ticket_hypothesis=False, verbose=0)
    return BlockPruning(algorithm, SPARSITY, block, min_blocks=min_blocks, plan=[(phase, 1.0)])


def time_config(
    model_name: str, algorithm: str, phase: str | None, steps: int, seed: int, compiled: bool = False
) -> list[float]:
    """Step times (s) of the second epoch of a ``2 x steps`` fit (of ``torch.compile(module)`` if ``compiled``;
    compilation happens in the first, untimed epoch)."""
    import pytorch_lightning as pl

    pl.seed_everything(seed, verbose=False)
    module, loader, block, min_blocks = build(model_name, steps)
    clock = _Clock()
    start, end = _clock_callbacks(clock)
    pruning = make_callback(algorithm, phase, block, min_blocks)
    callbacks = [start] + ([pruning] if pruning else []) + [end]
    kwargs = trainer_kwargs() | {"limit_train_batches": steps, "max_epochs": 2}
    pl.Trainer(callbacks=callbacks, **kwargs).fit(torch.compile(module) if compiled else module, loader)
    return clock.times


def state_bytes(model_name: str, algorithm: str, phase: str | None) -> dict[str, Any]:
    """Bytes of what the callback keeps during training (masks, logits, the logits' optimizer state) against the
    bytes of the model's weights, measured on a model after a few steps in the phase."""
    import pytorch_lightning as pl

    module, loader, block, min_blocks = build(model_name, 4)
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


def peak_rss_mib(model_name: str, label: str, steps: int, compiled: bool = False) -> float:
    """Peak resident memory of a fresh process that runs one configuration.

    Read from ``VmHWM`` in ``/proc/self/status``: Linux carries ``ru_maxrss`` across ``fork`` + ``execve``, so
    the child's ``ru_maxrss`` would report this (large) parent's peak instead of its own.
    """
    root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys, torch; sys.path.insert(0, {root!r}); torch.set_num_threads(1);"
        "from bench.common import quiet; quiet(); from bench.training_cost import CONFIGS, time_config;"
        f"cfg = {{c[0]: c for c in CONFIGS}}[{label!r}];"
        f"time_config({model_name!r}, cfg[1], cfg[2], {steps}, 0, {compiled});"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def run_model(
    model_name: str, labels: list[str], rounds: int, steps: int, peak: bool, compiled: bool = False
) -> dict[str, Any]:
    configs = [c for c in CONFIGS if c[0] in labels]
    per_round: dict[str, list[float]] = {c[0]: [] for c in configs}
    medians: dict[str, list[float]] = {c[0]: [] for c in configs}
    for r in range(rounds):
        for label, algorithm, phase in configs:
            times = time_config(model_name, algorithm, phase, steps, seed=r, compiled=compiled)
            medians[label].append(statistics.median(times))
        for label in per_round:
            per_round[label].append(medians[label][-1] / medians["dense"][-1])
        line = " ".join(f"{k}={v[-1]:.3f}" for k, v in per_round.items())
        print(f"[{model_name} round {r + 1}/{rounds}] ratio to dense: {line}", flush=True)
    result: dict[str, Any] = {"steps_timed_per_round": steps, "rounds": rounds, "compile": compiled, "configs": {}}
    for label, algorithm, phase in configs:
        result["configs"][label] = {
            "ms_per_step_median": 1e3 * statistics.median(medians[label]),
            "ratio_median": statistics.median(per_round[label]),
            "ratio_min": min(per_round[label]),
            "ratio_max": max(per_round[label]),
        }
        if algorithm in ("sapp", "acdc", "magnitude", "powerprop") and phase in ("sparse", "dense"):
            result["configs"][label]["memory"] = state_bytes(model_name, algorithm, phase)
        if peak:
            result["configs"][label]["peak_rss_mib"] = peak_rss_mib(model_name, label, steps, compiled)
            print(f"[{model_name}] peak RSS {label}: {result['configs'][label]['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def target(label: str) -> float | None:
    """The brief's targets: 1.15x in SA++'s attention phases (all of SA++'s phases multiply by the attention),
    1.05x in every phase of the other algorithms."""
    if label.startswith("sapp"):  # SA++ multiplies by its attention in every phase
        return 1.15
    if label in ("dense",) or label.startswith("ModelPruning"):
        return None
    return 1.05


def print_table(results: dict[str, Any]) -> None:
    for model_name, res in results["models"].items():
        compiled = " (torch.compile)" if res.get("compile") else ""
        print(f"\n{model_name}{compiled}: {res['rounds']} rounds x {res['steps_timed_per_round']} timed steps")
        print(
            "| configuration | ms/step | ratio to dense (median [min, max]) | target | met | callback state / weights |"
        )
        print("|---|---|---|---|---|---|")
        for label, c in res["configs"].items():
            t = target(label)
            met = "-" if t is None else ("yes" if c["ratio_median"] <= t else "**no**")
            mem = c.get("memory")
            mem_text = (
                f"{mem['extra_bytes']:,} B / {mem['weight_bytes']:,} B = {mem['extra_fraction']:.3%}" if mem else ""
            )
            print(
                f"| {label} | {c['ms_per_step_median']:.1f} | {c['ratio_median']:.3f} [{c['ratio_min']:.3f}, "
                f"{c['ratio_max']:.3f}] | {t or '-'} | {met} | {mem_text} |"
            )
        peaks = {k: c["peak_rss_mib"] for k, c in res["configs"].items() if "peak_rss_mib" in c}
        if peaks:
            print("peak RSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs="+", default=["mlp", "resnet50"], choices=["mlp", "resnet50"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, help="timed steps per fit (default: 30 MLP, 6 ResNet50)")
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocess runs")
    p.add_argument("--compile", action="store_true", help="time torch.compile(model) (inductor) in every configuration")
    p.add_argument("--out", type=Path, help="default: runs/training_cost.json (runs/training_cost_compiled.json)")
    args = p.parse_args(argv)
    quiet()
    torch.set_num_threads(1)
    results: dict[str, Any] = {"machine": machine(), "models": {}}
    models = ["mlp"] if args.quick else args.models
    for model_name in models:
        labels = QUICK_CONFIGS if args.quick else [c[0] for c in CONFIGS]
        rounds = 2 if args.quick else args.rounds
        steps = args.steps or (10 if args.quick else {"mlp": 30, "resnet50": 6}[model_name])
        peak = not (args.quick or args.no_peak)
        results["models"][model_name] = run_model(model_name, labels, rounds, steps, peak, args.compile)
    args.out = args.out or Path("runs/training_cost_compiled.json" if args.compile else "runs/training_cost.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print_table(results)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nwritten {args.out}; peak RSS of this process {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
