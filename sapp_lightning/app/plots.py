"""Figures: a run's block sparsity over training (the paper's Fig. 2(b)), runs' training accuracy over training (Fig.
3) and a sweep's validation metric against sparsity, one panel per block size (the paper's Fig. 4 and 5).

Everything is built from files, after the fact: a run's CSV log (``<run>/csv/version_N/metrics.csv``, the app's
default logger), a sweep's ``results.json`` files, or the JSON lines of ``bench/quality.py``. Command line::

    python -m sapp_lightning.app.results runs/demo --plot            # a sweep: the comparison + each run's curve
    python -m sapp_lightning.app.plots runs/2026-12-03/17-12-50  # one run's sparsity_curve.png
    python -m sapp_lightning.app.plots bench/results/images.jsonl bench/results/ctr.jsonl --out docs/figures
    python -m sapp_lightning.app.plots runs/fig3 --train-acc runs/fig3/train_acc.png  # training accuracy (Fig. 3)

matplotlib is an app extra (``pip install 'sapp_lightning[app]'``), imported only when a figure is drawn. The
figures are drawn on ``matplotlib.figure.Figure`` objects (the Agg canvas), never through pyplot's global state,
so they render headless and leave no figures open.

Example (reading a log needs no matplotlib):
    >>> import tempfile
    >>> from pathlib import Path
    >>> csv = Path(tempfile.mkdtemp()) / "metrics.csv"
    >>> _ = csv.write_text(
    ...     "step,pruning/sparsity,pruning/target_sparsity,pruning/phase,pruning/layer/fc\\n"
    ...     "9,0.0,0.0,0,\\n"      # a step row: Lightning writes the step before the one logged
    ...     "20,0.0,,0,0.0\\n"     # the dense phase ended at step 20 (a phase-end row)
    ...     "29,0.9,0.9,2,\\n")
    >>> log = read_sparsity_log(csv)
    >>> [(b.start, b.end, b.phase) for b in log.bands()]
    [(0, 20, 0), (20, 30, 2)]
    >>> log.achieved_curve()
    ([0, 20, 20, 30], [0.0, 0.0, 0.9, 0.9])
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import math
import re
import statistics
import sys
import textwrap
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .paper import CRITEO_DENSE_LOSS, IMAGENET_DENSE_TOP1, paper_value
from .results import METHOD_NAMES, METHOD_ORDER, Difference, load_jsonl, load_results, score_differences

if TYPE_CHECKING:  # matplotlib is an optional extra
    import pytorch_lightning as pl
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL.Image import Image

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sapp_lightning[app]'"
# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), one per method in every figure.
METHOD_COLORS = {
    "dense": "#000000",
    "magnitude": "#CC79A7",
    "powerprop": "#009E73",
    "acdc": "#0072B2",
    "gmp": "#E69F00",
    "sapp": "#D55E00",
}
METHOD_MARKERS = {"dense": "s", "magnitude": "v", "powerprop": "^", "acdc": "o", "gmp": "P", "sapp": "D"}
PHASE_NAMES = {0: "dense", 1: "sparsify", 2: "sparse"}
# Opaque pale band colours (no alpha), so that a band's pixels have exactly this colour in the PNG.
PHASE_COLORS = {0: "#e9e9e9", 1: "#fbe7b5", 2: "#d2e3f3"}
CURVE_FILENAME = "sparsity_curve.png"

_PRUNING = "pruning/"
_LAYER = "pruning/layer/"


def _matplotlib():
    """Import matplotlib's object-oriented pieces, or say which extra provides them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"figures need matplotlib: {INSTALL_HINT}") from err
    return Figure, FigureCanvasAgg


# --- a run's sparsity log ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Band:
    """A phase of training: optimizer steps ``start`` (inclusive) to ``end`` (exclusive)."""

    start: int
    end: int
    phase: int | None  # 0 dense, 1 sparsify, 2 sparse; None where nothing logged says which


@dataclass(frozen=True)
class PhaseEnd:
    """What ``BlockPruning`` logs when a phase ends: the first step of the next phase, the phase that ended, and
    the sparsity (overall and per layer) it ended with."""

    step: int
    phase: int
    sparsity: float
    layers: dict[str, float]


