"""Block PowerPropagation: each block scaled by its own Frobenius norm while training."""

from __future__ import annotations

import torch
from torch import Tensor

from ..blocks import BlockLayout, spread_over_taps, sum_inside_blocks
from .base import BlockReparam, PrunedLayer, PruningAlgorithm, register


class _NormScaledBlocks(torch.autograd.Function):
    """``view * (||view_b|| * mask_b)`` over a :meth:`BlockLayout.block_view`, with a hand-written backward.

    Autograd's chain (square, block sum, sqrt, scale) keeps four full-size temporaries and reduces in a slow
    order; this backward needs one temporary: ``d/dV_b = g_b * n_b * m_b + V_b * m_b * <g_b, V_b> / n_b``.
    """

    @staticmethod
    def forward(ctx, view: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        squares = view.square()
        norms = sum_inside_blocks(squares, keepdim=True).sqrt_()
        scale = norms * mask
        ctx.save_for_backward(view, norms, mask, scale)
        return torch.mul(view, spread_over_taps(scale, view), out=squares)  # reuse the full-size buffer

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        view, norms, mask, scale = ctx.saved_tensors
        double_backward = torch.is_grad_enabled()  # create_graph=True: differentiable norms, no out= / in-place
        if double_backward:
            norms = sum_inside_blocks(view.square(), keepdim=True).sqrt()
            scale = norms * mask
        product = grad * view
        inner = sum_inside_blocks(product, keepdim=True)
        coef = torch.where(norms > 0, inner * mask / norms, torch.zeros_like(norms))
        scale, coef = spread_over_taps(scale, view), spread_over_taps(coef, view)
        if double_backward:
            return grad * scale + view * coef, None
        return torch.mul(grad, scale, out=product).addcmul_(view, coef), None  # one full-size buffer


class BlockPowerProp(BlockReparam):
    """``W_b = ||V_b||_F * V_b * mask_b`` (group Powerprop with alpha = 2, SPEC section 3.3).

    ``right_inverse`` maps a standard init ``u`` to ``V_b = u_b / ||u_b||^(1/2)``, so the
    effective weights start exactly where the user's init put them.
    """

    def block_scale(self, weight: Tensor) -> Tensor:
        return self.layout.block_sq_norms(weight).sqrt() * self.block_mask

    def forward(self, weight: Tensor) -> Tensor:
        view = self.layout.block_view(weight)
        if view is None or weight.dtype in (torch.float16, torch.bfloat16):  # norms summed in float32 there
            return super().forward(weight)
        mask = self.layout.grid_to_view(self.block_mask.to(weight.dtype))
        return _NormScaledBlocks.apply(view, mask).view(self.layout.weight_shape)

    def right_inverse(self, weight: Tensor) -> Tensor:
        norms = self.layout.block_sq_norms(weight).sqrt()
        inverse_root = torch.where(norms > 0, norms.rsqrt(), torch.zeros_like(norms))
        return self.layout.scale(weight, inverse_root)


@register("powerprop")
class PowerPropagation(PruningAlgorithm):
    """Dense training with norm-scaled blocks, then one-shot pruning by block norm and fine-tuning."""

    plan_kind = "oneshot"
    default_prune_mode = "mask"

    reparametrizes = True

    def make_reparam(self, layout: BlockLayout, sparsity: float) -> BlockPowerProp:
        return BlockPowerProp(layout)

    def block_scores(self, layer: PrunedLayer) -> Tensor:
        with torch.no_grad():  # same ranking as the effective weight's norm, ||V_b||^2
            return layer.layout.block_sq_norms(layer.raw_weight)
