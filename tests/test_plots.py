"""Figures: the sparsity curve from a CSV log, the result figures from results.json / JSON lines, their CLIs."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from sapp_lightning.app import plots
from sapp_lightning.app.paper import paper_value
from sapp_lightning.app.plots import (
    METHOD_COLORS,
    PHASE_COLORS,
    find_metrics_csv,
    read_sparsity_log,
    records_from_jsonl,
    records_from_results,
    result_figure,
    result_series,
    sparsity_curve_figure,
)
from sapp_lightning.app.results import main as results_main

# A plan of 100 steps: dense, sparsify (to 90%), sparse, dense, sparse.
PLAN = [(0, 20), (1, 20), (2, 20), (0, 20), (2, 20)]
TARGET = 0.9


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def plan_sparsity(step: int) -> tuple[int, float]:
    """(phase, sparsity) of the masks step ``step`` trains with under ``PLAN`` (linear sparsification)."""
    start = 0
    for phase, length in PLAN:
        if step < start + length:
            tau = (step - start) / length
            return phase, {0: 0.0, 1: TARGET * tau, 2: TARGET}[phase]
        start += length
    return PLAN[-1][0], TARGET


def write_metrics_csv(path: Path, every: int = 5, layers: tuple[str, ...] = ("fc1", "fc2")) -> Path:
    """What BlockPruning and Lightning's CSVLogger write: step rows every ``every`` steps, written at the step
    before the one they describe, and at each phase boundary a row with ``pruning/layer/<name>`` carrying the
    first step of the next phase and the sparsity the ended phase finished with."""
    rows = []
    boundaries, start = [], 0
    for _, length in PLAN[:-1]:
        start += length
        boundaries.append(start)
    total = sum(length for _, length in PLAN)
    for step in range(1, total + 1):
        if step in boundaries:
            phase, sparsity = plan_sparsity(step - 1)
            row = {"step": step, "pruning/phase": phase, "pruning/sparsity": sparsity}
            row |= {f"pruning/layer/{name}": sparsity for name in layers}
            rows.append(row)
        if step % every == 0:
            phase, sparsity = plan_sparsity(step)
            rows.append(
                {"step": step - 1, "epoch": 0, "pruning/phase": phase, "pruning/sparsity": sparsity,
                 "pruning/target_sparsity": sparsity}
            )  # fmt: skip
            rows.append({"step": step - 1, "epoch": 0, "train/loss": 1.0 / step})
    rows.append({"step": total, "epoch": 1, "val/acc": 0.8})
    keys = sorted({k for row in rows for k in row})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def results_json(folder: Path, algorithm: str, sparsity: float, block: int, seed: int, value: float, **extra) -> Path:
    """A run's results.json as ``sapp_lightning.app.train.run`` writes it."""
    task = extra.pop("task", "classification")
    val = {"val/acc": value, "val/loss": 1 - value} if task == "classification" else {"val/loss": value}
    val |= extra.pop("val", {})
    folder.mkdir(parents=True, exist_ok=True)
    row = {
        "name": "demo", "algorithm": algorithm, "sparsity": sparsity, "block_size": block, "seed": seed,
        "data": "FashionMNISTDataModule", "model": "MLP", "task": task, "val": val, "test": {},
        "achieved_block_sparsity": sparsity, "achieved_weight_sparsity": sparsity,
        "pruned_layers": ["net.1"] if algorithm not in ("none", "dense") else [], "fit_seconds": 1.0, "steps": 100,
    } | extra  # fmt: skip
    (folder / "results.json").write_text(json.dumps(row))
    return folder


def png_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])


def count_color(pixels: np.ndarray, color: str, tolerance: int = 0) -> int:
    return int((np.abs(pixels.astype(int) - rgb(color)).max(axis=-1) <= tolerance).sum())


# --- reading the log ----------------------------------------------------------------------------------------------
def test_the_log_gives_exact_phase_bands_and_shifts_step_rows_to_the_step_they_describe(tmp_path):
    log = read_sparsity_log(write_metrics_csv(tmp_path / "metrics.csv"))
    assert [(b.start, b.end, b.phase) for b in log.bands()] == [
        (0, 20, 0), (20, 40, 1), (40, 60, 2), (60, 80, 0), (80, 100, 2)
    ]  # fmt: skip
    assert log.steps[:3] == [5, 10, 15] and log.steps[-1] == 100
    # every step row now sits at the step whose masks it describes
    for step, sparsity, phase in zip(log.steps, log.sparsity, log.phase):
        assert (phase, sparsity) == plan_sparsity(step)
    assert [(e.step, e.phase) for e in log.phase_ends] == [(20, 0), (40, 1), (60, 2), (80, 0)]
    assert log.layer_names == ["fc1", "fc2"]
    assert log.phase_ends[1].sparsity == pytest.approx(TARGET * 19 / 20)