@dataclass
class SparsityLog:
    """The pruning curves of one run, read from its ``metrics.csv`` by :func:`read_sparsity_log`.

    ``steps`` are optimizer steps (0-based): entry ``i`` of ``sparsity``/``target``/``phase`` describes the masks
    that step ``steps[i]`` trains with.
    """

    path: Path
    steps: list[int] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)
    target: list[float | None] = field(default_factory=list)
    phase: list[int] = field(default_factory=list)
    phase_ends: list[PhaseEnd] = field(default_factory=list)
    last_step: int = 0

    @property
    def layer_names(self) -> list[str]:
        return sorted({name for end in self.phase_ends for name in end.layers})

    def bands(self) -> list[Band]:
        """The phases of training, from the phase-end rows (exact boundaries); where a log has none, from the
        changes of ``pruning/phase`` between step rows (a boundary at the first step row showing the new phase)."""
        bands, start = [], 0
        for end in self.phase_ends:
            if end.step > start:
                bands.append(Band(start, end.step, end.phase))
            start = end.step
        later = [(s, p) for s, p in zip(self.steps, self.phase) if s >= start]
        if not self.phase_ends and later:  # no phase-end rows: cut where the logged phase changes
            for (_, p), (s, q) in zip(later, later[1:]):
                if q != p:
                    bands.append(Band(start, s, p))
                    start = s
            later = [(s, p) for s, p in later if s >= start]
        if self.last_step > start or not bands:  # the phase training ended in (no phase-end row)
            bands.append(Band(start, max(self.last_step, start + 1), later[-1][1] if later else None))
        return bands

    def _curve(
        self, values: Sequence[float | None], end_values: bool, defaults: dict[int | None, float | None]
    ) -> tuple[list[float], list[float]]:
        """Join the logged points band by band: dense and sparse phases hold one value, so their line is flat
        over the whole band; a sparsification phase starts from where the previous phase ended (the exponential
        schedule starts at the current sparsity), runs straight through its logged points and ends at the
        phase-end row's value (``end_values``), or for the plan at the next sparse phase's target (the schedule
        reaches the target as the phase ends). Between bands the line jumps at the exact boundary step. A dense or
        sparse band without a logged value takes ``defaults[phase]``, or leaves a gap."""
        points = [(s, v) for s, v in zip(self.steps, values) if v is not None]
        ends = {e.step: e.sparsity for e in self.phase_ends} if end_values else {}
        bands = self.bands()
        # the last band keeps a point at its end (the masks after the last step)
        inside = [[(s, v) for s, v in points if b.start <= s < b.end or (b is bands[-1] and s == b.end)] for b in bands]
        finals = [ends.get(b.end, pts[-1][1] if pts else None) for b, pts in zip(bands, inside)]
        finals = [defaults.get(b.phase) if v is None else v for b, v in zip(bands, finals)]
        for i, band in enumerate(bands[:-1]):
            if band.phase == 1 and not end_values and bands[i + 1].phase == 2 and finals[i + 1] is not None:
                finals[i] = finals[i + 1]
        xs: list[float] = []
        ys: list[float] = []
        for i, (band, pts, final) in enumerate(zip(bands, inside, finals)):
            if band.phase == 1:
                previous = finals[i - 1] if i > 0 else None
                logged_start = bool(pts) and pts[0][0] == band.start
                path = ([(band.start, previous)] if previous is not None and not logged_start else []) + pts
                if final is not None and (not pts or pts[-1][0] < band.end):
                    path.append((band.end, final))
            else:
                path = [(band.start, final), (band.end, final)] if final is not None else []
            if not path:
                xs.append(band.start)  # nothing known about this band: leave a gap
                ys.append(math.nan)
            for x, y in path:
                xs.append(x)
                ys.append(y)
        return xs, ys

    def achieved_curve(self) -> tuple[list[float], list[float]]:
        """``(steps, block sparsity)`` of the line drawn for the measured sparsity (see :meth:`_curve`)."""
        return self._curve(self.sparsity, end_values=True, defaults={})

    def target_curve(self) -> tuple[list[float], list[float]]:
        """``(steps, target sparsity)`` of the plan's line (logged on step rows only). A phase too short to be
        logged still has the plan's value: 0 in a dense phase, the final target in a sparse one."""
        sparse = [t for t, p in zip(self.target, self.phase) if p == 2 and t is not None]
        return self._curve(self.target, end_values=False, defaults={0: 0.0, 2: sparse[-1] if sparse else None})


