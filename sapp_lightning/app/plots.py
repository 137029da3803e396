"""Figures of runs: a run's block sparsity over training (the paper's Fig. 2(b)) from the pruning record of its
``results.json``; validation metric against sparsity, one panel per block size (Fig. 4 and 5), and SA++'s attention
against magnitude scores (Fig. 2(a)) from the runs' summaries; training accuracy over steps (Fig. 3) from the runs'
CSV logs. ``sapp-results SOURCE... --plot`` draws them.

matplotlib is an app extra (``pip install 'sapp_lightning[app]'``), imported only when a figure is drawn. The
figures are drawn on ``matplotlib.figure.Figure`` objects (the Agg canvas), never through pyplot's global state,
so they render headless and leave no figures open.

Example (the line drawn needs no matplotlib):
    >>> pruning = {"phases": [{"phase": "dense", "start": 0, "end": 20}, {"phase": "sparse", "start": 20, "end": 30}],
    ...            "curve": {"step": [0, 10, 20, 30], "achieved": [0.0, 0.0, 0.9, 0.9]}}
    >>> phase_line(pruning, pruning["curve"]["achieved"])
    ([0, 20, 20, 30], [0.0, 0.0, 0.9, 0.9])
"""

from __future__ import annotations

import logging
import math
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .paper import CRITEO_DENSE_LOSS, IMAGENET_DENSE_TOP1, paper_value
from .results import DATA_NAMES, load_runs, method_name, method_rank, paper_setting, score_differences

if TYPE_CHECKING:  # matplotlib is an optional extra
    import pytorch_lightning as pl
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sapp_lightning[app]'"
# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), one per method in every figure.
METHOD_COLORS = {
    "dense": "#000000",
    "magnitude": "#CC79A7",
    "powerprop": "#009E73",
    "acdc": "#0072B2",
    "gmp": "#E69F00",
    "torch_ao_gmp": "#56B4E9",
    "sapp": "#D55E00",
}
METHOD_MARKERS = {"dense": "s", "magnitude": "v", "powerprop": "^", "acdc": "o", "gmp": "P", "torch_ao_gmp": "X",
                  "sapp": "D"}  # fmt: skip
# Opaque pale band colours (no alpha), so that a band's pixels have exactly this colour in the PNG.
PHASE_COLORS = {"dense": "#e9e9e9", "sparsify": "#fbe7b5", "sparse": "#d2e3f3"}
LAYER_COLORS = ["#555555", "#8c564b", "#7f7f7f", "#bcbd22", "#17becf", "#9467bd", "#2ca02c", "#e377c2"]
# Okabe-Ito colours, one per sparsity level in ascending order (the score-difference figure).
LEVEL_COLORS = ["#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
CURVE_FILENAME = "sparsity_curve.png"
SCORE_FIGURE = "score_attention_vs_magnitude.png"


def _matplotlib():
    """Import matplotlib's object-oriented pieces, or say which extra provides them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"figures need matplotlib: {INSTALL_HINT}") from err
    return Figure, FigureCanvasAgg


def _figure(width: float, height: float) -> Figure:
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int | None = None) -> Path:
    """Write ``fig`` as a PNG (creating the folder) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi or fig.dpi, facecolor="white")
    return path


