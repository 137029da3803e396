"""``sapp-train``: the Hydra entry point over ``conf/`` and ``recipes/``.

Examples (see the README and each recipe's first line)::

    sapp-train recipe=resnet50_imagenet pruning=sapp pruning.sparsity=0.9 pruning.block_size=16
    sapp-train recipe=criteo_paper pruning=acdc pruning.sparsity=0.95 pruning.block_size=10
    sapp-train -m recipe=criteo_paper pruning=sapp,acdc,magnitude,powerprop pruning.sparsity=0.9,0.95 seed=0,1,2
    sapp-train pruning=dense           # the dense baseline
    sapp-train recipe=criteo_paper --cfg job   # print the composed config

Each run writes ``results.json`` and the committed weights (``model.pt``) into its output folder; ``sapp-results DIR``
gathers a sweep into tables. ``ckpt_path=PATH`` or ``ckpt_path=last`` (with the run's own ``hydra.run.dir``) resumes a
run; ``skip_finished=true`` returns a finished run's ``results.json`` instead of training it again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

try:
    from hydra.utils import instantiate
    from omegaconf import DictConfig
except ImportError as err:  # pragma: no cover - depends on the installation
    raise SystemExit(f"sapp-train needs the app extra: pip install 'sapp_lightning[app]' ({err})") from err
import pytorch_lightning as pl
import torch

from sapp_lightning import block_sparsity, real_sparsity

from .builders import (
    build_callbacks,
    build_loggers,
    build_module,
    build_pruning,
    build_trainer,
    check_accelerator,
    pin_global_batch,
)
from .checkpoints import Preempted, check_checkpoint, resolve_ckpt_path, resume_load_options, run_settings
from .history import PruningHistory
from .synthetic import smoke_config

log = logging.getLogger(__name__)


class KeptAttentionRange:
    """A sparsifier listener: SA++'s kept-block attention ``A = N softmax(k L)`` per pruned layer, as
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


# Settings that do not change what a run computes or records: a finished run made with other values is reused.
NOT_COMPARED = ("skip_finished", "threads")


def finished_results(cfg: DictConfig) -> dict[str, Any] | None:
    """The ``results.json`` in the run folder when it was made with this composed configuration (its ``config``),
    else ``None``, saying why it is trained again."""
    path = Path(cfg.output_dir) / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    ours = json.loads(json.dumps(run_settings(cfg), default=str))
    theirs = results.get("config") or {}
    differ = sorted(k for k in set(ours) | set(theirs) if k not in NOT_COMPARED and ours.get(k) != theirs.get(k))
    if differ:
        log.info("skip_finished: %s was made with other settings (%s); training again", path, ", ".join(differ))
        return None
    log.info("skip_finished: %s was made with this configuration; not training again", path)
    return results


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Train one configuration and return (and save) its results; ``None`` when SLURM preempted it (requeued).
    With ``skip_finished``, a run folder that holds the results of this configuration returns them untrained."""
    if cfg.get("smoke"):
        cfg = smoke_config(cfg)
    if cfg.get("skip_finished") and (finished := finished_results(cfg)) is not None:
        return finished
    if cfg.get("threads"):  # e.g. one per run when a sweep runs several at once (conf/bench/fast.yaml)
        torch.set_num_threads(cfg.threads)
    check_accelerator(cfg)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is not None:
        check_checkpoint(ckpt_path, cfg)
        log.info("resuming from %s", ckpt_path)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    pruning = build_pruning(cfg.pruning, cfg.pruning_callback)
    history = PruningHistory(pruning.sparsifier, cfg.trainer.log_every_n_steps) if pruning else None
    loggers = build_loggers(cfg.logger)
    fast = cfg.trainer.get("fast_dev_run", False)
    callbacks = build_callbacks(cfg.callbacks, pruning, history, has_logger=bool(loggers), fast_dev_run=fast)
    trainer = build_trainer(cfg, callbacks, loggers)
    pin_global_batch(cfg, datamodule, trainer)
    try:
        return _fit_and_report(cfg, trainer, module, datamodule, pruning, history, ckpt_path)
    finally:
        finish_wandb(trainer)


def finish_wandb(trainer: pl.Trainer) -> None:
    """End this run's W&B run: an unfinished one would be reused by the next run in the same process (sweeps)."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:  # never started: nothing to end
            logger.experiment.finish()


def _fit_and_report(cfg, trainer, module, datamodule, pruning, history, ckpt_path) -> dict[str, Any] | None:
    attention = KeptAttentionRange()
    if pruning is not None:
        pruning.sparsifier.add_listener(attention)
    started = time.perf_counter()
    try:
        resume = dict(ckpt_path=str(ckpt_path), **resume_load_options(trainer, cfg)) if ckpt_path else {}
        trainer.fit(module, datamodule=datamodule, **resume)
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
        **({"variant": cfg.variant} if cfg.get("variant") else {}),  # a recipe's label: its own rows in the table
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
    if history is not None:  # what the sparsifier did: phases and sparsity curves (the figures read these)
        results["pruning"] = history.to_dict()
    results["config"] = run_settings(cfg)  # what made these results (skip_finished compares it)
    if trainer.is_global_zero:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), out / "model.pt")  # the committed weights: plain tensors, no callback state
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if trainer.is_global_zero and cfg.get("export", {}).get("enabled") and cfg.pruning.algorithm != "dense":
        from .export import describe, export_run

        record = export_run(cfg.output_dir, cfg.export.batch_size, cfg=cfg, datamodule=datamodule)
        log.info("block-sparse export:\n%s", describe(record))
    if history is not None:
        from .plots import log_sparsity_curve

        log_sparsity_curve(trainer, cfg.output_dir, results)  # sparsity_curve.png in the run folder (and to W&B)
    return results


if __name__ == "__main__":  # python -m sapp_lightning.app.train: the same as sapp-train
    from .cli import train

    train()