def test_achieved_curve_is_flat_in_dense_and_sparse_phases_and_jumps_at_the_boundaries(tmp_path):
    log = read_sparsity_log(write_metrics_csv(tmp_path / "metrics.csv"))
    xs, ys = log.achieved_curve()
    end = TARGET * 19 / 20  # the last sparsification step's sparsity, from the phase-end row
    expected = [(0, 0.0), (20, 0.0)]  # dense
    expected += [(20, 0.0), (25, 0.225), (30, 0.45), (35, 0.675), (40, end)]  # sparsify through its logged points
    expected += [(40, 0.9), (60, 0.9), (60, 0.0), (80, 0.0), (80, 0.9), (100, 0.9)]
    assert xs == [x for x, _ in expected]
    assert ys == pytest.approx([y for _, y in expected])
    tx, ty = log.target_curve()
    # the plan reaches the target as the sparsification phase ends
    assert tx[2:7] == [20, 25, 30, 35, 40] and ty[2:7] == pytest.approx([0.0, 0.225, 0.45, 0.675, 0.9])


def test_a_phase_shorter_than_the_logging_interval_still_gets_its_band_and_the_plans_value(tmp_path):
    log = read_sparsity_log(write_metrics_csv(tmp_path / "metrics.csv", every=50))  # step rows at 50 and 100 only
    assert [b.phase for b in log.bands()] == [0, 1, 2, 0, 2]
    tx, ty = log.target_curve()
    assert (60, 0.0) in zip(tx, ty) and (80, 0.0) in zip(tx, ty)  # the dense phase 60-80 was never logged


def test_a_run_folder_resolves_to_its_newest_csv_version(tmp_path):
    write_metrics_csv(tmp_path / "run" / "csv" / "version_0" / "metrics.csv")
    newest = write_metrics_csv(tmp_path / "run" / "csv" / "version_1" / "metrics.csv")
    assert find_metrics_csv(tmp_path / "run") == newest


def test_missing_metrics_csv_says_which_logger_writes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no metrics.csv below .*logger=csv"):
        read_sparsity_log(tmp_path)


def test_a_log_without_pruning_keys_says_it_is_a_dense_run(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\n0,9,0.5\n")
    with pytest.raises(ValueError, match=r"logs no pruning curve .*dense run \(pruning=dense\)"):
        read_sparsity_log(path)


def test_several_runs_below_a_folder_are_refused(tmp_path):
    write_metrics_csv(tmp_path / "a" / "csv" / "version_0" / "metrics.csv")
    write_metrics_csv(tmp_path / "b" / "csv" / "version_0" / "metrics.csv")
    with pytest.raises(ValueError, match="several runs' logs below"):
        find_metrics_csv(tmp_path)


# --- the sparsity curve figure --------------------------------------------------------------------------------------
def test_sparsity_curve_png_shows_the_phase_bands_and_the_methods_colour(tmp_path, mpl):
    run = results_json(tmp_path / "run", "sapp", 0.9, 16, 0, 0.8)
    write_metrics_csv(run / "csv" / "version_0" / "metrics.csv")
    path = plots.save_sparsity_curve(run)
    assert path == run / "sparsity_curve.png"
    pixels = png_pixels(path)
    fig = sparsity_curve_figure(run)
    width, height = fig.get_size_inches() * fig.dpi
    assert pixels.shape == (round(height), round(width), 3)
    for phase in (0, 1, 2):  # each band covers a fifth of the axes: thousands of pixels of exactly its colour
        assert count_color(pixels, PHASE_COLORS[phase]) > 2000
    assert count_color(pixels, METHOD_COLORS["sapp"], tolerance=8) > 200
    assert count_color(pixels, METHOD_COLORS["acdc"], tolerance=8) == 0
    (ax,) = fig.axes
    achieved, target = ax.lines[:2]
    xs, ys = read_sparsity_log(run).achieved_curve()
    assert list(achieved.get_xdata()) == xs and list(achieved.get_ydata()) == pytest.approx([100 * y for y in ys])
    assert target.get_label() == "target (plan)"
    layer_lines = [line for line in ax.lines if "phase end" in line.get_label()]
    assert [line.get_label() for line in layer_lines] == ["fc1 (phase end)", "fc2 (phase end)"]
    assert list(layer_lines[0].get_xdata()) == [20, 40, 60, 80]
    assert "SA++ on Fashion-MNIST MLP" in ax.get_title() and "target 90%" in ax.get_title()


def test_per_layer_points_can_be_left_out(tmp_path, mpl):
    fig = sparsity_curve_figure(write_metrics_csv(tmp_path / "metrics.csv"), layers=False)
    assert [line.get_label() for line in fig.axes[0].lines] == ["achieved", "target (plan)"]


def test_without_matplotlib_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `from matplotlib.figure import` fail
    with pytest.raises(ImportError, match=r"pip install 'sapp_lightning\[app\]'"):
        sparsity_curve_figure(write_metrics_csv(tmp_path / "metrics.csv"))


def test_only_the_apps_figure_modules_import_matplotlib_and_only_inside_functions():
    """matplotlib is an app extra: no module imports it at import time (torchmetrics may, where it is installed)."""
    import ast

    package = Path(plots.__file__).parents[1]
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "matplotlib" for n in names):
                found.append((path.relative_to(package).as_posix(), id(node) in top_level))
    assert found and {p for p, _ in found} == {"app/plots.py", "app/heatmaps.py"}
    assert not any(top for _, top in found)


