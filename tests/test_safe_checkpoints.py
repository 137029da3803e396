"""Checkpoint files are read with ``torch.load(weights_only=True)``: one that holds a pickled callable is refused,
naming its type, unless trusted; every checkpoint sapp-train writes still opens, folds and resumes."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from helpers import save_checkpoint_holding
from omegaconf import OmegaConf
from test_app import compose_cfg

from sapp_lightning import UnsafeCheckpointError, committed_state_dict, load_checkpoint
from sapp_lightning.app.checkpoints import check_checkpoint
from sapp_lightning.app.synthetic import make_fashion_dir
from sapp_lightning.app.train import run


def test_sapp_train_refuses_it_before_training_unless_trusted(tmp_path):
    path = save_checkpoint_holding(tmp_path / "partial.ckpt", functools.partial(print, "called"))
    cfg = OmegaConf.create({"resume_check": True, "trusted": False})
    with pytest.raises(UnsafeCheckpointError, match=r"holds .*functools\.partial.* \(sapp-train: trusted=true\)"):
        check_checkpoint(path, cfg)
    check_checkpoint(path, OmegaConf.create({"resume_check": True, "trusted": True}))


# 100 images, 20 for validation, batches of 16: 5 steps per epoch, 2 epochs
SETTINGS = ["recipe=fashion_mnist_demo", "pruning=sapp", "trainer.max_epochs=2", "data.batch_size=16"]


SETTINGS += ["data.val_size=20", "logger=none", "trainer.enable_progress_bar=false", "~callbacks.mask_heatmaps"]


SETTINGS += ["test=false", "callbacks.checkpoint.save_top_k=-1"]


MID_EPOCH = ["callbacks.checkpoint.every_n_train_steps=3", "callbacks.checkpoint.every_n_epochs=null"]


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["epoch end", "mid-epoch", "slurm"])
def test_every_checkpoint_sapp_train_writes_opens_and_resumes(tmp_path, monkeypatch, where):
    data = tmp_path / "fashion"
    make_fashion_dir(data, n_train=100, n_test=20)
    settings = [*SETTINGS, f"data.data_dir={data}", *(MID_EPOCH if where == "mid-epoch" else [])]
    full = run(compose_cfg(settings, tmp_path / "full"))
    assert full is not None and full["steps"] == 10
    folder = tmp_path / "full" / "checkpoints"
    if where == "slurm":  # SLURM's warning signal after step 3: last.ckpt at the end of that batch, then a requeue
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "scontrol").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "scontrol").chmod(0o755)
        for key, value in dict(SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_JOB_NAME="sapp", SLURM_PROCID="0",
                               SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost").items():  # fmt: skip
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        signalled = [*settings, "+callbacks.fault._target_=app_faults.SignalAt", "+callbacks.fault.step=3"]
        assert run(compose_cfg(signalled, tmp_path / "slurm")) is None  # preempted
        folder = tmp_path / "slurm" / "checkpoints"
    written = sorted(folder.glob("*.ckpt"))
    expected = {"epoch end": {"epoch0-step5", "epoch1-step10", "last"}, "mid-epoch": {"epoch0-step3", "epoch1-step6",
                "epoch1-step9", "last"}, "slurm": {"last"}}[where]  # fmt: skip
    assert {p.stem for p in written} == expected
    cfg = compose_cfg(settings, tmp_path / "resumed")
    for path in written:
        checkpoint = load_checkpoint(path)  # weights_only=True
        assert checkpoint["callbacks"]["BlockPruning"]["config"]["algorithm"] == "sapp"
        check_checkpoint(path, cfg)
        assert list(committed_state_dict(path)) == list(final_weights(tmp_path / "full"))
    first = min(written, key=lambda p: load_checkpoint(p)["global_step"])
    resumed = run(compose_cfg([*settings, f"ckpt_path={first}"], tmp_path / "resumed"))
    assert resumed is not None and resumed["steps"] == 10
    weights, expected_weights = final_weights(tmp_path / "resumed"), final_weights(tmp_path / "full")
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights)


def test_lightning_resumes_with_weights_only_unless_trusted():
    import pytorch_lightning as pl

    from sapp_lightning.app.checkpoints import resume_load_options

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert resume_load_options(trainer, OmegaConf.create({"trusted": False})) == {"weights_only": True}
    assert resume_load_options(trainer, OmegaConf.create({"trusted": True})) == {"weights_only": False}
