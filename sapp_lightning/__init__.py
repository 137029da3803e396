"""Block-sparse training: SequentialAttention++, ACDC, magnitude, PowerPropagation, from any training loop.

The pure-torch core (:class:`BlockSparsifier`, the algorithms, block layouts, plans, reports,
:func:`committed_state_dict`) imports torch alone; the Lightning callback :class:`BlockPruning` is imported on
first use.

Example:
    >>> from sapp_lightning import BlockPruning
    >>> pruning = BlockPruning("sapp", sparsity=0.9, block_size=16)
    >>> pruning.plan.segments[0]
    Segment(phase=<Phase.DENSE: 0>, fraction=0.1)
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from .algorithms import ALGORITHMS, PruningAlgorithm, register
from .blocks import BlockLayout, keep_count, top_k_mask
from .checkpoint import UnsafeCheckpointError, committed_state_dict, load_checkpoint
from .events import LayerState, Lifecycle, PruningEvent
from .report import LayerSparsity, SparsityReport, block_sparsity, real_sparsity
from .schedules import Phase, PhasePlan, exponential_sparsity
from .sparsifier import BlockSparsifier

if TYPE_CHECKING:
    from .callback import BlockPruning

_LAZY = {"BlockPruning": ".callback"}  # imports Lightning

__all__ = [
    "ALGORITHMS",
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
    "block_sparsity",
    "committed_state_dict",
    "exponential_sparsity",
    "keep_count",
    "load_checkpoint",
    "real_sparsity",
    "register",
    "top_k_mask",
]

__version__ = "0.2.0"

# Like Lightning's own logger: the set-up summary is shown unless the application configures logging.
_log = logging.getLogger(__name__)
if not _log.handlers:
    _log.addHandler(logging.StreamHandler())
    _log.setLevel(logging.INFO)
    _log.propagate = False


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
