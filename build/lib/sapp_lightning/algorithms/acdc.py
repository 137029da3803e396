"""ACDC: alternating dense and sparse phases, support re-chosen by block norm (Peste et al. 2021)."""

from __future__ import annotations

from .base import PruningAlgorithm, register


@register("acdc")
class ACDC(PruningAlgorithm):
    """Blocks ranked by Frobenius norm at the start of every sparse phase.

    ``prune_mode="zero"`` (default, the ImageNet form) zeroes pruned blocks, which regrow from 0;
    ``"mask"`` keeps their values under a zero mask (the paper's Criteo form).
    """

    plan_kind = "acdc"