def test_end_of_run_hook_writes_the_png_and_sends_an_8bit_image_to_wandb(tmp_path, monkeypatch, mpl):
    from PIL import Image
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    csv_logger = CSVLogger(tmp_path / "run", name="csv")
    log = read_sparsity_log(write_metrics_csv(tmp_path / "reference.csv"))
    for row in csv.DictReader((tmp_path / "reference.csv").open()):  # the same rows through Lightning's writer
        metrics = {k: float(v) for k, v in row.items() if v != "" and k not in ("step", "epoch")}
        csv_logger.log_metrics(metrics, step=int(row["step"]))
    sent = []
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images, step=None, **kw: sent.append((key, images)))
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path))

    class Trainer:
        global_rank, global_step, loggers = 0, 100, [csv_logger, wandb_logger]

    path = plots.log_sparsity_curve(Trainer(), tmp_path / "run")
    assert path == tmp_path / "run" / "sparsity_curve.png" and path.is_file()
    assert read_sparsity_log(tmp_path / "run").achieved_curve() == log.achieved_curve()
    ((key, (image,)),) = sent
    assert key == "pruning/sparsity_curve"
    assert isinstance(image, Image.Image) and image.mode == "RGB"  # uint8 RGB: wandb.Image keeps it as is
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.mean() > 150  # mostly white and pale bands, not black
    assert count_color(pixels, PHASE_COLORS[1]) > 2000


def test_end_of_run_hook_skips_dense_runs_and_runs_without_csv_logs(tmp_path, mpl):
    from pytorch_lightning.loggers import CSVLogger

    dense = CSVLogger(tmp_path / "dense", name="csv")
    dense.log_metrics({"train/loss": 0.5}, step=3)

    class Trainer:
        global_rank, global_step, loggers = 0, 10, [dense]

    assert plots.log_sparsity_curve(Trainer(), tmp_path / "dense") is None
    Trainer.loggers = []
    assert plots.log_sparsity_curve(Trainer(), tmp_path / "none") is None
    assert not list(tmp_path.rglob("*.png"))


# --- result figures ------------------------------------------------------------------------------------------------
def jsonl_rows() -> list[dict]:
    """Dense, two methods x two sparsities x two blocks x three seeds, and an ablation row to be left out."""
    rows = [
        {"key": f"dense/{s}", "part": "images", "model": "mlp", "method": "dense", "sparsity": 0.0, "block": 0,
         "seed": s, "epochs": 2, "val_acc": 88.0 + s, "val_loss": 0.3}
        for s in range(3)
    ]  # fmt: skip
    for block in (8, 16):
        for sparsity in (0.7, 0.9):
            for method, base in (("acdc", 80.0), ("sapp", 82.0)):
                for s in range(3):
                    rows.append(
                        {"key": f"{method}/{sparsity}/{block}/{s}", "part": "images", "model": "mlp",
                         "method": method, "sparsity": sparsity, "block": block, "seed": s, "epochs": 2,
                         "val_acc": base - 10 * sparsity - block / 8 + s, "val_loss": 0.4,
                         "pruned_layers": {"net.1": [1, 2]}, "achieved_sparsity": sparsity}
                    )  # fmt: skip
    rows.append(dict(rows[-1], key="ablation", options={"schedule_exponent": 2.0}, val_acc=0.0))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn": ')  # an interrupted last line
    return path