def find_metrics_csv(source: str | Path) -> Path:
    """``source`` itself if it is a file, else the ``metrics.csv`` below the run folder ``source`` (of several
    ``version_N`` folders of one logger, the newest)."""
    source = Path(source)
    if source.is_file():
        return source
    found = sorted(source.rglob("metrics.csv")) if source.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no metrics.csv below {source}: the sparsity curve is read from the CSV logger's log (logger=csv, "
            "the app's default)"
        )
    by_logger: dict[Path, list[Path]] = defaultdict(list)
    for path in found:
        by_logger[path.parent.parent if re.fullmatch(r"version_\d+", path.parent.name) else path.parent].append(path)
    if len(by_logger) > 1:
        listed = ", ".join(str(p) for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(f"several runs' logs below {source} ({listed}): pass one run folder or one metrics.csv")
    (paths,) = by_logger.values()
    return max(paths, key=lambda p: int(p.parent.name.split("_")[1]) if p.parent.name.startswith("version_") else 0)


def _float(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def read_sparsity_log(source: str | Path) -> SparsityLog:
    """The pruning curves logged by ``BlockPruning`` into a CSV log (``metrics.csv``, or a run folder holding one).

    Step rows (``pruning/sparsity``, ``pruning/target_sparsity``, ``pruning/phase`` every ``log_every_n_steps``)
    are written by Lightning one step before the step whose masks they describe, so they are shifted by one;
    phase-end rows (those with ``pruning/layer/<name>``) carry the first step of the next phase and the sparsity
    the ended phase finished with. Training ends at the last step logged, or at the ``steps`` of the run's
    ``results.json`` where one lies above the log.
    """
    path = find_metrics_csv(source)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    if not {"pruning/sparsity", "pruning/phase"} <= columns:
        raise ValueError(
            f"{path} logs no pruning curve (no pruning/sparsity and pruning/phase columns): a dense run "
            "(pruning=dense), or training ended before BlockPruning logged anything (fewer steps than "
            "log_every_n_steps)"
        )
    out = SparsityLog(path)
    step_rows: dict[int, tuple[float, float | None, int]] = {}
    for row in rows:
        if row.get("step") in (None, ""):
            continue
        step = int(float(row["step"]))
        out.last_step = max(out.last_step, step)
        sparsity, phase = _float(row.get("pruning/sparsity")), _float(row.get("pruning/phase"))
        if sparsity is None or phase is None:
            continue
        layers = {k[len(_LAYER) :]: float(v) for k, v in row.items() if k and k.startswith(_LAYER) and v != ""}
        if layers:
            out.phase_ends.append(PhaseEnd(step, int(phase), sparsity, layers))
        else:  # the last row of a step wins (a resumed run may write a step twice)
            step_rows[step + 1] = (sparsity, _float(row.get("pruning/target_sparsity")), int(phase))
    if not step_rows and not out.phase_ends:
        raise ValueError(f"{path} has pruning columns but no logged values")
    for step in sorted(step_rows):
        sparsity, target, phase = step_rows[step]
        out.steps.append(step)
        out.sparsity.append(sparsity)
        out.target.append(target)
        out.phase.append(phase)
    out.phase_ends.sort(key=lambda e: e.step)
    # Where training ended: Lightning's epoch-end rows sit one step early too, so the run's own count of
    # optimizer steps (results.json, where the log lies in an app run folder) is preferred.
    info = _run_info(path)
    out.last_step = max([out.last_step, *out.steps, int((info or {}).get("steps") or 0)])
    return out


def _run_info(path: Path) -> dict[str, Any] | None:
    """The ``results.json`` of the run a log belongs to (the nearest one above it), if any."""
    for folder in path.parents:
        if (folder / "results.json").is_file():
            return json.loads((folder / "results.json").read_text()) | {"path": str(folder)}
    return None


def run_folder(metrics_csv: Path) -> Path:
    """Where a run's figures go: the folder of its ``results.json``, else beside the log."""
    info = _run_info(metrics_csv)
    return Path(info["path"]) if info else metrics_csv.parent


def sparsity_curve_figure(
    source: str | Path | SparsityLog, title: str | None = None, layers: bool | None = None
) -> Figure:
    """Achieved and target block sparsity against the optimizer step, the phases shaded (the paper's Fig. 2(b)).

    ``source``: a ``metrics.csv``, a run folder, or a :class:`SparsityLog`. ``layers``: draw each pruned layer's
    sparsity at the phase ends (default: when there are at most 8 layers). The title names the method, data,
    target and block size when the run's ``results.json`` is found above the log.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib.patches import Patch

    curves = source if isinstance(source, SparsityLog) else read_sparsity_log(source)
    info = _run_info(curves.path) or {}
    method = info.get("algorithm", "sapp" if 1 in curves.phase or any(e.phase == 1 for e in curves.phase_ends) else "")
    fig = Figure(figsize=(10, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bands = curves.bands()
    for band in bands:
        if band.phase is not None:
            ax.axvspan(band.start, band.end, color=PHASE_COLORS[band.phase], lw=0, zorder=0)
    xs, ys = curves.achieved_curve()
    ax.plot(xs, [100 * y for y in ys], color=METHOD_COLORS.get(method, "#000000"), lw=2, label="achieved", zorder=3)
    tx, ty = curves.target_curve()
    ax.plot(tx, [100 * y for y in ty], color="#000000", lw=1.2, ls=(0, (4, 2)), label="target (plan)", zorder=4)
    names = curves.layer_names
    if layers if layers is not None else len(names) <= 8:
        cmap = _layer_colors(len(names))
        for name, color in zip(names, cmap):
            pts = [(e.step, 100 * e.layers[name]) for e in curves.phase_ends if name in e.layers]
            ax.plot(*zip(*pts), ls="none", marker="o", ms=4, mfc="none", color=color, label=f"{name} (phase end)")
    ax.set_xlim(0, bands[-1].end)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("block sparsity (%)")
    ax.grid(axis="y", color="#ffffff", lw=0.8, zorder=1)
    if title is None:
        title = _curve_title(info, curves.path)
    ax.set_title(title, fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    phases = sorted({b.phase for b in bands if b.phase is not None})
    handles += [Patch(color=PHASE_COLORS[p], label=f"{PHASE_NAMES[p]} phase") for p in phases]
    labels += [f"{PHASE_NAMES[p]} phase" for p in phases]
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    return fig


def _layer_colors(n: int) -> list[str]:
    palette = ["#555555", "#8c564b", "#7f7f7f", "#bcbd22", "#17becf", "#9467bd", "#2ca02c", "#e377c2"]
    return [palette[i % len(palette)] for i in range(n)]


def _curve_title(info: dict[str, Any], path: Path) -> str:
    if not info:
        return f"block sparsity over training: {path}"
    method = METHOD_NAMES.get(info.get("algorithm", ""), info.get("algorithm", "?"))
    what = " ".join(DATA_NAMES.get(info.get("data", ""), info.get("data", "")).split() + [str(info.get("model", ""))])
    return (
        f"{method} on {what}: block sparsity over training "
        f"(target {float(info.get('sparsity', 0)):.0%}, {info.get('block_size')}x{info.get('block_size')} blocks, "
        f"seed {info.get('seed')})\n{info['path']}"
    )


def save_figure(fig: Figure, path: str | Path, dpi: int | None = None) -> Path:
    """Write ``fig`` as a PNG (creating the folder) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi or fig.dpi, facecolor="white")
    return path


def figure_image(fig: Figure) -> Image:
    """``fig`` as an 8-bit RGB ``PIL.Image`` (what ``wandb.Image`` stores as is; a float tensor would not be)."""
    import PIL.Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, facecolor="white")
    buffer.seek(0)
    return PIL.Image.open(buffer).convert("RGB")


