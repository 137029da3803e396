"""Block PowerPropagation: each block scaled by its own Frobenius norm while training."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import fused
from ..blocks import BlockLayout, block_sq_sums, spread_over_taps, sum_inside_blocks
from .base import BlockReparam, PrunedLayer, PruningAlgorithm, register


def _safe_norms(sq: Tensor) -> Tensor:
    """``sqrt(sq)`` whose gradient is 0 (not NaN) where ``sq`` is 0: an all-zero block stays a fixed point."""
    positive = sq > 0
    return torch.where(positive, sq, torch.ones_like(sq)).sqrt() * positive


class _NormScaledBlocks(torch.autograd.Function):
    """``blocks * (||block|| * mask)`` over :meth:`BlockLayout.blocked`'s tensor, with a hand-written backward.

    One path for every shape: a block view where the blocks tile the weight, a zero-padded copy where they do not
    (the padding adds nothing to a norm and gets no gradient). The backward,
    ``d/dV_b = g_b * n_b * m_b + V_b * m_b * <g_b, V_b> / n_b``, is 0 in a block whose norm is 0, as the limit of
    the formula (autograd through ``sqrt`` would give NaN there). With :mod:`sapp_lightning.fused` on, each
    direction is one kernel that reads a block-row once from memory (passes per step: docs/results.md section 2).
    """

    @staticmethod
    def forward(ctx, blocks: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        both = fused.norm_scale_forward(blocks, mask) if fused.active(blocks, mask) else None
        if both is not None:
            out, norms = both
        elif blocks.dim() == 4 and blocks.stride(3) == 1:  # norms in one read, no full-size temporary
            norms = block_sq_sums(blocks).sqrt_()
            out = blocks * spread_over_taps(norms * mask, blocks)
        else:  # conv views: the squares' buffer becomes the output (one full-size allocation, not two)
            squares = blocks.square()
            norms = sum_inside_blocks(squares, keepdim=True).sqrt_()
            out = torch.mul(blocks, spread_over_taps(norms * mask, blocks), out=squares)
        ctx.save_for_backward(blocks, norms, mask)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        blocks, norms, mask = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable norms, no out= / in-place
            norms = _safe_norms(sum_inside_blocks(blocks.square(), keepdim=True))
            inner = sum_inside_blocks(grad * blocks, keepdim=True)
            coef = torch.where(norms > 0, inner * mask / torch.where(norms > 0, norms, 1), 0)
            return grad * spread_over_taps(norms * mask, blocks) + blocks * spread_over_taps(coef, blocks), None
        if fused.active(grad, blocks, mask):
            grad_blocks = fused.norm_scale_backward(grad, blocks, norms, mask)
            if grad_blocks is not None:
                return grad_blocks, None
        product = grad * blocks
        inner = sum_inside_blocks(product, keepdim=True)
        coef = torch.where(norms > 0, inner * mask / norms, torch.zeros_like(norms))
        scale, coef = spread_over_taps(norms * mask, blocks), spread_over_taps(coef, blocks)
        return torch.mul(grad, scale, out=product).addcmul_(blocks, coef), None  # one full-size buffer


class BlockPowerProp(BlockReparam):
    """``W_b = ||V_b||_F * V_b * mask_b`` (group Powerprop with alpha = 2, SPEC section 3.3).

    ``right_inverse`` maps a standard init ``u`` to ``V_b = u_b / ||u_b||^(1/2)``, so the
    effective weights start exactly where the user's init put them; an all-zero block stays all zero.
    Norms and scaling run in float32 for half-precision weights; only the effective weight is rounded.
    """

    def block_scale(self, weight: Tensor) -> Tensor:
        return _safe_norms(self.layout.block_sq_norms(weight)) * self.block_mask

    def forward(self, weight: Tensor) -> Tensor:
        work = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
        blocks, padded = self.layout.blocked(work)
        mask = self.layout.grid_to_blocks(self.block_mask.to(work.dtype), padded)
        return self.layout.from_blocks(_NormScaledBlocks.apply(blocks, mask), padded).to(weight.dtype)

    def right_inverse(self, weight: Tensor) -> Tensor:
        norms = self.layout.block_sq_norms(weight).sqrt()
        inverse_root = torch.where(norms > 0, norms, torch.ones_like(norms)).rsqrt() * (norms > 0)
        work = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
        return self.layout.scale(work, inverse_root).to(weight.dtype)


@register("powerprop")
class PowerPropagation(PruningAlgorithm):
    """Dense training with norm-scaled blocks, then one-shot pruning by block norm and fine-tuning."""

    plan_kind = "oneshot"
    default_prune_mode = "mask"

    def make_reparam(self, layout: BlockLayout) -> BlockPowerProp:
        return BlockPowerProp(layout)

    def block_scores(self, layer: PrunedLayer) -> Tensor:
        with torch.no_grad():  # same ranking as the effective weight's norm, ||V_b||^2
            return layer.layout.block_sq_norms(layer.raw_weight)