def test_result_series_averages_seeds_and_keeps_min_max():
    records = records_from_jsonl(write_jsonl(Path(__import__("tempfile").mkdtemp()) / "x.jsonl", jsonl_rows()))
    series = result_series(records, "acc")
    assert sorted(series) == [0, 8, 16]
    (point,) = series[0]["dense"]
    assert (point.mean, point.low, point.high, point.n) == (89.0, 88.0, 90.0, 3)
    sapp = series[16]["sapp"]
    assert [p.sparsity for p in sapp] == [0.7, 0.9]
    assert sapp[1].mean == pytest.approx(82.0 - 9 - 2 + 1) and sapp[1].n == 3  # the ablation row is not in it


def test_result_figure_one_panel_per_block_lines_are_the_seed_means(tmp_path, mpl):
    records = records_from_jsonl(write_jsonl(tmp_path / "images.jsonl", jsonl_rows()))
    fig = result_figure(records)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["8x8 blocks", "16x16 blocks"]
    series = result_series(records, "acc")
    for ax, block in zip(axes, (8, 16)):
        lines = {line.get_label(): line for line in ax.lines}
        for method, name in (("acdc", "ACDC"), ("sapp", "SA++")):
            means = [p.mean for p in series[block][method]]
            assert list(lines[name].get_ydata()) == pytest.approx(means)
            x = lines[name].get_xdata()
            assert [round(v) for v in x] == [0, 1]  # the two sparsity levels, methods set slightly apart
            assert lines[name].get_color().lower() == METHOD_COLORS[method].lower()
        assert list(lines["Dense"].get_ydata()) == [89.0, 89.0]
        assert not [line for line in ax.lines if line.get_marker() == "*"]  # no paper numbers for Fashion-MNIST
        assert [t.get_text() for t in ax.get_xticklabels()] == ["70%", "90%"]
    assert "No paper numbers" in fig.get_supxlabel()
    assert "2 epochs" in fig.get_suptitle() and "3 seeds" in fig.get_suptitle()


def test_result_png_has_one_colour_per_method(tmp_path, mpl):
    paths = plots.plot_jsonl([write_jsonl(tmp_path / "images.jsonl", jsonl_rows())], tmp_path / "figures")
    assert paths == [tmp_path / "figures" / "images.png"]
    pixels = png_pixels(paths[0])
    assert pixels.shape[0] > 300 and pixels.shape[1] > 900
    for method in ("acdc", "sapp"):
        assert count_color(pixels, METHOD_COLORS[method], tolerance=8) > 100
    for method in ("magnitude", "powerprop"):  # not in the data, so not in the picture
        assert count_color(pixels, METHOD_COLORS[method], tolerance=8) == 0


def test_a_jsonl_with_only_ablation_rows_says_so(tmp_path):
    path = write_jsonl(tmp_path / "ablations.jsonl", jsonl_rows()[-1:])
    with pytest.raises(ValueError, match="holds no runs without options"):
        plots.plot_jsonl([path], tmp_path)


def criteo_sweep(root: Path) -> Path:
    for seed in range(2):
        results_json(root / f"dense{seed}", "dense", 0.0, 10, seed, 0.45, task="ctr", data="CriteoDataModule",
                     model="CriteoPaperNet", val={"val/auroc": 0.79})  # fmt: skip
        for block in (5, 10):
            for sparsity in (0.9, 0.95):
                for method in ("acdc", "sapp"):
                    value = paper_value("criteo", method, block, sparsity) + 0.001 * seed
                    results_json(root / f"{method}{block}{sparsity}{seed}", method, sparsity, block, seed, value,
                                 task="ctr", data="CriteoDataModule", model="CriteoPaperNet",
                                 val={"val/auroc": 0.78})  # fmt: skip
    return root


