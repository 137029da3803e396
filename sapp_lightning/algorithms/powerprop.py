"""Block PowerPropagation: each block scaled by its own Frobenius norm while training."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import fused
from ..blocks import BlockLayout, block_sq_sums, spread_over_taps, sum_inside_blocks
from .base import BlockReparam, PrunedLayer, PruneMode, PruningAlgorithm, register


def _safe_norms(sq: Tensor) -> Tensor:
    """``sqrt(sq)`` whose gradient is 0 (not NaN) where ``sq`` is 0: an all-zero block stays a fixed point."""
    positive = sq > 0
    return torch.where(positive, sq, torch.ones_like(sq)).sqrt() * positive


def _power(norms: Tensor, exponent: float) -> Tensor:
    """``norms ** exponent`` (1 for exponent 0), without a copy for the paper's exponent 1."""
    return norms if exponent == 1 else norms.pow(exponent)


class _NormScaledBlocks(torch.autograd.Function):
    """``blocks * (||block||^(alpha-1) * mask)`` over :meth:`BlockLayout.blocked`'s tensor, hand-written backward.

    One path for every shape: a block view where the blocks tile the weight, a zero-padded copy where they do not
    (the padding adds nothing to a norm and gets no gradient). With ``p = alpha - 1`` the backward is
    ``d/dV_b = g_b * n_b^p * m_b + p * V_b * m_b * <g_b, V_b> * n_b^(p-2)``, 0 in a block whose norm is 0 (the limit
    of the formula for alpha > 1; autograd through ``sqrt`` would give NaN there). With :mod:`sapp_lightning.fused`
    on, each direction of alpha = 2 is one kernel that reads a block-row once (passes per step: docs/results.md
    section 2).
    """

    @staticmethod
    def forward(ctx, blocks: Tensor, mask: Tensor, alpha: float) -> Tensor:  # type: ignore[override]
        p = alpha - 1
        both = fused.norm_scale_forward(blocks, mask) if p == 1 and fused.active(blocks, mask) else None
        if both is not None:
            out, norms = both
        elif blocks.dim() == 4 and blocks.stride(3) == 1:  # norms in one read, no full-size temporary
            norms = block_sq_sums(blocks).sqrt_()
            out = blocks * spread_over_taps(_power(norms, p) * mask, blocks)
        else:  # conv views: the squares' buffer becomes the output (one full-size allocation, not two)
            squares = blocks.square()
            norms = sum_inside_blocks(squares, keepdim=True).sqrt_()
            out = torch.mul(blocks, spread_over_taps(_power(norms, p) * mask, blocks), out=squares)
        ctx.save_for_backward(blocks, norms, mask)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        blocks, norms, mask = ctx.saved_tensors
        p = ctx.p
        if torch.is_grad_enabled():  # create_graph=True: differentiable norms, no out= / in-place
            norms = _safe_norms(sum_inside_blocks(blocks.square(), keepdim=True))
            inner = sum_inside_blocks(grad * blocks, keepdim=True)
            safe = torch.where(norms > 0, norms, 1)
            coef = torch.where(norms > 0, p * inner * mask * _power(safe, p - 2), 0)
            scale = spread_over_taps(_power(norms, p) * mask, blocks)
            return grad * scale + blocks * spread_over_taps(coef, blocks), None, None
        if p == 1 and fused.active(grad, blocks, mask):
            grad_blocks = fused.norm_scale_backward(grad, blocks, norms, mask)
            if grad_blocks is not None:
                return grad_blocks, None, None
        product = grad * blocks
        inner = sum_inside_blocks(product, keepdim=True)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        coef = torch.where(norms > 0, p * inner * mask * _power(safe, p - 2), torch.zeros_like(norms))
        scale, coef = spread_over_taps(_power(norms, p) * mask, blocks), spread_over_taps(coef, blocks)
        return torch.mul(grad, scale, out=product).addcmul_(blocks, coef), None, None  # one full-size buffer


class BlockPowerProp(BlockReparam):
    """``W_b = ||V_b||_F^(alpha-1) * V_b * mask_b`` (group Powerprop; the paper's block version is alpha = 2,
    SPEC section 3.3).

    ``right_inverse`` maps a standard init ``u`` to ``V_b = u_b / ||u_b||^((alpha-1)/alpha)``, so the
    effective weights start exactly where the user's init put them; an all-zero block stays all zero.
    Norms and scaling run in float32 for half-precision weights; only the effective weight is rounded.

    Example:
        >>> layout = BlockLayout.for_weight(torch.zeros(32, 32), block_size=16)
        >>> reparam, u = BlockPowerProp(layout, alpha=3.0), torch.randn(32, 32)
        >>> torch.allclose(reparam(reparam.right_inverse(u)), u, atol=1e-6)
        True
    """

    def __init__(self, layout: BlockLayout, alpha: float = 2.0) -> None:
        super().__init__(layout)
        self.alpha = float(alpha)

    def block_scale(self, weight: Tensor) -> Tensor:
        return _power(_safe_norms(self.layout.block_sq_norms(weight)), self.alpha - 1) * self.block_mask

    def forward(self, weight: Tensor) -> Tensor:
        work = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
        blocks, padded = self.layout.blocked(work)
        mask = self.layout.grid_to_blocks(self.block_mask.to(work.dtype), padded)
        return self.layout.from_blocks(_NormScaledBlocks.apply(blocks, mask, self.alpha), padded).to(weight.dtype)

    def right_inverse(self, weight: Tensor) -> Tensor:
        norms = self.layout.block_sq_norms(weight).sqrt()
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        inverse = safe.pow(-(self.alpha - 1) / self.alpha) * (norms > 0)
        work = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
        return self.layout.scale(work, inverse).to(weight.dtype)


@register("powerprop")
class PowerPropagation(PruningAlgorithm):
    """Dense training with norm-scaled blocks, then one-shot pruning by block norm and fine-tuning.

    ``alpha`` is Powerprop's exponent (``W_b = ||V_b||^(alpha-1) V_b``): the paper's block version is 2, 1 is
    plain training (then the method is one-shot magnitude pruning); larger values push small blocks harder
    towards zero.

    Example:
        >>> PowerPropagation(alpha=3).config()
        {'prune_mode': 'mask', 'alpha': 3.0}
    """

    plan_kind = "oneshot"
    default_prune_mode = "mask"

    reparametrizes = True

    def __init__(self, *, alpha: float = 2.0, prune_mode: PruneMode | None = None) -> None:
        super().__init__(prune_mode)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha >= 1:
            raise ValueError(f"alpha must be a number >= 1 (the paper's block PowerPropagation is 2), got {alpha!r}")
        self.alpha = float(alpha)

    def config(self) -> dict[str, Any]:  # alpha only where it differs: older checkpoints keep matching
        return {**super().config(), **({"alpha": self.alpha} if self.alpha != 2 else {})}

    def make_reparam(self, layout: BlockLayout, sparsity: float) -> BlockPowerProp:
        return BlockPowerProp(layout, self.alpha)

    def cannot_train(self, weight: Tensor) -> str | None:
        if self.alpha > 1 and not weight.any():  # e.g. torchvision ViT's zero-initialised head
            return "all zero: PowerPropagation's all-zero blocks get no gradient and would never train"
        return None

    def block_scores(self, layer: PrunedLayer) -> Tensor:
        with torch.no_grad():  # same ranking as the effective weight's norm, ||V_b||^2
            return layer.layout.block_sq_norms(layer.raw_weight)
