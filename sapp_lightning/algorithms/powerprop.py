"""Block PowerPropagation: each block scaled by its own Frobenius norm while training."""

from __future__ import annotations

import torch
from torch import Tensor

from ..blocks import BlockLayout
from .base import BlockReparam, PrunedLayer, PruningAlgorithm, register


class BlockPowerProp(BlockReparam):
    """``W_b = ||V_b||_F * V_b * mask_b`` (group Powerprop with alpha = 2, SPEC section 3.3).

    ``right_inverse`` maps a standard init ``u`` to ``V_b = u_b / ||u_b||^(1/2)``, so the
    effective weights start exactly where the user's init put them.
    """

    def block_scale(self, weight: Tensor) -> Tensor:
        return self.layout.block_sq_norms(weight).sqrt() * self.block_mask

    def right_inverse(self, weight: Tensor) -> Tensor:
        norms = self.layout.block_sq_norms(weight).sqrt()
        inverse_root = torch.where(norms > 0, norms.rsqrt(), torch.zeros_like(norms))
        return self.layout.scale(weight, inverse_root)


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
