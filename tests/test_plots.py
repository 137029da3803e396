"""Figures (sapp_lightning/app/plots.py): the sparsity curve from a run's pruning record (results.json), the comparison
and score-difference figures from the runs' summaries, training accuracy over steps from the runs' CSV logs
(``sapp-results --train-acc``, the paper's Fig. 3), and what the end-of-run hook sends to W&B."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    TinyNet,
    compose_cfg,
    count_color,
    grid_rows,
    make_trainer,
    png_pixels,
    record,
    run_record,
    score_rows,
    tiny_loader,
    write_jsonl,
    write_run,
)

from sapp_lightning.app import plots
from sapp_lightning.app.cli import results
from sapp_lightning.app.history import PruningHistory
from sapp_lightning.app.paper import paper_value
from sapp_lightning.app.plots import (
    METHOD_COLORS,
    PHASE_COLORS,
    find_metrics_csv,
    phase_line,
    read_train_accuracy,
    result_figure,
    series,
    sparsity_curve_figure,
    train_accuracy_figure,
)
from sapp_lightning.app.results import load_runs, score_differences, to_frame
from sapp_lightning.app.synthetic import make_fashion_dir
from sapp_lightning.app.train import run


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


# --- the sparsity curve (Fig. 2(b)) ---------------------------------------------------------------------------------


def test_sparsity_curve_png_shows_the_phase_bands_the_methods_colour_and_each_layer(tmp_path, mpl):
    run = run_record("sapp") | {"path": "runs/demo/1"}
    fig = sparsity_curve_figure(run)
    path = plots.save_figure(fig, tmp_path / "sparsity_curve.png")
    pixels = png_pixels(path)
    width, height = fig.get_size_inches() * fig.dpi
    assert pixels.shape == (round(height), round(width), 3)
    for color in PHASE_COLORS.values():  # each band covers a fifth of the axes or more: pixels of exactly its colour
        assert count_color(pixels, color) > 2000
    assert count_color(pixels, METHOD_COLORS["sapp"], tolerance=8) > 200
    assert count_color(pixels, METHOD_COLORS["acdc"], tolerance=8) == 0
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines) == ["achieved", "target (plan)", "0", "2"]  # the two pruned layers' own lines
    xs, ys = phase_line(run["pruning"], run["pruning"]["curve"]["achieved"])
    assert list(lines["achieved"].get_xdata()) == xs
    assert list(lines["achieved"].get_ydata()) == pytest.approx([100 * y for y in ys])
    layer = phase_line(run["pruning"], run["pruning"]["curve"]["layers"]["2"])
    assert list(lines["2"].get_xdata()) == layer[0]
    title = ax.get_title()
    assert title.startswith("SA++ on Fashion-MNIST MLP") and "target 90%" in title and "runs/demo/1" in title


def test_per_layer_lines_can_be_left_out_and_a_dense_run_has_no_curve(mpl):
    fig = sparsity_curve_figure(run_record("acdc"), layers=False)
    assert [line.get_label() for line in fig.axes[0].lines] == ["achieved", "target (plan)"]
    with pytest.raises(ValueError, match="no pruning record"):
        sparsity_curve_figure(record("dense", 0.0, 16, 0, 0.9))


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `from matplotlib.figure import` fail
    with pytest.raises(ImportError, match=r"pip install 'sapp_lightning\[app\]'"):
        sparsity_curve_figure(run_record())


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


def test_end_of_run_hook_draws_from_the_record_with_any_logger_and_sends_wandb_the_figure(tmp_path, monkeypatch, mpl):
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    sent = []
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images, step=None, **kw: sent.append((key, images)))
    monkeypatch.setenv("WANDB_MODE", "offline")

    class Trainer:
        global_rank, global_step, loggers = 0, 100, [WandbLogger(offline=True, save_dir=str(tmp_path))]

    run = run_record("sapp")
    path = plots.log_sparsity_curve(Trainer(), tmp_path / "run", run)
    assert path == tmp_path / "run" / "sparsity_curve.png" and path.is_file()
    ((key, (image,)),) = sent
    assert key == "pruning/sparsity_curve" and isinstance(image, wandb.Image)
    pixels = np.asarray(image.image.convert("RGB"))  # what W&B stores: the figure as drawn
    assert pixels.shape == png_pixels(path).shape and count_color(pixels, PHASE_COLORS["sparsify"]) > 2000
    Trainer.loggers = []  # no logger at all: the PNG all the same
    assert plots.log_sparsity_curve(Trainer(), tmp_path / "quiet", run) == tmp_path / "quiet" / "sparsity_curve.png"
    assert plots.log_sparsity_curve(Trainer(), tmp_path / "dense", record("dense", 0.0, 16, 0, 0.9)) is None
    Trainer.global_rank = 1  # only rank 0 draws
    assert plots.log_sparsity_curve(Trainer(), tmp_path / "rank1", run) is None
    assert not (tmp_path / "dense").exists() and not (tmp_path / "rank1").exists()


@pytest.mark.slow
def test_a_real_fit_with_offline_wandb_gets_a_curve_that_wandb_stores_as_drawn(tmp_path, monkeypatch, mpl):
    """After a real fit: the record's phases are the plan's, and the image W&B writes to its run folder is the
    PNG in the run folder, pixel for pixel (not the all-black PNG a float tensor would give)."""
    from pytorch_lightning.loggers import WandbLogger

    from sapp_lightning import BlockPruning

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb

    if wandb.run is not None:  # an unfinished run of an earlier test would be reused by WandbLogger
        wandb.finish()
    pruning = BlockPruning("sapp", 0.75, 4, plan=[("dense", 0.2), ("sparsify", 0.3), ("sparse", 0.5)])
    history = PruningHistory(pruning.sparsifier, every_n_steps=2)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path / "run"))
    trainer = make_trainer(tmp_path, [pruning, history], max_epochs=6, logger=logger, log_every_n_steps=2)
    trainer.fit(TinyNet(), tiny_loader())
    run = {"algorithm": "sapp", "sparsity": 0.75, "block_size": 4, "pruning": history.to_dict()}
    assert [(p["start"], p["end"], p["phase"]) for p in run["pruning"]["phases"]] == [
        (0, 10, "dense"), (10, 24, "sparsify"), (24, 48, "sparse")
    ]  # fmt: skip
    assert run["pruning"]["curve"]["achieved"][-1] == pytest.approx(0.75, abs=0.01)
    path = plots.log_sparsity_curve(trainer, tmp_path / "run", run)
    files = Path(logger.experiment.dir)
    assert tmp_path in files.parents
    logger.experiment.finish()
    (stored,) = files.rglob("media/images/pruning/sparsity_curve_*.png")
    ours, theirs = png_pixels(path), png_pixels(stored)
    assert theirs.shape == ours.shape and np.abs(theirs.astype(int) - ours.astype(int)).max() <= 2
    assert count_color(theirs, PHASE_COLORS["sparsify"]) > 2000 and count_color(theirs, METHOD_COLORS["sapp"], 8) > 100


# --- comparison figures (Fig. 4 and 5) ------------------------------------------------------------------------------


def test_series_averages_seeds_and_keeps_min_max():
    points = series(to_frame(grid_rows()[:-1]), "acc")
    dense = points[points["algorithm"] == "dense"].iloc[0]
    assert (dense["block_size"], dense["low"], dense["high"], dense["n"]) == (0, 88.0, 90.0, 3)
    assert dense["mean"] == pytest.approx(89.0)
    sapp = points[(points["algorithm"] == "sapp") & (points["block_size"] == 16)]
    assert sapp["sparsity"].tolist() == [0.7, 0.9] and sapp["n"].tolist() == [3, 3]


def test_result_figure_one_panel_per_block_lines_are_the_seed_means(tmp_path, mpl):
    frame = load_runs(write_jsonl(tmp_path / "images.jsonl", grid_rows()))
    fig = result_figure(frame[frame["variant"] == ""])
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["8x8 blocks", "16x16 blocks"]
    points = series(frame[frame["variant"] == ""], "acc")
    for ax, block in zip(axes, (8, 16)):
        lines = {line.get_label(): line for line in ax.lines}
        for method, name in (("acdc", "ACDC"), ("sapp", "SA++")):
            means = points[(points["block_size"] == block) & (points["algorithm"] == method)]["mean"]
            assert list(lines[name].get_ydata()) == pytest.approx(means.tolist())
            assert [round(v) for v in lines[name].get_xdata()] == [0, 1]  # two sparsity levels, methods set apart
            assert lines[name].get_color().lower() == METHOD_COLORS[method].lower()
        assert list(lines["Dense"].get_ydata()) == pytest.approx([89.0, 89.0])
        assert not [line for line in ax.lines if line.get_marker() == "*"]  # no paper numbers for Fashion-MNIST
        assert [t.get_text() for t in ax.get_xticklabels()] == ["70%", "90%"]
    assert "No paper numbers" in fig.get_supxlabel()
    assert "2 epochs" in fig.get_suptitle() and "3 seeds" in fig.get_suptitle()


def test_a_stores_figure_has_one_colour_per_method_and_leaves_variants_out(tmp_path, mpl):
    frame = load_runs(write_jsonl(tmp_path / "images.jsonl", grid_rows()))
    paths = plots.plot_runs(frame, tmp_path / "figures", "images")
    assert paths == [tmp_path / "figures" / "images.png"]
    pixels = png_pixels(paths[0])
    assert pixels.shape[0] > 300 and pixels.shape[1] > 900
    for method in ("acdc", "sapp"):
        assert count_color(pixels, METHOD_COLORS[method], tolerance=8) > 100
    for method in ("magnitude", "powerprop"):  # not in the data, so not in the picture
        assert count_color(pixels, METHOD_COLORS[method], tolerance=8) == 0
    only_variants = write_jsonl(tmp_path / "ablations.jsonl", grid_rows()[-1:])
    with pytest.raises(ValueError, match="holds no runs without a variant"):
        plots.plot_sources([only_variants], tmp_path)


def criteo_runs() -> list[dict]:
    ctr = dict(task="ctr", data="CriteoDataModule", model="CriteoPaperNet", val={"val/auroc": 0.78})
    rows = [record("dense", 0.0, 10, seed, 0.45, **ctr) for seed in range(2)]
    for block in (5, 10):
        for sparsity in (0.9, 0.95):
            for method in ("acdc", "sapp"):
                rows += [record(method, sparsity, block, s, paper_value("criteo", method, block, sparsity) + s / 1000,
                                **ctr) for s in range(2)]  # fmt: skip
    return rows


def test_paper_markers_only_in_the_papers_setting_and_only_for_its_metric(mpl):
    fig = result_figure(to_frame(criteo_runs()))
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
    movielens = to_frame([r | {"data": "MovieLensCTRDataModule"} for r in criteo_runs()])  # not the paper's data
    fig = result_figure(movielens)
    assert not [line for ax in fig.axes for line in ax.lines if line.get_marker() == "*"]
    assert "No paper numbers" in fig.get_supxlabel() and "MovieLens" in fig.get_supxlabel()


def test_imagenet_markers_need_resnet50(mpl):
    rows = [record(m, 0.9, 16, 0, 0.7, data="ImageNetDataModule", model="resnet50") for m in ("acdc", "sapp")]
    stars = [line for ax in result_figure(to_frame(rows)).axes for line in ax.lines if line.get_marker() == "*"]
    assert sorted(line.get_ydata()[0] for line in stars) == [68.61, 69.92]
    rows = [r | {"model": "SmallCNN"} for r in rows]
    assert not [line for ax in result_figure(to_frame(rows)).axes for line in ax.lines if line.get_marker() == "*"]


def test_a_diverged_method_is_marked_at_the_edge_instead_of_stretching_the_axis(mpl):
    rows = [r | {"val": {"val/loss": 0.66 + 0.001 * r["seed"]}} for r in grid_rows()[:-1]]
    rows += [r | {"algorithm": "magnitude", "val": {"val/loss": 5.0}} for r in grid_rows()[3:6]]
    fig = result_figure(to_frame(rows), metrics=["loss"])
    ax = fig.axes[0]
    assert ax.get_ylim()[1] < 1.0
    assert any(t.get_text() == "5" for t in ax.texts)  # the off-scale mean, printed at the edge
    assert "off the scale" in fig.get_supxlabel()


def test_a_single_sparsity_sweep_plots_each_method_once(mpl):
    rows = [record(m, 0.9, 16, 0, acc) for m, acc in (("dense", 0.88), ("sapp", 0.85), ("acdc", 0.84))]
    (ax,) = [ax for ax in result_figure(to_frame(rows)).axes if ax.lines]
    ys = {line.get_label(): list(line.get_ydata()) for line in ax.lines}
    assert ys["SA++"] == [pytest.approx(85.0)] and ys["ACDC"] == [pytest.approx(84.0)]
    assert ys["Dense"] == [pytest.approx(88.0)] * 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["90%"]


# --- SA++'s score: attention against magnitude (Fig. 2(a)) ----------------------------------------------------------
def test_score_difference_figure_has_a_bar_per_cell_in_the_sparsity_colours(tmp_path, mpl):
    fig = plots.score_difference_figure(score_differences(to_frame(score_rows())))
    mlp, cnn = (ax for ax in fig.axes if ax.get_title())
    assert mlp.get_title() == "MLP (3 seeds)" and [t.get_text() for t in mlp.get_xticklabels()] == ["8x8", "16x16"]
    heights = sorted(round(bar.get_height(), 6) for bar in mlp.patches)
    assert heights == [2.0] * 4  # (0.80 + 0.01 * seed) - 0.79, in points, averaged over the seeds
    assert len(cnn.patches) == 2
    pixels = png_pixels(plots.save_figure(fig, tmp_path / "score.png"))
    for color in plots.LEVEL_COLORS[:2]:  # 80% and 90%
        assert count_color(pixels, color, tolerance=8) > 100
    assert count_color(pixels, plots.LEVEL_COLORS[2], tolerance=8) == 0
    with pytest.raises(ValueError, match="no pairs of SA"):
        plots.score_difference_figure(score_differences(to_frame(score_rows()[-1:])))


def test_plot_sources_draws_a_sweeps_curves_and_comparison_and_with_out_names_each_curve(tmp_path, mpl):
    for i, algorithm in enumerate(("dense", "sapp", "acdc")):
        row = record(algorithm, 0.9, 4, 0, 0.8 - i / 100)
        write_run(tmp_path / "sweep" / str(i), row if algorithm == "dense" else run_record(algorithm))
    written = plots.plot_sources([tmp_path / "sweep"])
    assert sorted(written) == sorted([tmp_path / "sweep" / str(i) / "sparsity_curve.png" for i in (1, 2)]
                                     + [tmp_path / "sweep" / "results.png"])  # fmt: skip
    written = plots.plot_sources([tmp_path / "sweep" / "1", tmp_path / "sweep" / "2"], tmp_path / "docs")
    assert written == [tmp_path / "docs" / "sparsity_curve_sapp.png", tmp_path / "docs" / "sparsity_curve_acdc.png"]
    json.loads((tmp_path / "sweep" / "1" / "results.json").read_text())  # left as it was


# --- training accuracy over steps (Fig. 3) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """ACDC and SA++ at 90% on generated Fashion-MNIST, 2 epochs, train/acc logged at every step (CSV)."""
    root = tmp_path_factory.mktemp("fig3")
    make_fashion_dir(root / "fashion", n_train=200, n_test=20)
    overrides = ["recipe=fashion_mnist_demo", "model.net.hidden=[64]", "trainer.max_epochs=2", "data.batch_size=16"]
    overrides += ["data.val_size=40", "trainer.log_every_n_steps=1", "test=false", "~callbacks.mask_heatmaps"]
    overrides += ["trainer.enable_progress_bar=false", f"data.data_dir={root / 'fashion'}"]
    for algorithm in ("acdc", "sapp"):
        run(compose_cfg([*overrides, f"pruning={algorithm}"], root / "sweep" / algorithm))
    return root / "sweep"


@pytest.mark.slow
def test_train_accuracy_of_two_runs_is_overlaid_in_one_figure(two_runs, tmp_path):
    accuracy = read_train_accuracy(two_runs / "sapp")
    assert accuracy.index.tolist() == list(range(20)) and accuracy.between(0.0, 1.0).all()
    fig = train_accuracy_figure([two_runs])  # a sweep folder: each of its runs
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["ACDC 90% 16x16 seed 0", "SA++ 90% 16x16 seed 0"]
    out = tmp_path / "train_acc.png"
    assert results([str(two_runs / "acdc"), str(two_runs / "sapp"), "--train-acc", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_a_log_without_train_accuracy_is_named(tmp_path, capsys):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss\n0,9,0.5\n")
    with pytest.raises(ValueError, match=r"metrics.csv logs no train/acc: the image classifier logs it"):
        read_train_accuracy(csv)
    assert results([str(csv), "--train-acc", str(tmp_path / "out.png")]) == 1  # a bare log: the figure only
    assert "logs no train/acc" in capsys.readouterr().err


def test_a_run_folder_resolves_to_its_newest_csv_version_and_several_runs_are_refused(tmp_path):
    for version in (0, 1):
        (tmp_path / "run" / "csv" / f"version_{version}").mkdir(parents=True)
        (tmp_path / "run" / "csv" / f"version_{version}" / "metrics.csv").write_text("step,train/acc\n0,0.5\n")
    assert find_metrics_csv(tmp_path / "run") == tmp_path / "run" / "csv" / "version_1" / "metrics.csv"
    (tmp_path / "other" / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "other" / "csv" / "version_0" / "metrics.csv").write_text("step,train/acc\n0,0.5\n")
    with pytest.raises(ValueError, match="several runs' logs below"):
        find_metrics_csv(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no metrics.csv below .*logger=csv"):
        find_metrics_csv(tmp_path / "run" / "nothing")
