"""The Lightning callback: a thin adapter that drives a :class:`~sapp_lightning.BlockSparsifier` from Trainer hooks.

``BlockPruningHooks`` holds the hook bodies and touches the Trainer only through its public attributes, so the
same code serves ``pytorch_lightning`` (:class:`BlockPruning`, here) and ``lightning.pytorch``
(``sapp_lightning.lightning.BlockPruning``).
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
from torch import nn

from .events import Lifecycle, PruningEvent
from .sparsifier import BlockSparsifier


class BlockPruningHooks:
    """The hook bodies of :class:`BlockPruning`, for any Lightning ``Callback`` base class.

    Holds a :class:`~sapp_lightning.BlockSparsifier` (``.sparsifier``), made from the arguments or given; its public
    attributes and methods (``report()``, ``config()``, ``commit()``, ``layers``, ``phase``, ``plan``, ...) are read
    through the callback too.
    """

    def __init__(
        self,
        *args: Any,
        sparsifier: BlockSparsifier | None = None,
        verify_masks_across_ranks: bool = True,
        total_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if args and isinstance(args[0], BlockSparsifier):
            sparsifier, args = args[0], args[1:]
        if sparsifier is not None and (args or kwargs):
            raise ValueError(
                f"pass either a BlockSparsifier or its arguments to {type(self).__name__}, not both (got "
                f"{', '.join([*map(repr, args), *kwargs])} beside it)"
            )
        self.sparsifier = sparsifier if sparsifier is not None else BlockSparsifier(*args, **kwargs)
        self.sparsifier.owner = type(self).__name__
        if self.sparsifier.lifecycle is not Lifecycle.NEW:
            raise ValueError(f"{type(self).__name__} needs a new BlockSparsifier, got one that is already "
                             f"{self.sparsifier.lifecycle.value}")  # fmt: skip
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"total_steps must be an int >= 1 or None, got {total_steps!r}")
        self.verify_masks_across_ranks = verify_masks_across_ranks
        self.total_steps = total_steps
        self.sparsifier.add_listener(self._on_event)  # a bound method: ddp_spawn pickles the callback
        self._trainer: Any = None
        self._last_global_step = -1
        self._epoch_batches = [0, 0]  # batches of this epoch seen, and those that stepped an optimizer

    def __getattr__(self, name: str) -> Any:
        # only for names the callback lacks: the sparsifier's public state (report(), layers, phase, plan, ...)
        sparsifier = self.__dict__.get("sparsifier")
        if sparsifier is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(sparsifier, name)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *(n for n in dir(self.sparsifier) if not n.startswith("_"))})

    @property
    def state_key(self) -> str:
        # One key whatever the arguments, so a checkpoint made with other arguments is found and
        # reported as a mismatch instead of being silently skipped.
        return "BlockPruning"

    # --- set-up -------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if stage != "fit":
            return
        lifecycle = self.sparsifier.lifecycle
        if lifecycle is Lifecycle.COMMITTED:
            raise RuntimeError(
                "this BlockPruning callback already committed a model at the end of an earlier fit; "
                "create a new BlockPruning for another fit"
            )
        if lifecycle in (Lifecycle.PREPARED, Lifecycle.TRAINING):  # setup already ran for this fit (re-entrant)
            return
        if lifecycle is Lifecycle.FAILED:
            raise RuntimeError(
                "this BlockPruning callback already pruned a model in an earlier fit that did not finish (it raised "
                "or was interrupted), and that model still carries its masks. Call commit() on it for plain weights, "
                "or resume the run from a checkpoint with a fresh model, Trainer and BlockPruning"
            )
        self.sparsifier.prepare(pl_module)
        self._trainer = trainer

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        self.sparsifier.mark_failed()

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.sparsifier.lifecycle is Lifecycle.PREPARED:
            self.sparsifier.attach(trainer.optimizers)
        # The plan is laid out in on_train_start: estimated_stepping_batches sets the train dataloader up, and
        # doing so before the checkpoint is restored drops a resumable dataloader's saved position
        # (Lightning-AI/pytorch-lightning#20550), which breaks mid-epoch resumes.

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.sparsifier.lifecycle is not Lifecycle.PREPARED:
            return
        total = self.total_steps or trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("BlockPruning needs a finite training length: set max_epochs or max_steps")
        self._last_global_step = trainer.global_step
        self._started_phase(trainer, lambda: self.sparsifier.start(int(total)))

    # --- training -----------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: Any) -> None:
        self.sparsifier.before_optimizer_step(optimizer)

    def on_train_epoch_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._epoch_batches = [0, 0]

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.sparsifier.lifecycle is not Lifecycle.TRAINING:
            return
        self._epoch_batches[0] += 1
        step, delta = trainer.global_step, trainer.global_step - self._last_global_step
        if delta == 0:  # accumulating gradients: no optimizer step yet
            return
        self._epoch_batches[1] += 1
        self._last_global_step = step
        if delta > 1 and self.sparsifier.steps_done == 0:
            self._check_steps_per_batch(trainer, delta)
        self._started_phase(trainer, self.sparsifier.step)
        # Only where Lightning will write step metrics: each LightningModule.log costs milliseconds.
        if trainer.loggers and trainer.log_every_n_steps and step % trainer.log_every_n_steps == 0:
            metrics = {
                "pruning/sparsity": self.sparsifier.achieved_sparsity(),
                "pruning/target_sparsity": self.sparsifier.target_sparsity(),
                "pruning/phase": float(self.sparsifier.phase if self.sparsifier.phase is not None else 0),
            }
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)

    def _started_phase(self, trainer: Any, advance) -> None:
        """Run ``advance`` (start or step); where it began a phase, check that all ranks agree on the masks."""
        before = self.sparsifier.segment_index
        advance()
        if self.sparsifier.segment_index != before:
            phase = self.sparsifier.phase
            assert phase is not None
            self.verify_masks(trainer, f"at the start of phase {self.sparsifier.segment_index} ({phase.name.lower()})")

    def _check_steps_per_batch(self, trainer: Any, per_batch: int) -> None:
        """Manual optimization with several optimizers: ``max_steps`` counts each optimizer's step."""
        planned = self.sparsifier.schedule.total_steps
        if self.total_steps is None and trainer.max_steps not in (-1, None):
            batches = math.ceil(trainer.max_steps / per_batch)
            if batches < planned:
                raise ValueError(
                    f"BlockPruning: each training batch steps {per_batch} optimizers, and "
                    f"max_steps={trainer.max_steps} counts every optimizer's step, so training ends after {batches} "
                    f"batches while the phase plan was laid over {planned}. Set max_epochs instead "
                    "of max_steps, or pass "
                    f"BlockPruning(total_steps={batches})."
                )

    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        seen, stepped = self._epoch_batches
        planned = self.sparsifier.schedule.total_steps if self.sparsifier.schedule else 0
        manual = not getattr(pl_module, "automatic_optimization", True)
        if manual and self.total_steps is None and 0 < stepped < seen and not trainer.should_stop:
            raise ValueError(
                f"BlockPruning: under manual optimization Lightning counts every training batch as a step "
                f"(estimated_stepping_batches = {planned}), but only {stepped} of the {seen} batches "
                f"of epoch {trainer.current_epoch} stepped an optimizer: the phase plan would run past the end of "
                f"training. Pass BlockPruning(total_steps=...) with the number of batches that step the optimizers "
                f"(about {math.ceil(planned * stepped / seen)})."
            )

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.sparsifier.lifecycle is Lifecycle.TRAINING:
            self.sparsifier.check_finite("when training ended")
            self.verify_masks(trainer, "when training ended")

    def verify_masks(self, trainer: Any, when: str) -> None:
        """Compare mask checksums across ranks (one gather); called at every phase start and when training ends."""
        if self.verify_masks_across_ranks and trainer.world_size > 1:
            self.sparsifier.verify_masks(when, trainer.strategy.all_gather)

    def _on_event(self, sparsifier: BlockSparsifier, event: PruningEvent) -> None:
        """At each phase end: per-layer sparsity straight to every logger (not thinned by ``log_every_n_steps``)."""
        trainer = self._trainer
        if event.kind != "phase_end" or trainer is None or not trainer.is_global_zero:
            return
        metrics = {f"pruning/layer/{name}": value for name, value in self.sparsifier.layer_sparsity().items()}
        metrics["pruning/sparsity"] = self.sparsifier.achieved_sparsity()
        metrics["pruning/phase"] = float(event.phase if event.phase is not None else 0)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # --- the end and checkpoints --------------------------------------------------------------
    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self.sparsifier.commit()

    def state_dict(self) -> dict[str, Any]:
        return self.sparsifier.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sparsifier.load_state_dict(state_dict)


