"""Surviving faults in ``sapp-train``: atomic checkpoint writes, resuming (``ckpt_path=PATH|last``) with checks
that the file is whole and the configuration the same, and requeueing on SLURM's warning signal."""

from __future__ import annotations

import inspect
import logging
import os
import signal
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, ListConfig, OmegaConf

from sapp_lightning import UnsafeCheckpointError, allow_safe_globals, load_checkpoint

log = logging.getLogger(__name__)

RUN_CONFIG_KEY = "sapp_train_config"
CHECKSUM_KEY = "sapp_train_checksum"
# Settings that do not change what a run computes: they may differ between a run and its resumption.
IGNORED_ON_RESUME = (
    "output_dir", "name", "variant", "test", "ckpt_path", "resume_check", "trusted", "slurm", "logger", "callbacks",
    "hydra", "trainer.enable_progress_bar", "trainer.log_every_n_steps", "trainer.default_root_dir",
    "trainer.enable_model_summary", "trainer.enable_checkpointing", "trainer.accelerator",
    "data.num_workers", "data.path", "data.root", "data.data_dir", "data.cache_dir", "data.download",
    "pruning.verify_masks_across_ranks", "pruning.check_finite_every_n_steps", "threads", "skip_finished",
)  # fmt: skip


def tensor_checksum(tree: Any, crc: int = 0) -> int:
    """CRC-32 over the bytes of every tensor in a checkpoint (in its own order), to tell a damaged file that
    still unpickles from a whole one."""
    if isinstance(tree, torch.Tensor):
        if tree.layout is torch.strided and tree.numel():
            return zlib.crc32(tree.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
        return crc
    if isinstance(tree, dict):
        for value in tree.values():
            crc = tensor_checksum(value, crc)
    elif isinstance(tree, list | tuple):
        for value in tree:
            crc = tensor_checksum(value, crc)
    return crc


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside the target and renames it into place, so a crash while
    writing leaves the previous file (``last.ckpt`` included) whole; records a checksum of its tensors, which
    :func:`check_checkpoint` verifies."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        checkpoint = {**checkpoint, CHECKSUM_KEY: tensor_checksum(checkpoint)}
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        try:
            torch.save(checkpoint, partial)
            os.replace(partial, target)  # atomic on POSIX file systems
        finally:
            partial.unlink(missing_ok=True)


class RunConfig(pl.Callback):
    """Saves the composed configuration in every checkpoint (``checkpoint["sapp_train_config"]``), so that a
    resumed run can be compared with the run that wrote it."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = run_settings(cfg)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_CONFIG_KEY] = self.config


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The composed configuration as plain data, without Hydra's own node."""
    return {key: OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
            for key, value in cfg.items() if key != "hydra"}  # fmt: skip


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: checkpoint X, this run Y`` for every setting that changes results and differs.

    Example:
        >>> config_differences({"seed": 0, "data": {"batch_size": 8, "num_workers": 2}},
        ...                    {"seed": 0, "data": {"batch_size": 16, "num_workers": 8}})
        ['data.batch_size: checkpoint 8, this run 16']
    """
    ours, theirs = _flatten(current), _flatten(saved)
    ignored = lambda key: any(key == i or key.startswith(i + ".") for i in IGNORED_ON_RESUME)  # noqa: E731
    keys = sorted(k for k in set(ours) | set(theirs) if not ignored(k))
    return [
        f"{k}: checkpoint {theirs.get(k)!r}, this run {ours.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)
    ]


def checkpoint_dir(cfg: DictConfig) -> Path:
    checkpoint = (cfg.get("callbacks") or {}).get("checkpoint")
    return (
        Path(checkpoint.dirpath) if checkpoint and checkpoint.get("dirpath") else Path(cfg.output_dir) / "checkpoints"
    )


def resolve_ckpt_path(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from: ``ckpt_path`` as given, ``last`` as the run folder's ``last.ckpt``, and
    after a SLURM requeue (``SLURM_RESTART_COUNT`` > 0) the run folder's ``last.ckpt`` when there is one."""
    wanted = cfg.get("ckpt_path")
    restarted = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    folder = checkpoint_dir(cfg)
    if wanted is None and not restarted:
        return None
    if wanted is None or wanted == "last":
        last = folder / "last.ckpt"
        if last.is_file():
            return last
        if wanted == "last":
            raise FileNotFoundError(
                f"ckpt_path=last: there is no {last}. Resume with the run's own folder "
                f"(hydra.run.dir=... of the run to continue; this one is {cfg.output_dir})"
            )
        log.warning("SLURM restart %s: no checkpoint in %s yet, training from the start", restarted, folder)
        return None
    path = Path(wanted)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={wanted}: no such checkpoint file")
    return path


def check_checkpoint(path: Path, cfg: DictConfig) -> None:
    """Fail before training when ``path`` holds more than tensors and plain data (:func:`load_checkpoint`; unless
    ``trusted=true``), cannot be read (cut off or damaged), or was written by a run whose results-changing settings
    differ from ``cfg`` (unless ``resume_check=false``)."""
    try:
        checkpoint = load_checkpoint(path, trusted=bool(cfg.get("trusted", False)))
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError("it holds no state_dict")
        expected = checkpoint.pop(CHECKSUM_KEY, None)
        if expected is not None and tensor_checksum(checkpoint) != expected:
            raise ValueError("the checksum of its tensors differs from the one recorded when it was written")
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to read means the same to the user
        others = sorted((p for p in path.parent.glob("*.ckpt") if p != path), key=lambda p: p.stat().st_mtime)
        hint = f"resume from the previous one, ckpt_path={others[-1]}" if others else "no other checkpoint is there"
        raise ValueError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it is damaged or was cut off while "
            f"being written: {hint}"
        ) from err
    saved = checkpoint.get(RUN_CONFIG_KEY)
    if saved is None or not cfg.get("resume_check", True):
        return
    diffs = config_differences(saved, run_settings(cfg))
    if diffs:
        raise ValueError(
            f"checkpoint {path} was written by a run with other settings: {'; '.join(diffs)}. Resume with the same "
            "settings (recipe and overrides), or pass resume_check=false to continue anyway"
        )


