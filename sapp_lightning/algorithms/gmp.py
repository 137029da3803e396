"""Gradual magnitude pruning (Zhu & Gupta 2017), the way ``torch.ao.pruning`` does it with blocks."""

from __future__ import annotations

from .base import PruningAlgorithm, register


@register("gmp")
class GradualMagnitude(PruningAlgorithm):
    """Blocks ranked by Frobenius norm, pruned along a cubic ramp, then fine-tuned at the final mask.

    Zhu & Gupta's schedule ``s_t = s_f + (s_i - s_f) (1 - tau)^3`` from ``s_i = 0`` to the target: its plan
    (``plan="imagenet"``: ``imagenet_gmp``) trains dense for the first 10%, ramps over the next 75% with the
    masks re-chosen every step (``sparsify_every_n_steps``) among the blocks still kept, and fine-tunes the last
    15% at the final mask: the same first dense and final fine-tuning fractions as the paper's other methods.
    ``torch.ao.pruning``'s ``WeightNormSparsifier`` with blocks and ``CubicSL`` prunes this way
    (``bench/torch_ao_gmp.py`` checks the two against each other). ``prune_mode="zero"`` (default) zeroes the
    pruned blocks in place after each optimizer step, so it adds no forward work; ``"mask"`` masks them in the
    forward, as ``torch.ao``'s ``FakeSparsity`` does: the two train the same model.

    Example:
        >>> from sapp_lightning import BlockSparsifier
        >>> sparsifier = BlockSparsifier("gmp", sparsity=0.9, block_size=16)
        >>> sparsifier.ramp.kind, [seg.fraction for seg in sparsifier.plan.segments]
        ('cubic', [0.1, 0.75, 0.15])
    """

    plan_kind = "gmp"
    default_ramp = "cubic"