class BlockPruning(BlockPruningHooks, pl.Callback):
    """Make any LightningModule block-sparse while it trains (``pytorch_lightning``; for ``lightning.pytorch``
    use ``sapp_lightning.lightning.BlockPruning``, the same callback).

    At fit start the callback puts a per-block mask (and, for ``sapp`` and ``powerprop``, a reparametrized forward)
    on every target layer; it then follows the phase plan step by step, resets the optimizer state at phase
    boundaries, and when ``trainer.fit`` returns it commits plain weights whose pruned blocks are exact zeros. The
    model's ``state_dict`` then has the same keys as before fit. The work is done by a
    :class:`~sapp_lightning.BlockSparsifier` (``pruning.sparsifier``), which any other training loop can drive.

    Args:
        *args, **kwargs: a :class:`~sapp_lightning.BlockSparsifier`, or its arguments (``algorithm``, ``sparsity``,
            ``block_size``, ``plan``, the algorithm's knobs, ...; see its documentation). ``algorithm`` is a name
            (``"sapp"``, ``"acdc"``, ``"magnitude"``, ``"powerprop"``, ``"gmp"``) or an object such as
            ``SequentialAttentionPP(logit_l2=1e-4)``. The sparsifier is ``pruning.sparsifier``; its public
            attributes and methods (``report()``, ``config()``, ``commit()``, ``layers``, ``phase``) are read
            through the callback as well.
        verify_masks_across_ranks: in distributed runs, compare mask checksums across ranks at every phase
            boundary and when training ends, and raise if they differ.
        total_steps: the number of training steps the plan is laid over (one per batch that steps the
            optimizers). Default: ``trainer.estimated_stepping_batches``. Needed only under manual optimization
            when some batches step no optimizer (the callback raises after the first epoch, naming the value).

    Resume, DDP, precision, ``torch.compile`` and odd states: see the README's "Reliability" section.

    Example:
        >>> import pytorch_lightning as pl, torch
        >>> from sapp_lightning import BlockPruning
        >>> class Model(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
        ...     def training_step(self, batch, _):
        ...         x, y = batch
        ...         return torch.nn.functional.mse_loss(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.01)
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 64), torch.randn(64, 1))
        >>> model = Model()
        >>> pruning = BlockPruning("sapp", sparsity=0.75, block_size=8, min_blocks=16)
        >>> trainer = pl.Trainer(max_epochs=4, callbacks=[pruning], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
        >>> report = pruning.report()
        >>> report["net.0"].zero_blocks, report["net.0"].num_blocks
        (48, 64)
    """
