"""Block-sparse training for PyTorch Lightning: SequentialAttention++, ACDC, magnitude, PowerPropagation.

Example:
    >>> from sapp_lightning import BlockPruning
    >>> pruning = BlockPruning("sapp", sparsity=0.9, block_size=16)
    >>> pruning.plan.segments[0]
    Segment(phase=<Phase.DENSE: 0>, fraction=0.1)
"""

from .algorithms import ALGORITHMS, PruningAlgorithm, register
from .blocks import BlockLayout, keep_count, top_k_mask
from .callback import BlockPruning, committed_state_dict
from .report import LayerSparsity, SparsityReport, block_sparsity
from .schedules import Phase, PhasePlan, exponential_sparsity

__all__ = [
    "ALGORITHMS",
    "BlockLayout",
    "BlockPruning",
    "LayerSparsity",
    "Phase",
    "PhasePlan",
    "PruningAlgorithm",
    "SparsityReport",
    "block_sparsity",
    "committed_state_dict",
    "exponential_sparsity",
    "keep_count",
    "register",
    "top_k_mask",
]

__version__ = "0.1.0"
