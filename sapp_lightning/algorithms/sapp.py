"""SequentialAttention++: a trainable softmax attention per block ranks the blocks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..blocks import BlockLayout
from .base import BlockReparam, PrunedLayer, PruningAlgorithm, register


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

    ``prune_mode="mask"`` (default, Algorithm 1) keeps pruned values under a zero mask;
    ``"zero"`` also zeroes them when they are pruned, so regrown blocks restart from 0.
    """

    plan_kind = "sapp"
    default_prune_mode = "mask"
    has_trainable_state = True

    def __init__(self, prune_mode=None, *, sparsity: float = 0.0, attention_clipping: bool = True, **options):
        super().__init__(prune_mode, **options)
        self.clip = (1.0 - sparsity) if attention_clipping and sparsity > 0 else None

    def make_reparam(self, layout: BlockLayout) -> BlockAttention:
        return BlockAttention(layout, clip=self.clip)

    def block_scores(self, layer: PrunedLayer) -> Tensor:
        assert isinstance(layer.reparam, BlockAttention)
        return layer.reparam.logits.detach()

    def extra_parameters(self, layer: PrunedLayer) -> list[nn.Parameter]:
        assert isinstance(layer.reparam, BlockAttention)
        return [layer.reparam.logits]

    @property
    def zeroes_pruned_weights(self) -> bool:
        return self.prune_mode == "zero"
