"""Gather the ``results.json`` files of a sweep, or the JSON lines of ``bench/quality.py``, into tables, with the
paper's numbers alongside.

    python -m sapp_lightning.app.results runs/demo                 # one row per configuration
    python -m sapp_lightning.app.results runs/table2_criteo --paper criteo   # Table 2's shape
    python -m sapp_lightning.app.results runs/demo --plot          # + DIR/results.png and each run's sparsity curve
    python -m sapp_lightning.app.results bench/results/ctr25.jsonl # the benchmark's runs (one results.json a line)

``--plot`` needs matplotlib (``pip install 'sapp_lightning[app]'``); see :mod:`sapp_lightning.app.plots`.

Example:
    >>> rows = [{"algorithm": "sapp", "sparsity": 0.9, "block_size": 10, "seed": s, "task": "ctr",
    ...          "val": {"val/loss": 0.45 + s / 100}, "test": {}, "achieved_block_sparsity": 0.9,
    ...          "fit_seconds": 1.0} for s in range(3)]
    >>> summary = summarize(rows)
    >>> summary[0]["metric"], summary[0]["n"], round(summary[0]["mean"], 4), round(summary[0]["std"], 4)
    ('val/loss', 3, 0.46, 0.01)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paper import paper_value

METHOD_ORDER = ("dense", "magnitude", "powerprop", "acdc", "gmp", "sapp")
METHOD_NAMES = {
    "dense": "Dense",
    "magnitude": "Magnitude",
    "powerprop": "PowerPropagation",
    "gmp": "Gradual magnitude",
    "acdc": "ACDC",
    "sapp": "SA++",
}


def load_results(root: str | Path) -> list[dict[str, Any]]:
    """Every ``results.json`` below ``root``, or the runs of a ``.jsonl`` file (:func:`load_jsonl`)."""
    if Path(root).suffix == ".jsonl":
        if not Path(root).is_file():
            raise FileNotFoundError(f"no such file: {root}")
        return load_jsonl(root)
    paths = sorted(Path(root).rglob("results.json"))
    if not paths:
        raise FileNotFoundError(f"no results.json below {root}: is this a finished run or sweep folder?")
    rows = [json.loads(p.read_text()) | {"path": str(p.parent)} for p in paths]
    for row in rows:  # sapp_lightning 0.1 called the dense baseline "none"
        row["algorithm"] = "dense" if row["algorithm"] == "none" else row["algorithm"]
    return rows


# The lines bench/quality.py wrote before it ran through the app: flat metrics (accuracy in %), its own names.
_LEGACY_MODELS = {"mlp": "MLP", "cnn": "SmallCNN", "cnn_nobn": "SmallCNN (no BatchNorm)"}


def _legacy_row(row: dict[str, Any]) -> dict[str, Any]:
    """An older ``bench/quality.py`` line in ``results.json``'s shape (``variant``: its options as overrides)."""
    ctr = row.get("part") == "ctr"
    percent = {"acc": 100.0}  # those lines hold accuracy in %, results.json as a fraction

    def split(prefix: str) -> dict[str, float]:
        return {
            f"{prefix}/{m}": row[f"{prefix}_{m}"] / percent.get(m, 1.0)
            for m in ("loss", "acc", "auroc")
            if row.get(f"{prefix}_{m}") is not None
        }

    options = row.get("options") or {}
    variant = " ".join(
        f"{'model.module' if k == 'logit_lr_scale' else 'pruning'}.{k}={json.dumps(v)}"
        for k, v in sorted(options.items())
    )
    return {
        "key": row.get("key"),
        "algorithm": row["method"],
        "sparsity": float(row["sparsity"]),
        "block_size": int(row["block"]),
        "seed": row.get("seed"),
        "epochs": row.get("epochs"),
        "task": "ctr" if ctr else "classification",
        "data": "MovieLensCTRDataModule" if ctr else "FashionMNISTDataModule",
        "model": "CriteoPaperNet" if ctr else _LEGACY_MODELS.get(row.get("model"), row.get("model")),
        "val": split("val"),
        "test": split("test"),
        "achieved_block_sparsity": row.get("achieved_sparsity", 0.0),
        "achieved_weight_sparsity": row.get("real_sparsity", 0.0),
        "pruned_layers": sorted(row.get("pruned_layers") or ()),
        "min_blocks": row.get("min_blocks"),
        "fit_seconds": row.get("seconds", math.nan),
        "steps": row.get("steps"),
        "attention_range": row.get("attention_range"),
        "variant": variant,
    }


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The runs of a JSON lines file, one ``results.json`` per line as ``bench/quality.py`` writes them (older lines
    of that script are converted). A run written twice counts once (its last line); a torn last line (an
    interrupted sweep) is skipped. ``variant`` holds the overrides beyond the grid's method, sparsity, block size,
    seed and length (empty for a plain run).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "runs.jsonl"
        >>> old = {"key": "a", "part": "images", "model": "mlp", "method": "sapp", "sparsity": 0.9, "block": 16,
        ...        "seed": 0, "val_acc": 82.5, "options": {"schedule_exponent": 2.0}}
        >>> _ = path.write_text(json.dumps(old) + "\\n" + '{"key": "b", "val')
        >>> (row,) = load_jsonl(path)
        >>> row["algorithm"], row["block_size"], row["val"], row["variant"]
        ('sapp', 16, {'val/acc': 0.825}, 'pruning.schedule_exponent=2.0')
    """
    rows: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "algorithm" not in row:
            row = _legacy_row(row)
        row["algorithm"] = "dense" if row["algorithm"] == "none" else row["algorithm"]
        row["pruned_layers"] = sorted(row.get("pruned_layers") or ())
        rows[row.get("key") or str(number)] = {"variant": "", **row, "path": str(path)}
    return list(rows.values())


def primary_metric(task: str) -> tuple[str, float]:
    """The metric a table reports, and the factor to print it with (accuracy in %)."""
    return ("val/acc", 100.0) if task == "classification" else ("val/loss", 1.0)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values) if values else math.nan
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group runs by (algorithm, sparsity, block size, variant) and average over seeds: the primary metric
    (``mean``/``std``), its test value (``test_mean``) and, where logged, AUROC (``auroc_mean``,
    ``test_auroc_mean``)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["algorithm"], float(row["sparsity"]), int(row["block_size"]), row.get("variant") or "")
        groups.setdefault(key, []).append(row)
    summary = []
    for (algorithm, sparsity, block, variant), runs in groups.items():
        metric, scale = primary_metric(runs[0]["task"])
        stats: dict[str, Any] = {}
        for name, split, key, factor in (
            ("", "val", metric, scale),
            ("test_", "test", metric.replace("val/", "test/"), scale),
            ("auroc_", "val", "val/auroc", 1.0),
            ("test_auroc_", "test", "test/auroc", 1.0),
        ):
            values = [r[split][key] * factor for r in runs if key in r.get(split, {})]
            if "auroc" in name and not values:  # classification: no AUROC
                continue
            stats[f"{name}mean"], stats[f"{name}std"] = _mean_std(values)
            stats[f"{name}n"] = len(values)
        summary.append(
            {
                "algorithm": algorithm,
                "sparsity": sparsity,
                "block_size": block,
                "variant": variant,
                "metric": metric,
                **stats,
                "achieved": statistics.fmean(r["achieved_block_sparsity"] for r in runs),
                "seconds": statistics.fmean(r["fit_seconds"] for r in runs),
            }
        )
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(summary, key=lambda s: (s["sparsity"], s["block_size"], order.get(s["algorithm"], 99), s["variant"]))


def method_label(summary: dict[str, Any]) -> str:
    """The method's name, with its variant (the overrides beyond the grid) where it has one."""
    name = METHOD_NAMES.get(summary["algorithm"], summary["algorithm"])
    return f"{name} {summary['variant']}" if summary.get("variant") else name


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (readable in a terminal too)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _cell(mean: float, std: float, n: int, digits: int) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def runs_table(summary: Sequence[dict[str, Any]]) -> str:
    """One row per configuration: validation and test metric (and AUROC where logged), achieved sparsity, time."""
    if not summary:
        return "(no runs)"
    metric = summary[0]["metric"]
    digits = 2 if metric == "val/acc" else 4
    label = "top-1 %" if metric == "val/acc" else "BCE"
    auroc = any("auroc_mean" in s for s in summary)
    header = ["method", "target sparsity", "block", "seeds", f"val {label}", f"test {label}"]
    header += ["val AUROC", "test AUROC"] if auroc else []
    header += ["achieved sparsity", "fit time"]
    rows = []
    for s in summary:
        row = [
            method_label(s),
            "—" if s["algorithm"] == "dense" else f"{s['sparsity']:.0%}",
            "—" if s["algorithm"] == "dense" else str(s["block_size"]),
            str(s["n"]),
            _cell(s["mean"], s["std"], s["n"], digits),
            _cell(s["test_mean"], s["test_std"], s["n"], digits),
        ]
        if auroc:
            row += [_cell(s.get(f"{k}mean", math.nan), s.get(f"{k}std", 0.0), s.get(f"{k}n", 0), 4)
                    for k in ("auroc_", "test_auroc_")]  # fmt: skip
        rows.append([*row, f"{s['achieved']:.2%}", f"{s['seconds']:.0f} s"])
    return _format_table(header, rows)


