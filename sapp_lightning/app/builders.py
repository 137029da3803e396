"""The pieces of a ``sapp-train`` run built from its composed config: the model, the pruning callback, loggers,
callbacks and the Trainer. ``sapp_lightning.app.train`` runs them; ``sapp-export`` rebuilds a run's model with them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from sapp_lightning import BlockPruning

from .checkpoints import AtomicCheckpointIO, RequeueOnSignal, RunConfig, checkpoint_dir
from .history import PruningHistory

log = logging.getLogger(__name__)


def build_pruning(cfg: DictConfig, callback: DictConfig | dict | None = None) -> BlockPruning | None:
    """The ``pruning`` group's sparsifier (``_target_: sapp_lightning.BlockSparsifier``) inside the Lightning
    callback, with ``callback``'s options (the config's ``pruning_callback``); ``None`` where the group's
    ``_target_`` is null (``pruning=dense``, the dense baseline)."""
    if not cfg.get("_target_"):
        return None
    return BlockPruning(instantiate(cfg, _convert_="all"), **(callback or {}))


def build_module(cfg: DictConfig, datamodule: pl.LightningDataModule) -> pl.LightningModule:
    """The network (sized from the data) inside the task's LightningModule."""
    make_net = instantiate(cfg.model.net)
    make_module = instantiate(cfg.model.module)
    if cfg.model.task == "classification":
        net = make_net(input_shape=tuple(datamodule.input_shape), num_classes=datamodule.num_classes)
        return make_module(net=net, num_classes=datamodule.num_classes)
    if cfg.model.task == "ctr":
        if getattr(datamodule, "cardinalities", None) is None:  # some data sets know them only after setup
            datamodule.prepare_data()
            datamodule.setup("fit")
        net = make_net(num_dense=datamodule.num_dense, cardinalities=list(datamodule.cardinalities))
        return make_module(net=net)
    raise ValueError(f"unknown model.task {cfg.model.task!r}; expected 'classification' or 'ctr'")


def wandb_has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_loggers(cfg: DictConfig) -> list[pl.loggers.Logger]:
    loggers = []
    for name, logger_cfg in (cfg or {}).items():
        if name == "wandb" and logger_cfg.get("offline") is None:
            offline = not wandb_has_api_key()
            if offline:
                log.info("W&B: no API key configured, logging offline (sync later with `wandb sync`)")
            logger_cfg = OmegaConf.merge(logger_cfg, {"offline": offline})
        loggers.append(instantiate(logger_cfg))
    return loggers


def build_callbacks(
    cfg: DictConfig,
    pruning: BlockPruning | None,
    history: PruningHistory | None,
    has_logger: bool,
    fast_dev_run: bool | int = False,
) -> list[pl.Callback]:
    callbacks = [instantiate(c) for c in (cfg or {}).values()]
    if not has_logger:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    if fast_dev_run:  # Lightning says it suppresses checkpoints then, but ModelCheckpoint writes last.ckpt at the end
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ModelCheckpoint)]
    return callbacks + [c for c in (pruning, history) if c is not None]  # the history reads after the pruning


def check_accelerator(cfg: DictConfig) -> None:
    """A recipe that trains on GPUs says so on a machine without one, with the override that runs on the CPU."""
    if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
        recipe = cfg.get("name") or "this configuration"
        raise SystemExit(
            f"{recipe} trains on GPUs (trainer.accelerator=gpu, e.g. trainer=ddp) and this machine has none: add "
            "trainer=cpu to run it on the CPU (slowly), or run it where CUDA is available"
        )


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list) -> pl.Trainer:
    """The Trainer with atomic checkpoint writes; on SLURM, requeueing on the warning signal (``slurm.*``)."""
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect() and cfg.slurm.requeue:
        plugins.append(SLURMEnvironment(auto_requeue=False))  # RequeueOnSignal saves at a batch boundary
        callbacks = [*callbacks, RequeueOnSignal(checkpoint_dir(cfg), cfg.slurm.signal)]
    callbacks = [*callbacks, RunConfig(cfg)]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)


def pin_global_batch(cfg: DictConfig, datamodule: pl.LightningDataModule, trainer: pl.Trainer) -> None:
    """With ``global_batch_size`` set, each device's batch is that over devices x nodes x accumulation, so the
    recipe trains at the paper's batch whatever the machine (``data.batch_size`` is then ignored)."""
    total = cfg.get("global_batch_size")
    if not total:
        return
    share = trainer.world_size * trainer.accumulate_grad_batches
    if total % share:
        raise ValueError(
            f"global_batch_size={total} does not split over {trainer.world_size} device(s) x "
            f"{trainer.accumulate_grad_batches} accumulated batch(es): use a device count that divides it"
        )
    datamodule.batch_size = total // share
    log.info("global batch %d: %d per device", total, datamodule.batch_size)
