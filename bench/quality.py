"""Pruning quality on real data, in the shape of the paper's Tables 1 and 2, plus SA++'s ablations.

One command per part; every finished run is one JSON line in ``--out`` and runs already there are skipped,
so an interrupted or extended sweep continues where it stopped::

    python bench/quality.py --part ctr --epochs 3 --seeds 0 1 2 --blocks 10          # Table 2 shape
    python bench/quality.py --part images --model mlp --epochs 2 --seeds 0 1 2      # Table 1 shape
    python bench/quality.py --part ablations --epochs 3 --seeds 0 1 2               # no sparsification, c=2/4/8
    python bench/quality.py --part ablations --ablations-on images --models cnn --ablations logit_lr_x10
    python bench/quality.py --quick                                                 # < 2 minutes: a smoke run
    python bench/quality.py --table bench/results/ctr.jsonl                         # print the tables

CTR: the paper's Criteo architecture (CriteoPaperNet: 10-dim embeddings, 3 x 400) on MovieLens-100k as CTR,
only ``net.mlp.0`` pruned, CTRModule (Adam 2e-2 -> 3e-4), the Criteo phase plan, masking, batch 1024.
Images: Fashion-MNIST, the 784-512-512-10 MLP or SmallCNN (conv layers pruned through the paper's
``(kh*kw*cin) x cout`` layout), ImageClassifier (SGD 0.05, momentum 0.9, cosine), the ImageNet phase plan.
Validation numbers are for choices, test numbers are reported beside them.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import fashion_mnist, load_done, movielens, quiet, run_pool, trainer_kwargs  # noqa: E402

METHODS = ("magnitude", "powerprop", "acdc", "sapp")
MODELS = ("mlp", "cnn", "cnn_nobn")  # cnn_nobn: SmallCNN without BatchNorm
CTR_INCLUDE = [r"^net\.mlp\.0$"]
IMAGE_LR = 0.05
RESULTS = Path(__file__).resolve().parent / "results"  # committed: the raw runs behind docs/results.md


# --- one run -----------------------------------------------------------------------------------------
def split_options(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A job's options for ``BlockPruning`` and those for the LightningModule (``MODULE_OPTIONS``)."""
    options = job.get("options") or {}
    return (
        {k: v for k, v in options.items() if k not in MODULE_OPTIONS},
        {k: v for k, v in options.items() if k in MODULE_OPTIONS},
    )


def make_pruning(job: dict[str, Any]):
    """The BlockPruning of a job, or ``None`` for the dense model."""
    from sapp_lightning import BlockPruning

    if job["method"] == "dense":
        return None
    options, _ = split_options(job)
    if job["part"] == "ctr":
        return BlockPruning(
            job["method"], job["sparsity"], job["block"], min_blocks=0, include=CTR_INCLUDE,
            plan=options.pop("plan", "criteo"), prune_mode=options.pop("prune_mode", "mask"), **options,
        )  # fmt: skip
    return BlockPruning(
        job["method"], job["sparsity"], job["block"], min_blocks=job["min_blocks"],
        plan=options.pop("plan", "imagenet"), **options,
    )  # fmt: skip


def build_module(job: dict[str, Any]):
    """The LightningModule and data module of a job (the data is loaded once per process)."""
    from sapp_lightning.models import MLP, CriteoPaperNet, CTRModule, ImageClassifier, SmallCNN

    _, module_options = split_options(job)
    if job["part"] == "ctr":
        if module_options:
            raise ValueError(f"the CTR module takes none of {sorted(module_options)}; run these ablations on images")
        dm = movielens()
        return CTRModule(CriteoPaperNet(num_dense=dm.num_dense, cardinalities=list(dm.cardinalities))), dm
    dm = fashion_mnist()
    if job["model"] == "mlp":
        net = MLP(dm.input_shape, dm.num_classes)
    else:  # "cnn", or "cnn_nobn": the same without BatchNorm
        net = SmallCNN(dm.input_shape, dm.num_classes, batch_norm=job["model"] == "cnn")
    return ImageClassifier(net, dm.num_classes, lr=IMAGE_LR, **module_options), dm


@torch.no_grad()
def evaluate(module, dm, split: str, part: str) -> dict[str, float]:
    """Mean BCE and AUROC (CTR) or accuracy and cross-entropy (images) on a whole split, in eval mode."""
    module.eval()
    losses, correct, count = [], 0, 0
    logits_all, labels_all = [], []
    for batch in dm._loader(split, shuffle=False):
        if part == "ctr":
            dense, cats, label = batch
            logits = module(dense, cats)
            losses.append(F.binary_cross_entropy_with_logits(logits, label, reduction="sum").item())
            logits_all.append(logits)
            labels_all.append(label)
        else:
            x, y = batch
            logits = module(x)
            losses.append(F.cross_entropy(logits, y, reduction="sum").item())
            correct += int((logits.argmax(1) == y).sum())
        count += len(batch[-1])
    out = {f"{split}_loss": math.fsum(losses) / count}
    if part == "ctr":
        from torchmetrics.functional.classification import binary_auroc

        out[f"{split}_auroc"] = float(binary_auroc(torch.cat(logits_all), torch.cat(labels_all).long()))
    else:
        out[f"{split}_acc"] = 100.0 * correct / count
    return out


