"""The Lightning callback: the only piece of sapp_lightning that knows about the Trainer."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from torch.nn.utils import parametrize

from .algorithms import PRUNE_MODES, PrunedLayer, PruningAlgorithm, get_algorithm
from .algorithms.base import MASK_BUFFER, BlockReparam
from .blocks import BlockLayout, BlockSize, keep_count, normalize_block_size, top_k_mask
from .report import SparsityReport, measure_layer
from .schedules import Phase, PhasePlan, StepSchedule, exponential_sparsity
from .targets import candidate_layers, compile_patterns, shared_weight_owners

log = logging.getLogger(__name__)

STATE_VERSION = 1
CONFIG_KEY = "_block_pruning_config"  # entry in the model's state_dict while training
# mask checksums: a (non-linear) hash of each kept block's index, so that swapped blocks change the sum
_HASH_MULTIPLIER, _HASH_MULTIPLIER_2, _HASH_MASK = 2654435761, 2246822519, 2**31 - 1


class BlockPruning(Callback):
    """Make any LightningModule block-sparse while it trains.

    At fit start the callback puts a per-block mask (and, for ``sapp`` and ``powerprop``, a
    reparametrized forward) on every target layer; it then follows the phase plan step by step,
    resets the optimizer state at phase boundaries, and when ``trainer.fit`` returns it commits
    plain weights whose pruned blocks are exact zeros. The model's ``state_dict`` then has the
    same keys as before fit.

    Args:
        algorithm: ``"sapp"`` (SequentialAttention++), ``"acdc"``, ``"magnitude"`` or ``"powerprop"``.
        sparsity: fraction of blocks removed in each pruned layer, ``0 <= sparsity < 1``. Each
            layer keeps ``max(1, round((1 - sparsity) * n_blocks))`` blocks.
        block_size: an int (square blocks) or ``(rows, cols)`` in the fan_in x fan_out kernel
            orientation (Linear: ``weight.T``; Conv2d: ``weight.permute(2, 3, 1, 0)`` flattened
            to ``(kh * kw * cin, cout)``). Edge blocks may be smaller; each counts as one block.
        min_blocks: layers with fewer blocks stay dense (the paper uses 100).
        include: regular expressions searched in module names; when given, only matching
            Linear, Conv2d and Embedding modules are candidates. Default: every Linear and
            Conv2d (``groups == 1``).
        exclude: regular expressions; matching modules are never pruned.
        plan: ``"imagenet"`` or ``"criteo"`` (the paper's plan for the algorithm), a full plan
            name such as ``"imagenet_acdc"``, or a list of ``(phase, fraction)`` pairs with phases
            ``"dense"``, ``"sparsify"``, ``"sparse"`` and fractions of
            ``trainer.estimated_stepping_batches`` that add up to 1.
        schedule_exponent: ``c`` of the exponential sparsification schedule.
        prune_mode: ``"zero"`` zeroes pruned weights (they regrow from 0), ``"mask"`` keeps
            their values under a zero mask. Default: the algorithm's (``mask`` for sapp and
            powerprop, ``zero`` for acdc and magnitude). With ``zero``, a unit that loses all its
            incoming blocks may stop receiving gradient (ReLU, bias <= 0) and never regrow them.
        reset_optimizer: clear the optimizer state (momentum, Adam moments) at every phase
            boundary, as the paper does.
        attention_clipping: clip SA++'s attention to ``[1 - sparsity, 1 / (1 - sparsity)]``.
        logit_l2: coefficient ``lambda`` of the term ``lambda / 2 * ||logits||^2`` that the
            callback adds to the loss (as its exact gradient, before the optimizer step, so AMP
            scaling and gradient accumulation do not change it). ``None``: the weight decay of
            the pruned weights' parameter group, or 0 when the optimizer already decays the logits.
        verify_masks_across_ranks: in distributed runs, compare mask checksums across ranks at
            every phase boundary and when training ends, and raise if they differ.
        check_finite_every_n_steps: every this many optimizer steps, check the pruned layers' weights
            (and SA++'s attention logits) for NaN and infinity: one host sync, no extra forward. They are
            also checked at every phase boundary and when training ends; ``0`` keeps only those checks.
            A non-finite value raises ``FloatingPointError`` naming the layer.

    Reliability notes:

    * Resuming: ``trainer.fit(..., ckpt_path=...)`` with the same settings reaches bit-identical weights
      and masks (CPU), from inside any phase. A checkpoint written with other settings (algorithm,
      sparsity, block size, targets, plan) or for a run of another length is refused with a message that
      names the difference. Checkpoints written during fit (e.g. ``ModelCheckpoint``, ``last.ckpt``) hold
      raw weights, masks and logits; :func:`committed_state_dict` turns one into plain weights. A
      checkpoint saved after ``fit`` returned holds the committed weights: it loads into a plain model,
      and resuming it is refused (the run is over).
    * Distributed (DDP): every rank computes the masks from the synchronized weights; their checksums are
      compared across ranks at each phase boundary. Under ``ddp_spawn`` / ``ddp_fork`` the callback in the
      main process is a copy that did not train: the committed weights come back to the model, but call
      :func:`~sapp_lightning.block_sparsity` on it instead of :meth:`report`.
    * Precision: under ``bf16-mixed`` / ``16-mixed`` the masked forward runs under autocast and pruned
      blocks are exact zeros; SA++'s logits and attention stay float32, also under ``bf16-true`` /
      ``16-true`` (which convert the rest of the model).
    * ``torch.compile``: masks and logits are buffers and parameters changed in place, so phase changes
      do not recompile the model (measured with torch 2.14: 0 recompilations at the 4 phase changes of
      a dense-sparsify-sparse-dense-sparse plan, every algorithm, eager and inductor backends). Once
      ``fit`` returns, the commit gives parametrized layers (``sapp``, ``powerprop``, ``prune_mode="mask"``)
      their plain class back, so the first compiled call afterwards compiles once more. Validation's
      train/eval and grad-mode switches, and ``self.log`` inside a compiled step, recompile as usual.
    * Odd states: a second ``fit`` with the same callback, a model with no eligible layer, a weight
      shared by two modules, and a layer already pruned by another callback raise at set-up, before
      the model is touched; a sparsity that rounds to 0 pruned blocks in a layer warns, naming it, and
      so do kept blocks that end training all zero (dead units, see ``prune_mode``); ``validate``,
      ``test`` and ``predict`` leave the model alone.

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

    def __init__(
        self,
        algorithm: str,
        sparsity: float,
        block_size: BlockSize,
        min_blocks: int = 100,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        *,
        plan: str | Sequence[Any] | PhasePlan = "imagenet",
        schedule_exponent: float = 4.0,
        prune_mode: str | None = None,
        reset_optimizer: bool = True,
        attention_clipping: bool = True,
        logit_l2: float | None = None,
        verify_masks_across_ranks: bool = True,
        check_finite_every_n_steps: int = 100,
    ) -> None:
        super().__init__()
        algorithm_cls = get_algorithm(algorithm)
        if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        if isinstance(min_blocks, bool) or not isinstance(min_blocks, int) or min_blocks < 0:
            raise ValueError(f"min_blocks must be an int >= 0, got {min_blocks!r}")
        if prune_mode is not None and prune_mode not in PRUNE_MODES:
            raise ValueError(
                f"prune_mode must be one of {', '.join(map(repr, PRUNE_MODES))} or None, got {prune_mode!r}"
            )
        if not (isinstance(schedule_exponent, int | float) and schedule_exponent > 0):
            raise ValueError(f"schedule_exponent must be > 0, got {schedule_exponent!r}")
        if logit_l2 is not None and not (isinstance(logit_l2, int | float) and logit_l2 >= 0):
            raise ValueError(f"logit_l2 must be >= 0 or None, got {logit_l2!r}")
        if (
            isinstance(check_finite_every_n_steps, bool)
            or not isinstance(check_finite_every_n_steps, int)
            or check_finite_every_n_steps < 0
        ):
            raise ValueError(f"check_finite_every_n_steps must be an int >= 0, got {check_finite_every_n_steps!r}")

        self.algorithm_name = algorithm
        self.sparsity = float(sparsity)
        self.block_size = normalize_block_size(block_size)
        self.min_blocks = min_blocks
        self.include = list([include] if isinstance(include, str) else include or [])
        self.exclude = list([exclude] if isinstance(exclude, str) else exclude or [])
        self._include = compile_patterns(self.include, "include")
        self._exclude = compile_patterns(self.exclude, "exclude")
        self.plan = PhasePlan.parse(plan, algorithm_cls.plan_kind)
        self.schedule_exponent = float(schedule_exponent)
        self.reset_optimizer = reset_optimizer
        self.attention_clipping = attention_clipping
        self.logit_l2 = logit_l2
        self.verify_masks_across_ranks = verify_masks_across_ranks
        self.check_finite_every_n_steps = check_finite_every_n_steps
        self.algorithm: PruningAlgorithm = algorithm_cls(
            prune_mode, sparsity=self.sparsity, attention_clipping=attention_clipping
        )

        self.layers: list[PrunedLayer] = []
        self.schedule: StepSchedule | None = None
        self._model: nn.Module | None = None
        self._hooks: list[Any] = []
        self._segment_index: int | None = None
        self._sparsify_start: list[float] = []
        self._last_step = -1
        self._committed = False
        self._logit_l2 = 0.0
        self._logits_by_optimizer: list[list[nn.Parameter]] = []
        self._fit_active = False  # between this callback's setup and teardown of one fit
        self._resumed_total_steps: int | None = None  # the training length of the checkpoint resumed from

    # --- public helpers -------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # One key whatever the arguments, so a checkpoint made with other arguments is found and
        # reported as a mismatch instead of being silently skipped.
        return "BlockPruning"

    @property
    def phase(self) -> Phase | None:
        """The phase of the current optimizer step (``None`` outside of fit)."""
        if self._segment_index is None:
            return None
        return self.plan.segments[self._segment_index].phase

    @property
    def segment_index(self) -> int | None:
        """Which entry of ``plan.segments`` the current optimizer step is in (``None`` outside of fit)."""
        return self._segment_index

    def config(self) -> dict[str, Any]:
        """The settings that must match for a checkpoint to resume (plain types only)."""
        return {
            "algorithm": self.algorithm_name,
            "sparsity": self.sparsity,
            "block_size": list(self.block_size),
            "min_blocks": self.min_blocks,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "prune_mode": self.algorithm.prune_mode,
            "plan": [list(pair) for pair in self.plan.to_pairs()],
            "schedule_exponent": self.schedule_exponent,
            "attention_clipping": self.attention_clipping,
            "layers": [layer.name for layer in self.layers],
            "kinds": [layer.layout.kind for layer in self.layers],
        }

    def report(self) -> SparsityReport:
        """Block sparsity of the pruned layers, measured on their (effective) weights."""
        if not self.layers:
            raise RuntimeError("report() lists the pruned layers, which are chosen when trainer.fit starts")
        layers = tuple(measure_layer(layer.name, layer.module.weight, layer.layout) for layer in self.layers)
        return SparsityReport(self.block_size, layers)

    # --- set-up -----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._committed:
            raise RuntimeError(
                "this BlockPruning callback already committed a model at the end of an earlier fit; "
                "create a new BlockPruning for another fit"
            )
        if self._fit_active:  # setup already ran for this fit (e.g. a re-entrant strategy)
            return
        if self.layers:
            raise RuntimeError(
                "this BlockPruning callback already pruned a model in an earlier fit that did not finish (it raised "
                "or was interrupted), and that model still carries its masks. Call commit() on it for plain weights, "
                "or resume the run from a checkpoint with a fresh model, Trainer and BlockPruning"
            )
        others = [cb for cb in trainer.callbacks if isinstance(cb, BlockPruning) and cb is not self]
        if others:
            raise ValueError("a Trainer takes one BlockPruning callback; combine the settings into one")
        candidates = self._select_layers(pl_module)
        self._inject(pl_module, candidates)
        self._fit_active = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._fit_active = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._fit_active = False

    def _select_layers(self, pl_module: nn.Module):
        candidates = candidate_layers(pl_module, self.block_size, self._include, self._exclude)
        chosen = [c for c in candidates if c.layout.num_blocks >= self.min_blocks]
        if not chosen:
            if candidates:
                found = ", ".join(f"{c.name} ({c.layout.num_blocks} blocks)" for c in candidates[:10])
                raise ValueError(
                    f"no layer has at least min_blocks={self.min_blocks} blocks of size {self.block_size}; "
                    f"candidates: {found}. Use a smaller block_size or min_blocks."
                )
            raise ValueError(
                "no layer to prune: the model has no nn.Linear or nn.Conv2d (groups=1) layer"
                + (" matching include/exclude" if self.include or self.exclude else "")
            )
        shared = shared_weight_owners(pl_module, chosen)
        if shared:
            name, owners = next(iter(shared.items()))
            raise ValueError(
                f"the weight of layer {name!r} is shared by {', '.join(owners)}; BlockPruning cannot prune a "
                "shared weight consistently. Exclude the layer (exclude=[...]) or untie the weights."
            )
        pruned = [c.name for c in chosen if _carries_block_pruning(c.module)]
        if pruned:
            raise ValueError(
                f"layer(s) {', '.join(map(repr, pruned))} already carry the masks of another BlockPruning (from a fit "
                "that did not finish?); call that callback's commit() first, or start from a fresh model"
            )
        if self.sparsity > 0:
            dense = [c for c in chosen if keep_count(c.layout.num_blocks, self.sparsity) >= c.layout.num_blocks]
            if dense:
                listed = ", ".join(f"{c.name} ({c.layout.num_blocks} blocks)" for c in dense[:10])
                more = f" and {len(dense) - 10} more" if len(dense) > 10 else ""
                rank_zero_warn(
                    f"BlockPruning: sparsity {self.sparsity:g} rounds to 0 pruned blocks in {len(dense)} of the "
                    f"{len(chosen)} pruned layer(s), which stay dense: {listed}{more}. A layer of N blocks loses "
                    "a block from sparsity 1/N on: raise sparsity, use smaller blocks, or exclude those layers."
                )
        skipped = [c for c in candidates if c.layout.num_blocks < self.min_blocks]
        rank_zero_info(
            f"BlockPruning({self.algorithm_name}): pruning {len(chosen)} layer(s) to {self.sparsity:.1%} block "
            f"sparsity with {self.block_size[0]}x{self.block_size[1]} blocks"
            + (f"; {len(skipped)} layer(s) under {self.min_blocks} blocks stay dense" if skipped else "")
        )
        return chosen

    def _inject(self, pl_module: nn.Module, candidates) -> None:
        for cand in candidates:
            reparam = self.algorithm.make_reparam(cand.layout)
            weight = cand.module.weight
            layer = PrunedLayer(cand.name, cand.module, cand.layout, None)  # records the parameter order
            if reparam is not None:
                reparam.to(weight.device)
                parametrize.register_parametrization(cand.module, "weight", reparam)
            else:
                mask = torch.ones(cand.layout.grid_shape, dtype=torch.bool, device=weight.device)
                cand.module.register_buffer(MASK_BUFFER, mask)
            layer.reparam = reparam
            self.layers.append(layer)
        self._sparsify_start = [0.0] * len(self.layers)
        self._model = pl_module
        # torch tags hook objects, which bound methods do not allow: wrap them in functions.
        self._hooks = [
            pl_module.register_state_dict_post_hook(lambda *args: self._add_config_to_state_dict(*args)),
            pl_module.register_load_state_dict_pre_hook(lambda *args: self._check_config_in_state_dict(*args)),
        ]

    def _add_config_to_state_dict(self, module, state_dict, prefix, local_metadata) -> None:
        state_dict[prefix + CONFIG_KEY] = self.config()

    def _check_config_in_state_dict(self, module, state_dict, prefix, *args) -> None:
        saved = state_dict.pop(prefix + CONFIG_KEY, None)
        if saved is None:
            raise ValueError(
                "the model is being trained with BlockPruning, but this state_dict holds no BlockPruning "
                "configuration: it was saved by a run without BlockPruning, or after BlockPruning committed the "
                "weights when fit returned (a finished run, which cannot be resumed). Load such plain weights into "
                "the model before trainer.fit (model.load_state_dict or Model.load_from_checkpoint) to start a new "
                "run from them, or resume from a checkpoint written during training (e.g. ModelCheckpoint's last.ckpt)"
            )
        self._raise_on_config_difference(saved)

    def _raise_on_config_difference(self, saved: dict[str, Any]) -> None:
        ours = self.config()
        diffs = [
            f"{key}: checkpoint {saved.get(key)!r}, this callback {ours[key]!r}"
            for key in ours
            if saved.get(key) != ours[key]
        ]
        if diffs:
            raise ValueError(
                "the checkpoint was written with a different BlockPruning configuration; "
                + "; ".join(diffs)
                + ". Resume with the same settings, or start a new run."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._keep_logits_float32()
        self._register_extra_parameters(trainer)
        self._logit_l2 = self._resolve_logit_l2(trainer)
        # The plan is resolved in on_train_start: estimated_stepping_batches sets the train dataloader up, and
        # doing so before the checkpoint is restored drops a resumable dataloader's saved position
        # (Lightning-AI/pytorch-lightning#20550), which breaks mid-epoch resumes.

    def _keep_logits_float32(self) -> None:
        """Undo a half-precision conversion of SA++'s logits (``BlockAttention`` resists ``module.to``, this
        catches other routes): the attention stays float32 whatever the weights' dtype."""
        for layer in self.layers:
            for logits in self.algorithm.extra_parameters(layer):
                if logits.dtype in (torch.float16, torch.bfloat16):
                    logits.data = logits.data.float()

    def _register_extra_parameters(self, trainer: pl.Trainer) -> None:
        """Make sure the algorithm's own parameters (SA++'s logits) are trained."""
        extra = [p for layer in self.layers for p in self.algorithm.extra_parameters(layer)]
        self._logits_by_optimizer = [[] for _ in trainer.optimizers]
        if not extra:
            return
        if not trainer.optimizers:
            raise ValueError("BlockPruning(sapp) trains attention logits and needs an optimizer")
        where = {id(p): i for i, opt in enumerate(trainer.optimizers) for g in opt.param_groups for p in g["params"]}
        missing = [p for p in extra if id(p) not in where]
        if missing:
            trainer.optimizers[0].add_param_group({"params": missing})
            rank_zero_warn(
                f"BlockPruning: configure_optimizers left out the {len(missing)} attention-logit tensor(s); "
                "they were added to the first optimizer as a new parameter group (a learning-rate scheduler "
                "made before does not schedule it). Pass self.parameters() to the optimizer to avoid this."
            )
            for p in missing:
                where[id(p)] = 0
        for p in extra:
            self._logits_by_optimizer[where[id(p)]].append(p)

    def _resolve_logit_l2(self, trainer: pl.Trainer) -> float:
        if self.logit_l2 is not None or not any(self._logits_by_optimizer):
            return float(self.logit_l2 or 0.0)
        groups = [g for opt in trainer.optimizers for g in opt.param_groups]
        logit_ids = {id(p) for ps in self._logits_by_optimizer for p in ps}
        if any(g.get("weight_decay", 0.0) > 0 for g in groups if any(id(p) in logit_ids for p in g["params"])):
            return 0.0  # the optimizer already decays the logits
        weight_ids = {id(layer.raw_weight) for layer in self.layers}
        decays = [g.get("weight_decay", 0.0) for g in groups if any(id(p) in weight_ids for p in g["params"])]
        return float(decays[0]) if decays else 0.0

    # --- training ---------------------------------------------------------------------------------
    def _resolve_schedule(self, trainer: pl.Trainer) -> StepSchedule:
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("BlockPruning needs a finite training length: set max_epochs or max_steps")
        schedule = self.plan.resolve(int(total))
        empty = schedule.empty_segments()
        if empty:
            rank_zero_warn(
                f"BlockPruning: {len(empty)} of the plan's {len(self.plan.segments)} phases get no optimizer step "
                f"in {int(total)} steps of training; they are skipped"
            )
        return schedule

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._committed or not self.layers:
            return
        self.schedule = self._resolve_schedule(trainer)
        saved = self._resumed_total_steps
        if saved is not None and saved != self.schedule.total_steps:
            raise ValueError(
                f"the checkpoint comes from a run planned over {saved} optimizer steps, but this run has "
                f"{self.schedule.total_steps} (max_epochs, max_steps, limit_train_batches, accumulate_grad_batches, "
                "the number of devices or the dataset size changed): the phase plan would shift under the saved "
                "masks. Resume with the same training length, or start a new run."
            )
        self._last_step = trainer.global_step
        self._advance(trainer, trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._logit_l2 <= 0 or self._committed:
            return
        index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), None)
        if index is None:  # a LightningOptimizer wrapper
            index = next(
                (i for i, opt in enumerate(trainer.optimizers) if opt is getattr(optimizer, "optimizer", None)), 0
            )
        with torch.no_grad():
            for logits in self._logits_by_optimizer[index]:
                if logits.grad is None:
                    logits.grad = self._logit_l2 * logits.detach().clone()
                else:
                    logits.grad.add_(logits.detach(), alpha=self._logit_l2)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or self._committed:  # accumulating gradients: no optimizer step yet
            return
        self._last_step = step
        every = self.check_finite_every_n_steps
        checked = bool(every) and step % every == 0
        if checked:  # before the masks move, so that scoring never sees the NaN first
            self._check_finite(f"at step {step}")
        self._advance(trainer, step, checked)
        # Only where Lightning will write step metrics: each LightningModule.log costs milliseconds.
        if trainer.loggers and trainer.log_every_n_steps and step % trainer.log_every_n_steps == 0:
            self._log_step(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._committed or not self.layers:
            return
        self._check_finite("when training ended")
        self._verify_masks(trainer, "when training ended")

    def _advance(self, trainer: pl.Trainer, step: int, checked: bool = False) -> None:
        """Bring the masks to where the plan says they are for the forward pass of ``step``.

        Where a phase begins, the weights are checked for NaN and infinity first (unless ``checked``).
        """
        assert self.schedule is not None
        position = self.schedule.locate(step)
        if position.index != self._segment_index:
            if not checked:
                self._check_finite(f"at step {step}")
            if self._segment_index is not None:  # a phase ended (not the start of training)
                self._log_phase_end(trainer)
                if self.reset_optimizer:
                    for optimizer in trainer.optimizers:
                        optimizer.state.clear()
            self._enter(position.phase, position.tau)
            self._segment_index = position.index
            self._verify_masks(trainer, f"at the start of phase {position.index} ({position.phase.name.lower()})")
        elif position.phase is Phase.SPARSIFY:
            self._sparsify(position.tau)
        if self.algorithm.zeroes_pruned_weights:
            for layer in self.layers:
                layer.zero_pruned_()

    def _enter(self, phase: Phase, tau: float) -> None:
        if phase is Phase.DENSE:
            for layer in self.layers:
                if layer.num_kept < layer.layout.num_blocks:
                    layer.set_mask(torch.ones_like(layer.mask))
        elif phase is Phase.SPARSIFY:
            self._sparsify_start = [1.0 - layer.num_kept / layer.layout.num_blocks for layer in self.layers]
            self._sparsify(tau)
        else:
            for layer in self.layers:
                self._prune_to(layer, keep_count(layer.layout.num_blocks, self.sparsity))

    def _sparsify(self, tau: float) -> None:
        for layer, start in zip(self.layers, self._sparsify_start):
            target = exponential_sparsity(tau, self.sparsity, self.schedule_exponent, start=start)
            self._prune_to(layer, keep_count(layer.layout.num_blocks, target))

    def _prune_to(self, layer: PrunedLayer, keep: int) -> None:
        """Shrink the layer's kept set to ``keep`` blocks, dropping the lowest scores first."""
        if keep >= layer.num_kept:
            return
        scores = self.algorithm.block_scores(layer)
        if not torch.isfinite(scores).all():
            raise FloatingPointError(
                f"BlockPruning: layer {layer.name!r} has NaN or infinite block scores "
                f"({'attention logits' if self.algorithm.has_trainable_state else 'weights'}); training diverged"
            )
        layer.set_mask(top_k_mask(scores, keep, eligible=layer.mask))

    def _check_finite(self, when: str) -> None:
        """Raise ``FloatingPointError`` naming the layers whose weights or logits hold NaN or infinity."""
        tensors = []
        for layer in self.layers:
            tensors.append((layer.name, "weight", layer.raw_weight))
            tensors += [(layer.name, "attention logits", p) for p in self.algorithm.extra_parameters(layer)]
        if not tensors:
            return
        device = tensors[0][2].device
        finite = torch.stack([torch.isfinite(t.detach()).all().to(device) for *_, t in tensors])
        if bool(finite.all()):  # the one host sync
            return
        bad = [f"{name!r} ({what})" for (name, what, _), ok in zip(tensors, finite.tolist()) if not ok]
        raise FloatingPointError(
            f"BlockPruning: NaN or infinite values {when} in layer {', '.join(bad)}; training diverged "
            "(lower the learning rate, clip gradients, or check the data)"
        )

    def _verify_masks(self, trainer: pl.Trainer, when: str) -> None:
        if not self.verify_masks_across_ranks or trainer.world_size <= 1 or not self.layers:
            return
        sums = torch.stack([self._mask_checksum(layer) for layer in self.layers])  # (layers, 2)
        gathered = trainer.strategy.all_gather(sums).reshape(-1, len(self.layers), 2)  # (world_size, layers, 2)
        differs = (gathered != gathered[0]).any(dim=2).any(dim=0)
        if bool(differs.any()):
            bad = [self.layers[i].name for i in differs.nonzero().flatten().tolist()]
            kept = {
                name: gathered[:, i, 0].tolist()
                for i, name in enumerate(layer.name for layer in self.layers)
                if name in bad
            }
            raise RuntimeError(
                f"BlockPruning: the masks of layer(s) {', '.join(map(repr, bad))} differ across ranks {when} "
                f"(step {trainer.global_step}; kept blocks on ranks 0..{trainer.world_size - 1}: {kept}). The ranks "
                "chose blocks from different weights or scores: every pruned parameter must be synchronized "
                "(DDP) and nothing may change it on one rank only."
            )

    @staticmethod
    def _mask_checksum(layer: PrunedLayer) -> torch.Tensor:
        """``[kept blocks, sum of a hash of their indices]`` as int64, the same on every device.

        The hash is not linear in the index, so moving two kept blocks in opposite directions (as a
        tie broken differently does) changes the sum.
        """
        flat = layer.mask.reshape(-1)
        x = (torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) * _HASH_MULTIPLIER) & _HASH_MASK
        x = x ^ (x >> 15)
        x = ((x * _HASH_MULTIPLIER_2) & _HASH_MASK) ^ (x >> 13)
        return torch.stack([flat.sum(dtype=torch.int64), (x * flat).sum()])

    # --- logging ----------------------------------------------------------------------------------
    def target_sparsity(self) -> float:
        """The sparsity the plan asks for at the current step (0 in dense phases)."""
        if self.schedule is None or self._segment_index is None:
            return 0.0
        position = self.schedule.locate(max(self._last_step, 0))
        if position.phase is Phase.DENSE:
            return 0.0
        if position.phase is Phase.SPARSE:
            return self.sparsity
        start = sum(self._sparsify_start) / max(1, len(self._sparsify_start))
        return exponential_sparsity(position.tau, self.sparsity, self.schedule_exponent, start=start)

    def achieved_sparsity(self) -> float:
        """Fraction of blocks masked out, over all pruned layers."""
        total = sum(layer.layout.num_blocks for layer in self.layers)
        return 1.0 - sum(layer.num_kept for layer in self.layers) / max(1, total)

    def _log_step(self, pl_module: pl.LightningModule) -> None:
        metrics = {
            "pruning/sparsity": self.achieved_sparsity(),
            "pruning/target_sparsity": self.target_sparsity(),
            "pruning/phase": float(self.phase if self.phase is not None else 0),
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)

    @rank_zero_only
    def _log_phase_end(self, trainer: pl.Trainer) -> None:
        """Per-layer sparsity straight to every logger (not thinned by ``log_every_n_steps``)."""
        metrics = {
            f"pruning/layer/{layer.name}": 1.0 - layer.num_kept / layer.layout.num_blocks for layer in self.layers
        }
        metrics["pruning/sparsity"] = self.achieved_sparsity()
        metrics["pruning/phase"] = float(self.phase if self.phase is not None else 0)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # --- the end ----------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._committed:  # commit() was called during fit
            return
        short = [
            f"{layer.name} keeps {layer.num_kept} of {layer.layout.num_blocks} (target {target})"
            for layer in self.layers
            if layer.num_kept > (target := keep_count(layer.layout.num_blocks, self.sparsity))
        ]
        self.commit()
        # committed pruned blocks are exact zeros, so any zero block beyond them is a kept one
        dead = {
            layer.name: (zeros, layer.num_kept)
            for layer, measured in zip(self.layers, self.report().layers)
            if (zeros := measured.zero_blocks - (layer.layout.num_blocks - layer.num_kept))
        }
        if short:
            rank_zero_warn(
                f"BlockPruning: training ended at {self.achieved_sparsity():.2%} block sparsity, below the target "
                f"{self.sparsity:.2%}: {'; '.join(short[:10])} (stopped before the plan's final sparse phase?)"
            )
        if dead:
            hint = (
                " In prune_mode='zero' a unit whose incoming blocks were all pruned can stop receiving gradient "
                "(with ReLU and a bias <= 0 it outputs 0), so its blocks never regrow; prune_mode='mask' keeps "
                "their values."
                if self.algorithm.zeroes_pruned_weights
                else ""
            )
            rank_zero_warn(
                f"BlockPruning: {sum(n for n, _ in dead.values())} kept blocks are all zero after training, so the "
                "model is sparser than asked and those blocks are wasted: "
                + "; ".join(f"{name}: {n} of {kept}" for name, (n, kept) in list(dead.items())[:10])
                + "."
                + hint
            )

    def commit(self) -> None:
        """Fold masks (and SA++'s attention, PowerPropagation's scaling) into plain weights.

        Called when ``trainer.fit`` returns; call it yourself after an interrupted fit. Idempotent.
        """
        if self._committed or not self.layers:
            return
        for layer in self.layers:
            layer.commit()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._committed = True

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "config": self.config(),
            "segment_index": self._segment_index,
            "sparsify_start": list(self._sparsify_start),
            "committed": self._committed,
            "total_steps": self.schedule.total_steps if self.schedule is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported BlockPruning checkpoint state version {state_dict.get('version')!r}")
        if state_dict.get("committed"):
            raise ValueError(
                "this checkpoint was saved after BlockPruning committed the weights when fit returned: the run is "
                "finished and cannot be resumed. Its state_dict holds plain pruned weights (load them with "
                "model.load_state_dict); resume from a checkpoint written during training instead"
            )
        self._raise_on_config_difference(state_dict["config"])
        self._segment_index = state_dict["segment_index"]
        self._sparsify_start = list(state_dict["sparsify_start"])
        self._resumed_total_steps = state_dict.get("total_steps")
        for layer in self.layers:
            layer.refresh_kept_count()


def _carries_block_pruning(module: nn.Module) -> bool:
    """Whether a BlockPruning callback already put its mask on ``module`` (and did not commit)."""
    if hasattr(module, MASK_BUFFER):
        return True
    if not parametrize.is_parametrized(module, "weight"):
        return False
    return any(isinstance(p, BlockReparam) for p in module.parametrizations.weight)


@torch.no_grad()
def committed_state_dict(checkpoint: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The plain state_dict that :meth:`BlockPruning.commit` would leave, from a checkpoint written during fit.

    A training checkpoint holds each pruned layer's raw weight, mask and (SA++) logits under
    parametrization keys, and a ``_block_pruning_config`` entry. This folds them exactly as the commit
    does (pruned blocks exact zeros, attention and PowerPropagation scaling folded in) and returns a
    state_dict with the keys the model had before fit, which loads into the model without this package.
    On CPU the result is bit-identical to the commit's.

    Args:
        checkpoint: a path to a Lightning checkpoint (loaded on CPU, ``weights_only=False``: only open
            checkpoints you trust), a loaded checkpoint (a dict with ``"state_dict"``), or a model state_dict.
            One without BlockPruning state (e.g. already committed) is returned unchanged.

    Example:
        >>> import torch
        >>> from sapp_lightning import committed_state_dict
        >>> committed_state_dict({"state_dict": {"fc.weight": torch.ones(2, 2)}})["fc.weight"].shape
        torch.Size([2, 2])
    """
    if isinstance(checkpoint, str | os.PathLike):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a checkpoint path, a checkpoint dict or a state_dict, got {type(checkpoint)!r}")
    state = checkpoint["state_dict"] if isinstance(checkpoint.get("state_dict"), Mapping) else checkpoint
    configs = [k for k in state if k == CONFIG_KEY or k.endswith("." + CONFIG_KEY)]
    if not configs:
        leftover = [k for k in state if ".parametrizations.weight." in k or k.endswith("." + MASK_BUFFER)]
        if leftover:
            raise ValueError(
                f"the state_dict holds parametrization or mask entries ({leftover[0]!r}, ...) but no "
                f"{CONFIG_KEY!r} entry: it was not written by a BlockPruning run, or the entry was removed"
            )
        return dict(state)
    weights: dict[str, torch.Tensor] = {}  # prefix of a pruned layer -> its committed weight
    dropped: set[str] = set()
    for config_key in configs:
        root = config_key[: -len(CONFIG_KEY)]
        config = state[config_key]
        dropped.add(config_key)
        algorithm = get_algorithm(config["algorithm"])(
            config["prune_mode"], sparsity=config["sparsity"], attention_clipping=config["attention_clipping"]
        )
        for name, kind in zip(config["layers"], config["kinds"]):
            prefix = f"{root}{name}."
            reparam_prefix = f"{prefix}parametrizations.weight."
            if reparam_prefix + "original" in state:
                original = state[reparam_prefix + "original"]
                layout = BlockLayout(kind, tuple(original.shape), tuple(config["block_size"]))
                reparam = algorithm.make_reparam(layout)
                if reparam is None:
                    raise ValueError(f"layer {name!r} has a parametrization, but {config['algorithm']!r} uses none")
                own = {k: state[f"{reparam_prefix}0.{k}"] for k in reparam.state_dict()}
                reparam.load_state_dict(own)
                weights[prefix] = reparam.to(original.device)(original)
                dropped.update([reparam_prefix + "original"] + [f"{reparam_prefix}0.{k}" for k in own])
            else:
                weight, mask = state[prefix + "weight"], state[prefix + MASK_BUFFER]
                layout = BlockLayout(kind, tuple(weight.shape), tuple(config["block_size"]))
                weights[prefix] = weight * layout.expand(mask.to(weight.dtype))
                dropped.update([prefix + "weight", prefix + MASK_BUFFER])
    plain: dict[str, torch.Tensor] = {}
    pending = dict(weights)
    for key, value in state.items():
        # ``weight`` comes first among a layer's entries, as in the model before fit
        prefix = next((p for p in pending if key.startswith(p)), None)
        if prefix is not None:
            plain[prefix + "weight"] = pending.pop(prefix)
        if key not in dropped:
            plain[key] = value
    return plain
