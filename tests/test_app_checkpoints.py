"""sapp-train survives faults (sapp_lightning/app/checkpoints.py): killed and resumed equals uninterrupted, SLURM
requeues on its warning signal, damaged checkpoints, changed settings and untrusted pickles are refused before
training, writes are atomic, and every checkpoint it writes opens with ``weights_only=True``, folds and resumes."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_cfg, make_trainer, save_checkpoint_holding
from omegaconf import OmegaConf

from sapp_lightning import UnsafeCheckpointError, committed_state_dict, load_checkpoint
from sapp_lightning.app.checkpoints import AtomicCheckpointIO, check_checkpoint
from sapp_lightning.app.synthetic import make_fashion_dir
from sapp_lightning.app.train import run

TESTS = Path(__file__).resolve().parent
# 100 images, 20 for validation, batches of 16: 5 steps per epoch, 4 epochs
SETTINGS = ["recipe=fashion_mnist_demo", "pruning=sapp", "trainer.max_epochs=4", "data.batch_size=16"]
SETTINGS += ["data.val_size=20", "logger=none", "trainer.enable_progress_bar=false", "~callbacks.mask_heatmaps"]


def train(run_dir: Path, fashion_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sapp_lightning.app.train", *SETTINGS, f"data.data_dir={fashion_dir}"]
    cmd += [f"hydra.run.dir={run_dir}", *extra]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, env=environment | (env or {}), cwd=run_dir.parent)


def outcome(run_dir: Path) -> tuple[dict, dict]:
    results = json.loads((run_dir / "results.json").read_text())
    return torch.load(run_dir / "model.pt", weights_only=True), {"val": results["val"], "test": results["test"]}


def assert_same_outcome(a: Path, b: Path) -> None:
    (weights_a, metrics_a), (weights_b, metrics_b) = outcome(a), outcome(b)
    assert list(weights_a) == list(weights_b) and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert metrics_a == metrics_b


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fashion_dir):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    done = train(run_dir, fashion_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.slow  # sapp-train in subprocesses, killed and resumed
@pytest.mark.parametrize(
    "where, checkpoints, kill_after",
    [
        ("epoch end", [], 6),  # every epoch: the newest checkpoint is step 5, the end of epoch 0
        ("mid-epoch", ["callbacks.checkpoint.every_n_train_steps=3", "callbacks.checkpoint.every_n_epochs=null"], 7),
    ],
)
def test_killed_and_resumed_equals_uninterrupted(tmp_path, fashion_dir, uninterrupted, where, checkpoints, kill_after):
    run_dir = tmp_path / "run"
    killed = train(run_dir, fashion_dir, *checkpoints, "+callbacks.fault._target_=app_faults.KillAfter",
                   f"+callbacks.fault.step={kill_after}")  # fmt: skip
    assert killed.returncode == -9 and not (run_dir / "results.json").exists()
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == (5 if where == "epoch end" else 6)
    resumed = train(run_dir, fashion_dir, *checkpoints, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert_same_outcome(run_dir, uninterrupted)


@pytest.mark.slow  # sapp-train in subprocesses
def test_slurm_warning_signal_saves_requeues_and_the_requeued_job_resumes(tmp_path, fashion_dir, uninterrupted):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "sapp", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    run_dir = tmp_path / "run"
    first = train(
        run_dir, fashion_dir, "+callbacks.fault._target_=app_faults.SignalAt", "+callbacks.fault.step=8", env=slurm
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert not (run_dir / "results.json").exists()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
    requeued = train(run_dir, fashion_dir, env=slurm | {"SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "resuming from" in requeued.stdout + requeued.stderr
    assert_same_outcome(run_dir, uninterrupted)


@pytest.fixture
def finished_run(tmp_path, fashion_dir):
    """An in-process run of 2 epochs: checkpoints after each epoch and last.ckpt."""
    overrides = [*SETTINGS, "trainer.max_epochs=2", f"data.data_dir={fashion_dir}", "test=false"]
    run(compose_cfg(overrides, tmp_path / "run"))
    return overrides, tmp_path / "run" / "checkpoints"


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_damaged_checkpoint_fails_before_training_naming_the_file_and_the_previous_one(
    tmp_path, finished_run, damage
):
    overrides, folder = finished_run
    last = folder / "last.ckpt"
    data = last.read_bytes()
    if damage == "truncated":
        last.write_bytes(data[: len(data) // 2])
    else:
        middle = len(data) // 2
        last.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 4096]) + data[middle + 4096 :])
    with pytest.raises(ValueError, match=rf"checkpoint {last} cannot be read .* damaged or was cut off") as error:
        run(compose_cfg([*overrides, "ckpt_path=last"], tmp_path / "run"))
    assert f"ckpt_path={folder / 'epoch1-step10.ckpt'}" in str(error.value)


def test_resuming_with_other_settings_names_each_difference(tmp_path, finished_run):
    overrides, _ = finished_run
    changed = [*overrides, "ckpt_path=last", "data.batch_size=8", "seed=1", "data.num_workers=1"]
    with pytest.raises(
        ValueError, match="written by a run with other settings: data.batch_size: checkpoint 16, this "
    ) as e:
        run(compose_cfg(changed, tmp_path / "run"))
    assert "; seed: checkpoint 0, this run 1. Resume with the same settings" in str(e.value)
    assert "num_workers" not in str(e.value)  # does not change results


def test_ckpt_path_last_without_a_checkpoint_names_the_run_folder(tmp_path, fashion_dir):
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: there is no .*last.ckpt. Resume with the run's own"):
        run(compose_cfg([*SETTINGS, f"data.data_dir={fashion_dir}", "ckpt_path=last"], tmp_path / "empty"))


def test_a_crash_while_writing_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def crash(obj, target):
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# --- checkpoints are opened with weights_only=True --------------------------------------------------------------------
def test_sapp_train_refuses_it_before_training_unless_trusted(tmp_path):
    path = save_checkpoint_holding(tmp_path / "partial.ckpt", functools.partial(print, "called"))
    cfg = OmegaConf.create({"resume_check": True, "trusted": False})
    with pytest.raises(UnsafeCheckpointError, match=r"holds .*functools\.partial.* \(sapp-train: trusted=true\)"):
        check_checkpoint(path, cfg)
    check_checkpoint(path, OmegaConf.create({"resume_check": True, "trusted": True}))


def test_lightning_resumes_with_weights_only_unless_trusted(tmp_path):
    from sapp_lightning.app.checkpoints import resume_load_options

    trainer = make_trainer(tmp_path)
    assert resume_load_options(trainer, OmegaConf.create({"trusted": False})) == {"weights_only": True}
    assert resume_load_options(trainer, OmegaConf.create({"trusted": True})) == {"weights_only": False}


# 100 images, 20 for validation, batches of 16: 5 steps per epoch, 2 epochs
ALL_CHECKPOINTS = ["recipe=fashion_mnist_demo", "pruning=sapp", "trainer.max_epochs=2", "data.batch_size=16"]


ALL_CHECKPOINTS += ["data.val_size=20", "logger=none", "trainer.enable_progress_bar=false", "~callbacks.mask_heatmaps"]


ALL_CHECKPOINTS += ["test=false", "callbacks.checkpoint.save_top_k=-1"]


MID_EPOCH = ["callbacks.checkpoint.every_n_train_steps=3", "callbacks.checkpoint.every_n_epochs=null"]


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["epoch end", "mid-epoch", "slurm"])
def test_every_checkpoint_sapp_train_writes_opens_and_resumes(tmp_path, monkeypatch, where):
    data = tmp_path / "fashion"
    make_fashion_dir(data, n_train=100, n_test=20)
    settings = [*ALL_CHECKPOINTS, f"data.data_dir={data}", *(MID_EPOCH if where == "mid-epoch" else [])]
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