def test_paper_markers_only_in_the_papers_setting_and_only_for_its_metric(tmp_path, mpl):
    from sapp_lightning.app.results import load_results

    records = records_from_results(load_results(criteo_sweep(tmp_path / "criteo")))
    fig = result_figure(records)
    axes = [ax for ax in fig.axes if ax.lines]
    assert len(axes) == 4  # BCE and AUROC rows x two block sizes
    bce, auroc = axes[:2], axes[2:]
    for ax, block in zip(bce, (5, 10)):
        stars = [line for line in ax.lines if line.get_marker() == "*"]
        assert len(stars) == 2  # ACDC and SA++
        assert sorted(v for line in stars for v in line.get_ydata()) == sorted(
            paper_value("criteo", m, block, s) for m in ("acdc", "sapp") for s in (0.9, 0.95)
        )
        assert [line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == ":"] == [0.4489]
    for ax in auroc:
        assert not [line for line in ax.lines if line.get_marker() == "*"]
    assert "Table 2" in fig.get_supxlabel()
    # the same numbers on another data set: no paper markers
    for r in records:
        r["data"] = "MovieLensCTRDataModule"
    fig = result_figure(records)
    assert not [line for ax in fig.axes for line in ax.lines if line.get_marker() == "*"]
    assert "No paper numbers" in fig.get_supxlabel() and "MovieLens" in fig.get_supxlabel()


def test_imagenet_markers_need_resnet50(tmp_path, mpl):
    rows = [
        {"method": m, "sparsity": 0.9, "block": 16, "seed": 0, "task": "classification", "data": "ImageNetDataModule",
         "model": model, "pruned_layers": (), "acc": 70.0}
        for m in ("acdc", "sapp") for model in ("resnet50",)
    ]  # fmt: skip
    stars = [line for ax in result_figure(rows).axes for line in ax.lines if line.get_marker() == "*"]
    assert sorted(line.get_ydata()[0] for line in stars) == [68.61, 69.92]
    for r in rows:
        r["model"] = "SmallCNN"
    assert not [line for ax in result_figure(rows).axes for line in ax.lines if line.get_marker() == "*"]


def test_a_diverged_method_is_marked_at_the_edge_instead_of_stretching_the_axis(tmp_path, mpl):
    rows = [r | {"val_loss": 0.66 + 0.001 * r["seed"]} for r in jsonl_rows()[:-1]]
    rows += [r | {"method": "magnitude", "key": r["key"] + "m", "val_loss": 5.0} for r in jsonl_rows()[3:6]]
    records = records_from_jsonl(write_jsonl(tmp_path / "x.jsonl", rows))
    fig = result_figure(records, metrics=["loss"])
    ax = fig.axes[0]
    assert ax.get_ylim()[1] < 1.0
    assert any(t.get_text() == "5" for t in ax.texts)  # the off-scale mean, printed at the edge
    assert "off the scale" in fig.get_supxlabel()


def score_rows() -> list[dict]:
    """SA++ on two models with attention (plain or explicit) and magnitude scores; one unpaired run, one ACDC run."""
    rows = []
    for model, blocks in (("MLP", (8, 16)), ("SmallCNN", (16,))):
        for block in blocks:
            for sparsity in (0.8, 0.9):
                for seed in range(3):
                    attention = "" if model == "MLP" else "pruning.score=attention"
                    for variant, acc in ((attention, 0.80 + 0.01 * seed), ("pruning.score=magnitude", 0.79)):
                        cell = dict(model=model, block_size=block, sparsity=sparsity, seed=seed, variant=variant)
                        key = f"{model}{block}{sparsity}{seed}{variant}"
                        rows.append(dict(cell, key=key, algorithm="sapp", val={"val/acc": acc + block / 1000}))
    rows.append(dict(rows[0], key="unpaired", seed=7))
    rows.append(dict(rows[0], key="acdc", algorithm="acdc", variant="", val={"val/acc": 0.1}))
    return rows


def test_score_differences_pair_attention_and_magnitude_runs_seed_by_seed():
    differences = plots.score_differences(score_rows())
    assert sorted(differences) == ["MLP", "SmallCNN"]
    first = differences["MLP"][0]
    assert (first.block, first.sparsity) == (8, 0.8)
    assert first.values == pytest.approx((1.0, 2.0, 3.0)) and first.mean == pytest.approx(2.0)  # seed 7 unpaired
    assert [(d.block, d.sparsity) for d in differences["SmallCNN"]] == [(16, 0.8), (16, 0.9)]


