"""Gather the ``results.json`` files of a sweep into tables, with the paper's numbers alongside.

    python -m sapp_lightning.results runs/demo                 # one row per configuration
    python -m sapp_lightning.results runs/table2_criteo --paper criteo   # Table 2's shape
    python -m sapp_lightning.results runs/demo --plot          # + DIR/results.png and each run's sparsity curve

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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .paper import paper_value

METHOD_ORDER = ("dense", "magnitude", "powerprop", "acdc", "sapp")
METHOD_NAMES = {
    "dense": "Dense",
    "magnitude": "Magnitude",
    "powerprop": "PowerPropagation",
    "acdc": "ACDC",
    "sapp": "SA++",
}


def load_results(root: str | Path) -> list[dict[str, Any]]:
    """Every ``results.json`` below ``root``."""
    paths = sorted(Path(root).rglob("results.json"))
    if not paths:
        raise FileNotFoundError(f"no results.json below {root}: is this a finished run or sweep folder?")
    rows = [json.loads(p.read_text()) | {"path": str(p.parent)} for p in paths]
    for row in rows:  # sapp_lightning 0.1 called the dense baseline "none"
        row["algorithm"] = "dense" if row["algorithm"] == "none" else row["algorithm"]
    return rows


def primary_metric(task: str) -> tuple[str, float]:
    """The metric a table reports, and the factor to print it with (accuracy in %)."""
    return ("val/acc", 100.0) if task == "classification" else ("val/loss", 1.0)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values) if values else math.nan
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group runs by (algorithm, sparsity, block size) and average over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["algorithm"], float(row["sparsity"]), int(row["block_size"]))
        groups.setdefault(key, []).append(row)
    summary = []
    for (algorithm, sparsity, block), runs in groups.items():
        metric, scale = primary_metric(runs[0]["task"])
        test_metric = metric.replace("val/", "test/")
        values = [r["val"][metric] * scale for r in runs if metric in r["val"]]
        tests = [r["test"][test_metric] * scale for r in runs if test_metric in r.get("test", {})]
        mean, std = _mean_std(values)
        test_mean, test_std = _mean_std(tests)
        summary.append(
            {
                "algorithm": algorithm,
                "sparsity": sparsity,
                "block_size": block,
                "metric": metric,
                "n": len(values),
                "mean": mean,
                "std": std,
                "test_mean": test_mean,
                "test_std": test_std,
                "achieved": statistics.fmean(r["achieved_block_sparsity"] for r in runs),
                "seconds": statistics.fmean(r["fit_seconds"] for r in runs),
            }
        )
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(summary, key=lambda s: (s["sparsity"], s["block_size"], order.get(s["algorithm"], 99)))


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
    """One row per configuration: validation and test metric, achieved sparsity, training time."""
    if not summary:
        return "(no runs)"
    metric = summary[0]["metric"]
    digits = 2 if metric == "val/acc" else 4
    label = "top-1 %" if metric == "val/acc" else "BCE"
    header = [
        "method",
        "target sparsity",
        "block",
        "seeds",
        f"val {label}",
        f"test {label}",
        "achieved sparsity",
        "fit time",
    ]
    rows = [
        [
            METHOD_NAMES.get(s["algorithm"], s["algorithm"]),
            "—" if s["algorithm"] == "dense" else f"{s['sparsity']:.0%}",
            "—" if s["algorithm"] == "dense" else str(s["block_size"]),
            str(s["n"]),
            _cell(s["mean"], s["std"], s["n"], digits),
            _cell(s["test_mean"], s["test_std"], s["n"], digits),
            f"{s['achieved']:.2%}",
            f"{s['seconds']:.0f} s",
        ]
        for s in summary
    ]
    return _format_table(header, rows)


def paper_table(summary: Sequence[dict[str, Any]], paper: str | None) -> str:
    """The paper's layout: rows (sparsity, method), one column per block size, paper value in brackets."""
    pruned = [s for s in summary if s["algorithm"] != "dense"]
    if not pruned:
        return "(no pruned runs)"
    digits = 2 if pruned[0]["metric"] == "val/acc" else 4
    blocks = sorted({s["block_size"] for s in pruned})
    cells = {(s["sparsity"], s["algorithm"], s["block_size"]): s for s in pruned}
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    keys = sorted({(s["sparsity"], s["algorithm"]) for s in pruned}, key=lambda k: (k[0], order.get(k[1], 99)))
    rows = []
    for sparsity, algorithm in keys:
        row = [f"{sparsity:.0%}", METHOD_NAMES.get(algorithm, algorithm)]
        for block in blocks:
            s = cells.get((sparsity, algorithm, block))
            text = _cell(s["mean"], s["std"], s["n"], digits) if s else "—"
            reference = paper_value(paper, algorithm, block, sparsity) if paper else None
            if paper:
                text += f" [{reference:.{digits}f}]" if reference is not None else " [—]"
            row.append(text)
        rows.append(row)
    dense = [s for s in summary if s["algorithm"] == "dense"]
    if dense:
        d = dense[0]
        ref = f" [{paper_value(paper, 'dense', 0, 0):.{digits}f}]" if paper else ""
        rows.append(["0%", "Dense", *([_cell(d["mean"], d["std"], d["n"], digits) + ref] * len(blocks))])
    header = ["sparsity", "method", *[f"B={b}" for b in blocks]]
    return _format_table(header, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="a run or sweep folder (searched recursively for results.json)")
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
        rows = load_results(args.root)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    paper = None if args.paper == "none" else args.paper
    if args.paper == "auto":
        data = {r.get("data") for r in rows}
        paper = "criteo" if data == {"CriteoDataModule"} else "imagenet" if data == {"ImageNetDataModule"} else None
    summary = summarize(rows)
    print(f"{len(rows)} runs from {args.root}\n")
    print(runs_table(summary))
    if len({s["block_size"] for s in summary if s["algorithm"] != "dense"}) > 1 or paper:
        print("\nIn the paper's layout" + (f" (the paper's {paper} numbers in brackets)" if paper else "") + ":\n")
        print(paper_table(summary, paper))
    return _plot(args.root) if args.plot else 0


def _plot(root: str) -> int:
    """Draw the sweep's figures (``--plot``) and say where each went."""
    try:
        from .app.plots import plot_sweep

        written = plot_sweep(root)
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
