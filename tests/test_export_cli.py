"""``sapp-export RUN_DIR`` and ``sapp-train ... export.enabled=true`` on tiny runs made with the app's own pieces
(Fashion-MNIST's files and a Criteo TSV, generated); one test per error message."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_app import FAST, compose_cfg

from sapp_lightning.app.cli import export as main
from sapp_lightning.app.export import MODEL_FILE, RESULT_FILE, SUMMARY_FILE, build_model, load_exported
from sapp_lightning.app.synthetic import make_criteo_tsv, make_fashion_dir
from sapp_lightning.app.train import run
from sapp_lightning.export import BlockSparseLinear, load_block_sparse

ROOT = Path(__file__).resolve().parents[1]


def _save_config(cfg, run_dir: Path) -> None:
    """What Hydra writes into a run folder: the composed config without its own node."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    config = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.save(config, run_dir / ".hydra" / "config.yaml")


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory) -> Path:
    """A finished magnitude-pruning run of the MLP recipe (90%, blocks of 16) on generated Fashion-MNIST files."""
    tmp = tmp_path_factory.mktemp("fashion")
    data = tmp / "data"
    make_fashion_dir(data, n_train=64, n_test=16)
    run_dir = tmp / "run"
    overrides = ["recipe=fashion_mnist_demo", "pruning=magnitude", f"data.data_dir={data}", "data.val_size=16"]
    overrides += ["data.batch_size=16", "export.enabled=true", "export.batch_size=4", *FAST]
    cfg = compose_cfg(overrides, run_dir)
    run(cfg)
    _save_config(cfg, run_dir)
    return run_dir


def test_sapp_train_writes_the_block_sparse_model_when_export_is_enabled(fashion_run):
    for name in (MODEL_FILE, SUMMARY_FILE, RESULT_FILE):
        assert (fashion_run / name).is_file()
    record = json.loads((fashion_run / RESULT_FILE).read_text())
    assert record["batch_size"] == 4 and record["speedup"] > 0
    assert record["exported_layers"] == 2  # the two hidden layers; the 512 x 10 classifier has 32 blocks < 100
    assert record["file_bytes"]["block_sparse"] < 0.3 * record["file_bytes"]["dense"]
    assert "net.1" in (fashion_run / SUMMARY_FILE).read_text()


def test_sapp_export_exports_a_run_folder_and_prints_the_speedup(fashion_run, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main([str(fashion_run), "--batch-size", "2", "--repeats", "2", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 layers block-sparse" in printed and "batch 2, 1 thread(s):" in printed
    assert "x the dense model's speed" in printed
    cfg = OmegaConf.load(fashion_run / ".hydra" / "config.yaml")
    state = torch.load(fashion_run / "model.pt", weights_only=True)
    dense, shapes = build_model(cfg, state)
    loaded = load_block_sparse(out, build_model(cfg, state)[0])
    assert isinstance(loaded.net[1], BlockSparseLinear) and loaded.net[1].layout == "own"
    x = shapes.inputs(3)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), dense(x))
        torch.testing.assert_close(load_exported(fashion_run)(x), dense(x))


def test_sapp_export_names_itself_in_its_usage(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: sapp-export")


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: shutil.rmtree(d), "is not a folder"),
        (lambda d: shutil.rmtree(d / ".hydra"), "is not a sapp-train run folder: it has no .hydra/config.yaml"),
        (lambda d: (d / "model.pt").unlink(), "has no committed model .* the run never finished"),
        (lambda d: _set(d, "pruning.algorithm", "dense"), "is a dense run"),
        (lambda d: _set(d, "pruning.block_size", 32), "is not block-sparse at the recorded block size 32"),
        (lambda d: _densify(d), "is not block-sparse at the recorded block size 16: the run pruned net.1, net.3"),
    ],
    ids=["no_folder", "no_config", "never_committed", "dense_run", "other_block_size", "dense_weights"],
)
def test_each_error_of_sapp_export(fashion_run, tmp_path, capsys, damage, message):
    run_dir = _copy_run(fashion_run, tmp_path)
    damage(run_dir)
    assert main([str(run_dir), "--no-measure"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sapp-export: error:")
    assert re.search(message, err), err


def _set(run_dir: Path, key: str, value) -> None:
    path = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(path)
    OmegaConf.update(cfg, key, value)
    OmegaConf.save(cfg, path)


def _densify(run_dir: Path) -> None:
    """model.pt from a dense model of the same architecture (another run's weights)."""
    state = torch.load(run_dir / "model.pt", weights_only=True)
    torch.save({k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}, run_dir / "model.pt")


def test_a_ctr_run_exports_without_its_data(tmp_path):
    """The table sizes come from the weights: the Criteo TSV is gone when sapp-export runs."""
    tsv = make_criteo_tsv(tmp_path / "train.txt")
    run_dir = tmp_path / "run"
    overrides = ["recipe=criteo_paper", "pruning=acdc", f"data.path={tsv}", "data.batch_size=32"]
    overrides += ["global_batch_size=null", "data.table_size=50", f"data.cache_dir={tmp_path / 'cache'}", *FAST]
    cfg = compose_cfg(overrides, run_dir)
    run(cfg)
    _save_config(cfg, run_dir)
    tsv.unlink()
    shutil.rmtree(tmp_path / "cache")
    assert main([str(run_dir), "--batch-size", "8", "--repeats", "2"]) == 0
    record = json.loads((run_dir / RESULT_FILE).read_text())
    assert [row["name"] for row in record["summary"]["layers"] if row["layout"]] == ["net.mlp.0"]  # blocks of 10
    model = load_exported(run_dir)
    assert isinstance(model.net.mlp[0], BlockSparseLinear)


@pytest.mark.slow
def test_sapp_train_and_sapp_export_as_commands(tmp_path):
    """The two commands end to end, as a user types them (Hydra writes the run folder)."""
    data = tmp_path / "data"
    make_fashion_dir(data, n_train=64, n_test=16)
    run_dir = tmp_path / "run"
    train = [sys.executable, "-m", "sapp_lightning.app.train", "recipe=fashion_mnist_demo", "pruning=sapp"]
    train += [f"data.data_dir={data}", "data.val_size=16", "data.batch_size=16", "trainer.fast_dev_run=2"]
    train += ["logger=none", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's sapp_lightning, whichever is installed
    subprocess.run(train, check=True, cwd=tmp_path, capture_output=True, env=env)
    export = [
        sys.executable,
        "-c",
        "from sapp_lightning.app.cli import export; raise SystemExit(export())",
        str(run_dir),
        "--batch-size",
        "4",
    ]
    out = subprocess.run(export, check=True, cwd=tmp_path, capture_output=True, text=True, env=env).stdout
    assert "2 layers block-sparse" in out and (run_dir / MODEL_FILE).is_file()