def save_sparsity_curve(source: str | Path, out: str | Path | None = None) -> Path:
    """Draw a run's sparsity curve and save it (default: ``sparsity_curve.png`` in the run folder)."""
    path = find_metrics_csv(source)
    fig = sparsity_curve_figure(path)
    return save_figure(fig, out or run_folder(path) / CURVE_FILENAME)


def log_sparsity_curve(trainer: pl.Trainer, run_dir: str | Path) -> Path | None:
    """The app's end-of-run hook: ``sparsity_curve.png`` in ``run_dir`` from the run's CSV log, also sent to every
    ``WandbLogger`` as the image ``pruning/sparsity_curve``.

    Returns the PNG's path, or ``None`` (with a log line) for a dense run, a run without a CSV logger, or without
    matplotlib: a missing figure never fails a finished run. Call it on every rank; only rank 0 draws.
    """
    if getattr(trainer, "global_rank", 0) != 0:
        return None
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    loggers = list(getattr(trainer, "loggers", []) or [])
    csv_loggers = [lg for lg in loggers if isinstance(lg, CSVLogger)]
    if not csv_loggers:
        log.info("no sparsity curve: it is drawn from the CSV log, and this run has no CSVLogger")
        return None
    for logger in csv_loggers:
        logger.save()  # flush what is still buffered
    try:
        curves = read_sparsity_log(Path(csv_loggers[0].log_dir) / "metrics.csv")
        fig = sparsity_curve_figure(curves)
    except ValueError as err:  # a dense run logs no pruning curve
        log.info("no sparsity curve: %s", err)
        return None
    except ImportError as err:
        log.warning("no sparsity curve: %s", err)
        return None
    path = save_figure(fig, Path(run_dir) / CURVE_FILENAME)
    log.info("sparsity curve: %s", path)
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image("pruning/sparsity_curve", [figure_image(fig)], step=trainer.global_step)
    return path


