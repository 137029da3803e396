"""SequentialAttention++: a trainable softmax attention per block ranks the blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..blocks import BlockLayout
from ..distributed import rank_zero_warn
from .base import BlockReparam, PrunedLayer, PruneMode, PruningAlgorithm, register


class AttentionGroup:
    """The layers of one global softmax (``softmax_scope="global"``): ``A = N_total * softmax`` over every block
    of every layer, so a layer's attention depends on all logits."""

    def __init__(self) -> None:
        self.members: list[BlockAttention] = []

    def log_normalizer(self) -> tuple[Tensor, int]:
        logits = torch.cat([m.scaled_logits().reshape(-1) for m in self.members])
        return torch.logsumexp(logits, dim=0), logits.numel()


class BlockAttention(BlockReparam):
    """``weight * expand(A * mask)`` with ``A = N * softmax(scale * logits)`` over the layer's N blocks.

    The logits start at 0 (``init_std`` > 0: normal noise of that size), so ``A`` is 1 everywhere and the layer is
    unchanged. ``clip`` bounds ``A`` to ``[clip, 1 / clip]`` (SPEC section 6 #3: ``clip = 1 - target sparsity``),
    or to a ``(low, high)`` pair. ``over_kept`` takes the softmax over the kept blocks only (``N`` = their
    number); ``group`` makes it one softmax over the blocks of every layer in the group.
    The logits, the attention and the scaling stay float32 whatever the weight's dtype (also after
    ``module.to(torch.bfloat16)``); only the effective weight is rounded to the weight's dtype.
    """

    def __init__(
        self,
        layout: BlockLayout,
        clip: float | tuple[float, float] | None = None,
        init_std: float = 0.0,
        over_kept: bool = False,
        group: AttentionGroup | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__(layout)
        self.scale = float(scale)
        self.logits = nn.Parameter(torch.zeros(layout.grid_shape, dtype=torch.float32))
        if init_std > 0:
            with torch.no_grad():
                self.logits.normal_(0.0, init_std)
        self.clip = clip
        self.over_kept = over_kept
        self.group = group
        if group is not None:
            group.members.append(self)

    def scaled_logits(self) -> Tensor:
        """``scale * logits`` in float32: what the softmax sees."""
        logits = self.logits.float()
        return logits * self.scale if self.scale != 1.0 else logits

    def attention(self) -> Tensor:
        logits = self.scaled_logits()
        if self.group is not None:
            log_normalizer, n = self.group.log_normalizer()
            attention = n * torch.exp(logits - log_normalizer)
        elif self.over_kept:
            kept = torch.where(self.block_mask, logits, torch.full_like(logits, -torch.inf))
            attention = self.block_mask.sum() * torch.softmax(kept.reshape(-1), dim=0).reshape(logits.shape)
        else:
            attention = logits.numel() * torch.softmax(logits.reshape(-1), dim=0).reshape(logits.shape)
        if isinstance(self.clip, tuple):
            attention = attention.clamp(*self.clip)
        elif self.clip is not None and self.clip < 1.0:
            attention = attention.clamp(self.clip, 1.0 / self.clip)
        return attention

    def block_scale(self, weight: Tensor) -> Tensor:
        return self.attention() * self.block_mask

    def forward(self, weight: Tensor) -> Tensor:
        if weight.dtype in (torch.float16, torch.bfloat16):
            # scale in float32 so that the logits' gradient (a sum over each block) is not summed in half
            # precision; only the effective weight is rounded to the weight's dtype
            return self.layout.scale(weight.float(), self.block_scale(weight)).to(weight.dtype)
        return super().forward(weight)

    def _apply(self, fn, recurse=True):
        # ``module.to(torch.bfloat16)`` / ``.half()`` (e.g. Lightning's "bf16-true" and "16-true") convert every
        # floating-point parameter; the logits go back to float32 (same Parameter object, so optimizers keep it).
        super()._apply(fn, recurse)
        logits = self.logits
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits.data = logits.data.float()
            if logits.grad is not None:
                logits.grad = logits.grad.float()
        return self

    def extra_repr(self) -> str:
        scale = f", scale={self.scale:g}" if self.scale != 1.0 else ""
        return f"grid={tuple(self.logits.shape)}, clip={self.clip}{scale}"


@register("sapp")
class SequentialAttentionPP(PruningAlgorithm):
    """Blocks ranked by their attention alone; dense / sparsification / sparse cycles.

    Each point the paper leaves open (SPEC section 6) is an argument whose default is the spec's:

    Args:
        attention_clipping: clip the attention to ``[1 - sparsity, 1 / (1 - sparsity)]`` (#3).
        clip_bounds: fixed ``(low, high)`` bounds instead (with ``attention_clipping``).
        logit_l2: coefficient ``lambda`` of ``lambda / 2 * ||logits||^2``, added as its exact gradient right before
            the optimizer steps (so AMP scaling and gradient accumulation do not change it). ``None``: the weight
            decay of the pruned weights' parameter group, or 0 when the optimizer already decays the logits (#11).
        logit_init_std: the logits start as ``N(0, std^2)``; 0 (default, #1) makes ``A`` 1 everywhere.
        logit_scale: the softmax sees ``logit_scale * logits`` (a temperature of ``1 / logit_scale``): an optimizer
            step moves the attention ``logit_scale`` times as far under Adam and ``logit_scale**2`` times under SGD,
            as a larger learning rate for the logits would, whatever optimizer and schedule the user built. Default
            10 (the paper's is 1): SGD's gradients leave the paper's attention near 1, and on the Fashion-MNIST
            models 10 was ahead of 1, 3.16 and 30 in all but one cell (30 diverged); with Adam on the CTR model 1
            did better, so the CTR recipes set 1 (docs/results.md, "SA++ against gradual magnitude pruning").
        softmax_scope: ``"layer"`` (default, #2): a softmax over each layer's blocks times their number;
            ``"global"``: one softmax over the blocks of every pruned layer, times their total number.
        softmax_over: ``"all"`` blocks (default, #9, Algorithm 1) or only the ``"kept"`` ones.
        score: what ranks the blocks: ``"attention"`` (default) or ``"magnitude"``, the Frobenius norm of each
            block of the effective weight ``W * A`` with the same schedule, resets and phases (the paper's
            Fig. 2(a) comparison).
        clip_ties: how blocks tied at a clipping bound are ranked: by their unclipped ``"logit"`` (default) or by
            ``"index"`` (ranking the clipped attention, ties to the lower index: SPEC section 1.10 and #12).
            **The default differs from the spec**: blocks whose attention is clipped all read the same value, and
            with ``"index"`` those at a bound are kept in index order (the kernel's first rows), which says nothing
            about them; the unclipped logit keeps the attention's own order (softmax is monotone). The two agree
            wherever no tie at a bound decides (with the default bounds ``[1 - s, 1 / (1 - s)]`` at most ``k``
            blocks can reach the upper one, since the attention sums to ``N``, so only ties at the lower bound
            matter). ``"logit"`` was the ranking before the option existed: every SA++ result here used it.
        prune_mode: ``"mask"`` (default, Algorithm 1) keeps pruned values under a zero mask; ``"zero"`` also
            zeroes them when they are pruned, so regrown blocks restart from 0 (#8).

    Example:
        >>> SequentialAttentionPP(attention_clipping=False, logit_scale=1.0)  # the paper's attention, unclipped
        SequentialAttentionPP(prune_mode='mask', attention_clipping=False)
        >>> SequentialAttentionPP(score="magnitude").config()["score"]
        'magnitude'
    """

    plan_kind = "sapp"
    # the paper's cycles where the budget has room for them, else one long ramp: ahead of the paper's plan at
    # every budget measured here (docs/results.md, "SA++ against gradual magnitude pruning")
    default_plan = "auto"
    default_prune_mode = "mask"
    importance_name = "attention"
    #: what a setting missing from a recorded configuration means (only the settings that differ are recorded, so
    #: these stay the values of the checkpoints written before each setting existed, whatever the defaults)
    DEFAULTS: ClassVar[dict[str, Any]] = dict(
        clip_bounds=None, logit_init_std=0.0, softmax_scope="layer", softmax_over="all", score="attention",
        clip_ties="logit", logit_scale=1.0,
    )  # fmt: skip

    def __init__(
        self,
        *,
        attention_clipping: bool = True,
        clip_bounds: Sequence[float] | None = None,
        logit_l2: float | None = None,
        logit_init_std: float = 0.0,
        softmax_scope: str = "layer",
        softmax_over: str = "all",
        score: str = "attention",
        clip_ties: str = "logit",
        logit_scale: float = 10.0,
        prune_mode: PruneMode | None = None,
    ) -> None:
        super().__init__(prune_mode)
        if logit_l2 is not None and not (isinstance(logit_l2, int | float) and logit_l2 >= 0):
            raise ValueError(f"logit_l2 must be >= 0 or None, got {logit_l2!r}")
        if not (isinstance(logit_init_std, int | float) and logit_init_std >= 0):
            raise ValueError(f"logit_init_std must be >= 0, got {logit_init_std!r}")
        if isinstance(logit_scale, bool) or not (isinstance(logit_scale, int | float) and logit_scale > 0):
            raise ValueError(f"logit_scale must be > 0, got {logit_scale!r}")
        if clip_bounds is not None:
            clip_bounds = tuple(float(b) for b in clip_bounds)
            if len(clip_bounds) != 2 or not 0 < clip_bounds[0] <= clip_bounds[1]:
                raise ValueError(f"clip_bounds must be (low, high) with 0 < low <= high, got {clip_bounds!r}")
        for name, value, allowed in (
            ("softmax_scope", softmax_scope, ("layer", "global")),
            ("softmax_over", softmax_over, ("all", "kept")),
            ("score", score, ("attention", "magnitude")),
            ("clip_ties", clip_ties, ("logit", "index")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        self.attention_clipping = bool(attention_clipping)
        self.clip_bounds = clip_bounds
        self.logit_l2 = logit_l2
        self.logit_init_std = float(logit_init_std)
        self.logit_scale = float(logit_scale)
        self.softmax_scope, self.softmax_over, self.score, self.clip_ties = (
            softmax_scope,
            softmax_over,
            score,
            clip_ties,
        )
        self.importance_name = "attention" if score == "attention" else "block norm"
        #: the coefficient in use once attached (``logit_l2`` resolved against the optimizer)
        self.effective_logit_l2 = 0.0
        self._logits_by_optimizer: dict[int, list[nn.Parameter]] = {}
        self._group = AttentionGroup() if softmax_scope == "global" else None

    def config(self) -> dict[str, Any]:
        changed = {k: getattr(self, k) for k, default in self.DEFAULTS.items() if getattr(self, k) != default}
        if "clip_bounds" in changed:
            changed["clip_bounds"] = list(changed["clip_bounds"])
        return {**super().config(), "attention_clipping": self.attention_clipping, **changed}

    reparametrizes = True

    def make_reparam(self, layout: BlockLayout, sparsity: float) -> BlockAttention:
        clip = None
        if self.attention_clipping:
            clip = self.clip_bounds or ((1.0 - sparsity) if sparsity > 0 else None)
        return BlockAttention(
            layout,
            clip=clip,
            init_std=self.logit_init_std,
            over_kept=self.softmax_over == "kept",
            group=self._group,
            scale=self.logit_scale,
        )

    def block_scores(self, layer: PrunedLayer) -> Tensor:
        if self.score == "magnitude":
            return super().block_scores(layer)
        if self.clip_ties == "index":
            with torch.no_grad():
                return _attention_of(layer).attention()
        return _attention_of(layer).logits.detach()

    def global_block_scores(self, layer: PrunedLayer) -> Tensor:
        """Scores that compare across layers (``ranking="global"``): with the per-layer softmax (#2) each layer's
        logits have their own normaliser, so they are put on the attention's scale, ``log(N * softmax(L)) =
        L - logsumexp(L) + log N`` (over the kept blocks with ``softmax_over="kept"``), unclipped like the
        ``"logit"`` ranking; ``clip_ties="index"`` ranks the clipped attention itself, which is already normalised.
        Within a layer the order is :meth:`block_scores`'."""
        if self.score == "magnitude" or self.clip_ties == "index" or self.softmax_scope == "global":
            return self.block_scores(layer)  # block norms, the attention, or logits sharing one normaliser
        reparam = _attention_of(layer)
        logits = reparam.scaled_logits().detach()
        domain = logits[reparam.block_mask] if reparam.over_kept else logits.reshape(-1)
        return logits - torch.logsumexp(domain, dim=0) + math.log(domain.numel())

    def block_importance(self, layer: PrunedLayer) -> Tensor:
        if self.score == "magnitude":
            return super().block_importance(layer)
        with torch.no_grad():
            return _attention_of(layer).attention()

    def trainable_parameters(self, layer: PrunedLayer) -> list[nn.Parameter]:
        return [_attention_of(layer).logits]

    def attach(self, layers: Sequence[PrunedLayer], optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Make sure every logit tensor is trained, and resolve ``logit_l2`` against the optimizers' decay."""
        logits = [p for layer in layers for p in self.trainable_parameters(layer)]
        if not logits:
            return
        if not optimizers:
            raise ValueError("SequentialAttentionPP trains attention logits and needs an optimizer")
        where = {id(p): i for i, opt in enumerate(optimizers) for g in opt.param_groups for p in g["params"]}
        missing = [p for p in logits if id(p) not in where]
        if missing:
            optimizers[0].add_param_group({"params": missing})
            rank_zero_warn(
                f"SequentialAttentionPP: the optimizers (configure_optimizers) left out the {len(missing)} "
                "attention-logit tensor(s); they were added to the first optimizer as a new parameter group (a "
                "learning-rate scheduler made before does not schedule it). Pass self.parameters() to the optimizer "
                "to avoid this."
            )
            where.update({id(p): 0 for p in missing})
        self._logits_by_optimizer = {}
        for p in logits:
            self._logits_by_optimizer.setdefault(id(optimizers[where[id(p)]]), []).append(p)
        self.effective_logit_l2 = self._resolve_logit_l2(layers, optimizers, {id(p) for p in logits})

    def _resolve_logit_l2(self, layers, optimizers, logit_ids: set[int]) -> float:
        if self.logit_l2 is not None:
            return float(self.logit_l2)
        groups = [g for opt in optimizers for g in opt.param_groups]
        if any(g.get("weight_decay", 0.0) > 0 for g in groups if any(id(p) in logit_ids for p in g["params"])):
            return 0.0  # the optimizer already decays the logits
        weight_ids = {id(layer.raw_weight) for layer in layers}
        decays = [g.get("weight_decay", 0.0) for g in groups if any(id(p) in weight_ids for p in g["params"])]
        return float(decays[0]) if decays else 0.0

    @torch.no_grad()
    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Add the exact gradient of ``logit_l2 / 2 * ||L||^2`` to the logits this optimizer trains."""
        if self.effective_logit_l2 <= 0:
            return
        for logits in self._logits_by_optimizer.get(id(optimizer), ()):
            if logits.grad is None:
                logits.grad = self.effective_logit_l2 * logits.detach().clone()
            else:
                logits.grad.add_(logits.detach(), alpha=self.effective_logit_l2)

    def __getstate__(self) -> dict[str, Any]:  # optimizers and layers are per run: a copy starts unattached
        group = AttentionGroup() if self.softmax_scope == "global" else None
        return {**self.__dict__, "_logits_by_optimizer": {}, "effective_logit_l2": 0.0, "_group": group}


def _attention_of(layer: PrunedLayer) -> BlockAttention:
    if not isinstance(layer.reparam, BlockAttention):
        raise TypeError(f"layer {layer.name!r} has no SequentialAttention++ parametrization")
    return layer.reparam
