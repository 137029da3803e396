"""Pruning quality on real data through the app: every run is ``sapp-train``'s, composed by Hydra from ``conf/``
and ``recipes/`` plus overrides and trained by :func:`sapp_lightning.app.train.run` in this process (one thread), so
a recipe, a config change or a fix reaches the benchmark and the app alike.

A grid is a list of override lists; each finished run is one JSON line (``results.json`` plus the run's ``key``
and overrides) in ``--out``, and runs already there are skipped, so an interrupted or extended sweep continues
where it stopped::

    python bench/quality.py --part ctr --seeds 0 1 2 --blocks 10                 # Table 2's shape, 25 epochs
    python bench/quality.py --part images --models mlp cnn --epochs 2            # Table 1's shape
    python bench/quality.py --part ctr --methods sapp --set pruning.logit_l2=0,1e-4 --sparsities 0.9
    python bench/quality.py --part images --models cnn --methods sapp acdc --ablations zero_mode --blocks 16 \\
        --min-blocks 17
    python bench/quality.py --quick                                              # a few minutes: a smoke run
    sapp-results bench/results/ctr25.jsonl --paper criteo                        # print the tables

``--part ctr`` is ``recipe=movielens_ctr`` (the paper's Criteo model on MovieLens-100k, the Criteo plan,
masking), ``--part images`` is ``recipe=fashion_mnist_demo model=mlp|cnn`` (SGD, the ImageNet plan). A run of
method ``sapp`` at 90% and B = 10 with seed 1 is ``recipe=movielens_ctr pruning=sapp pruning.sparsity=0.9
pruning.block_size=10 seed=1 trainer.max_epochs=25`` plus :data:`BENCH` (no logger, checkpoints or heatmaps,
validation once at the end); the dense baseline is ``pruning=dense``. ``--set`` adds any override (a comma list
sweeps, as in Hydra's multirun; ``pruning.*`` overrides skip the dense runs) and ``--ablations`` adds SA++
variants by name (:data:`ABLATIONS`). Validation numbers are for choices, test numbers are reported beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: use this checkout's bench and sapp_lightning, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import append_row, load_done, quiet, run_pool  # noqa: E402
from sapp_lightning.app.results import load_runs, report, to_frame  # noqa: E402

METHODS = ("dense", "magnitude", "powerprop", "acdc", "gmp", "sapp", "torch_ao_gmp")
# torch.ao.pruning's gradual magnitude pruning (bench/torch_ao_gmp.py) through the app: no BlockPruning callback, the
# glue's own, on the layers BlockPruning would prune, with gmp's plan (the ramp from 10% to 85% of training).
TORCH_AO = [
    "pruning=dense",
    "pruning.algorithm=torch_ao_gmp",
    "+callbacks.torch_ao._target_=bench.torch_ao_gmp.TorchAOGradualPruning",
    "+callbacks.torch_ao.sparsity=${pruning.sparsity}",
    "+callbacks.torch_ao.block_size=${pruning.block_size}",
    "+callbacks.torch_ao.min_blocks=${pruning.min_blocks}",
]
MODELS = ("mlp", "cnn")
RESULTS = Path(__file__).resolve().parent / "results"  # committed: the raw runs behind docs/results.md
# Each part: its recipe, the length of the committed grids, the default grid, and its ACDC plan (for no_sparsify).
PARTS: dict[str, dict[str, Any]] = {
    "ctr": dict(recipe="movielens_ctr", epochs=25, blocks=[10, 20, 5], sparsities=[0.9, 0.95, 0.97, 0.98, 0.99],
                acdc_plan="criteo_acdc", setup="criteo"),
    "images": dict(recipe="fashion_mnist_demo", epochs=2, blocks=[16, 8, 32], sparsities=[0.7, 0.8, 0.9, 0.95],
                   acdc_plan="imagenet_acdc", setup="imagenet"),
}  # fmt: skip
# Benchmark speed, not results: no logger, checkpoints or heatmaps, one validation after the last epoch (the model
# the run ends with), no sanity check or model summary, one CPU. Stored with each run; a run made with other
# settings is not skipped but refused (bench.common.run_pool).
BENCH = [
    "logger=none",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.enable_progress_bar=false",
    "++trainer.check_val_every_n_epoch=${trainer.max_epochs}",
    "++trainer.num_sanity_val_steps=0",
    "++trainer.enable_model_summary=false",
    "~callbacks.mask_heatmaps",
    "~callbacks.checkpoint",
]
# SA++ variants as overrides ("{acdc_plan}": the part's ACDC plan). Module options (model.module.*) exist for the
# image models only.
ABLATIONS: dict[str, list[str]] = {
    "no_sparsify": ["pruning.plan={acdc_plan}"],  # SA++'s scores on ACDC's dense/sparse plan (App. D.1)
    "c2": ["pruning.schedule_exponent=2"],
    "c8": ["pruning.schedule_exponent=8"],
    "no_clip": ["pruning.attention_clipping=false"],
    "wide_clip": ["pruning.clip_bounds=[0.01,100]"],
    "no_reset": ["pruning.reset_optimizer=false"],
    "logit_l2_1e-4": ["pruning.logit_l2=1e-4"],
    "zero_mode": ["pruning.prune_mode=zero"],  # pruned blocks are zeroed and regrow from 0, as ACDC's
    "softmax_kept": ["pruning.softmax_over=kept"],
    "softmax_global": ["pruning.softmax_scope=global"],
    "score_magnitude": ["pruning.score=magnitude"],  # Fig. 2(a): SA++'s schedule, blocks ranked by norm
    "regrowth": ["pruning.sparsify_regrowth=true"],
    "logit_init_1e-2": ["pruning.logit_init_std=1e-2"],
    "logit_lr_x10": ["model.module.logit_lr_scale=10"],
    "logit_lr_x100": ["model.module.logit_lr_scale=100"],
    # Issue 20: the plan by budget ("{setup}": the part's paper setup; "{setup}:K" its plan with K cycles)
    "gradual": ["pruning.plan={setup}:0"],  # no cycle: one ramp from 10% (20% CTR) of training to 85% (80%)
    "cycles1": ["pruning.plan={setup}:1"],
    "cycles2": ["pruning.plan={setup}:2"],
    "cycles4": ["pruning.plan={setup}:4"],
    "auto": ["pruning.plan={setup}_auto"],
    "gradual_zero": ["pruning.plan={setup}:0", "pruning.prune_mode=zero"],
    "gradual_cubic": ["pruning.plan={setup}:0", "pruning.ramp=cubic"],
    "gradual_score_magnitude": ["pruning.plan={setup}:0", "pruning.score=magnitude"],
    "gradual_logit_lr_x3": ["pruning.plan={setup}:0", "model.module.logit_lr_scale=3"],
    "gradual_logit_lr_x10": ["pruning.plan={setup}:0", "model.module.logit_lr_scale=10"],
    "gradual_logit_lr_x30": ["pruning.plan={setup}:0", "model.module.logit_lr_scale=30"],
    "gradual_logit_lr_x100": ["pruning.plan={setup}:0", "model.module.logit_lr_scale=100"],
    # the same through the algorithm (any optimizer and schedule): A = N softmax(k L); SGD ~ lr x k^2, Adam ~ x k
    "gradual_logit_scale_3": ["pruning.plan={setup}:0", "pruning.logit_scale=3.16"],
    "gradual_logit_scale_10": ["pruning.plan={setup}:0", "pruning.logit_scale=10"],
    "gradual_logit_scale_30": ["pruning.plan={setup}:0", "pruning.logit_scale=30"],
    "gradual_norm": ["pruning.plan={setup}:0", "pruning.normalize_logit_grad=true"],
    "gradual_norm_scale_3": ["pruning.plan={setup}:0", "pruning.normalize_logit_grad=true", "pruning.logit_scale=3.16"],
    "cycles1_logit_scale_3": ["pruning.plan={setup}:1", "pruning.logit_scale=3.16"],
    "cycles2_logit_scale_3": ["pruning.plan={setup}:2", "pruning.logit_scale=3.16"],
    "gradual_logit_lr_x10_score_magnitude": [
        "pruning.plan={setup}:0",
        "model.module.logit_lr_scale=10",
        "pruning.score=magnitude",
    ],
}


# --- one run -----------------------------------------------------------------------------------------
def compose(overrides: list[str], output_dir: str | Path) -> Any:
    """The app's config for ``overrides``, as ``sapp-train`` would compose it (with Hydra's own keys resolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from sapp_lightning.app.configs import CONFIG_DIR  # importing it registers recipes/ as the recipe group

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[*overrides, f"output_dir={output_dir}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one run with ``sapp_lightning.app.train.run`` (one thread) and return its row: the job and results.json."""
    import torch

    from sapp_lightning.app.train import run

    quiet()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="sapp-bench-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        results = run(compose([*job["overrides"], *job["bench"]], tmp))  # model.pt etc. are not kept
    if results is None:
        raise RuntimeError(f"{job['key']} was preempted")
    return {**job, **results}


def settings(job: dict[str, Any]) -> str:
    """What a run trains with: its composed config, resolved, without Hydra's own node, numbers compared by value
    (an override's ``0`` is a recipe's ``0.0``), as sorted JSON."""
    import json

    from omegaconf import OmegaConf, open_dict

    cfg = compose([*job["overrides"], *job["bench"]], ".")
    with open_dict(cfg):
        del cfg["hydra"]  # the ${hydra:...} values elsewhere come from HydraConfig, which compose() set

    def by_value(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: by_value(v) for k, v in node.items()}
        if isinstance(node, list):
            return [by_value(v) for v in node]
        return float(node) if isinstance(node, int) and not isinstance(node, bool) else node

    return json.dumps(by_value(OmegaConf.to_container(cfg, resolve=True)), sort_keys=True, default=str)


def reuse(jobs: list[dict[str, Any]], sources: list[Path], out: Path) -> int:
    """Append to ``out``, under each job's key, a finished run of ``sources`` whose overrides compose to exactly
    the job's config (e.g. ``pruning.logit_l2=0`` in a sweep and a recipe that now sets it to 0): the same code
    path and settings, so training it again would repeat it. The row keeps ``reused_from``. Returns the count."""
    done = load_done(out)
    todo = [job for job in jobs if job["key"] not in done]
    found = {}
    for path in sources:
        for row in load_done(path).values():
            if "overrides" in row:  # older lines were not made by the app: never the same code path
                found.setdefault(settings(row), (path, row))
    count = 0
    for job in todo:
        if (match := found.get(settings(job))) is not None:
            path, row = match
            append_row(out, {**row, **job, "reused_from": f"{path.name}: {row['key']}"})
            count += 1
    return count


# --- the grids ---------------------------------------------------------------------------------------
def make_job(part: str, overrides: list[str], variant: list[str]) -> dict[str, Any]:
    """A run: its key (the overrides, which say everything that changes results), the benchmark's speed settings,
    and ``variant``, the overrides beyond the method / sparsity / block / seed / length of the grid."""
    return {"key": " ".join(overrides), "part": part, "overrides": overrides, "bench": list(BENCH),
            "variant": " ".join(variant)}  # fmt: skip


def sweep(overrides: list[str]) -> list[list[str]]:
    """Every combination of Hydra overrides, where ``key=a,b`` sweeps (Hydra's multirun grammar).

    Example:
        >>> sweep(["pruning.logit_l2=0,1e-4", "pruning.score=magnitude"])
        [['pruning.logit_l2=0', 'pruning.score=magnitude'], ['pruning.logit_l2=0.0001', 'pruning.score=magnitude']]
        >>> sweep([])
        [[]]
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    choices = []
    for text in overrides:
        parsed = parser.parse_override(text)
        if parsed.is_sweep_override():
            choices.append([f"{parsed.get_key_element()}={v}" for v in parsed.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(combo) for combo in itertools.product(*choices)]


def ablation_overrides(name: str, part: str) -> list[str]:
    """The overrides of ablation ``name`` on ``part``; without sparsification SA++ follows the part's ACDC plan.

    Example:
        >>> ablation_overrides("no_sparsify", "images")
        ['pruning.plan=imagenet_acdc']
    """
    return [o.format(acdc_plan=PARTS[part]["acdc_plan"], setup=PARTS[part]["setup"]) for o in ABLATIONS[name]]


def min_blocks_for(spec: list[str] | None, block: int) -> list[str]:
    """``--min-blocks 100`` for every block size or ``--min-blocks 8=100 16=17 32=16`` per block size."""
    for item in spec or []:
        size, _, value = item.rpartition("=")
        if not size or int(size) == block:
            return [f"pruning.min_blocks={int(value)}"]
    return []


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Dense once per seed (and model), then every block x seed x sparsity x method x variant, as overrides.

    The variants of a pruned run are the combinations of ``--set`` (``pruning.*`` overrides only for pruned runs)
    and, for SA++, each of ``--ablations``; without ``--set`` sweeps a method's plain run comes first.
    """
    part = PARTS[args.part]
    epochs = args.epochs or part["epochs"]
    tail = [f"trainer.max_epochs={epochs}"] + (
        [f"++trainer.limit_train_batches={args.limit_train_batches}"] if args.limit_train_batches else []
    )
    shared = [o for o in args.set if not o.startswith("pruning.")]  # these change the dense model too
    models = args.models if args.part == "images" else [None]
    jobs = []
    for model in models:
        base = [f"recipe={part['recipe']}"] + ([f"model={model}"] if model else [])
        if "dense" in args.methods:
            for variant in sweep(shared):
                for seed in args.seeds:
                    jobs.append(make_job(args.part, [*base, "pruning=dense", *variant, f"seed={seed}", *tail], variant))
        for block in args.blocks or part["blocks"]:
            for seed in args.seeds:
                for sparsity in args.sparsities or part["sparsities"]:
                    cell = [f"pruning.sparsity={sparsity}", f"pruning.block_size={block}"]
                    cell += min_blocks_for(args.min_blocks, block)
                    for method in (m for m in METHODS if m in args.methods and m != "dense"):
                        variants = sweep(args.set)
                        if method == "sapp":
                            variants += [v + ablation_overrides(a, args.part) for a in args.ablations for v in variants]
                        for variant in variants:
                            algorithm = TORCH_AO if method == "torch_ao_gmp" else [f"pruning={method}"]
                            overrides = [*base, *algorithm, *cell, *variant, f"seed={seed}", *tail]
                            jobs.append(make_job(args.part, overrides, variant))
    return jobs


def quick_jobs() -> list[dict[str, Any]]:
    """Short runs (2 epochs of 10 batches) through every path: CTR dense, SA++, ACDC and SA++ without its
    sparsification phases, the MLP with SA++ and the CNN with ACDC. Too short to compare methods."""
    short = "--epochs 2 --limit-train-batches 10 --seeds 0 --sparsities 0.9"
    jobs = grid(parse_args(f"--part ctr --blocks 10 --methods dense sapp acdc --ablations no_sparsify {short}".split()))
    jobs += grid(parse_args(f"--part images --models mlp --blocks 16 --methods sapp {short}".split()))
    jobs += grid(parse_args(f"--part images --models cnn --blocks 8 --methods acdc {short}".split()))
    return jobs


# --- tables ------------------------------------------------------------------------------------------
def variant_name(variant: str, part: str) -> str:
    """An ablation's name for a run's extra overrides, where one matches (values compared as YAML, so that
    ``pruning.schedule_exponent=2.0`` of an older line is ``c2``); else the overrides themselves.

    Example:
        >>> variant_name("pruning.schedule_exponent=2.0", "ctr"), variant_name("pruning.logit_l2=0.0001", "ctr")
        ('c2', 'logit_l2_1e-4')
        >>> variant_name("pruning.logit_l2=0", "ctr")
        'pruning.logit_l2=0'
    """
    import yaml

    def value(text: str) -> Any:
        try:
            return float(text)  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            return yaml.safe_load(text)

    def parsed(overrides: list[str]) -> dict[str, Any]:
        return {k: value(v) for k, _, v in (o.partition("=") for o in overrides)}

    mine = parsed(variant.split())
    for name in ABLATIONS:
        if mine and parsed(ablation_overrides(name, part)) == mine:
            return name
    return variant


def tables(rows: Any) -> str:
    """The tables of a set of runs (a frame of :func:`sapp_lightning.app.results.load_runs`, or results.json
    dicts), as ``sapp-results`` prints them, each part on its own with its paper numbers in brackets (Table 1 beside
    the image models, Table 2 beside CTR) and older lines' variants by their ablation's name, as docs/results.md
    shows them."""
    frame = rows if hasattr(rows, "columns") else to_frame(rows)
    old = [not isinstance(r.get("overrides"), list) for r in frame["record"]]  # lines written before the app
    names = [variant_name(v, "ctr" if t == "ctr" else "images") if o and v else v
             for v, t, o in zip(frame["variant"], frame["task"], old)]  # fmt: skip
    frame = frame.assign(variant=names)
    parts = [frame[frame["task"] == task] for task in sorted(set(frame["task"]))]
    return "\n\n".join(report(part, paper=["imagenet", "criteo"]) for part in parts) or "(no runs)"


def print_tables(paths: list[Path]) -> None:
    print(tables(load_runs(paths)))


# --- command line ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=sorted(PARTS), default="ctr", help="ctr: recipe=movielens_ctr; images: "
                   "recipe=fashion_mnist_demo with each of --models")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a few short runs of every part (a few minutes)")
    p.add_argument("--epochs", type=int, help="trainer.max_epochs (default: 25 for ctr, the recipe's; 2 for images)")
    p.add_argument("--limit-train-batches", type=int, help="trainer.limit_train_batches")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sparsities", type=float, nargs="+", help="default: the paper's for the part")
    p.add_argument("--blocks", type=int, nargs="+", help="default: 10 20 5 (ctr), 16 8 32 (images)")
    p.add_argument("--methods", nargs="*", default=[m for m in METHODS if m != "torch_ao_gmp"], choices=METHODS,
                   help="dense is pruning=dense; torch_ao_gmp: torch.ao.pruning's (bench/torch_ao_gmp.py)")  # fmt: skip
    p.add_argument("--models", nargs="+", default=["mlp"], choices=MODELS, help="images: model=...")
    p.add_argument("--min-blocks", nargs="+", metavar="[B=]N", help="pruning.min_blocks, for every block size "
                   "or per block size (8=100 16=17); default: the recipe's (100)")  # fmt: skip
    p.add_argument("--set", nargs="+", default=[], metavar="OVERRIDE", help="more Hydra overrides; key=a,b sweeps")
    p.add_argument("--ablations", nargs="+", default=[], choices=list(ABLATIONS), help="SA++ variants by name")
    p.add_argument("--reuse", type=Path, nargs="+", default=[], help="JSON lines files whose runs with exactly a "
                   "job's composed config stand in for it (recorded as reused_from)")  # fmt: skip
    p.add_argument("--processes", type=int, default=2, help="runs in parallel, one thread each")
    p.add_argument("--out", type=Path, help="JSON lines file (default bench/results/<part>.jsonl)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        out = args.out or Path("runs/quality/quick.jsonl")
        jobs = quick_jobs()
    else:
        out = args.out or RESULTS / f"{args.part}.jsonl"
        jobs = grid(args)
    if args.reuse:
        print(f"{reuse(jobs, args.reuse, out)} runs reused from {', '.join(map(str, args.reuse))}", flush=True)
    run_pool(jobs, run_job, out, args.processes)
    print_tables([out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