def paper_table(
    summary: Sequence[dict[str, Any]], paper: str | None, stat: str = "mean", achieved: bool = False
) -> str:
    """The paper's layout: rows (sparsity, method), one column per block size, paper value in brackets.

    ``stat`` picks the number: ``"mean"`` (the validation metric), ``"test_mean"``, ``"auroc_mean"`` or
    ``"test_auroc_mean"``; ``achieved=True`` adds the achieved block sparsity of each cell, e.g. ``(97.97%)``.
    """
    prefix = stat.removesuffix("mean")
    pruned = [s for s in summary if s["algorithm"] != "dense"]
    if not pruned:
        return "(no pruned runs)"
    digits = 2 if pruned[0]["metric"] == "val/acc" and "auroc" not in stat else 4
    blocks = sorted({s["block_size"] for s in pruned})
    cells = {(s["sparsity"], s["algorithm"], s["variant"], s["block_size"]): s for s in pruned}
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    keys = sorted(
        {(s["sparsity"], s["algorithm"], s["variant"]) for s in pruned},
        key=lambda k: (k[0], order.get(k[1], 99), k[2]),
    )

    def cell(s: dict[str, Any] | None) -> str:
        if s is None or f"{prefix}mean" not in s:
            return "—"
        return _cell(s[f"{prefix}mean"], s[f"{prefix}std"], s[f"{prefix}n"], digits)

    rows = []
    for sparsity, algorithm, variant in keys:
        row = [f"{sparsity:.0%}", method_label({"algorithm": algorithm, "variant": variant})]
        for block in blocks:
            s = cells.get((sparsity, algorithm, variant, block))
            text = cell(s)
            if achieved and s is not None:
                text += f" ({s['achieved']:.1%})"
            reference = paper_value(paper, algorithm, block, sparsity) if paper else None
            if paper:
                text += f" [{reference:.{digits}f}]" if reference is not None else " [—]"
            row.append(text)
        rows.append(row)
    for d in (s for s in summary if s["algorithm"] == "dense"):
        ref = f" [{paper_value(paper, 'dense', 0, 0):.{digits}f}]" if paper else ""
        rows.append(["0%", method_label(d), *([cell(d) + ref] * len(blocks))])
    header = ["sparsity", "method", *[f"B={b}" for b in blocks]]
    return _format_table(header, rows)


