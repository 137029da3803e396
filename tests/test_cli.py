"""sapp-results: light to start, the tables of folders and stores, --plot, --jsonl, and benchmark grids as sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import count_color, grid_rows, png_pixels, record, run_record, write_jsonl, write_run

from sapp_lightning.app.cli import results
from sapp_lightning.app.plots import METHOD_COLORS
from sapp_lightning.app.results import load_runs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}  # this checkout, whichever copy is installed


def demo_sweep(root: Path) -> Path:
    """``runs/demo`` as ``make demo`` leaves it: one folder per method, the pruned ones with their pruning record
    (the dense run as sapp_lightning 0.1 names it, "none")."""
    for i, (algorithm, acc) in enumerate([("none", 0.88), ("sapp", 0.85), ("acdc", 0.84), ("magnitude", 0.7),
                                          ("powerprop", 0.72)]):  # fmt: skip
        row = record(algorithm, 0.9, 16, 0, acc)
        write_run(root / str(i), row if algorithm == "none" else row | {"pruning": run_record(algorithm)["pruning"]})
    return root


def test_help_names_sapp_results_and_parses_before_pandas_torch_or_matplotlib_load():
    script = (
        "import sys\nfrom sapp_lightning.app import cli\ntry:\n    cli.results(['--help'])\nexcept SystemExit:\n"
        "    pass\nprint(sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=ENV).stdout
    assert out.startswith("usage: sapp-results ") and "--paper {auto,imagenet,criteo,none}" in out
    assert out.strip().splitlines()[-1] == "[]"


def test_a_sweeps_tables_and_figures(tmp_path, capsys):
    root = demo_sweep(tmp_path / "demo")
    assert results([str(root), "--plot"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"5 runs from {root}\n\nMLP (classification, 2 epochs), pruned net.1: every configuration")
    assert "| SA++  " in out and "| Dense " in out and "| 90%" in out
    assert f"comparison figure: {root / 'results.png'}" in out
    for i in range(1, 5):
        assert f"sparsity curve: {root / str(i) / 'sparsity_curve.png'}" in out
        assert (root / str(i) / "sparsity_curve.png").is_file()
    assert not (root / "0" / "sparsity_curve.png").exists()  # the dense run has none
    pixels = png_pixels(root / "results.png")
    for method in ("sapp", "acdc", "magnitude", "powerprop"):
        assert count_color(pixels, METHOD_COLORS[method], tolerance=8) > 20


def test_a_folder_without_runs_says_so(tmp_path, capsys):
    assert results([str(tmp_path), "--plot"]) == 1
    assert "no results.json below" in capsys.readouterr().err


def test_without_matplotlib_the_tables_come_first_then_the_extra_is_named(tmp_path, capsys, monkeypatch):
    root = demo_sweep(tmp_path / "demo")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert results([str(root), "--plot"]) == 1
    captured = capsys.readouterr()
    assert "| SA++" in captured.out and "pip install 'sapp_lightning[app]'" in captured.err


def test_stores_and_run_folders_draw_into_out(tmp_path, capsys):
    store = write_jsonl(tmp_path / "images.jsonl", grid_rows())
    run = write_run(tmp_path / "run", run_record("acdc"))
    assert results([str(store), str(run), "--plot", "--out", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [
        f"comparison figure: {tmp_path / 'figs' / 'images.png'}",
        f"sparsity curve: {tmp_path / 'figs' / 'sparsity_curve_acdc.png'}",
    ]
    assert results([str(store), "--plot"]) == 0  # without --out: beside the store
    assert capsys.readouterr().out.splitlines()[-1] == f"comparison figure: {tmp_path / 'images.png'}"


def test_the_papers_numbers_follow_the_setting_or_the_option(tmp_path, capsys):
    rows = [record(m, 0.9, 16, 0, 0.7) for m in ("dense", "acdc", "sapp")]
    store = write_jsonl(tmp_path / "runs.jsonl", rows, torn=False)
    assert results([str(store)]) == 0
    assert "[" not in capsys.readouterr().out  # Fashion-MNIST: not the paper's setting
    assert results([str(store), "--paper", "imagenet"]) == 0
    assert "| 90%      | SA++   | 70.00 (90.0%) [69.92] |" in capsys.readouterr().out
    resnet = write_jsonl(
        tmp_path / "resnet.jsonl", [r | {"data": "ImageNetDataModule", "model": "resnet50"} for r in rows]
    )
    assert results([str(resnet), "--paper", "none"]) == 0
    assert "[" not in capsys.readouterr().out
    assert results([str(resnet)]) == 0
    assert "[69.92]" in capsys.readouterr().out


def test_jsonl_collects_the_runs_of_folders_into_a_store_once(tmp_path, capsys):
    root = demo_sweep(tmp_path / "demo")
    store = tmp_path / "store" / "demo.jsonl"
    assert results([str(root), "--jsonl", str(store)]) == 0
    assert capsys.readouterr().out.endswith(f"{store}: 5 runs appended, 0 already there\n")
    assert results([str(root), "--jsonl", str(store)]) == 0
    assert capsys.readouterr().out.endswith(f"{store}: 0 runs appended, 5 already there\n")
    assert sorted(load_runs(store)["algorithm"]) == ["acdc", "dense", "magnitude", "powerprop", "sapp"]


@pytest.mark.slow
def test_a_benchmark_grid_is_a_joblib_sweep_that_a_rerun_continues_and_a_store_collects(tmp_path, capsys):
    from sapp_lightning.app.synthetic import make_fashion_dir

    data = tmp_path / "fmnist"
    make_fashion_dir(data, n_train=120, n_test=20)
    sweep = tmp_path / "runs" / "bench" / "demo"
    cmd = [sys.executable, "-m", "sapp_lightning.app.train", "-m", "recipe=fashion_mnist_demo", "pruning=dense,sapp"]
    cmd += [f"data.data_dir={data}", "data.val_size=20", "data.batch_size=50", "model.net.hidden=[32,32]"]
    cmd += ["pruning.min_blocks=4", "trainer.max_epochs=1", "+bench=fast", "hydra/launcher=joblib"]
    cmd += ["hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, check=True, cwd=tmp_path, env=ENV, capture_output=True)
    first = {p: p.read_bytes() for p in sorted(sweep.rglob("results.json"))}
    assert [json.loads(text)["algorithm"] for text in first.values()] == ["dense", "sapp"]
    sapp = json.loads(first[sweep / "1" / "results.json"])
    assert sapp["config"]["threads"] == 1 and sapp["config"]["trainer"]["check_val_every_n_epoch"] == 1
    assert not list(sweep.rglob("*.ckpt")) and not list(sweep.rglob("metrics.csv"))  # no checkpoints, no logger
    subprocess.run(cmd, check=True, cwd=tmp_path, env=ENV, capture_output=True)  # the same command again
    assert {p: p.read_bytes() for p in sorted(sweep.rglob("results.json"))} == first  # nothing trained again
    (log,) = (sweep / "1").glob("*.log")  # Hydra's log of the job
    assert "made with this configuration; not training again" in log.read_text()
    store = tmp_path / "demo.jsonl"
    assert results([str(sweep), "--jsonl", str(store)]) == 0
    assert capsys.readouterr().out.endswith(f"{store}: 2 runs appended, 0 already there\n")
    stored = load_runs(store)
    assert stored["key"].tolist() == [" ".join(r["overrides"]) for r in stored["record"]]
    assert "pruning=sapp" in stored["key"].iloc[1] and "+bench=fast" in stored["key"].iloc[1]
