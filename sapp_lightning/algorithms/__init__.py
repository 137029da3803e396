"""The pruning algorithms, registered by the id used everywhere (CLI, YAML, ``BlockPruning``)."""

from .acdc import ACDC
from .base import (
    ALGORITHMS,
    PRUNE_MODES,
    BlockReparam,
    PrunedLayer,
    PruningAlgorithm,
    algorithm_option_names,
    build_algorithm,
    carries_block_pruning,
    get_algorithm,
    register,
)
from .gmp import GradualMagnitude
from .magnitude import Magnitude
from .powerprop import BlockPowerProp, PowerPropagation
from .sapp import BlockAttention, SequentialAttentionPP

__all__ = [
    "ACDC",
    "ALGORITHMS",
    "PRUNE_MODES",
    "BlockAttention",
    "BlockPowerProp",
    "BlockReparam",
    "GradualMagnitude",
    "Magnitude",
    "PowerPropagation",
    "PrunedLayer",
    "PruningAlgorithm",
    "SequentialAttentionPP",
    "algorithm_option_names",
    "build_algorithm",
    "carries_block_pruning",
    "get_algorithm",
    "register",
]