# --- training accuracy over steps ------------------------------------------------------------------------------
TRAIN_ACC = "train/acc"
_LINE_STYLES = ("-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)))


def read_train_accuracy(source: str | Path) -> tuple[list[int], list[float]]:
    """``(steps, accuracy)`` from the ``train/acc`` column of a run's CSV log (``metrics.csv`` or a run folder): the
    top-1 accuracy of the training batch at each logged optimizer step (where a resumed run logged a step twice,
    the later row).

    Example:
        >>> import tempfile
        >>> csv = Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> _ = csv.write_text("epoch,step,train/acc,val/acc\\n0,9,0.5,\\n0,19,0.75,\\n0,19,,0.7\\n")
        >>> read_train_accuracy(csv)
        ([9, 19], [0.5, 0.75])
    """
    path = find_metrics_csv(source)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    by_step = {int(float(r["step"])): float(r[TRAIN_ACC]) for r in rows if r.get("step") and r.get(TRAIN_ACC)}
    if not by_step:
        raise ValueError(
            f"{path} logs no {TRAIN_ACC}: the image classifier logs it (a CTR model does not), or training ended "
            "before the first log_every_n_steps"
        )
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def run_sources(sources: Sequence[str | Path]) -> list[Path]:
    """Each source as run logs: a sweep folder (several ``results.json``) becomes the folder of each run."""
    runs: list[Path] = []
    for source in map(Path, sources):
        found = sorted(source.rglob("results.json")) if source.is_dir() else []
        runs += [p.parent for p in found] if len(found) > 1 else [source]
    return runs


def _run_label(info: dict[str, Any], path: Path) -> str:
    if not info:
        return str(path)
    label = METHOD_NAMES.get(info.get("algorithm", ""), info.get("algorithm", "?"))
    if info.get("algorithm") not in (None, "dense", "none"):
        label += f" {float(info.get('sparsity', 0)):.0%} {info.get('block_size')}x{info.get('block_size')}"
    variant = f" {info['variant']}" if info.get("variant") else ""
    return f"{label}{variant} seed {info.get('seed')}"


def train_accuracy_figure(sources: Sequence[str | Path], smooth: int | None = None, title: str | None = None) -> Figure:
    """Training accuracy against the optimizer step, one line per run: the paper's Fig. 3 (ACDC against SA++ at 90%
    sparsity with 32x32 blocks) from the runs' CSV logs.

    ``sources``: run folders, ``metrics.csv`` files or sweep folders (each run of a sweep). Each run's logged batch
    accuracies are drawn faintly, and over them their running mean over ``smooth`` logged steps (default: a 50th of
    the longest run's points). The colour is the method's; runs of one method differ in line style.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    runs = run_sources(sources)
    curves = [(path, *read_train_accuracy(path)) for path in runs]
    window = smooth or max(1, max(len(steps) for _, steps, _ in curves) // 50)
    fig = Figure(figsize=(9, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    seen: dict[str, int] = defaultdict(int)
    for path, steps, values in curves:
        info = _run_info(find_metrics_csv(path)) or {}
        method = info.get("algorithm", "")
        color, style = METHOD_COLORS.get(method, "#000000"), _LINE_STYLES[seen[method] % len(_LINE_STYLES)]
        seen[method] += 1
        percent = [100 * v for v in values]
        ax.plot(steps, percent, color=color, lw=0.6, alpha=0.25)
        # running mean over the last `window` logged points (a short window at the start)
        totals = [0.0, *itertools.accumulate(percent)]
        mean = [(totals[i + 1] - totals[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(percent))]
        ax.plot(steps, mean, color=color, ls=style, lw=1.8, label=_run_label(info, path))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training accuracy (%)")
    ax.grid(alpha=0.3)
    what = f"top-1 on each logged batch; lines: mean over {window} logged steps"
    ax.set_title(title or f"training accuracy over training ({what})", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return fig


def save_train_accuracy(sources: Sequence[str | Path], out: str | Path, smooth: int | None = None) -> Path:
    """Draw :func:`train_accuracy_figure` and save it as the PNG ``out``."""
    return save_figure(train_accuracy_figure(sources, smooth), out)


# --- results against sparsity ----------------------------------------------------------------------------------
# Metrics of a record: "acc" (top-1 %, higher is better), "loss" (cross-entropy / BCE), "auroc".
HIGHER_IS_BETTER = {"acc": True, "loss": False, "auroc": True}
DATA_NAMES = {
    "FashionMNISTDataModule": "Fashion-MNIST",
    "MovieLensCTRDataModule": "MovieLens-100k CTR",
    "CriteoDataModule": "Criteo",
    "ImageNetDataModule": "ImageNet",
}


def records_from_results(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten ``results.json`` dicts (``sapp_lightning.app.results.load_results``) into plot records."""
    out = []
    for r in rows:
        method = "dense" if r["algorithm"] in ("none", "dense") else r["algorithm"]
        val = r.get("val", {})
        metrics = {"acc": val.get("val/acc"), "loss": val.get("val/loss"), "auroc": val.get("val/auroc")}
        if metrics["acc"] is not None:
            metrics["acc"] *= 100.0
        out.append(
            {
                "method": method,
                "sparsity": float(r["sparsity"]) if method != "dense" else 0.0,
                "block": int(r["block_size"]) if method != "dense" else 0,
                "seed": r.get("seed"),
                "task": r.get("task", "classification"),
                "data": r.get("data", ""),
                "model": r.get("model", ""),
                "epochs": r.get("epochs"),
                "pruned_layers": tuple(r.get("pruned_layers") or ()),
                **{k: v for k, v in metrics.items() if v is not None},
            }
        )
    return out


def records_from_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The runs of a ``bench/quality.py`` JSON lines file as plot records (read by
    :func:`sapp_lightning.app.results.load_jsonl`, older lines included); runs with a variant (ablations, swept
    overrides) are left out, and a run written twice counts once (its last line)."""
    return records_from_results(r for r in load_jsonl(path) if not r.get("variant"))


def paper_setting(records: Sequence[dict[str, Any]]) -> str | None:
    """``"criteo"`` for runs on Criteo, ``"imagenet"`` for ResNet50 on ImageNet (the paper's tables), else None."""
    data = {r["data"] for r in records}
    models = {str(r["model"]).lower() for r in records}
    if data == {"CriteoDataModule"}:
        return "criteo"
    if data == {"ImageNetDataModule"} and models == {"resnet50"}:
        return "imagenet"
    return None


@dataclass(frozen=True)
class Point:
    """One configuration over its seeds."""

    sparsity: float
    mean: float
    low: float
    high: float
    n: int


def result_series(records: Sequence[dict[str, Any]], metric: str) -> dict[int, dict[str, list[Point]]]:
    """``{block: {method: [Point per sparsity, ascending]}}`` of the pruned runs, and ``{0: {"dense": [...]}}`` for
    the dense ones; ``low``/``high`` are the seeds' minimum and maximum.

    Example:
        >>> rows = [{"method": "sapp", "sparsity": 0.9, "block": 8, "acc": a} for a in (80.0, 82.0, 84.0)]
        >>> result_series(rows, "acc")
        {8: {'sapp': [Point(sparsity=0.9, mean=82.0, low=80.0, high=84.0, n=3)]}}
    """
    groups: dict[tuple[int, str, float], list[float]] = defaultdict(list)
    for r in records:
        if r.get(metric) is not None and math.isfinite(r[metric]):
            block = 0 if r["method"] == "dense" else r["block"]
            groups[(block, r["method"], round(r["sparsity"], 6))].append(float(r[metric]))
    out: dict[int, dict[str, list[Point]]] = defaultdict(lambda: defaultdict(list))
    for (block, method, sparsity), values in sorted(groups.items()):
        out[block][method].append(Point(sparsity, statistics.fmean(values), min(values), max(values), len(values)))
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return {b: {m: out[b][m] for m in sorted(out[b], key=lambda m: (order.get(m, 99), m))} for b in sorted(out)}


def _metric_label(metric: str, task: str) -> str:
    if metric == "acc":
        return "validation top-1 (%)"
    if metric == "auroc":
        return "validation AUROC (higher is better)"
    return "validation BCE (lower is better)" if task == "ctr" else "validation cross-entropy"


def _paper_metric(paper: str | None, metric: str) -> bool:
    return (paper == "criteo" and metric == "loss") or (paper == "imagenet" and metric == "acc")


def result_figure(
    records: Sequence[dict[str, Any]],
    metrics: Sequence[str] | None = None,
    paper: str | None | bool = True,
    title: str | None = None,
    caption: str | None = None,
) -> Figure:
    """Validation metric against target block sparsity: one row of panels per metric, one column per block size.

    Each method is a line through its means over the seeds with min-max bars (the methods are set a little
    apart so that the bars do not hide each other; the sparsity levels are evenly spaced); the dense model is a
    dashed horizontal line with its seeds' range shaded. ``paper=True`` adds the paper's numbers as hollow
    markers where the runs are the paper's setting (:func:`paper_setting`: Criteo data, or ResNet50 on
    ImageNet), ``paper="criteo"``/``"imagenet"`` forces them, ``False`` leaves them out. ``metrics`` default:
    accuracy for classification, BCE and (where logged) AUROC for CTR. Means far off the other methods' range
    are drawn as a triangle at the panel's edge with their value, so that one diverged method does not flatten
    the others.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not records:
        raise ValueError("no runs to plot")
    task = records[0].get("task", "classification")
    if metrics is None:
        metrics = ["acc"] if task == "classification" else ["loss", "auroc"]
    metrics = [m for m in metrics if any(r.get(m) is not None for r in records)]
    if not metrics:
        raise ValueError("the runs hold none of the metrics to plot")
    setting = paper_setting(records) if paper is True else (paper or None)
    series = {m: result_series(records, m) for m in metrics}
    blocks = sorted({b for s in series.values() for b in s if b != 0})
    if not blocks:
        raise ValueError("no pruned runs to plot (only the dense model)")
    levels = sorted({r["sparsity"] for r in records if r["method"] != "dense"})
    methods = [m for m in METHOD_ORDER[1:] if any(r["method"] == m for r in records)]
    methods += sorted({r["method"] for r in records} - set(METHOD_ORDER))
    layers_by_block = {
        b: sorted({name for r in records if r["block"] == b and r["method"] != "dense" for name in r["pruned_layers"]})
        for b in blocks
    }
    show_layers = len({tuple(v) for v in layers_by_block.values()}) > 1

    ncols, nrows = len(blocks), len(metrics)
    width = max(0.8 + 3.9 * ncols + 1.9, 8.5)  # room for the title and the caption over a single column
    fig = Figure(figsize=(width, 0.9 + 3.2 * nrows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey="row")
    stacks: list[dict] = []  # per panel: the off-scale labels drawn
    dodge = min(0.5 / max(1, len(methods)), 0.14)
    offsets = {m: (i - (len(methods) - 1) / 2) * dodge for i, m in enumerate(methods)}
    for row, metric in enumerate(metrics):
        data = series[metric]
        dense = data.get(0, {}).get("dense", [])
        limits = _focus_limits(data, dense, HIGHER_IS_BETTER[metric])
        with_paper = _paper_metric(setting, metric)
        for col, block in enumerate(blocks):
            ax: Axes = axes[row][col]
            stack: dict = {}
            stacks.append(stack)
            if dense:
                d = dense[0]
                ax.axhspan(d.low, d.high, color="#000000", alpha=0.07, lw=0)
                ax.axhline(d.mean, color=METHOD_COLORS["dense"], ls="--", lw=1.2, label="Dense")
            for method in methods:
                points = data.get(block, {}).get(method, [])
                if not points:
                    continue
                x = [levels.index(p.sparsity) + offsets[method] for p in points]
                y = [p.mean for p in points]
                color = METHOD_COLORS.get(method)
                bars = ax.errorbar(
                    x, y, yerr=[[p.mean - p.low for p in points], [p.high - p.mean for p in points]],
                    color=color, marker=METHOD_MARKERS.get(method, "o"), ms=5, lw=1.6, capsize=2.5, elinewidth=1,
                    label=METHOD_NAMES.get(method, method),
                )  # fmt: skip
                bars.lines[0].set_label(METHOD_NAMES.get(method, method))  # errorbar labels only its container
                _mark_off_scale(ax, x, y, limits, color, stack)
                if len(levels) == 1:  # a single sparsity (the demo): the few values are worth printing
                    for xi, yi in zip(x, y):
                        ax.annotate(f"{yi:.4g}", (xi, yi), xytext=(7, 0), textcoords="offset points", va="center",
                                    fontsize=8, color=color)  # fmt: skip
                if with_paper:
                    ref = [(xi, paper_value(setting, method, block, p.sparsity)) for xi, p in zip(x, points)]
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
                head = f"{block}x{block} blocks"
                if show_layers:
                    head += "\npruned: " + ", ".join(layers_by_block[block])
                ax.set_title(head, fontsize=10)
            if col == 0:
                ax.set_ylabel(_metric_label(metric, task))
            if row == nrows - 1:
                ax.set_xlabel("target block sparsity")
                ax.set_xticks(range(len(levels)), [f"{s:.0%}" for s in levels])
                ax.set_xlim(-0.5, len(levels) - 0.5)
    off_scale = any(stacks)
    handles = []
    dense_points = series[metrics[0]].get(0, {}).get("dense", [])
    if dense_points:
        handles.append(Line2D([], [], color="#000000", ls="--", label="Dense"))
    if any(p.n > 1 for p in dense_points):
        handles.append(Patch(color="#000000", alpha=0.07, lw=0, label="Dense: seeds' range"))
    handles += [
        Line2D([], [], color=METHOD_COLORS.get(m), marker=METHOD_MARKERS.get(m, "o"), label=METHOD_NAMES.get(m, m))
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
        caption = _result_caption(records, setting)
        if off_scale:
            caption += " Triangles at a panel's edge: a mean off the scale, its value printed beside."
    fig.suptitle(textwrap.fill(title or _result_title(records), int(width * 8)), fontsize=11)
    fig.supxlabel(textwrap.fill(caption, int(width * 15)), fontsize=8, color="#333333")
    return fig


def _focus_limits(
    data: dict[int, dict[str, list[Point]]], dense: list[Point], higher_better: bool
) -> tuple[float, float]:
    """y-limits around the competitive means: the dense model and every mean with its bar, except, in a grid of
    at least 8 pruned means, means worse than the best by more than 3x the spread of the better half (a diverged
    method), which are marked at the edge instead. A small sweep (the demo's one sparsity) shows everything."""
    points = [p for b, methods in data.items() if b != 0 for ps in methods.values() for p in ps]
    if not points and not dense:
        return 0.0, 1.0
    kept = points + dense
    if len(points) >= 8:
        means = sorted((p.mean for p in kept), reverse=higher_better)  # best first
        best, middle = means[0], means[len(means) // 2]
        reach = 3 * max(abs(middle - best), 1e-9)
        kept = [p for p in points if abs(p.mean - best) <= reach] + dense
    lo, hi = min(p.low for p in kept), max(p.high for p in kept)
    if len(points) >= 8:  # the bars of the kept means only as far as the reach
        lo, hi = (max(lo, best - reach * 1.15), hi) if higher_better else (lo, min(hi, best + reach * 1.15))
    pad = 0.06 * max(hi - lo, 1e-6 + 0.01 * abs(hi))
    return lo - pad, hi + pad


def _mark_off_scale(
    ax: Axes, x: Sequence[float], y: Sequence[float], limits: tuple[float, float], color: str, stack: dict
) -> None:
    """A triangle at the panel's edge, with the value, for each mean outside the y-limits; ``stack`` counts the
    labels already at each sparsity level of this panel, so that the labels of several methods do not overlap."""
    lo, hi = limits
    for xi, yi in zip(x, y):
        if hi >= yi >= lo:
            continue
        above = yi > hi
        ax.plot([xi], [hi if above else lo], marker="^" if above else "v", ms=8, color=color, clip_on=False, zorder=6)
        key = (round(xi), above)
        offset = 11 + 10 * stack.get(key, 0)
        stack[key] = stack.get(key, 0) + 1
        ax.annotate(
            f"{yi:.3g}", (xi, hi if above else lo), xytext=(0, -offset if above else offset),
            textcoords="offset points", ha="center", va="top" if above else "bottom", fontsize=7, color=color,
            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.85}, zorder=7,
        )  # fmt: skip


def _result_title(records: Sequence[dict[str, Any]]) -> str:
    data = " / ".join(sorted({DATA_NAMES.get(r["data"], r["data"]) for r in records}))
    models = " / ".join(sorted({str(r["model"]) for r in records}))
    epochs = sorted({r["epochs"] for r in records if r.get("epochs")})
    seeds = sorted({len({r["seed"] for r in records if (r["method"], r["block"], r["sparsity"]) == k})
                    for k in {(r["method"], r["block"], r["sparsity"]) for r in records}})  # fmt: skip
    parts = [f"{models} on {data}"]
    if epochs:
        parts.append(f"{'/'.join(map(str, epochs))} epoch{'s' if epochs != [1] else ''}")
    if seeds == [1]:
        parts.append("1 seed")
    else:
        parts.append(f"mean of {'/'.join(map(str, seeds))} seeds, bars: min-max")
    return ", ".join(parts)


def _result_caption(records: Sequence[dict[str, Any]], setting: str | None) -> str:
    data = {DATA_NAMES.get(r["data"], r["data"]) for r in records}
    if setting == "criteo":
        return "Stars: the paper's Table 2 (Criteo, mean of 3 runs); dotted: the paper's dense model (0.4489)."
    if setting == "imagenet":
        return "Stars: the paper's Table 1 (ResNet50 / ImageNet top-1; only ACDC and SA++ were retrieved)."
    return (
        f"No paper numbers: the paper reports ImageNet (ResNet50) and Criteo, not {', '.join(sorted(data))}. "
        "Sparsity levels evenly spaced; methods set slightly apart."
    )


# --- SA++'s block score: attention against magnitude (the paper's Fig. 2(a)) -------------------------------------
# Okabe-Ito colours (as METHOD_COLORS), one per sparsity level in ascending order.
LEVEL_COLORS = ["#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#000000"]


def score_difference_figure(differences: dict[str, list[Difference]], title: str | None = None) -> Figure:
    """Grouped bars shaped like the paper's Fig. 2(a): one panel per model, x = block size, one bar (colour) per
    sparsity, y = top-1 with attention scores minus top-1 with magnitude scores in points (positive: attention is
    better), bars at the mean over seeds with min-max whiskers and each seed's difference as a dot."""
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib.patches import Patch

    if not differences:
        raise ValueError("no pairs of SA++ runs with attention and magnitude scores")
    levels = sorted({d.sparsity for ds in differences.values() for d in ds})
    colors = {s: LEVEL_COLORS[i % len(LEVEL_COLORS)] for i, s in enumerate(levels)}
    counts = [len({d.block for d in ds}) for ds in differences.values()]  # panel widths follow the block sizes
    fig = Figure(figsize=(2.6 + 2.3 * sum(counts), 4.3), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(differences), squeeze=False, sharey=True, gridspec_kw={"width_ratios": counts})[0]
    width = 0.8 / len(levels)
    for ax, (model, ds) in zip(axes, differences.items()):
        blocks = sorted({d.block for d in ds})
        for d in ds:
            x = blocks.index(d.block) + (levels.index(d.sparsity) - (len(levels) - 1) / 2) * width
            low, high = min(d.values), max(d.values)
            ax.bar(x, d.mean, width * 0.9, color=colors[d.sparsity], zorder=2)
            ax.errorbar(x, d.mean, yerr=[[d.mean - low], [high - d.mean]], color="#333333", lw=1, capsize=3, zorder=3)
            ax.plot([x] * len(d.values), d.values, ls="none", marker="o", ms=3, mfc="white", mec="#333333", zorder=4)
        ax.axhline(0, color="#000000", lw=1, zorder=1)
        ax.set_xticks(range(len(blocks)), [f"{b}x{b}" for b in blocks])
        ax.set_xlim(-0.55, len(blocks) - 0.45)
        ax.set_xlabel("block size")
        ax.set_title(f"{model} ({len(ds[0].values)} seeds)" if len({len(d.values) for d in ds}) == 1 else model)
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


def plot_score_difference(paths: Sequence[str | Path], out: str | Path, split: str = "val") -> Path:
    """The Fig. 2(a)-shaped figure of the runs in ``paths`` (JSON lines) as ``out/score_attention_vs_magnitude.png``."""
    rows = [r for path in paths for r in load_jsonl(path)]
    return save_figure(score_difference_figure(score_differences(rows, split)), Path(out) / SCORE_FIGURE)


SCORE_FIGURE = "score_attention_vs_magnitude.png"


# --- sweep folders and JSON lines files --------------------------------------------------------------------------
def _group_key(record: dict[str, Any]) -> tuple:
    return (record["data"], record["model"], record["task"], record.get("epochs"))


def plot_records(records: Sequence[dict[str, Any]], out: Path, stem: str) -> list[Path]:
    """One result figure per (data, model, task, epochs) group: ``out/<stem>.png``, with ``_<data>``, ``_<model>``
    and ``_e<epochs>`` added for what differs between the groups. Groups without pruned runs are skipped."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[_group_key(r)].append(r)
    varying = [i for i in range(4) if len({key[i] for key in groups}) > 1]
    paths = []
    for key, rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if all(r["method"] == "dense" for r in rows):
            continue
        parts = [f"e{key[i]}" if i == 3 else re.sub(r"\W+", "", str(key[i]).replace("DataModule", "")) for i in varying]
        name = "_".join([stem, *(p.lower() for p in parts)])
        paths.append(save_figure(result_figure(rows), out / f"{name}.png"))
    return paths


def plot_sweep(root: str | Path, curves: bool = True) -> list[Path]:
    """For a run or sweep folder: the result figure (``<root>/results.png``) and, with ``curves``, each pruned
    run's ``sparsity_curve.png`` in its own folder. Returns the paths written; says on stderr what it skipped."""
    root = Path(root)
    rows = load_results(root)
    written = []
    if curves:
        for row in rows:
            folder = Path(row["path"])
            if row["algorithm"] in ("none", "dense"):
                continue
            try:
                written.append(save_sparsity_curve(folder, folder / CURVE_FILENAME))
            except (FileNotFoundError, ValueError) as err:
                print(f"no sparsity curve for {folder}: {err}", file=sys.stderr)
    records = records_from_results(rows)
    if any(r["method"] != "dense" for r in records):
        written += plot_records(records, root, "results")
    else:
        print(f"no result figure for {root}: only dense runs", file=sys.stderr)
    return written


def plot_jsonl(paths: Sequence[str | Path], out: str | Path) -> list[Path]:
    """The result figures of ``bench/quality.py`` JSON lines files into ``out`` (named after each file)."""
    written = []
    for path in map(Path, paths):
        records = records_from_jsonl(path)
        if not records:
            raise ValueError(f"{path} holds no runs without options (ablation rows are not plotted)")
        written += plot_records(records, Path(out), path.stem)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Draw figures: a metrics.csv or run folder -> its sparsity curve; a sweep folder -> the result "
        "figure and each run's curve; a bench/quality.py .jsonl file -> its result figures.",
    )
    parser.add_argument("sources", nargs="+", type=Path, help="metrics.csv, run/sweep folders or .jsonl files")
    parser.add_argument(
        "--out", type=Path,
        help="folder for the figures of .jsonl files (default: beside each file) and of single runs (named "
        "sparsity_curve_<method>.png there; default: sparsity_curve.png in the run folder)",
    )  # fmt: skip
    parser.add_argument(
        "--score-difference", action="store_true",
        help="the .jsonl sources together: SA++ with attention against magnitude scores (Fig. 2(a)), as "
        f"OUT/{SCORE_FIGURE}",
    )  # fmt: skip
    parser.add_argument(
        "--train-acc", type=Path, metavar="OUT.png",
        help="the sources together (run or sweep folders, metrics.csv): training accuracy over steps, one line per "
        "run (the paper's Fig. 3), as OUT.png",
    )  # fmt: skip
    parser.add_argument(
        "--smooth", type=int, help="with --train-acc: the running mean's window in logged steps (default: automatic)"
    )
    args = parser.parse_args(argv)
    try:
        if args.train_acc:
            print(f"wrote {save_train_accuracy(args.sources, args.train_acc, args.smooth)}")
            return 0
        if args.score_difference:
            print(f"wrote {plot_score_difference(args.sources, args.out or args.sources[0].parent)}")
            return 0
        for source in args.sources:
            if source.suffix == ".jsonl":
                written = plot_jsonl([source], args.out or source.parent)
            elif source.is_dir() and len(list(source.rglob("results.json"))) > 1:
                written = plot_sweep(source)
            else:
                out = None
                if args.out:
                    info = _run_info(find_metrics_csv(source)) or {}
                    out = args.out / f"sparsity_curve_{info.get('algorithm', source.stem)}.png"
                written = [save_sparsity_curve(source, out)]
            for path in written:
                print(f"wrote {path}")
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