def test_score_difference_figure_has_a_bar_per_cell_in_the_sparsity_colours(tmp_path, mpl):
    rows = score_rows()
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plots.plot_score_difference([path], tmp_path / "figures")
    assert written == tmp_path / "figures" / plots.SCORE_FIGURE
    fig = plots.score_difference_figure(plots.score_differences(rows))
    mlp, cnn = (ax for ax in fig.axes if ax.get_title())
    assert mlp.get_title() == "MLP (3 seeds)" and [t.get_text() for t in mlp.get_xticklabels()] == ["8x8", "16x16"]
    heights = sorted(round(bar.get_height(), 6) for bar in mlp.patches)
    assert heights == [2.0] * 4  # (0.80 + 0.01 * seed) - 0.79, in points, averaged over the seeds
    assert len(cnn.patches) == 2
    pixels = png_pixels(written)
    for color in plots.LEVEL_COLORS[:2]:  # 80% and 90%
        assert count_color(pixels, color, tolerance=8) > 100
    assert count_color(pixels, plots.LEVEL_COLORS[2], tolerance=8) == 0


# --- sweeps: the results CLI ----------------------------------------------------------------------------------------
def fake_demo_sweep(root: Path) -> Path:
    """``runs/demo`` as ``make demo`` leaves it: one folder per method, CSV logs for the pruned ones (the dense
    run as sapp_lightning 0.1 names it, "none"; the Criteo sweep uses "dense")."""
    for i, (algorithm, acc) in enumerate([("none", 0.88), ("sapp", 0.85), ("acdc", 0.84), ("magnitude", 0.7),
                                          ("powerprop", 0.72)]):  # fmt: skip
        run = results_json(root / str(i), algorithm, 0.9, 16, 0, acc)
        if algorithm != "none":
            write_metrics_csv(run / "csv" / "version_0" / "metrics.csv")
        else:  # the dense run logs no pruning keys
            (run / "csv" / "version_0").mkdir(parents=True)
            (run / "csv" / "version_0" / "metrics.csv").write_text("epoch,step,train/loss\n0,19,0.5\n")
    return root


def test_results_plot_writes_the_comparison_figure_and_each_curve(tmp_path, capsys, mpl):
    root = fake_demo_sweep(tmp_path / "demo")
    assert results_main([str(root), "--plot"]) == 0
    out = capsys.readouterr().out
    assert "| SA++" in out  # the table is still printed first
    assert f"comparison figure: {root / 'results.png'}" in out
    for i in range(1, 5):
        assert f"sparsity curve: {root / str(i) / 'sparsity_curve.png'}" in out
        assert (root / str(i) / "sparsity_curve.png").is_file()
    assert not (root / "0" / "sparsity_curve.png").exists()  # the dense run has none
    pixels = png_pixels(root / "results.png")
    for method in ("sapp", "acdc", "magnitude", "powerprop"):
        assert count_color(pixels, METHOD_COLORS[method], tolerance=8) > 20


def test_results_plot_of_a_single_sparsity_sweep_plots_each_method_once(tmp_path, mpl):
    from sapp_lightning.app.results import load_results

    records = records_from_results(load_results(fake_demo_sweep(tmp_path / "demo")))
    (ax,) = [ax for ax in result_figure(records).axes if ax.lines]
    ys = {line.get_label(): list(line.get_ydata()) for line in ax.lines}
    assert ys["SA++"] == [pytest.approx(85.0)] and ys["ACDC"] == [pytest.approx(84.0)]
    assert ys["Dense"] == [pytest.approx(88.0)] * 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["90%"]


def test_results_plot_on_an_empty_folder_says_so(tmp_path, capsys):
    assert results_main([str(tmp_path), "--plot"]) == 1
    assert "no results.json below" in capsys.readouterr().err