def resume_load_options(trainer: pl.Trainer, cfg: DictConfig) -> dict[str, Any]:
    """``trainer.fit``'s arguments for reading the checkpoint it resumes from: ``weights_only=True`` with
    :data:`~sapp_lightning.checkpoint.SAFE_GLOBALS` allowed, or ``weights_only=False`` with ``trusted=true``
    (a Lightning without that argument uses torch's default, after :func:`check_checkpoint` read the file safely)."""
    allow_safe_globals()
    if "weights_only" not in inspect.signature(trainer.fit).parameters:
        return {}
    return {"weights_only": not cfg.get("trusted", False)}


class Preempted(Exception):
    """Training stopped on SLURM's warning signal after saving ``last.ckpt``; the job was requeued."""


class RequeueOnSignal(pl.Callback):
    """On SLURM's warning signal (sent before a time-out or a preemption): at the end of the current batch, save
    ``last.ckpt``, requeue the job (``scontrol requeue``), and stop with :class:`Preempted`. The requeued job runs
    in the same run folder and resumes from it (``SLURM_RESTART_COUNT`` > 0).

    Lightning's own SLURM handler is switched off (``SLURMEnvironment(auto_requeue=False)``) so that the checkpoint
    is taken at a batch boundary, which keeps a resumed run bit-identical to an uninterrupted one.
    """

    def __init__(self, checkpoint_dir: Path, signal_name: str = "SIGUSR2") -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.signum = getattr(signal, signal_name)
        self.requested = False
        self._previous: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._previous = signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("received signal %s: saving a checkpoint and requeueing at the end of this batch", signum)
        self.requested = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # every rank must stop at the same batch: one scalar all-reduce per step where there are several
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = self.checkpoint_dir / "last.ckpt"
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID", "")
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if done.returncode:
                log.warning("scontrol requeue %s failed (%s): resume by hand with ckpt_path=last", job, done.stderr)
        raise Preempted(f"saved {path} at step {trainer.global_step} and requeued the job")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None
