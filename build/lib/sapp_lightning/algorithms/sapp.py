"""SequentialAttention++: a trainable softmax attention per block ranks the blocks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import BlockLayout
from ..distributed import rank_zero_warn
from .base import BlockReparam, PrunedLayer, PruneMode, PruningAlgorithm, register


class BlockAttention(BlockReparam):
    """``weight * expand(A * mask)`` with ``A = N * softmax(logits)`` over the layer's N blocks.

    The logits start at 0, so ``A`` is 1 everywhere and the layer is unchanged. ``clip`` bounds
    ``A`` to ``[clip, 1 / clip]`` (SPEC section 6 #3: ``clip = 1 - target sparsity``).
    The logits, the attention and the scaling stay float32 whatever the weight's dtype (also after
    ``module.to(torch.bfloat16)``); only the effective weight is rounded to the weight's dtype.
    """

    def __init__(self, layout: BlockLayout, clip: float | None = None) -> None:
        super().__init__(layout)
        self.logits = nn.Parameter(torch.zeros(layout.grid_shape, dtype=torch.float32))
        self.clip = clip

    def attention(self) -> Tensor:
        logits = self.logits.float()
        attention = logits.numel() * torch.softmax(logits.reshape(-1), dim=0).reshape(logits.shape)
        if self.clip is not None and self.clip < 1.0:
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
        return f"grid={tuple(self.logits.shape)}, clip={self.clip}"


@register("sapp")
class SequentialAttentionPP(PruningAlgorithm):
    """Blocks ranked by their attention alone; dense / sparsification / sparse cycles.

    Args:
        attention_clipping: clip the attention to ``[1 - sparsity, 1 / (1 - sparsity)]`` (SPEC section 6 #3).
        logit_l2: coefficient ``lambda`` of ``lambda / 2 * ||logits||^2``, added as its exact gradient right before
            the optimizer steps (so AMP scaling and gradient accumulation do not change it). ``None``: the weight
            decay of the pruned weights' parameter group, or 0 when the optimizer already decays the logits.
        prune_mode: ``"mask"`` (default, Algorithm 1) keeps pruned values under a zero mask; ``"zero"`` also
            zeroes them when they are pruned, so regrown blocks restart from 0.

    Example:
        >>> SequentialAttentionPP(attention_clipping=False, logit_l2=1e-4)
        SequentialAttentionPP(prune_mode='mask', attention_clipping=False)
    """

    plan_kind = "sapp"
    default_prune_mode = "mask"
    importance_name = "attention"

    def __init__(
        self, *, attention_clipping: bool = True, logit_l2: float | None = None, prune_mode: PruneMode | None = None
    ) -> None:
        super().__init__(prune_mode)
        if logit_l2 is not None and not (isinstance(logit_l2, int | float) and logit_l2 >= 0):
            raise ValueError(f"logit_l2 must be >= 0 or None, got {logit_l2!r}")
        self.attention_clipping = bool(attention_clipping)
        self.logit_l2 = logit_l2
        #: the coefficient in use once attached (``logit_l2`` resolved against the optimizer)
        self.effective_logit_l2 = 0.0
        self._logits_by_optimizer: dict[int, list[nn.Parameter]] = {}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "attention_clipping": self.attention_clipping}

    def make_reparam(self, layout: BlockLayout, sparsity: float) -> BlockAttention:
        clip = (1.0 - sparsity) if self.attention_clipping and sparsity > 0 else None
        return BlockAttention(layout, clip=clip)

    def block_scores(self, layer: PrunedLayer) -> Tensor:
        return _attention_of(layer).logits.detach()

    def block_importance(self, layer: PrunedLayer) -> Tensor:
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
                f"BlockPruning: configure_optimizers left out the {len(missing)} attention-logit tensor(s); "
                "they were added to the first optimizer as a new parameter group (a learning-rate scheduler "
                "made before does not schedule it). Pass self.parameters() to the optimizer to avoid this."
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

    def __getstate__(self) -> dict[str, Any]:  # optimizers are per run: a copy starts unattached
        return {**self.__dict__, "_logits_by_optimizer": {}, "effective_logit_l2": 0.0}


def _attention_of(layer: PrunedLayer) -> BlockAttention:
    if not isinstance(layer.reparam, BlockAttention):
        raise TypeError(f"layer {layer.name!r} has no SequentialAttention++ parametrization")
    return layer.reparam