def weight_sparsity_all(module) -> float:
    """Zero weights over all Linear and Conv2d weights of the network (the paper's "real sparsity")."""
    zero = total = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            zero += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zero / total


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration in this process (one thread) and return its row."""
    quiet()
    torch.set_num_threads(1)
    pl.seed_everything(job["seed"], verbose=False)
    module, dm = build_module(job)
    pruning = make_pruning(job)
    attention: dict[str, list[float]] = {}
    callbacks = [pruning, AttentionRange(pruning, attention)] if pruning else []
    kwargs = trainer_kwargs() | {"limit_train_batches": job.get("limit_train_batches") or 1.0}
    trainer = pl.Trainer(max_epochs=job["epochs"], callbacks=callbacks, **kwargs)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    seconds = time.perf_counter() - start
    row = dict(job, seconds=seconds, steps=trainer.global_step)
    row |= evaluate(module, dm, "val", job["part"]) | evaluate(module, dm, "test", job["part"])
    row["real_sparsity"] = weight_sparsity_all(module.net)
    if pruning is not None:
        report = pruning.report()
        row["achieved_sparsity"] = report.block_sparsity
        row["pruned_layers"] = {layer.name: [layer.zero_blocks, layer.num_blocks] for layer in report.layers}
    if attention:
        row["attention_range"] = attention
    return row


class AttentionRange(pl.Callback):
    """SA++ diagnostic: per pruned layer, the smallest and largest attention ``A = N softmax(L)`` over the kept
    blocks when training ends (before the commit folds it into the weights). A range close to ``[1, 1]`` means
    the logits barely moved, so the ranking rests on small differences."""

    def __init__(self, pruning, out: dict[str, list[float]]) -> None:
        self.pruning, self.out = pruning, out

    def on_train_end(self, trainer, pl_module) -> None:
        for layer in self.pruning.sparsifier.layer_states():
            if layer.importance_name == "attention":
                kept = layer.importance[layer.mask]
                self.out[layer.name] = [round(float(kept.min()), 4), round(float(kept.max()), 4)]


# --- the grids ---------------------------------------------------------------------------------------
def job_key(job: dict[str, Any]) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted((job.get("options") or {}).items()))
    model = job.get("model", "ctr")
    limit = f"/limit{job['limit_train_batches']}" if job.get("limit_train_batches") else ""
    min_blocks = f"/mb{job['min_blocks']}" if job.get("min_blocks") else ""  # which layers are pruned
    return (
        f"{job['part']}/{model}/{job['method']}/s{job['sparsity']}/b{job['block']}{min_blocks}/seed{job['seed']}"
        f"/e{job['epochs']}{limit}" + (f"/{opts}" if opts else "")
    )


def make_job(part: str, method: str, sparsity: float, block: int, seed: int, epochs: int, **extra) -> dict[str, Any]:
    job = dict(part=part, method=method, sparsity=sparsity, block=block, seed=seed, epochs=epochs, **extra)
    job["key"] = job_key(job)
    return job


def ctr_jobs(args) -> list[dict[str, Any]]:
    """Dense once per seed, then every method x sparsity x block x seed (blocks in the order given)."""
    jobs = [make_job("ctr", "dense", 0.0, 0, s, args.epochs) for s in args.seeds]
    for block in args.blocks or [10, 20, 5]:
        for seed in args.seeds:
            for sparsity in args.sparsities or [0.9, 0.95, 0.97, 0.98, 0.99]:
                for method in args.methods:
                    jobs.append(make_job("ctr", method, sparsity, block, seed, args.epochs))
    return jobs


def image_jobs(args) -> list[dict[str, Any]]:
    jobs = []
    for model in args.models:
        jobs += [make_job("images", "dense", 0.0, 0, s, args.epochs, model=model, min_blocks=0) for s in args.seeds]
        for block in args.blocks or [16, 8, 32]:
            for seed in args.seeds:
                for sparsity in args.sparsities or [0.7, 0.8, 0.9, 0.95]:
                    for method in args.methods:
                        jobs.append(
                            make_job("images", method, sparsity, block, seed, args.epochs, model=model,
                                     min_blocks=args.min_blocks)
                        )  # fmt: skip
    return jobs


ABLATIONS = {
    "no_sparsify": {"plan": "criteo_acdc"},  # SA++ scores with ACDC's dense/sparse plan (App. D.1)
    "c2": {"schedule_exponent": 2.0},
    "c8": {"schedule_exponent": 8.0},
    "no_clip": {"attention_clipping": False},
    "no_reset": {"reset_optimizer": False},
    "logit_l2_1e-4": {"logit_l2": 1e-4},
    "zero_mode": {"prune_mode": "zero"},  # pruned blocks are zeroed and regrow from 0, as ACDC's
    "logit_lr_x10": {"logit_lr_scale": 10.0},  # images only: ImageClassifier's logits at 10x the LR
    "logit_lr_x100": {"logit_lr_scale": 100.0},
}
MODULE_OPTIONS = ("logit_lr_scale",)  # options of the LightningModule, not of BlockPruning


def ablation_options(name: str, part: str) -> dict[str, Any]:
    """The options of ablation ``name`` on ``part``: without sparsification, SA++ follows the ACDC plan of the
    part's own setup (``imagenet_acdc`` for images)."""
    options = dict(ABLATIONS[name])
    if part == "images" and options.get("plan") == "criteo_acdc":
        options["plan"] = "imagenet_acdc"
    return options


