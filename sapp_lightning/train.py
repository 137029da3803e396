"""``sapp-train``: the Hydra entry point over ``conf/`` and ``recipes/``.

Examples (see the README and each recipe's first line)::

    sapp-train recipe=resnet50_imagenet pruning=sapp pruning.sparsity=0.9 pruning.block_size=16
    sapp-train recipe=criteo_paper pruning=acdc pruning.sparsity=0.95 pruning.block_size=10
    sapp-train -m recipe=criteo_paper pruning=sapp,acdc,magnitude,powerprop pruning.sparsity=0.9,0.95 seed=0,1,2
    sapp-train pruning=dense           # the dense baseline
    sapp-train recipe=criteo_paper --cfg job   # print the composed config

Each run writes ``results.json`` and the committed weights (``model.pt``) into its output folder;
``python -m sapp_lightning.results DIR`` gathers a sweep into a table. ``ckpt_path=PATH`` or ``ckpt_path=last``
(with the run's own ``hydra.run.dir``) resumes a run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

try:
    import hydra
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf
except ImportError as err:  # pragma: no cover - depends on the installation
    raise SystemExit(f"sapp-train needs the app extra: pip install 'sapp_lightning[app]' ({err})") from err
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment

from . import BlockPruning, block_sparsity, real_sparsity
from .app.checkpoints import (
    AtomicCheckpointIO,
    Preempted,
    RequeueOnSignal,
    RunConfig,
    check_checkpoint,
    checkpoint_dir,
    resolve_ckpt_path,
)
from .app.configs import CONFIG_DIR

log = logging.getLogger(__name__)


def build_pruning(cfg: DictConfig) -> BlockPruning | None:
    """The ``pruning`` group instantiated (``_target_: sapp_lightning.BlockPruning``), or ``None`` where its
    ``_target_`` is null (``pruning=dense``, the dense baseline)."""
    return instantiate(cfg, _convert_="all") if cfg.get("_target_") else None


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


def build_callbacks(cfg: DictConfig, pruning: BlockPruning | None, has_logger: bool) -> list[pl.Callback]:
    callbacks = [instantiate(c) for c in (cfg or {}).values()]
    if not has_logger:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    return callbacks + ([pruning] if pruning is not None else [])


class KeptAttentionRange:
    """A sparsifier listener: SA++'s kept-block attention ``A = N softmax(L)`` per pruned layer, as
    ``{layer: [min, max]}``, taken at the commit event, right before ``A`` is folded into the weights (nothing for
    the other algorithms and for ``score=magnitude``). A range close to ``[1, 1]`` means the logits barely moved.
    A class, not a closure: under ``ddp_spawn`` the callback that holds it is pickled."""

    def __init__(self) -> None:
        self.ranges: dict[str, list[float]] = {}

    def __call__(self, sparsifier: Any, event: Any) -> None:
        if event.kind != "commit":
            return
        for state in sparsifier.layer_states():
            kept = state.importance[state.mask]
            if state.importance_name == "attention" and kept.numel():
                self.ranges[state.name] = [round(float(kept.min()), 4), round(float(kept.max()), 4)]


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


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


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Train one configuration and return (and save) its results; ``None`` when SLURM preempted it (requeued)."""
    check_accelerator(cfg)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is not None:
        check_checkpoint(ckpt_path, cfg)
        log.info("resuming from %s", ckpt_path)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    pruning = build_pruning(cfg.pruning)
    loggers = build_loggers(cfg.logger)
    trainer = build_trainer(cfg, build_callbacks(cfg.callbacks, pruning, has_logger=bool(loggers)), loggers)
    pin_global_batch(cfg, datamodule, trainer)
    try:
        return _fit_and_report(cfg, trainer, module, datamodule, pruning, ckpt_path)
    finally:
        finish_wandb(trainer)


def finish_wandb(trainer: pl.Trainer) -> None:
    """End this run's W&B run: an unfinished one would be reused by the next run in the same process (sweeps)."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:  # never started: nothing to end
            logger.experiment.finish()


def _fit_and_report(cfg, trainer, module, datamodule, pruning, ckpt_path) -> dict[str, Any] | None:
    attention = KeptAttentionRange()
    if pruning is not None:
        pruning.sparsifier.add_listener(attention)
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except Preempted as stop:
        log.info("preempted: %s; the requeued job resumes from this run folder", stop)
        return None
    fit_seconds = time.perf_counter() - started
    val_metrics = _floats(trainer.callback_metrics)
    test_metrics = _floats(trainer.test(module, datamodule=datamodule)[0]) if cfg.test else {}

    report = None
    if cfg.pruning.algorithm != "dense":  # measured on the module: under ddp_spawn this callback never trained
        # (and a pruning callback of the user's own, with pruning=dense and its own algorithm name, is measured too)
        p = cfg.pruning
        report = block_sparsity(module, p.block_size, include=p.include, exclude=p.exclude, min_blocks=p.min_blocks)
        log.info("block sparsity after fit:\n%s", report.format())
    results = {
        "name": cfg.name,
        "algorithm": cfg.pruning.algorithm,
        "sparsity": float(cfg.pruning.sparsity) if cfg.pruning.algorithm != "dense" else 0.0,
        "block_size": cfg.pruning.block_size,
        "seed": cfg.seed,
        "data": cfg.data._target_.rsplit(".", 1)[-1],
        "model": cfg.model.net._target_.rsplit(".", 1)[-1],
        "task": cfg.model.task,
        "val": {k: v for k, v in val_metrics.items() if k.startswith("val/")},
        "test": test_metrics,
        "achieved_block_sparsity": report.block_sparsity if report else 0.0,
        # the paper's real sparsity: over every Linear / Conv2d weight, pruned layers or not (SPEC section 2.4)
        "achieved_weight_sparsity": real_sparsity(module, cfg.pruning.block_size) if report else 0.0,
        "pruned_layers": [layer.name for layer in report.layers] if report else [],
        "fit_seconds": fit_seconds,
        "steps": trainer.global_step,
        "epochs": cfg.trainer.max_epochs,
    }
    if attention.ranges:
        results["attention_range"] = attention.ranges
    if trainer.is_global_zero:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), out / "model.pt")  # the committed weights: plain tensors, no callback state
        (out / "results.json").write_text(json.dumps(results, indent=2))
    if trainer.is_global_zero and cfg.get("export", {}).get("enabled") and cfg.pruning.algorithm != "dense":
        from .app.export import describe, export_run

        record = export_run(cfg.output_dir, cfg.export.batch_size, cfg=cfg, datamodule=datamodule)
        log.info("block-sparse export:\n%s", describe(record))
    if pruning is not None:
        from .app.plots import log_sparsity_curve

        log_sparsity_curve(trainer, cfg.output_dir)  # sparsity_curve.png beside the logs (and to W&B)
    return results


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the validation metric so sweepers can optimize it."""
    results = run(cfg)
    key = "val/acc" if cfg.model.task == "classification" else "val/loss"
    return None if results is None else results["val"].get(key)


if __name__ == "__main__":
    main()
