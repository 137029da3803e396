"""Phase plans and the sparsification schedule: pure functions of training progress.

A :class:`PhasePlan` is a list of phases with lengths given as fractions of training. Resolved
against the number of optimizer steps it becomes a :class:`StepSchedule`, which maps a step to
the phase it falls in and the progress ``tau`` inside that phase.

Example:
    >>> plan = PhasePlan.named("criteo_acdc")
    >>> schedule = plan.resolve(total_steps=1000)
    >>> schedule.locate(850).phase, schedule.locate(999).tau
    (<Phase.SPARSE: 2>, 1.0)
    >>> round(exponential_sparsity(0.25, target=0.9, c=4.0), 4)
    0.5795
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_COVERAGE_TOLERANCE = 1e-6


class Phase(enum.IntEnum):
    """What the masks do during a stretch of training (the value is what gets logged)."""

    DENSE = 0  # every block trains; the forward uses an all-ones mask
    SPARSIFY = 1  # the kept set shrinks along the exponential schedule
    SPARSE = 2  # the support is frozen

    @classmethod
    def parse(cls, value: Phase | str | int) -> Phase:
        if isinstance(value, Phase):
            return value
        if isinstance(value, str):
            key = value.strip().upper()
            aliases = {"SPARSIFICATION": "SPARSIFY", "FINETUNE": "SPARSE", "FINE_TUNE": "SPARSE"}
            key = aliases.get(key, key)
            if key in cls.__members__:
                return cls[key]
        elif isinstance(value, int) and value in {p.value for p in cls}:
            return cls(value)
        raise ValueError(f"unknown phase {value!r}; expected one of 'dense', 'sparsify', 'sparse'")


def exponential_sparsity(tau: float, target: float, c: float = 4.0, start: float = 0.0) -> float:
    """Sparsity after a fraction ``tau`` of a sparsification phase (SPEC section 1.6).

    ``start + (target - start) * (1 - exp(-c * tau)) / (1 - exp(-c))``: fast at first, slow near
    the target, exactly ``start`` at ``tau = 0`` and ``target`` at ``tau = 1``.
    """
    if c <= 0:
        raise ValueError(f"the schedule exponent c must be > 0, got {c}")
    tau = min(max(tau, 0.0), 1.0)
    fraction = (1.0 - math.exp(-c * tau)) / (1.0 - math.exp(-c))
    return start + (target - start) * fraction


@dataclass(frozen=True)
class Segment:
    phase: Phase
    fraction: float


@dataclass(frozen=True)
class Position:
    """Where a step falls: which segment of the plan, its phase, and the progress inside it."""

    index: int
    phase: Phase
    tau: float


def _cycle(*segments: tuple[str, float], times: int) -> list[tuple[str, float]]:
    return [seg for _ in range(times) for seg in segments]


# The paper's plans (SPEC section 1.5), in percent of training.
_NAMED_PLANS: dict[str, list[tuple[str, float]]] = {
    # 10% dense, 7 x (sparse 5, dense 5) with the last dense lengthened by 5%, 15% sparse.
    "imagenet_acdc": [("dense", 10)]
    + _cycle(("sparse", 5), ("dense", 5), times=6)
    + [("sparse", 5), ("dense", 10), ("sparse", 15)],
    # The first six sparse-dense cycles become sparsify-sparse-dense (equal thirds, SPEC 6 #4);
    # the seventh with its extension becomes one sparsification phase.
    "imagenet_sapp": [("dense", 10)]
    + _cycle(("sparsify", 10 / 3), ("sparse", 10 / 3), ("dense", 10 / 3), times=6)
    + [("sparsify", 15), ("sparse", 15)],
    "imagenet_oneshot": [("dense", 85), ("sparse", 15)],
    # 20% dense, 10 x (sparse 3, dense 3), 20% sparse.
    "criteo_acdc": [("dense", 20)] + _cycle(("sparse", 3), ("dense", 3), times=10) + [("sparse", 20)],
    # The same rewrite as on ImageNet (SPEC 6 #5).
    "criteo_sapp": [("dense", 20)]
    + _cycle(("sparsify", 2), ("sparse", 2), ("dense", 2), times=9)
    + [("sparsify", 6), ("sparse", 20)],
    "criteo_oneshot": [("dense", 80), ("sparse", 20)],
}

PLAN_SETUPS = ("imagenet", "criteo")
PLAN_KINDS = ("acdc", "sapp", "oneshot")


@dataclass(frozen=True)
class PhasePlan:
    """Phases with lengths as fractions of training that add up to 1."""

    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a phase plan needs at least one phase")
        for seg in self.segments:
            if not (seg.fraction > 0 and math.isfinite(seg.fraction)):
                raise ValueError(f"every phase of a plan needs a positive length, got {seg.fraction!r}")
        total = sum(seg.fraction for seg in self.segments)
        if abs(total - 1.0) > _COVERAGE_TOLERANCE:
            raise ValueError(
                f"the phase plan's fractions add up to {total:.6g}, but they must cover training exactly (sum to 1)"
            )

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[Phase | str, float]], scale: float = 1.0) -> PhasePlan:
        return cls(tuple(Segment(Phase.parse(p), float(f) / scale) for p, f in pairs))

    @classmethod
    def named(cls, name: str) -> PhasePlan:
        """One of the paper's plans: ``{imagenet,criteo}_{acdc,sapp,oneshot}``."""
        if name not in _NAMED_PLANS:
            raise ValueError(f"unknown phase plan {name!r}; named plans are {', '.join(sorted(_NAMED_PLANS))}")
        return cls.from_pairs(_NAMED_PLANS[name], scale=100.0)

    @classmethod
    def parse(cls, spec: PhasePlan | str | Sequence[Any], kind: str) -> PhasePlan:
        """Accept a plan, a setup name (``"imagenet"``, ``"criteo"``: the paper's plan for ``kind``),
        a full plan name, or a list of ``(phase, fraction)`` pairs or ``{"phase": .., "fraction": ..}``
        mappings (as Hydra hands them over)."""
        if isinstance(spec, PhasePlan):
            return spec
        if isinstance(spec, str):
            name = f"{spec}_{kind}" if spec in PLAN_SETUPS else spec
            return cls.named(name)
        pairs = []
        for item in spec:
            if isinstance(item, Mapping):
                pairs.append((item["phase"], item["fraction"]))
            else:
                phase, fraction = item
                pairs.append((phase, fraction))
        return cls.from_pairs(pairs)

    def to_pairs(self) -> list[tuple[str, float]]:
        return [(seg.phase.name.lower(), seg.fraction) for seg in self.segments]

    def resolve(self, total_steps: int) -> StepSchedule:
        if total_steps < 1:
            raise ValueError(f"training must have at least one optimizer step, got {total_steps}")
        cumulative, ends = 0.0, []
        for seg in self.segments:
            cumulative += seg.fraction
            ends.append(round(cumulative * total_steps))
        ends[-1] = total_steps
        return StepSchedule(self, total_steps, tuple(ends))


@dataclass(frozen=True)
class StepSchedule:
    """A plan laid over ``total_steps`` optimizer steps; segment ``i`` covers ``[start(i), ends[i])``."""

    plan: PhasePlan
    total_steps: int
    ends: tuple[int, ...]

    def start(self, index: int) -> int:
        return 0 if index == 0 else self.ends[index - 1]

    def empty_segments(self) -> list[int]:
        return [i for i in range(len(self.ends)) if self.ends[i] <= self.start(i)]

    def locate(self, step: int) -> Position:
        """The segment that the forward pass of optimizer step ``step`` (0-based) belongs to.

        ``tau`` runs from 0 on a phase's first step to 1 on its last, so a sparsification phase reaches its
        target on its last step. Steps at or past the end of training fall in the last segment with ``tau = 1``.
        """
        index = min(bisect.bisect_right(self.ends, step), len(self.ends) - 1)
        start, end = self.start(index), self.ends[index]
        tau = 1.0 if end - start <= 1 else min(1.0, (step - start) / (end - start - 1))
        return Position(index, self.plan.segments[index].phase, tau)
