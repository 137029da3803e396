"""Block magnitude pruning: one shot by block norm before the final fine-tuning phase."""

from __future__ import annotations

from .base import PruningAlgorithm, register


@register("magnitude")
class Magnitude(PruningAlgorithm):
    """Train dense, keep the blocks of largest Frobenius norm, fine-tune them."""

    plan_kind = "oneshot"
