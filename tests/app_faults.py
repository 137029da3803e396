"""Faults for the app tests, as callbacks a config can name (``+callbacks.fault._target_=app_faults.KillAfter``)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class KillAfter(pl.Callback):
    """SIGKILL this process once optimizer step ``step`` has run (checkpoints of earlier steps are on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step > self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(pl.Callback):
    """Send ``signal_name`` to this process after optimizer step ``step``, as SLURM does before a time-out."""

    def __init__(self, step: int, signal_name: str = "SIGUSR2") -> None:
        self.step, self.signum = step, getattr(signal, signal_name)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