def ablation_jobs(args) -> list[dict[str, Any]]:
    """SA++ variants on CTR, or with ``--ablations-on images`` on each of ``--models``."""
    images = args.ablations_on == "images"
    part = "images" if images else "ctr"
    extra = [dict(model=m, min_blocks=args.min_blocks) for m in args.models] if images else [{}]
    jobs = []
    for name in args.ablations:
        for fields in extra:
            for block in args.blocks or [16 if images else 10]:
                for seed in args.seeds:
                    for sparsity in args.sparsities or ([0.9, 0.95] if images else [0.9, 0.98]):
                        options = ablation_options(name, part)
                        jobs.append(
                            make_job(part, "sapp", sparsity, block, seed, args.epochs, options=options, **fields)
                        )
    return jobs


# --- tables ------------------------------------------------------------------------------------------
def mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f} (n={len(values)})"


def paper_shaped_table(
    rows: list[dict[str, Any]], metric: str, digits: int, model: str | None = None, with_paper: bool = True
) -> str:
    """Rows: sparsity x method; columns: block sizes; cells: mean ± std over seeds and the achieved sparsity.
    The paper's value of the cell beside each (``-`` where it has none, or with ``with_paper=False``)."""
    from sapp_lightning.paper import paper_value

    rows = [r for r in rows if not r.get("options") and (model is None or r.get("model", "ctr") == model)]
    blocks = sorted({r["block"] for r in rows if r["method"] != "dense"})
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["sparsity"], r["method"], r["block"])].append(r)
    dense = [r[metric] for r in rows if r["method"] == "dense"]
    table = "imagenet" if rows and rows[0]["part"] == "images" else "criteo"
    head = "| sparsity | method | " + " | ".join(f"B={b}: {metric} (achieved sparsity) | paper" for b in blocks) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(blocks))]
    lines.append(f"| 0 | dense | {mean_std(dense, digits)} |" + " |" * (2 * len(blocks) - 1))
    for sparsity in sorted({r["sparsity"] for r in rows if r["method"] != "dense"}):
        for method in METHODS:
            parts = []
            for b in blocks:
                runs = cells.get((sparsity, method, b), [])
                achieved = [r["achieved_sparsity"] for r in runs]
                ach = f" ({statistics.mean(achieved):.1%})" if achieved else ""
                paper = paper_value(table, method, b, sparsity) if with_paper else None
                parts += [mean_std([r[metric] for r in runs], digits) + ach, "-" if paper is None else f"{paper}"]
            if any(p != "-" for p in parts[::2]):
                lines.append(f"| {sparsity:.0%} | {method} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def ablation_table(rows: list[dict[str, Any]], metric: str, digits: int) -> str:
    """SA++ variants against the default SA++ and ACDC of the same cells (rows of one part and model)."""
    variants: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["method"] not in ("sapp", "acdc"):
            continue
        name = (
            r["method"]
            if not r.get("options")
            else next((n for n in ABLATIONS if ablation_options(n, r["part"]) == r["options"]), str(r["options"]))
        )
        variants[(r["sparsity"], r["block"], name)].append(r[metric])
    names = ["sapp", *ABLATIONS, "acdc"]
    present = [n for n in names if any(k[2] == n for k in variants)]
    keys = sorted({(k[0], k[1]) for k in variants if k[2] != "sapp" and k[2] != "acdc"})
    lines = ["| sparsity | block | " + " | ".join(present) + " |", "|" + "---|" * (2 + len(present))]
    for sparsity, block in keys:
        vals = [mean_std(variants.get((sparsity, block, n), []), digits) for n in present]
        lines.append(f"| {sparsity:.0%} | {block} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def print_tables(paths: list[Path]) -> None:
    rows = [r for p in paths for r in load_done(p).values()]
    ctr = [r for r in rows if r["part"] == "ctr"]
    if ctr:
        print("\nCTR (MovieLens-100k), validation BCE, lower is better\n" + paper_shaped_table(ctr, "val_loss", 4))
        print("\nCTR test BCE\n" + paper_shaped_table(ctr, "test_loss", 4))
        # the paper reports no AUROC; BCE punishes overconfident (overfit) predictions, AUROC only the ranking
        print("\nCTR validation AUROC, higher is better\n" + paper_shaped_table(ctr, "val_auroc", 4, with_paper=False))
        if any(r.get("options") for r in ctr):
            print("\nSA++ ablations, validation BCE\n" + ablation_table(ctr, "val_loss", 4))
            print("\nSA++ ablations, validation AUROC\n" + ablation_table(ctr, "val_auroc", 4))
    for model in MODELS:
        img = [r for r in rows if r["part"] == "images" and r.get("model") == model]
        dense = [r for r in img if r["method"] == "dense"]
        for layers, pruned in sorted(group_by_pruned_layers(img).items()):
            rules = ", ".join(
                f"B={b}: min_blocks={m}" for b, m in sorted({(r["block"], r["min_blocks"]) for r in pruned})
            )
            name = f"Fashion-MNIST {model}, pruned {', '.join(layers)} ({rules})"
            for metric, split in (("val_acc", "validation"), ("test_acc", "test")):
                print(f"\n{name}, {split} top-1 %\n" + paper_shaped_table(dense + pruned, metric, 2, model))
            if any(r.get("options") for r in pruned):
                print(f"\nSA++ ablations, {name}, validation top-1 %\n" + ablation_table(pruned, "val_acc", 2))


def group_by_pruned_layers(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """The pruned runs by the layers they pruned, so that a table compares only runs that pruned the same layers
    (``min_blocks`` selects different layers at different block sizes)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["method"] != "dense":
            groups[tuple(sorted(r.get("pruned_layers") or ()))].append(r)
    return groups


# --- command line ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["ctr", "images", "ablations"], default="ctr")
    p.add_argument("--quick", action="store_true", help="a few short runs of every part (< 2 minutes)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sparsities", type=float, nargs="+", help="default: the paper's for the part")
    p.add_argument("--blocks", type=int, nargs="+", help="default: 10 20 5 (CTR), 16 8 32 (images), 10/16 (ablations)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--models", nargs="+", default=["mlp"], choices=MODELS)
    p.add_argument("--min-blocks", type=int, default=100, help="images: layers with fewer blocks stay dense")
    p.add_argument("--ablations", nargs="+", default=["no_sparsify", "c2", "c8"], choices=list(ABLATIONS))
    p.add_argument("--ablations-on", choices=["ctr", "images"], default="ctr", help="images: on each of --models")
    p.add_argument("--processes", type=int, default=2, help="runs in parallel, one thread each")
    p.add_argument("--out", type=Path, help="JSON lines file (default bench/results/<part>.jsonl)")
    p.add_argument("--table", type=Path, nargs="*", help="only print the tables of these files")
    return p.parse_args(argv)


def quick_jobs() -> list[dict[str, Any]]:
    """Short runs (2 epochs of 10 batches) through every path: CTR dense, SA++, ACDC and SA++ without its
    sparsification phases, the MLP with SA++ and the CNN with ACDC. Too short to compare methods."""
    short = dict(limit_train_batches=10)
    jobs = [make_job("ctr", m, 0.9, 10, 0, 2, **short) for m in ("dense", "sapp", "acdc")]
    jobs += [make_job("ctr", "sapp", 0.9, 10, 0, 2, options=dict(ABLATIONS["no_sparsify"]), **short)]
    jobs += [make_job("images", "sapp", 0.9, 16, 0, 2, model="mlp", min_blocks=100, **short)]
    jobs += [make_job("images", "acdc", 0.9, 8, 0, 2, model="cnn", min_blocks=100, **short)]
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table is not None:
        print_tables(args.table)
        return 0
    if args.quick:
        out = args.out or Path("runs/quality/quick.jsonl")
        jobs = quick_jobs()
    else:
        out = args.out or RESULTS / f"{args.part}.jsonl"
        jobs = {"ctr": ctr_jobs, "images": image_jobs, "ablations": ablation_jobs}[args.part](args)
    _warm_data(jobs)
    run_pool(jobs, run_job, out, args.processes)
    print_tables([out])
    return 0


def _warm_data(jobs: list[dict[str, Any]]) -> None:
    """Load the data before forking, so workers share it instead of each parsing the files."""
    if any(j["part"] == "ctr" for j in jobs):
        movielens()
    if any(j["part"] == "images" for j in jobs):
        fashion_mnist()


if __name__ == "__main__":
    sys.exit(main())
