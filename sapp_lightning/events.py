"""What a sparsifier shows of itself: its lifecycle, the events listeners hear, and each layer's state."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from .blocks import BlockLayout
from .schedules import Phase


class Lifecycle(enum.Enum):
    NEW = "new"  # nothing pruned yet
    PREPARED = "prepared"  # masks injected, plan not started
    TRAINING = "training"  # the plan is running
    COMMITTED = "committed"  # plain weights again; the sparsifier is spent
    FAILED = "failed"  # training stopped by an exception; the model still carries the masks

    def require(self, *allowed: Lifecycle, action: str, who: str) -> None:
        """Raise ``RuntimeError`` unless the state is one of ``allowed``; ``action`` names the call refused. A new
        model needs a new sparsifier: ``prepare`` on a used one says why."""
        if self in allowed:
            return
        if action.startswith("prepare") and self is Lifecycle.COMMITTED:
            raise RuntimeError(
                f"this {who} already committed a model at the end of an earlier fit; create a new {who} for another fit"
            )
        if action.startswith("prepare"):
            raise RuntimeError(
                f"this {who} already pruned a model in an earlier fit that did not finish (it raised or was "
                "interrupted), and that model still carries its masks. Call commit() on it for plain weights, or "
                f"resume the run from a checkpoint with a fresh model and a fresh {who}"
            )
        raise RuntimeError(
            f"{who}.{action} needs a sparsifier that is {' or '.join(s.value for s in allowed)}, but it is "
            f"{self.value} (order: prepare -> attach -> start -> step ... -> commit)"
        )


@dataclass(frozen=True)
class PruningEvent:
    """What a listener hears: a phase starting or ending, or the commit (masks as training left them)."""

    kind: Literal["phase_start", "phase_end", "commit"]
    step: int
    segment_index: int | None
    phase: Phase | None


@dataclass(frozen=True)
class LayerState:
    """One pruned layer at a moment: its block mask and the score that ranks its blocks (CPU copies)."""

    name: str
    layout: BlockLayout
    mask: Tensor  # bool, ``layout.grid_shape``
    importance: Tensor  # float32, ``layout.grid_shape``: SA++'s attention, else the block's Frobenius norm
    importance_name: str  # "attention" or "block norm"

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    @property
    def num_kept(self) -> int:
        return int(self.mask.sum())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.num_kept / self.num_blocks