# --- SA++'s block score: attention against magnitude (the paper's Fig. 2(a)) ---------------------------------
SCORE_VARIANTS = {"": "attention", "pruning.score=attention": "attention", "pruning.score=magnitude": "magnitude"}


@dataclass(frozen=True)
class Difference:
    """Accuracy with attention scores minus accuracy with magnitude scores (points), seed by seed."""

    block: int
    sparsity: float
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def score_differences(rows: Iterable[dict[str, Any]], split: str = "val") -> dict[str, list[Difference]]:
    """``{model: [Difference per (block, sparsity)]}`` from SA++ runs (``results.json`` rows, e.g.
    :func:`sapp_lightning.app.results.load_jsonl`) that differ only in ``pruning.score``: the plain or
    ``pruning.score=attention`` runs against the ``pruning.score=magnitude`` runs of the same model, block size,
    sparsity and seed (only seeds with both are paired).

    Example:
        >>> rows = [{"algorithm": "sapp", "model": "MLP", "block_size": 16, "sparsity": 0.9, "seed": s,
        ...          "variant": v, "val": {"val/acc": a}}
        ...         for s, v, a in [(0, "", 0.82), (0, "pruning.score=magnitude", 0.80), (1, "", 0.83)]]
        >>> score_differences(rows)["MLP"][0].values  # seed 1 has no magnitude run
        (2.0,)
    """
    arms: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        score = SCORE_VARIANTS.get(r.get("variant") or "")
        value = r.get(split, {}).get(f"{split}/acc")
        if r["algorithm"] == "sapp" and score and value is not None:
            arms[(r["model"], int(r["block_size"]), round(float(r["sparsity"]), 6), r["seed"])][score] = 100 * value
    paired: dict[tuple[str, int, float], list[float]] = defaultdict(list)
    for (model, block, sparsity, _), pair in sorted(arms.items(), key=lambda kv: str(kv[0])):
        if len(pair) == 2:
            paired[(model, block, sparsity)].append(round(pair["attention"] - pair["magnitude"], 10))
    out: dict[str, list[Difference]] = defaultdict(list)
    for (model, block, sparsity), values in sorted(paired.items()):
        out[model].append(Difference(block, sparsity, tuple(values)))
    return dict(out)


