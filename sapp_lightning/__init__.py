"""Block-sparse training: SequentialAttention++, ACDC, magnitude, PowerPropagation and gradual magnitude pruning,
from any training loop.

The pure-torch core (:class:`BlockSparsifier`, the algorithms, block layouts, plans, reports,
:func:`committed_state_dict`) imports torch alone; the Lightning callback :class:`BlockPruning` imports Lightning.
Every name is imported on first use, so ``import sapp_lightning`` costs nothing until one is needed (the
command-line tools parse their arguments first).

Example:
    >>> from sapp_lightning import BlockPruning
    >>> pruning = BlockPruning("sapp", sparsity=0.9, block_size=16)
    >>> pruning.plan  # the paper's ImageNet plan with as many cycles as the training length allows
    AutoPlan(kind='sapp', setup='imagenet', min_phase_steps=500)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .algorithms import ALGORITHMS, PruningAlgorithm, register
    from .blocks import BlockLayout, keep_count, top_k_mask
    from .callback import BlockPruning
    from .checkpoint import UnsafeCheckpointError, allow_safe_globals, committed_state_dict, load_checkpoint
    from .events import LayerState, Lifecycle, PruningEvent
    from .report import LayerSparsity, SparsityReport, block_sparsity, real_sparsity
    from .schedules import AutoPlan, Phase, PhasePlan, exponential_sparsity
    from .sparsifier import BlockSparsifier

# public name -> the module that defines it
_EXPORTS = {
    "ALGORITHMS": ".algorithms",
    "PruningAlgorithm": ".algorithms",
    "register": ".algorithms",
    "BlockLayout": ".blocks",
    "keep_count": ".blocks",
    "top_k_mask": ".blocks",
    "BlockPruning": ".callback",
    "allow_safe_globals": ".checkpoint",
    "committed_state_dict": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "UnsafeCheckpointError": ".checkpoint",
    "LayerState": ".events",
    "Lifecycle": ".events",
    "PruningEvent": ".events",
    "LayerSparsity": ".report",
    "SparsityReport": ".report",
    "block_sparsity": ".report",
    "real_sparsity": ".report",
    "AutoPlan": ".schedules",
    "Phase": ".schedules",
    "PhasePlan": ".schedules",
    "exponential_sparsity": ".schedules",
    "BlockSparsifier": ".sparsifier",
}

__all__ = [
    "ALGORITHMS",
    "AutoPlan",
    "BlockLayout",
    "BlockPruning",
    "BlockSparsifier",
    "LayerSparsity",
    "LayerState",
    "Lifecycle",
    "Phase",
    "PhasePlan",
    "PruningAlgorithm",
    "PruningEvent",
    "SparsityReport",
    "UnsafeCheckpointError",
    "allow_safe_globals",
    "block_sparsity",
    "committed_state_dict",
    "exponential_sparsity",
    "keep_count",
    "load_checkpoint",
    "real_sparsity",
    "register",
    "top_k_mask",
]
__version__ = "0.3.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