def test_plots_cli_on_jsonl_and_on_a_run_folder(tmp_path, capsys, mpl):
    jsonl = write_jsonl(tmp_path / "images.jsonl", jsonl_rows())
    run = results_json(tmp_path / "run", "acdc", 0.9, 16, 0, 0.8)
    write_metrics_csv(run / "csv" / "version_0" / "metrics.csv")
    assert plots.main([str(jsonl), str(run), "--out", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"wrote {tmp_path / 'figs' / 'images.png'}",
        f"wrote {tmp_path / 'figs' / 'sparsity_curve_acdc.png'}",
    ]
    assert plots.main([str(run)]) == 0  # without --out: beside the run's results.json
    assert capsys.readouterr().out == f"wrote {run / 'sparsity_curve.png'}\n"
    assert plots.main([str(tmp_path / "nothing-here")]) == 1
    assert "no metrics.csv below" in capsys.readouterr().err


def test_a_real_app_run_logs_what_the_curve_reads(tmp_path, mpl):
    """Through the app: the CSV log of a short SA++ run has one band per phase of the callback's plan."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from sapp_lightning.app.configs import CONFIG_DIR
    from sapp_lightning.app.synthetic import make_fashion_dir
    from sapp_lightning.app.train import run

    data = tmp_path / "fmnist"
    make_fashion_dir(data, n_train=300, n_test=20)
    overrides = ["recipe=fashion_mnist_demo", "pruning=sapp", f"data.data_dir={data}", "data.val_size=20",
                 "data.batch_size=16", "trainer.max_epochs=3", "trainer.log_every_n_steps=4", "test=false",
                 "trainer.enable_progress_bar=false",
                 f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    results = run(cfg)
    log = read_sparsity_log(tmp_path / "out")
    from sapp_lightning import BlockPruning

    plan = BlockPruning("sapp", 0.9, 16, plan="imagenet").plan
    bands = log.bands()
    assert [b.phase for b in bands] == [int(s.phase) for s in plan.segments]
    assert bands[-1].end == results["steps"]
    for step, phase in zip(log.steps, log.phase):  # the shifted step rows fall inside the band of their phase
        band = next(b for b in bands if b.start <= step < b.end or step == b.end == bands[-1].end)
        assert band.phase == phase
    assert log.sparsity[-1] == pytest.approx(results["achieved_block_sparsity"], abs=1e-6)
    assert not math.isnan(log.achieved_curve()[1][-1])
    path = plots.save_sparsity_curve(tmp_path / "out")
    assert path == tmp_path / "out" / "sparsity_curve.png"


def test_a_real_fit_with_csv_and_offline_wandb_loggers_gets_a_curve_that_wandb_stores_in_colour(
    tmp_path, monkeypatch, mpl
):
    """The end-of-run hook after a real fit: the PNG in the run folder, and the image W&B writes to its run
    folder is the same picture (not the all-black PNG a float tensor would give)."""
    from conftest import TinyNet, make_trainer, tiny_loader
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    from sapp_lightning import BlockPruning

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb

    if wandb.run is not None:  # an unfinished run of an earlier test would be reused by WandbLogger
        wandb.finish()
    pruning = BlockPruning("sapp", 0.75, 4, plan=[("dense", 0.2), ("sparsify", 0.3), ("sparse", 0.5)])
    loggers = [CSVLogger(tmp_path / "run", name="csv"), WandbLogger(offline=True, save_dir=str(tmp_path / "run"))]
    trainer = make_trainer(tmp_path, [pruning], max_epochs=6, logger=loggers, log_every_n_steps=2)
    trainer.fit(TinyNet(), tiny_loader())
    path = plots.log_sparsity_curve(trainer, tmp_path / "run")
    log = read_sparsity_log(tmp_path / "run")
    assert [(b.start, b.end, b.phase) for b in log.bands()] == [(0, 10, 0), (10, 24, 1), (24, 48, 2)]
    assert log.sparsity[-1] == pytest.approx(0.75, abs=0.01)
    files = Path(loggers[1].experiment.dir)
    assert tmp_path in files.parents
    loggers[1].experiment.finish()
    (stored,) = files.rglob("media/images/pruning/sparsity_curve_*.png")
    ours, theirs = png_pixels(path), png_pixels(stored)
    assert theirs.shape == ours.shape and np.abs(theirs.astype(int) - ours.astype(int)).max() <= 2
    assert count_color(theirs, PHASE_COLORS[1]) > 2000 and count_color(theirs, METHOD_COLORS["sapp"], 8) > 100


def test_results_plot_without_matplotlib_prints_the_table_then_names_the_extra(tmp_path, capsys, monkeypatch):
    root = fake_demo_sweep(tmp_path / "demo")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert results_main([str(root), "--plot"]) == 1
    captured = capsys.readouterr()
    assert "| SA++" in captured.out
    assert "pip install 'sapp_lightning[app]'" in captured.err