def score_table(rows: list[dict[str, Any]], split: str = "val") -> str:
    """SA++ with attention scores minus SA++ with magnitude scores (the paper's Fig. 2(a)), top-1 in points, per
    model, sparsity and block size: mean ± std over the paired seeds, [min, max]; empty without such pairs."""
    tables = []
    for model, differences in score_differences(rows, split).items():
        blocks = sorted({d.block for d in differences})
        cells = {(d.sparsity, d.block): d for d in differences}
        body = [
            [f"{sparsity:.0%}"]
            + [
                f"{d.mean:+.2f} ± {d.std:.2f} [{min(d.values):+.2f}, {max(d.values):+.2f}] (n={len(d.values)})"
                if (d := cells.get((sparsity, b)))
                else "—"
                for b in blocks
            ]
            for sparsity in sorted({d.sparsity for d in differences})
        ]
        tables.append(_format_table([model, *(f"B={b}" for b in blocks)], body))
    return "\n\n".join(tables)


def compare_table(sources: dict[str, list[dict[str, Any]]], stat: str = "mean") -> str:
    """The plain runs (no variant) of several sources side by side, e.g. one grid before and after a change: one
    row per (sparsity, block, method), one column per source, cells mean ± std over seeds of ``stat`` (as in
    :func:`paper_table`)."""
    prefix = stat.removesuffix("mean")
    cells: dict[tuple, list[str]] = {}
    for i, rows in enumerate(sources.values()):
        for s in summarize(r for r in rows if not r.get("variant")):
            if f"{prefix}mean" not in s:
                continue
            digits = 2 if s["metric"] == "val/acc" and "auroc" not in stat else 4
            dense = s["algorithm"] == "dense"
            key = (0.0 if dense else s["sparsity"], 0 if dense else s["block_size"], s["algorithm"])
            cells.setdefault(key, ["—"] * len(sources))[i] = (
                f"{s[f'{prefix}mean']:.{digits}f} ± {s[f'{prefix}std']:.{digits}f} (n={s[f'{prefix}n']})"
            )
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    keys = sorted(cells, key=lambda k: (k[0], k[1], order.get(k[2], 99)))
    rows = [[f"{k[0]:.0%}", str(k[1] or "—"), METHOD_NAMES.get(k[2], k[2]), *cells[k]] for k in keys]
    return _format_table(["sparsity", "block", "method", *sources], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "roots", nargs="+", metavar="root",
        help="run or sweep folders (searched recursively for results.json) or bench/quality.py .jsonl files",
    )  # fmt: skip
    parser.add_argument(
        "--paper", choices=["auto", "imagenet", "criteo", "none"], default="auto",
        help="print the paper's numbers in brackets: auto picks criteo for CTR models on Criteo, imagenet for ResNet50",
    )  # fmt: skip
    parser.add_argument(
        "--plot", action="store_true",
        help="also draw DIR/results.png (metric against sparsity, one panel per block size) and each pruned run's "
        "sparsity_curve.png beside its results.json (from its CSV log); needs matplotlib",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        rows = [row for root in args.roots for row in load_results(root)]
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    paper = None if args.paper == "none" else args.paper
    if args.paper == "auto":
        data = {r.get("data") for r in rows}
        paper = "criteo" if data == {"CriteoDataModule"} else "imagenet" if data == {"ImageNetDataModule"} else None
    summary = summarize(rows)
    print(f"{len(rows)} runs from {', '.join(args.roots)}\n")
    print(runs_table(summary))
    if len({s["block_size"] for s in summary if s["algorithm"] != "dense"}) > 1 or paper:
        print("\nIn the paper's layout" + (f" (the paper's {paper} numbers in brackets)" if paper else "") + ":\n")
        print(paper_table(summary, paper))
    return max((_plot(root) for root in args.roots), default=0) if args.plot else 0


def _plot(root: str) -> int:
    """Draw the sweep's figures (``--plot``) and say where each went."""
    try:
        from .plots import plot_jsonl, plot_sweep

        written = plot_jsonl([root], Path(root).parent) if Path(root).suffix == ".jsonl" else plot_sweep(root)
    except (ImportError, ValueError) as err:
        print(f"\nno figures: {err}", file=sys.stderr)
        return 1
    print()
    for path in written:
        kind = "sparsity curve" if path.name == "sparsity_curve.png" else "comparison figure"
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
