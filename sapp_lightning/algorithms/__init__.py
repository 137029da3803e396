"""The pruning algorithms, registered by the id used everywhere (CLI, YAML, ``BlockPruning``)."""

from . import acdc, magnitude, powerprop, sapp  # noqa: F401  (registers each algorithm)
from .base import ALGORITHMS, PRUNE_MODES, BlockReparam, PrunedLayer, PruningAlgorithm, get_algorithm, register
from .powerprop import BlockPowerProp
from .sapp import BlockAttention

__all__ = [
    "ALGORITHMS",
    "PRUNE_MODES",
    "BlockAttention",
    "BlockPowerProp",
    "BlockReparam",
    "PrunedLayer",
    "PruningAlgorithm",
    "get_algorithm",
    "register",
]