# --- a run's sparsity over training (Fig. 2(b)) -------------------------------------------------------------------
def phase_line(pruning: dict[str, Any], values: Sequence[float]) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the line drawn for one curve of a pruning record (``results.json["pruning"]``),
    phase by phase: in a dense or sparse phase each recorded value holds until the next one, so the line is flat
    and jumps exactly at the phase boundaries; in a sparsification phase it runs straight through the recorded
    points to the next phase's first value (the schedule reaches it as the phase ends). A phase is recorded when it
    starts, so one shorter than the logging interval still has its value."""
    steps, phases = pruning["curve"]["step"], pruning["phases"]
    points: list[tuple[float, float]] = []
    for i, phase in enumerate(phases):
        start, end, last = phase["start"], phase["end"], i == len(phases) - 1
        inside = [(s, v) for s, v in zip(steps, values) if start <= s < end or (last and s == end)]
        if not inside:  # nothing recorded (a record cut short): leave a gap
            points.append((start, math.nan))
            continue
        if phase["phase"] == "sparsify":
            following = [v for s, v in zip(steps, values) if s >= end]
            path = [*inside, (end, following[0] if following else inside[-1][1])]
        else:  # each value holds until the next point, from the phase's start to its end
            inside[0] = (start, inside[0][1])
            path = [p for (s, v), (t, _) in zip(inside, [*inside[1:], (end, None)]) for p in ((s, v), (t, v))]
        points += path
    points = [p for i, p in enumerate(points) if i == 0 or p != points[i - 1]]
    flat = lambda i: 0 < i < len(points) - 1 and points[i - 1][1] == points[i][1] == points[i + 1][1]  # noqa: E731
    kept = [p for i, p in enumerate(points) if not flat(i)]  # a flat stretch needs its ends only
    return [s for s, _ in kept], [v for _, v in kept]


def sparsity_curve_figure(record: dict[str, Any], title: str | None = None, layers: bool | None = None) -> Figure:
    """Achieved and target block sparsity against the optimizer step, the phases shaded (the paper's Fig. 2(b)),
    from a run's ``results.json`` (its ``"pruning"`` record). ``layers``: draw each pruned layer's sparsity too
    (default: when there are at most 8 layers)."""
    pruning = record.get("pruning") or {}
    if not pruning.get("phases"):
        raise ValueError("the run has no pruning record (a dense run, or one that stopped before pruning started)")
    curve, phases = pruning["curve"], pruning["phases"]
    fig = _figure(10, 4.2)
    from matplotlib.patches import Patch

    ax = fig.add_subplot()
    for phase in phases:
        ax.axvspan(phase["start"], phase["end"], color=PHASE_COLORS[phase["phase"]], lw=0, zorder=0)
    xs, ys = phase_line(pruning, curve["achieved"])
    color = METHOD_COLORS.get(record.get("algorithm", ""), "#000000")
    ax.plot(xs, [100 * y for y in ys], color=color, lw=2, label="achieved", zorder=3)
    xs, ys = phase_line(pruning, curve["target"])
    ax.plot(xs, [100 * y for y in ys], color="#000000", lw=1.2, ls=(0, (4, 2)), label="target (plan)", zorder=4)
    names = sorted(curve.get("layers", {}))
    if layers if layers is not None else len(names) <= 8:
        for name, color in zip(names, LAYER_COLORS * len(names)):
            xs, ys = phase_line(pruning, curve["layers"][name])
            ax.plot(xs, [100 * y for y in ys], color=color, lw=0.9, label=name, zorder=2)
    ax.set_xlim(0, phases[-1]["end"])
    ax.set_ylim(-3, 103)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("block sparsity (%)")
    ax.grid(axis="y", color="#ffffff", lw=0.8, zorder=1)
    ax.set_title(title or _curve_title(record), fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    shown = [p for p in PHASE_COLORS if any(phase["phase"] == p for phase in phases)]
    handles += [Patch(color=PHASE_COLORS[p], label=f"{p} phase") for p in shown]
    fig.legend(handles, [*labels, *(f"{p} phase" for p in shown)], loc="outside right upper", fontsize=8, frameon=False)
    return fig


def _curve_title(record: dict[str, Any]) -> str:
    data = DATA_NAMES.get(record.get("data", ""), record.get("data", ""))
    what = " ".join([*data.split(), str(record.get("model", ""))]).strip()
    block = record.get("block_size")
    title = (
        f"{method_name(record.get('algorithm', '?'))} on {what}: block sparsity over training "
        f"(target {float(record.get('sparsity', 0)):.0%}, {block}x{block} blocks, seed {record.get('seed')})"
    )
    return f"{title}\n{record['path']}" if record.get("path") else title


def log_sparsity_curve(trainer: pl.Trainer, run_dir: str | Path, record: dict[str, Any]) -> Path | None:
    """The app's end-of-run hook: ``sparsity_curve.png`` in ``run_dir`` from the run's ``results.json`` record,
    also sent to every ``WandbLogger`` as the image ``pruning/sparsity_curve``.

    Works with any logger or none (``fast_dev_run`` too). Returns the PNG's path, or ``None``: a run without a
    pruning record (dense), a rank other than 0 (call it on every rank), or no matplotlib (a warning says so; a
    missing figure never fails a finished run).
    """
    if getattr(trainer, "global_rank", 0) != 0 or not (record.get("pruning") or {}).get("phases"):
        return None
    try:
        fig = sparsity_curve_figure({**record, "path": str(run_dir)})
    except ImportError as err:
        log.warning("no sparsity curve: %s", err)
        return None
    path = save_figure(fig, Path(run_dir) / CURVE_FILENAME)
    log.info("sparsity curve: %s", path)
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.log_image("pruning/sparsity_curve", [wandb.Image(fig)], step=trainer.global_step)
    return path


# --- results against sparsity (Fig. 4 and 5) ----------------------------------------------------------------------
HIGHER_IS_BETTER = {"acc": True, "loss": False, "auroc": True}


def metric_values(frame: pd.DataFrame, metric: str) -> pd.Series:
    """A metric of each run: ``"acc"`` (validation top-1 in %), ``"loss"`` or ``"auroc"``."""
    column = f"val/{metric}"
    values = frame[column] if column in frame else pd.Series(math.nan, index=frame.index)
    return 100 * values if metric == "acc" else values


def series(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (block size, method, sparsity): ``mean``, ``low``/``high`` (the seeds' minimum and maximum) and
    ``n`` of ``metric`` over the seeds; the dense runs have block size 0.

    Example:
        >>> from sapp_lightning.app.results import to_frame
        >>> rows = [{"algorithm": "sapp", "sparsity": 0.9, "block_size": 8, "val": {"val/acc": a}} for a in (.8, .84)]
        >>> series(to_frame(rows), "acc").to_dict("records")
        [{'block_size': 8, 'algorithm': 'sapp', 'sparsity': 0.9, 'mean': 82.0, 'low': 80.0, 'high': 84.0, 'n': 2}]
    """
    values = frame.assign(value=metric_values(frame, metric))
    values = values[values["value"].astype(float).map(math.isfinite)]
    stats = values.groupby(["block_size", "algorithm", "sparsity"])["value"]
    return stats.agg(mean="mean", low="min", high="max", n="count").reset_index()


def _metric_label(metric: str, task: str) -> str:
    if metric == "acc":
        return "validation top-1 (%)"
    if metric == "auroc":
        return "validation AUROC (higher is better)"
    return "validation BCE (lower is better)" if task == "ctr" else "validation cross-entropy"


def _paper_metric(paper: str | None, metric: str) -> bool:
    return (paper == "criteo" and metric == "loss") or (paper == "imagenet" and metric == "acc")


def result_figure(
    frame: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    paper: str | None | bool = True,
    title: str | None = None,
    caption: str | None = None,
) -> Figure:
    """Validation metric against target block sparsity: one row of panels per metric, one column per block size.

    Each method is a line through its means over the seeds with min-max bars (the methods are set a little apart so
    that the bars do not hide each other; the sparsity levels are evenly spaced); the dense model is a dashed
    horizontal line with its seeds' range shaded. ``paper=True`` adds the paper's numbers as hollow stars where the
    runs are the paper's setting (:func:`sapp_lightning.app.results.paper_setting`), ``"criteo"``/``"imagenet"``
    forces them, ``False`` leaves them out. ``metrics`` default: accuracy for classification, BCE and (where logged)
    AUROC for CTR. Means far off the other methods' range are drawn as a triangle at the panel's edge with their
    value, so that one diverged method does not flatten the others.
    """
    if frame.empty:
        raise ValueError("no runs to plot")
    task = frame["task"].iloc[0]
    metrics = metrics or (["acc"] if task == "classification" else ["loss", "auroc"])
    metrics = [m for m in metrics if metric_values(frame, m).notna().any()]
    if not metrics:
        raise ValueError("the runs hold none of the metrics to plot")
    pruned = frame[frame["algorithm"] != "dense"]
    if pruned.empty:
        raise ValueError("no pruned runs to plot (only the dense model)")
    if paper is True:
        pairs = set(zip(frame["data"], frame["model"]))
        setting = paper_setting(*pairs.pop()) if len(pairs) == 1 else None
    else:
        setting = paper or None
    data = {m: series(frame, m) for m in metrics}
    blocks = sorted(pruned["block_size"].unique())
    levels = sorted(pruned["sparsity"].unique())
    methods = sorted(pruned["algorithm"].unique(), key=lambda m: (method_rank(m), m))
    layers = {b: sorted({n for ls in pruned[pruned["block_size"] == b]["pruned_layers"] for n in ls}) for b in blocks}
    show_layers = len({tuple(v) for v in layers.values()}) > 1

    width = max(0.8 + 3.9 * len(blocks) + 1.9, 8.5)  # room for the title and the caption over a single column
    fig = _figure(width, 0.9 + 3.2 * len(metrics))
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    axes = fig.subplots(len(metrics), len(blocks), squeeze=False, sharex=True, sharey="row")
    off_scale = False
    dodge = min(0.5 / max(1, len(methods)), 0.14)
    offsets = {m: (i - (len(methods) - 1) / 2) * dodge for i, m in enumerate(methods)}
    for row, metric in enumerate(metrics):
        points = data[metric]
        dense = points[points["algorithm"] == "dense"]
        limits = _focus_limits(points, HIGHER_IS_BETTER[metric])
        with_paper = _paper_metric(setting, metric)
        for col, block in enumerate(blocks):
            ax: Axes = axes[row][col]
            stack: dict = {}
            if not dense.empty:
                d = dense.iloc[0]
                ax.axhspan(d["low"], d["high"], color="#000000", alpha=0.07, lw=0)
                ax.axhline(d["mean"], color=METHOD_COLORS["dense"], ls="--", lw=1.2, label="Dense")
            for method in methods:
                cell = points[(points["block_size"] == block) & (points["algorithm"] == method)]
                if cell.empty:
                    continue
                x = [levels.index(s) + offsets[method] for s in cell["sparsity"]]
                y = cell["mean"].tolist()
                color = METHOD_COLORS.get(method)
                bars = ax.errorbar(
                    x, y, yerr=[cell["mean"] - cell["low"], cell["high"] - cell["mean"]], color=color,
                    marker=METHOD_MARKERS.get(method, "o"), ms=5, lw=1.6, capsize=2.5, elinewidth=1,
                )  # fmt: skip
                bars.lines[0].set_label(method_name(method))  # errorbar labels only its container
                off_scale |= _mark_off_scale(ax, x, y, limits, color, stack)
                if len(levels) == 1:  # a single sparsity (the demo): the few values are worth printing
                    for xi, yi in zip(x, y):
                        # on a white ground, so that the dense line (often at the same height) does not cross it
                        ax.annotate(f"{yi:.4g}", (xi, yi), xytext=(7, 0), textcoords="offset points", va="center",
                                    fontsize=8, color=color, zorder=6,
                                    bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none"})  # fmt: skip
                if with_paper:
                    ref = [(xi, paper_value(setting, method, block, s)) for xi, s in zip(x, cell["sparsity"])]
                    ref = [(xi, v) for xi, v in ref if v is not None]
                    if ref:
                        ax.plot(*zip(*ref), ls="none", marker="*", ms=11, mfc="none", mew=1.2, color=color, zorder=5)
            if with_paper:
                dense_paper = IMAGENET_DENSE_TOP1 if setting == "imagenet" else CRITEO_DENSE_LOSS
                ax.axhline(dense_paper, color="#666666", ls=":", lw=1.2)
            ax.set_ylim(*limits)
            ax.grid(axis="y", color="#dddddd", lw=0.6)
            ax.set_axisbelow(True)
            if row == 0:
                head = f"{block}x{block} blocks" + ("\npruned: " + ", ".join(layers[block]) if show_layers else "")
                ax.set_title(head, fontsize=10)
            if col == 0:
                ax.set_ylabel(_metric_label(metric, task))
            if row == len(metrics) - 1:
                ax.set_xlabel("target block sparsity")
                ax.set_xticks(range(len(levels)), [f"{s:.0%}" for s in levels])
                ax.set_xlim(-0.5, len(levels) - 0.5)
    handles = []
    dense = data[metrics[0]][data[metrics[0]]["algorithm"] == "dense"]
    if not dense.empty:
        handles.append(Line2D([], [], color="#000000", ls="--", label="Dense"))
        if dense["n"].iloc[0] > 1:
            handles.append(Patch(color="#000000", alpha=0.07, lw=0, label="Dense: seeds' range"))
    handles += [
        Line2D([], [], color=METHOD_COLORS.get(m), marker=METHOD_MARKERS.get(m, "o"), label=method_name(m))
        for m in methods
    ]
    if setting and any(_paper_metric(setting, m) for m in metrics):
        table = "Table 2" if setting == "criteo" else "Table 1"
        handles += [
            Line2D([], [], ls="none", marker="*", ms=11, mfc="none", color="#444444", label=f"paper ({table})"),
            Line2D([], [], color="#666666", ls=":", label="paper dense"),
        ]
    fig.legend(handles=handles, loc="outside right center", fontsize=9, frameon=False)
    if caption is None:
        caption = _result_caption(frame, setting)
        if off_scale:
            caption += " Triangles at a panel's edge: a mean off the scale, its value printed beside."
    fig.suptitle(textwrap.fill(title or _result_title(frame), int(width * 8)), fontsize=11)
    fig.supxlabel(textwrap.fill(caption, int(width * 15)), fontsize=8, color="#333333")
    return fig


def _focus_limits(points: pd.DataFrame, higher_better: bool) -> tuple[float, float]:
    """y-limits around the competitive means: the dense model and every mean with its bar, except, in a grid of at
    least 8 pruned means, means worse than the best by more than 3x the spread of the better half (a diverged
    method), which are marked at the edge instead. A small sweep (the demo's one sparsity) shows everything."""
    if points.empty:
        return 0.0, 1.0
    dense, pruned = points[points["algorithm"] == "dense"], points[points["algorithm"] != "dense"]
    kept = points
    if len(pruned) >= 8:
        means = sorted(points["mean"], reverse=higher_better)  # best first
        best, middle = means[0], means[len(means) // 2]
        reach = 3 * max(abs(middle - best), 1e-9)
        kept = pd.concat([pruned[(pruned["mean"] - best).abs() <= reach], dense])
    lo, hi = kept["low"].min(), kept["high"].max()
    if len(pruned) >= 8:  # the bars of the kept means only as far as the reach
        lo, hi = (max(lo, best - reach * 1.15), hi) if higher_better else (lo, min(hi, best + reach * 1.15))
    pad = 0.06 * max(hi - lo, 1e-6 + 0.01 * abs(hi))
    return lo - pad, hi + pad


def _mark_off_scale(
    ax: Axes, x: Sequence[float], y: Sequence[float], limits: tuple[float, float], color: str, stack: dict
) -> bool:
    """A triangle at the panel's edge, with the value, for each mean outside the y-limits; ``stack`` counts the
    labels already at each sparsity level of this panel, so that the labels of several methods do not overlap.
    Returns whether any mean was off the scale."""
    lo, hi = limits
    marked = False
    for xi, yi in zip(x, y):
        if hi >= yi >= lo:
            continue
        above, marked = yi > hi, True
        ax.plot([xi], [hi if above else lo], marker="^" if above else "v", ms=8, color=color, clip_on=False, zorder=6)
        key = (round(xi), above)
        offset = 11 + 10 * stack.get(key, 0)
        stack[key] = stack.get(key, 0) + 1
        ax.annotate(
            f"{yi:.3g}", (xi, hi if above else lo), xytext=(0, -offset if above else offset),
            textcoords="offset points", ha="center", va="top" if above else "bottom", fontsize=7, color=color,
            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.85}, zorder=7,
        )  # fmt: skip
    return marked


def _result_title(frame: pd.DataFrame) -> str:
    data = " / ".join(sorted({DATA_NAMES.get(d, d) for d in frame["data"]}))
    models = " / ".join(sorted(set(frame["model"])))
    epochs = sorted({int(e) for e in frame["epochs"] if pd.notna(e) and e})
    seeds = sorted(set(frame.groupby(["algorithm", "block_size", "sparsity"])["seed"].nunique()))
    parts = [f"{models} on {data}"]
    if epochs:
        parts.append(f"{'/'.join(map(str, epochs))} epoch{'s' if epochs != [1] else ''}")
    parts.append("1 seed" if seeds == [1] else f"mean of {'/'.join(map(str, seeds))} seeds, bars: min-max")
    return ", ".join(parts)


def _result_caption(frame: pd.DataFrame, setting: str | None) -> str:
    if setting == "criteo":
        return "Stars: the paper's Table 2 (Criteo, mean of 3 runs); dotted: the paper's dense model (0.4489)."
    if setting == "imagenet":
        return "Stars: the paper's Table 1 (ResNet50 / ImageNet top-1; only ACDC and SA++ were retrieved)."
    data = sorted({DATA_NAMES.get(d, d) for d in frame["data"]})
    return (
        f"No paper numbers: the paper reports ImageNet (ResNet50) and Criteo, not {', '.join(data)}. "
        "Sparsity levels evenly spaced; methods set slightly apart."
    )


def plot_runs(frame: pd.DataFrame, out: str | Path, stem: str) -> list[Path]:
    """One comparison figure per (data, model, task, epochs) of the plain runs (no variant): ``out/<stem>.png``,
    with ``_<data>``, ``_<model>`` and ``_e<epochs>`` added for what differs between the groups. Groups without
    pruned runs are skipped."""
    keys = ["data", "model", "task", "epochs"]
    plain = frame[frame["variant"] == ""]
    groups = list(plain.groupby(keys, dropna=False))
    varying = [i for i, key in enumerate(keys) if plain[key].nunique(dropna=False) > 1]
    paths = []
    for key, runs in sorted(groups, key=lambda kv: str(kv[0])):
        if (runs["algorithm"] == "dense").all():
            continue
        parts = [
            f"e{key[i]:g}" if i == 3 else re.sub(r"\W+", "", str(key[i]).replace("DataModule", "")) for i in varying
        ]
        name = "_".join([stem, *(p.lower() for p in parts)])
        paths.append(save_figure(result_figure(runs), Path(out) / f"{name}.png"))
    return paths


# --- SA++'s block score: attention against magnitude (Fig. 2(a)) ---------------------------------------------------
def score_difference_figure(differences: pd.DataFrame, title: str | None = None) -> Figure:
    """Grouped bars shaped like the paper's Fig. 2(a), from :func:`sapp_lightning.app.results.score_differences`:
    one panel per model, x = block size, one bar (colour) per sparsity, y = top-1 with attention scores minus top-1
    with magnitude scores in points (positive: attention is better), bars at the mean over seeds with min-max
    whiskers and each seed's difference as a dot."""
    if differences.empty:
        raise ValueError("no pairs of SA++ runs with attention and magnitude scores")
    levels = sorted(differences["sparsity"].unique())
    colors = {s: LEVEL_COLORS[i % len(LEVEL_COLORS)] for i, s in enumerate(levels)}
    models = list(differences.groupby("model"))
    counts = [runs["block_size"].nunique() for _, runs in models]  # panel widths follow the block sizes
    fig = _figure(2.6 + 2.3 * sum(counts), 4.3)
    from matplotlib.patches import Patch

    axes = fig.subplots(1, len(models), squeeze=False, sharey=True, gridspec_kw={"width_ratios": counts})[0]
    width = 0.8 / len(levels)
    for ax, (model, runs) in zip(axes, models):
        blocks = sorted(runs["block_size"].unique())
        cells = runs.groupby(["block_size", "sparsity"])["difference"]
        for (block, sparsity), values in cells:
            x = blocks.index(block) + (levels.index(sparsity) - (len(levels) - 1) / 2) * width
            mean, low, high = values.mean(), values.min(), values.max()
            ax.bar(x, mean, width * 0.9, color=colors[sparsity], zorder=2)
            ax.errorbar(x, mean, yerr=[[mean - low], [high - mean]], color="#333333", lw=1, capsize=3, zorder=3)
            ax.plot([x] * len(values), values, ls="none", marker="o", ms=3, mfc="white", mec="#333333", zorder=4)
        ax.axhline(0, color="#000000", lw=1, zorder=1)
        ax.set_xticks(range(len(blocks)), [f"{b}x{b}" for b in blocks])
        ax.set_xlim(-0.55, len(blocks) - 0.45)
        ax.set_xlabel("block size")
        seeds = set(cells.size())
        ax.set_title(f"{model} ({seeds.pop()} seeds)" if len(seeds) == 1 else model)
        ax.grid(axis="y", color="#dddddd", lw=0.6, zorder=0)
        ax.set_axisbelow(True)
    axes[0].set_ylabel("top-1: attention minus magnitude (points)")
    handles = [Patch(color=colors[s], label=f"{s:.0%} sparsity") for s in levels]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    fig.suptitle(
        title or "SA++ block score: softmax attention vs block magnitude (paper's Fig. 2(a) shape)", fontsize=11
    )
    fig.supxlabel(
        "Bars: mean over seeds of the paired difference (same seed, schedule, resets and phases); whiskers: min-max; "
        "dots: seeds. Positive: attention is better.",
        fontsize=8,
    )
    return fig


# --- training accuracy over steps (Fig. 3) ------------------------------------------------------------------------
TRAIN_ACC = "train/acc"
_LINE_STYLES = ("-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)))


def find_metrics_csv(source: str | Path) -> Path:
    """``source`` itself if it is a file, else the ``metrics.csv`` below the run folder ``source`` (of several
    ``version_N`` folders of one logger, the newest)."""
    source = Path(source)
    if source.is_file():
        return source
    found = sorted(source.rglob("metrics.csv")) if source.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no metrics.csv below {source}: training accuracy is read from the CSV logger's log "
                                "(logger=csv, the app's default)")  # fmt: skip
    loggers = {p.parent.parent if re.fullmatch(r"version_\d+", p.parent.name) else p.parent for p in found}
    if len(loggers) > 1:
        listed = ", ".join(str(p) for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(f"several runs' logs below {source} ({listed}): pass one run folder or one metrics.csv")
    return max(found, key=lambda p: int(p.parent.name.split("_")[1]) if p.parent.name.startswith("version_") else 0)


def read_train_accuracy(source: str | Path) -> pd.Series:
    """The ``train/acc`` column of a run's CSV log (``metrics.csv`` or a run folder) by optimizer step: the top-1
    accuracy of the training batch at each logged step (where a resumed run logged a step twice, the later row).

    Example:
        >>> import tempfile
        >>> csv = Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> _ = csv.write_text("epoch,step,train/acc,val/acc\\n0,9,0.5,\\n0,19,0.75,\\n0,19,,0.7\\n")
        >>> read_train_accuracy(csv).to_dict()
        {9: 0.5, 19: 0.75}
    """
    path = find_metrics_csv(source)
    log_ = pd.read_csv(path)
    if TRAIN_ACC not in log_ or log_[TRAIN_ACC].isna().all():
        raise ValueError(f"{path} logs no {TRAIN_ACC}: the image classifier logs it (a CTR model does not), or "
                         "training ended before the first log_every_n_steps")  # fmt: skip
    rows = log_.dropna(subset=["step", TRAIN_ACC])
    return rows.groupby(rows["step"].astype(int))[TRAIN_ACC].last().rename(TRAIN_ACC)


def train_accuracy_figure(sources: Sequence[str | Path], smooth: int | None = None, title: str | None = None) -> Figure:
    """Training accuracy against the optimizer step, one line per run: the paper's Fig. 3 (ACDC against SA++ at 90%
    sparsity with 32x32 blocks) from the runs' CSV logs.

    ``sources``: run folders, ``metrics.csv`` files or sweep folders (each run of a sweep). Each run's logged batch
    accuracies are drawn faintly, and over them their running mean over ``smooth`` logged steps (default: a 50th of
    the longest run's points). The colour is the method's; runs of one method differ in line style.
    """
    runs = []
    for source in map(Path, sources):  # a sweep folder: each of its runs
        found = sorted(source.rglob("results.json")) if source.is_dir() else []
        runs += [(p.parent, p) for p in found] if len(found) > 1 else [(source, found[0] if found else None)]
    curves = [(read_train_accuracy(folder), load_runs(info).iloc[0] if info else str(folder)) for folder, info in runs]
    window = smooth or max(1, max(len(c) for c, _ in curves) // 50)
    fig = _figure(9, 4.5)
    ax = fig.add_subplot()
    seen: dict[str, int] = {}
    for curve, run in curves:
        method = run["algorithm"] if isinstance(run, pd.Series) else ""
        color, style = METHOD_COLORS.get(method, "#000000"), _LINE_STYLES[seen.get(method, 0) % len(_LINE_STYLES)]
        seen[method] = seen.get(method, 0) + 1
        ax.plot(curve.index, 100 * curve, color=color, lw=0.6, alpha=0.25)
        mean = (100 * curve).rolling(window, min_periods=1).mean()  # a short window at the start
        ax.plot(curve.index, mean, color=color, ls=style, lw=1.8, label=_run_label(run))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training accuracy (%)")
    ax.grid(alpha=0.3)
    what = f"top-1 on each logged batch; lines: mean over {window} logged steps"
    ax.set_title(title or f"training accuracy over training ({what})", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return fig


def _run_label(run: pd.Series | str) -> str:
    """A run's line in the legend: method, sparsity, blocks, variant and seed (a bare log: its path)."""
    if isinstance(run, str):
        return run
    label = method_name(run["algorithm"])
    if run["algorithm"] != "dense":
        label += f" {run['sparsity']:.0%} {run['block_size']}x{run['block_size']}"
    variant = f" {run['variant']}" if run["variant"] else ""
    return f"{label}{variant} seed {run['seed']}"


# --- what sapp-results --plot draws -------------------------------------------------------------------------------
def plot_sources(sources: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """The figures of ``sources``: for a run or sweep folder each pruned run's ``sparsity_curve.png`` in its own
    folder and, for several runs, the comparison figure ``results.png``; for a ``.jsonl`` store its comparison
    figures, named after it; where SA++ runs with attention and magnitude scores pair up, the score-difference
    figure. With ``out`` every figure goes there (a run's curve as ``sparsity_curve_<method>.png``; the run
    folder's name is added where a method has several runs). Says on stderr what it skips."""
    written, frames = [], []
    for source in map(Path, sources):
        frame = load_runs(source)
        frames.append(frame)
        if source.suffix == ".jsonl":
            if not (frame["variant"] == "").any():
                raise ValueError(f"{source} holds no runs without a variant (their figures are the tables')")
            written += plot_runs(frame, out or source.parent, source.stem)
            continue
        curves = frame[[bool((r.get("pruning") or {}).get("phases")) for r in frame["record"]]]
        several = curves["algorithm"].duplicated(keep=False)
        for (_, run), repeated in zip(curves.iterrows(), several):
            name = f"sparsity_curve_{run['algorithm']}" + (f"_{Path(run['path']).name}" if repeated else "")
            target = Path(out) / f"{name}.png" if out else Path(run["path"]) / CURVE_FILENAME
            written.append(save_figure(sparsity_curve_figure(run["record"]), target))
        if len(frame) > 1 and (frame["algorithm"] != "dense").any():
            written += plot_runs(frame, out or source, "results")
        elif len(frame) > 1:
            print(f"no comparison figure for {source}: only dense runs", file=sys.stderr)
    differences = score_differences(pd.concat(frames))
    if not differences.empty:
        first = Path(sources[0])
        folder = out or (first.parent if first.suffix == ".jsonl" else first)
        written.append(save_figure(score_difference_figure(differences), Path(folder) / SCORE_FIGURE))
    return written


def save_train_accuracy(sources: Sequence[str | Path], out: str | Path, smooth: int | None = None) -> Path:
    """Draw :func:`train_accuracy_figure` and save it as the PNG ``out``."""
    return save_figure(train_accuracy_figure(sources, smooth), out)
