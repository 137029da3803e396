"""The Trainer-free core: :class:`BlockSparsifier` makes a model block-sparse from any training loop.

Pure torch (no Lightning). The Lightning callback, Fabric, a plain loop and the Hugging Face integration all
drive the same object:

    prepare(model) -> attach(optimizers) -> start(total_steps)
    -> per training step: backward, before_optimizer_step(optimizer), optimizer.step(), step()
    -> commit()

Example:
    >>> import torch
    >>> from sapp_lightning import BlockSparsifier
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    >>> sparsifier = BlockSparsifier("sapp", sparsity=0.75, block_size=8, min_blocks=16)
    >>> [layer.name for layer in sparsifier.prepare(model)]
    ['0']
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01)   # after prepare: the logits are parameters now
    >>> sparsifier.attach([optimizer])
    >>> sparsifier.start(total_steps=40)
    >>> for _ in range(40):
    ...     loss = model(torch.randn(8, 64)).square().mean()
    ...     loss.backward()
    ...     sparsifier.before_optimizer_step(optimizer)
    ...     optimizer.step()
    ...     optimizer.zero_grad()
    ...     sparsifier.step()
    >>> sparsifier.commit()
    >>> sparsifier.report()["0"].zero_blocks, sparsifier.lifecycle
    (48, <Lifecycle.COMMITTED: 'committed'>)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import health
from .algorithms import PrunedLayer, PruningAlgorithm, build_algorithm, carries_block_pruning
from .blocks import BlockSize, keep_count, normalize_block_size, top_k_mask
from .compatibility import (
    METADATA_KEY,
    STATE_VERSION,
    check_incoming_model_state,
    check_saved_state,
    configuration,
    raise_on_config_difference,
)
from .distributed import AllGather, rank_zero_info, rank_zero_warn, torch_all_gather, verify_masks_agree, world_size
from .events import LayerState, Lifecycle, PruningEvent
from .report import SparsityReport, measure_layer
from .schedules import AutoPlan, Phase, PhasePlan, PlanCursor, Position, Ramp, StepSchedule
from .targets import LayerChoice, choose_layers, compile_patterns, format_choices
from .validation import require_choice, require_int

log = logging.getLogger(__name__)

__all__ = ["BlockSparsifier", "unwrap_optimizer"]


Listener = Callable[["BlockSparsifier", PruningEvent], None]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Lightning's ``LightningOptimizer`` or Fabric's ``_FabricOptimizer``."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class BlockSparsifier:
    """Owns the pruned layers, the algorithm, the phase plan and its position; any training loop drives it.

    Args:
        algorithm: ``"sapp"``, ``"acdc"``, ``"magnitude"``, ``"powerprop"``, ``"gmp"``, or an algorithm object such as
            ``SequentialAttentionPP(attention_clipping=False)`` (copied; its knobs stay on it).
        sparsity: fraction of blocks removed in each pruned layer, ``0 <= sparsity < 1``. Each layer keeps
            ``max(1, round((1 - sparsity) * n_blocks))`` blocks.
        block_size: an int (square blocks) or ``(rows, cols)`` in the fan_in x fan_out kernel orientation
            (Linear: ``weight.T``; Conv2d: ``weight.permute(2, 3, 1, 0)`` flattened to ``(kh * kw * cin, cout)``).
            Edge blocks may be smaller; each counts as one block.
        min_blocks: layers with fewer blocks stay dense (the paper uses 100).
        include: regular expressions searched in module names; when given, only matching Linear, Conv2d and
            Embedding modules are candidates. Default: every Linear and Conv2d (``groups == 1``).
        exclude: regular expressions; matching modules are never pruned.
        plan: ``None`` (default): the algorithm's own: ``"auto"`` for SA++, the paper's ImageNet plan for the others.
            ``"auto"``: the paper's ImageNet plan with as many cycles as the training length allows, one long ramp
            when there is no room for one (:class:`~sapp_lightning.schedules.AutoPlan`); ``"imagenet"`` or
            ``"criteo"`` (the paper's plan for the
            algorithm), a full plan name such as ``"imagenet_acdc"``, or a list of ``(phase, fraction)`` pairs with
            phases ``"dense"``, ``"sparsify"``, ``"sparse"`` and fractions of the training steps that add up to 1.
        schedule_exponent: ``c`` of the exponential ramp.
        ramp: how sparsity rises inside a sparsification phase: ``"exponential"`` (SA++'s, exponent
            ``schedule_exponent``) or ``"cubic"`` (gradual magnitude pruning's); ``None``: the algorithm's own.
        **algorithm_options: the algorithm's knobs when ``algorithm`` is a name: ``prune_mode`` for every one,
            SA++'s (:class:`~sapp_lightning.algorithms.SequentialAttentionPP`: ``attention_clipping``, ``logit_l2``,
            ...) and PowerPropagation's ``alpha``; ``None`` keeps the algorithm's default, a knob the named
            algorithm does not have is ignored (one configuration serves a sweep over algorithms), and one that no
            algorithm has is refused.
        reset_optimizer: clear the attached optimizers' state (momentum, Adam moments) at every phase boundary.
        check_finite_every_n_steps: every this many steps, check the pruned weights (and SA++'s logits) for NaN
            and infinity; they are also checked at every phase boundary and at the end. ``0``: only those.
        sparsify_every_n_steps: inside a sparsification phase, move the kept set along the schedule every this
            many steps (and on the phase's last step); 1 (default): every step (SPEC section 6 #6).
        sparsify_regrowth: let a block pruned earlier in a sparsification phase come back within it (ranked
            among all blocks); default ``False``: the kept set only shrinks (backward selection, #7).
        ranking: ``"layer"`` (default, #20): each layer keeps its own share of blocks (uniform sparsity);
            ``"global"``: one ranking over the blocks of every pruned layer, so layers end at different sparsities.
    """

    def __init__(
        self,
        algorithm: str | PruningAlgorithm,
        sparsity: float,
        block_size: BlockSize,
        min_blocks: int = 100,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        *,
        plan: str | Sequence[Any] | PhasePlan | AutoPlan | None = None,
        schedule_exponent: float = 4.0,
        ramp: str | None = None,
        reset_optimizer: bool = True,
        check_finite_every_n_steps: int = 100,
        sparsify_every_n_steps: int = 1,
        sparsify_regrowth: bool = False,
        ranking: str = "layer",
        **algorithm_options: Any,
    ) -> None:
        self.algorithm = build_algorithm(algorithm, **algorithm_options)
        if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        self.sparsity = float(sparsity)
        self.block_size = normalize_block_size(block_size)
        self.min_blocks = require_int("min_blocks", min_blocks, 0)
        self.include = [include] if isinstance(include, str) else list(include or [])
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])
        self._include = compile_patterns(self.include, "include")
        self._exclude = compile_patterns(self.exclude, "exclude")
        self.plan = PhasePlan.parse(self.algorithm.default_plan if plan is None else plan, self.algorithm.plan_kind)
        self.ramp = Ramp(ramp or self.algorithm.default_ramp, schedule_exponent)
        self.reset_optimizer = reset_optimizer
        self.check_finite_every_n_steps = require_int("check_finite_every_n_steps", check_finite_every_n_steps, 0)
        self.sparsify_every_n_steps = require_int("sparsify_every_n_steps", sparsify_every_n_steps, 1)
        self.sparsify_regrowth = bool(sparsify_regrowth)
        self.ranking = require_choice("ranking", ranking, ("layer", "global"))

        #: the class the user built, named in messages (the Lightning and Hugging Face callbacks set theirs)
        self.owner = "BlockSparsifier"
        self.lifecycle = Lifecycle.NEW
        self.layers: list[PrunedLayer] = []
        self.choices: list[LayerChoice] = []  # every weight of the prepared model: pruned, or why not
        self.cursor: PlanCursor | None = None  # laid out by start()
        self.steps_done = 0
        self._loaded_position: tuple[int | None, list[float]] | None = None
        self._optimizers: list[torch.optim.Optimizer] = []
        self._listeners: list[Listener] = []
        self._hooks: list[Any] = []
        self._saved_total_steps: int | None = None
        self._warned_overrun = False

    # --- where it stands ----------------------------------------------------------------------
    @property
    def algorithm_name(self) -> str:
        return self.algorithm.name

    @property
    def schedule(self) -> StepSchedule | None:
        """The plan laid over the training steps (``None`` before :meth:`start`)."""
        return None if self.cursor is None else self.cursor.schedule

    @property
    def schedule_exponent(self) -> float:
        return self.ramp.exponent

    @property
    def phase(self) -> Phase | None:
        """The phase of the next forward pass (``None`` before :meth:`start`)."""
        return None if self.cursor is None else self.cursor.phase

    @property
    def segment_index(self) -> int | None:
        """Which segment of the resolved plan (``schedule.plan``) the next forward pass is in (``None`` before
        :meth:`start`)."""
        return None if self.cursor is None else self.cursor.segment_index

    def target_sparsity(self) -> float:
        """The sparsity the plan asks for at the current step (0 in dense phases)."""
        if self.cursor is None or self.cursor.segment_index is None:
            return 0.0
        return self.cursor.target_sparsity(self.steps_done)

    def layer_sparsity(self) -> dict[str, float]:
        """Each pruned layer's fraction of masked blocks, from the kept counts (no tensor is read)."""
        return {layer.name: 1.0 - layer.num_kept / layer.layout.num_blocks for layer in self.layers}

    def achieved_sparsity(self) -> float:
        """Fraction of blocks masked out, over all pruned layers."""
        total = sum(layer.layout.num_blocks for layer in self.layers)
        return 1.0 - sum(layer.num_kept for layer in self.layers) / max(1, total)

    def report(self) -> SparsityReport:
        """Block sparsity of the pruned layers, measured on their (effective) weights."""
        if not self.layers:
            raise RuntimeError("report() lists the pruned layers, which are chosen when the model is prepared")
        layers = tuple(measure_layer(layer.name, layer.effective_weight(), layer.layout) for layer in self.layers)
        return SparsityReport(self.block_size, layers)

    def config(self) -> dict[str, Any]:
        """The settings that must match for a checkpoint to resume (plain types only)."""
        return configuration(self)

    def summary(self) -> str:
        """What is pruned and what stays dense: a line, then one row per weight of the model with its block grid
        and, for each one left dense, why (depthwise, under ``min_blocks``, excluded, tied, unsupported type)."""
        dense = [c for c in self.choices if not c.pruned]
        text = (
            f"{self.owner}({self.algorithm.name}): pruning {len(self.layers)} layer(s) to {self.sparsity:.1%} block "
            f"sparsity with {self.block_size[0]}x{self.block_size[1]} blocks"
            + (f"; {len(dense)} weight(s) stay dense" if dense else "")
        )
        return f"{text}\n{format_choices(self.choices)}"

    # --- observing ----------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(sparsifier, event)`` at every phase start and end and at the commit (before it)."""
        self._listeners.append(listener)

    @torch.no_grad()
    def layer_states(self) -> list[LayerState]:
        """Each pruned layer's mask and block importance, copied to the CPU."""
        name = self.algorithm.importance_name
        return [
            LayerState(
                layer.name,
                layer.layout,
                layer.mask.detach().cpu().clone(),
                self.algorithm.block_importance(layer).detach().float().cpu(),
                name,
            )
            for layer in self.layers
        ]

    def _emit(self, kind: str) -> None:
        event = PruningEvent(kind, self.steps_done, self.segment_index, self.phase)  # type: ignore[arg-type]
        for listener in self._listeners:
            listener(self, event)

    # --- lifecycle ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> list[PrunedLayer]:
        """Choose the layers and put a per-block mask (and the algorithm's parametrization) on each.

        Raises ``ValueError`` before touching the model when nothing can be pruned. Returns the pruned layers.
        """
        self._require(Lifecycle.NEW, action="prepare(model)")
        algorithm = self.algorithm
        refuse_tied = f"{algorithm.name} in prune_mode={algorithm.prune_mode!r}" if algorithm.reparametrizes else None
        chosen, choices = choose_layers(
            model,
            self.block_size,
            self.min_blocks,
            self._include,
            self._exclude,
            refuse_tied=refuse_tied,
            cannot_train=algorithm.cannot_train,
            who=self.owner,
        )
        already = [c.name for c in chosen if carries_block_pruning(c.module)]
        if already:
            raise ValueError(
                f"layer(s) {', '.join(map(repr, already))} already carry the masks of another BlockPruning (from a "
                "fit that did not finish?); call that callback's commit() first, or start from a fresh model"
            )
        health.warn_on_layers_that_stay_dense(chosen, self.sparsity, self.owner)
        for cand in chosen:
            reparam = self.algorithm.make_reparam(cand.layout, self.sparsity)
            self.layers.append(PrunedLayer.inject(cand.name, cand.module, cand.layout, reparam, cand.param_name))
        self.choices = choices
        # torch tags hook objects, which bound methods do not allow: wrap them in functions
        self._hooks = [
            model.register_state_dict_post_hook(lambda *args: self._record_config(*args)),
            model.register_load_state_dict_pre_hook(lambda *args: self._check_incoming_state(*args)),
        ]
        self.lifecycle = Lifecycle.PREPARED
        rank_zero_info(log, self.summary())
        return self.layers

    def attach(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Hand over the optimizers: they are reset at phase boundaries and train the algorithm's parameters.

        SA++ adds its logits to the first optimizer when none holds them (with a warning).
        """
        self._require(Lifecycle.PREPARED, Lifecycle.TRAINING, action="attach(optimizers)")
        self._optimizers = [unwrap_optimizer(opt) for opt in optimizers]
        self.algorithm.attach(self.layers, self._optimizers)

    def start(self, total_steps: int) -> None:
        """Lay the plan over ``total_steps`` training steps (one per batch that steps the optimizers) and bring
        the masks to where the plan puts step :attr:`steps_done` (0, or where a loaded state left off)."""
        self._require(Lifecycle.PREPARED, action="start(total_steps)")
        require_int("total_steps", total_steps, 1)
        saved = self._saved_total_steps
        if saved is not None and saved != total_steps:
            raise ValueError(
                f"the checkpoint comes from a run planned over {saved} optimizer steps, but this run has "
                f"{total_steps} (max_epochs, max_steps, limit_train_batches, accumulate_grad_batches, "
                "the number of devices or the dataset size changed): the phase plan would shift under the saved "
                "masks. Resume with the same training length, or start a new run."
            )
        schedule = self.plan.resolve(total_steps)
        self.cursor = PlanCursor(schedule, self.sparsity, self.ramp, self.sparsify_every_n_steps)
        resumed = self._loaded_position is not None
        if resumed:
            self.cursor.segment_index, self.cursor.ramp_start = self._loaded_position
        elif isinstance(self.plan, AutoPlan):
            rank_zero_info(log, f"{self.owner}({self.algorithm.name}): plan {self.plan.describe(total_steps)}")
        empty = schedule.empty_segments()
        if empty and not resumed:
            rank_zero_warn(
                f"{self.owner}: {len(empty)} of the plan's {len(schedule.plan.segments)} phases get no optimizer "
                f"step in {total_steps} steps of training; they are skipped"
            )
        self.lifecycle = Lifecycle.TRAINING
        self._advance(self.steps_done)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Call right before ``optimizer.step()``, with complete and unscaled gradients (SA++: the logits' L2)."""
        if self.lifecycle is Lifecycle.TRAINING:
            self.algorithm.before_optimizer_step(unwrap_optimizer(optimizer))

    def step(self) -> None:
        """Call once per training step, after the optimizers stepped: moves the masks along the plan."""
        self._require(Lifecycle.TRAINING, action="step()")
        assert self.cursor is not None
        self.steps_done += 1
        if self.steps_done > self.schedule.total_steps and not self._warned_overrun:
            self._warned_overrun = True
            rank_zero_warn(
                f"{self.owner}: training goes on past the {self.schedule.total_steps} steps the phase plan was laid "
                "over: the plan finished early and the rest of training stays in its last phase. Give the real "
                "number of training steps (one per batch that steps the optimizers)."
            )
        every = self.check_finite_every_n_steps
        checked = bool(every) and self.steps_done % every == 0
        if checked:  # before the masks move, so that scoring never sees the NaN first
            self.check_finite(f"at step {self.steps_done}")
        self._advance(self.steps_done, checked)

    def commit(self) -> None:
        """Fold masks (and SA++'s attention, PowerPropagation's scaling) into plain weights. Idempotent.

        Warns when training stopped short of the plan or of the target sparsity, and when kept blocks ended
        all zero (dead units).
        """
        if self.lifecycle in (Lifecycle.NEW, Lifecycle.COMMITTED):
            return
        self._emit("commit")
        planned = self.cursor.schedule.total_steps if self.cursor is not None else None
        if planned is not None and self.steps_done < planned:
            where = f"training stopped after {self.steps_done} of the {planned} steps of the plan"
        else:
            where = "stopped before the plan's final sparse phase?"
        health.warn_when_short_of_target(self.layers, self.sparsity, where, self.owner, self.ranking)
        for layer in self.layers:
            layer.commit()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.lifecycle = Lifecycle.COMMITTED
        health.warn_on_dead_blocks(self.layers, self.algorithm.zeroes_pruned_weights, self.owner)

    def mark_failed(self) -> None:
        """Training stopped with an exception: the model keeps its masks until :meth:`commit`."""
        if self.lifecycle in (Lifecycle.PREPARED, Lifecycle.TRAINING):
            self.lifecycle = Lifecycle.FAILED

    def _require(self, *allowed: Lifecycle, action: str) -> None:
        self.lifecycle.require(*allowed, action=action, who=self.owner)

    # --- the plan -----------------------------------------------------------------------------
    def _advance(self, step: int, checked: bool = False) -> None:
        """Bring the masks to where the plan says they are for the forward pass of ``step``.

        Where a phase begins, the weights are checked for NaN and infinity first (unless ``checked``).
        """
        cursor = self.cursor
        assert cursor is not None
        if (position := cursor.advance(step)) is not None:
            if not checked:
                self.check_finite(f"at step {step}")
            if cursor.segment_index is not None:  # a phase ended (not the start of training)
                self._emit("phase_end")
                if self.reset_optimizer:
                    for optimizer in self._optimizers:
                        optimizer.state.clear()
            self._enter(position)
            cursor.entered(position)
            self._emit("phase_start")
        elif (position := cursor.ramp_due(step)) is not None:
            self._prune_to(cursor.ramp_targets(position.tau), regrowth=self.sparsify_regrowth)
        if self.algorithm.zeroes_pruned_weights:
            for layer in self.layers:
                layer.zero_pruned_()

    def _enter(self, position: Position) -> None:
        if position.phase is Phase.DENSE:
            for layer in self.layers:
                if layer.num_kept < layer.layout.num_blocks:
                    layer.set_mask(torch.ones_like(layer.mask))
        elif position.phase is Phase.SPARSIFY:
            self.cursor.begin_ramp([1.0 - layer.num_kept / layer.layout.num_blocks for layer in self.layers])
            self._prune_to(self.cursor.ramp_targets(position.tau), regrowth=self.sparsify_regrowth)
        else:
            self._prune_to([self.sparsity] * len(self.layers), regrowth=False)

    def _scores(self, layer: PrunedLayer, across_layers: bool = False) -> Tensor:
        # across layers: on a scale shared by all of them (SA++: the attention, not each layer's raw logits)
        scores = (self.algorithm.global_block_scores if across_layers else self.algorithm.block_scores)(layer)
        return health.check_scores(layer, scores, self.algorithm.importance_name, self.owner)

    def _prune_to(self, sparsities: list[float], regrowth: bool) -> None:
        """Bring each layer to its target sparsity, dropping the lowest scores first: per layer, or in one
        ranking over all layers (``ranking="global"``). Without ``regrowth`` a kept set only shrinks."""
        if self.ranking == "global":
            self._prune_globally(
                sum(s * layer.layout.num_blocks for s, layer in zip(sparsities, self.layers)), regrowth
            )
            return
        for layer, sparsity in zip(self.layers, sparsities):
            keep = keep_count(layer.layout.num_blocks, sparsity)
            if keep < layer.num_kept or (regrowth and keep <= layer.num_kept):
                eligible = None if regrowth else layer.mask
                layer.set_mask(top_k_mask(self._scores(layer), keep, eligible=eligible))

    def _prune_globally(self, pruned_blocks: float, regrowth: bool) -> None:
        total = sum(layer.layout.num_blocks for layer in self.layers)
        keep = max(len(self.layers), total - round(pruned_blocks))
        if keep >= sum(layer.num_kept for layer in self.layers) and not regrowth:
            return
        scores = torch.cat([self._scores(layer, across_layers=True).reshape(-1).float() for layer in self.layers])
        eligible = None if regrowth else torch.cat([layer.mask.reshape(-1) for layer in self.layers])
        mask = top_k_mask(scores, keep, eligible=eligible)
        for layer, part in zip(self.layers, mask.split([layer.layout.num_blocks for layer in self.layers])):
            layer.set_mask(part.reshape(layer.mask.shape))

    # --- checks -------------------------------------------------------------------------------
    def check_finite(self, when: str) -> None:
        """Raise ``FloatingPointError`` naming the layers whose weights or logits hold NaN or infinity."""
        health.check_finite(self.layers, self.algorithm, when, self.owner)

    def verify_masks(self, when: str, all_gather: AllGather | None = None) -> None:
        """Raise ``RuntimeError`` if the masks differ across ranks. ``all_gather`` defaults to
        ``torch.distributed`` (nothing to check outside a distributed run)."""
        if all_gather is None:
            if world_size() <= 1:
                return
            all_gather = torch_all_gather
        verify_masks_agree(self.layers, all_gather, when, self.steps_done, self.owner)

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain, versioned state: the configuration and the position in the plan (masks live in the model)."""
        return {
            "version": STATE_VERSION,
            "config": self.config(),
            "lifecycle": self.lifecycle.value,
            "steps_done": self.steps_done,
            "segment_index": self.segment_index,
            "sparsify_start": list(self.cursor.ramp_start) if self.cursor else [],
            "total_steps": self.schedule.total_steps if self.schedule is not None else self._saved_total_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position in the plan, after :meth:`prepare` and with the model's own state loaded.

        Refuses a state written with another configuration, naming each difference.
        """
        check_saved_state(state_dict)
        self._require(Lifecycle.PREPARED, action="load_state_dict(state)")
        raise_on_config_difference(state_dict["config"], self.config())
        self.steps_done = int(state_dict["steps_done"])
        self._loaded_position = (state_dict["segment_index"], list(state_dict["sparsify_start"]))
        self._saved_total_steps = state_dict.get("total_steps")
        for layer in self.layers:
            layer.refresh_kept_count()

    def _record_config(self, module, state_dict, prefix, local_metadata) -> None:
        local_metadata[METADATA_KEY] = self.config()

    def _check_incoming_state(self, module, state_dict, prefix, local_metadata, *args) -> None:
        check_incoming_model_state(state_dict, prefix, local_metadata, self.layers, self.config())
