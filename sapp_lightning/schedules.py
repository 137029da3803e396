"""Phase plans, sparsity ramps and the plan cursor: pure functions of training progress.

A :class:`PhasePlan` is a list of phases with lengths given as fractions of training. Resolved against the number
of optimizer steps it becomes a :class:`StepSchedule`, which maps a step to its phase and the progress ``tau``
inside that phase. :class:`AutoPlan` (``plan="auto"``) picks how many of the paper's cycles fit the training
length. A :class:`PlanCursor` walks a schedule step by step: where phases begin and what sparsity each layer is due.

Example:
    >>> plan = PhasePlan.named("criteo_acdc")
    >>> schedule = plan.resolve(total_steps=1000)
    >>> schedule.locate(850).phase, schedule.locate(999).tau
    (<Phase.SPARSE: 2>, 1.0)
    >>> round(exponential_sparsity(0.25, target=0.9, c=4.0), 4), round(cubic_sparsity(0.25, target=0.9), 4)
    (0.5795, 0.5203)
    >>> AutoPlan("sapp").resolve(100_000).plan == PhasePlan.named("imagenet_sapp")  # long enough for six cycles
    True
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .validation import require_int

_COVERAGE_TOLERANCE = 1e-6


class Phase(enum.IntEnum):
    """What the masks do during a stretch of training (the value is what gets logged)."""

    DENSE = 0  # every block trains; the forward uses an all-ones mask
    SPARSIFY = 1  # the kept set shrinks along the ramp
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


# --- ramps: the sparsity inside a sparsification phase ------------------------------------------------
def exponential_sparsity(tau: float, target: float, c: float = 4.0, start: float = 0.0) -> float:
    """Sparsity after a fraction ``tau`` of a sparsification phase (SA++, SPEC section 1.6).

    ``start + (target - start) * (1 - exp(-c * tau)) / (1 - exp(-c))``: fast at first, slow near
    the target, exactly ``start`` at ``tau = 0`` and ``target`` at ``tau = 1``.
    """
    if c <= 0:
        raise ValueError(f"the schedule exponent c must be > 0, got {c}")
    tau = min(max(tau, 0.0), 1.0)
    fraction = (1.0 - math.exp(-c * tau)) / (1.0 - math.exp(-c))
    return start + (target - start) * fraction


def cubic_sparsity(tau: float, target: float, start: float = 0.0) -> float:
    """Gradual magnitude pruning's ramp (Zhu & Gupta 2017; ``torch.ao.pruning``'s ``CubicSL``):
    ``target + (start - target) * (1 - tau) ** 3``.

    Example:
        >>> [round(cubic_sparsity(t, 0.9), 4) for t in (0.0, 0.5, 1.0)]
        [0.0, 0.7875, 0.9]
    """
    tau = min(max(tau, 0.0), 1.0)
    return target + (start - target) * (1.0 - tau) ** 3


RAMPS = ("exponential", "cubic")


@dataclass(frozen=True)
class Ramp:
    """How sparsity rises inside a sparsification phase: SA++'s ``"exponential"`` (exponent ``c``) or gradual
    magnitude pruning's ``"cubic"``."""

    kind: str = "exponential"
    exponent: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in RAMPS:
            raise ValueError(f"ramp must be one of {', '.join(map(repr, RAMPS))}, got {self.kind!r}")
        if not (isinstance(self.exponent, int | float) and self.exponent > 0):
            raise ValueError(f"schedule_exponent must be > 0, got {self.exponent!r}")

    def sparsity(self, tau: float, target: float, start: float = 0.0) -> float:
        if self.kind == "cubic":
            return cubic_sparsity(tau, target, start)
        return exponential_sparsity(tau, target, self.exponent, start)


# --- plans ---------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class _Template:
    """One of the paper's plans as ``head + cycles x unit + tail`` (percent of training); the cycles share
    ``middle`` percent equally. With no cycle the middle goes to the head's last phase or the tail's first."""

    head: tuple[tuple[str, float], ...]
    unit: tuple[str, ...]
    middle: float
    tail: tuple[tuple[str, float], ...]
    paper_cycles: int
    absorb: str  # "head" or "tail": who takes the middle when there is no cycle

    def pairs(self, cycles: int) -> list[tuple[str, float]]:
        head, tail = [list(p) for p in self.head], [list(p) for p in self.tail]
        if cycles == 0:
            (head[-1] if self.absorb == "head" else tail[0])[1] += self.middle
            return [(phase, fraction) for phase, fraction in head + tail]
        share = self.middle / (cycles * len(self.unit))
        cycle = [(phase, share) for phase in self.unit]
        return [*self.head, *(cycle * cycles), *self.tail]


# The paper's plans (SPEC section 1.5), in percent of training. ImageNet ACDC: 10% dense, 7 x (sparse 5, dense 5)
# with the last dense lengthened by 5%, 15% sparse; SA++ turns the first six cycles into sparsify-sparse-dense
# (equal thirds, SPEC 6 #4) and the seventh with its extension into one sparsification phase. Criteo: 20% dense,
# 10 x (sparse 3, dense 3), 20% sparse; SA++ the same rewrite (SPEC 6 #5).
_TEMPLATES: dict[tuple[str, str], _Template] = {
    ("imagenet", "acdc"): _Template((("dense", 10),), ("sparse", "dense"), 60,
                                    (("sparse", 5), ("dense", 10), ("sparse", 15)), 6, "head"),
    ("imagenet", "sapp"): _Template((("dense", 10),), ("sparsify", "sparse", "dense"), 60,
                                    (("sparsify", 15), ("sparse", 15)), 6, "tail"),
    ("criteo", "acdc"): _Template((("dense", 20),), ("sparse", "dense"), 60, (("sparse", 20),), 10, "head"),
    ("criteo", "sapp"): _Template((("dense", 20),), ("sparsify", "sparse", "dense"), 54,
                                  (("sparsify", 6), ("sparse", 20)), 9, "tail"),
}  # fmt: skip
_FIXED_PLANS: dict[str, list[tuple[str, float]]] = {
    # Magnitude and PowerPropagation: one shot before the final fine-tuning (SPEC 6 #18).
    "imagenet_oneshot": [("dense", 85), ("sparse", 15)],
    "criteo_oneshot": [("dense", 80), ("sparse", 20)],
    # Gradual magnitude pruning: the same first dense and final fine-tuning fractions, the ramp in between.
    "imagenet_gmp": [("dense", 10), ("sparsify", 75), ("sparse", 15)],
    "criteo_gmp": [("dense", 20), ("sparsify", 60), ("sparse", 20)],
}

PLAN_SETUPS = ("imagenet", "criteo")
PLAN_KINDS = ("acdc", "sapp", "oneshot", "gmp")
#: ``plan="auto"``: the fewest optimizer steps a phase of a cycle gets. On validation data (Fashion-MNIST MLP, 2,150
#: steps; docs/results.md, "SA++ against gradual magnitude pruning") cycles of 215- and 430-step phases did no better
#: than one ramp; 500 leaves the paper's own plans at the paper's lengths (ImageNet ~1,900-step phases, Criteo ~700).
AUTO_MIN_PHASE_STEPS = 500


def plan_names() -> list[str]:
    return sorted([*_FIXED_PLANS, *(f"{s}_{k}" for s, k in _TEMPLATES)])


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
        """One of the paper's plans, ``{imagenet,criteo}_{acdc,sapp,oneshot}``, or gradual magnitude pruning's
        ``{imagenet,criteo}_gmp``."""
        if name in _FIXED_PLANS:
            return cls.from_pairs(_FIXED_PLANS[name], scale=100.0)
        setup, _, kind = name.partition("_")
        if (setup, kind) in _TEMPLATES:
            return cls.cycled(name, _TEMPLATES[setup, kind].paper_cycles)
        raise ValueError(
            f"unknown phase plan {name!r}; named plans are {', '.join(plan_names())}, and 'auto' "
            "(or 'imagenet_auto', 'criteo_auto')"
        )

    @classmethod
    def cycled(cls, name: str, cycles: int) -> PhasePlan:
        """One of the paper's cycled plans (``{imagenet,criteo}_{acdc,sapp}``) with ``cycles`` cycles in the
        span where the paper has its own count (SA++ with none: one ramp; ACDC with none: dense until the end).

        Example:
            >>> [(s.phase.name.lower(), round(s.fraction, 2)) for s in PhasePlan.cycled("imagenet_sapp", 0).segments]
            [('dense', 0.1), ('sparsify', 0.75), ('sparse', 0.15)]
        """
        setup, _, kind = name.partition("_")
        template = _TEMPLATES.get((setup, kind))
        if template is None:
            cycled = ", ".join(f"{s}_{k}" for s, k in _TEMPLATES)
            raise ValueError(f"{name!r} has no cycles to count; plans with cycles are {cycled}")
        require_int("the number of cycles", cycles, 0)
        return cls.from_pairs(template.pairs(cycles), scale=100.0)

    @classmethod
    def parse(cls, spec: PhasePlan | AutoPlan | str | Sequence[Any], kind: str) -> PhasePlan | AutoPlan:
        """Accept a plan; ``"auto"`` (:class:`AutoPlan`; ``"auto:50"``: phases of at least 50 steps;
        ``"criteo_auto"``: the Criteo proportions); a setup name (``"imagenet"``, ``"criteo"``: the paper's plan for
        ``kind``) or a full plan name, either with ``":K"`` for ``K`` cycles (``"imagenet:2"``); or a list of
        ``(phase, fraction)`` pairs or ``{"phase": .., "fraction": ..}`` mappings (as Hydra hands them over)."""
        if isinstance(spec, PhasePlan | AutoPlan):
            return spec
        if isinstance(spec, str):
            name, _, count = spec.partition(":")
            if count and not count.isdigit():
                raise ValueError(f"unknown phase plan {spec!r}: after ':' comes a whole number")
            if name == "auto" or name.endswith("_auto"):
                setup = "imagenet" if name == "auto" else name.removesuffix("_auto")
                if setup not in PLAN_SETUPS:
                    raise ValueError(
                        f"unknown phase plan {spec!r}; auto plans are 'auto', 'imagenet_auto', 'criteo_auto'"
                    )
                return AutoPlan(kind, setup, int(count) if count else AUTO_MIN_PHASE_STEPS)
            name = f"{name}_{kind}" if name in PLAN_SETUPS else name
            return cls.cycled(name, int(count)) if count else cls.named(name)
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

    def to_config(self) -> list[list[Any]]:
        """What a sparsifier's configuration records (plain types)."""
        return [list(pair) for pair in self.to_pairs()]

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
class AutoPlan:
    """The paper's plan for the algorithm with as many of its cycles as the training length allows.

    Every phase of a cycle gets at least ``min_phase_steps`` optimizer steps; the paper's own count (6 on
    ImageNet) is the most. With no room for a cycle, SA++ sparsifies once along one long ramp (10% dense, a
    75% ramp, 15% fine-tuning) and ACDC trains dense until it prunes for the fine-tuning. Plans without cycles
    (magnitude, PowerPropagation, gmp) are the setup's plan.

    Example:
        >>> auto = AutoPlan("sapp")
        >>> [auto.cycles(steps) for steps in (100, 1_000, 10_000, 100_000)]
        [0, 0, 4, 6]
        >>> print(auto.describe(10_000))
        auto, 10000 steps: 4 of the paper's 6 (sparsify, sparse, dense) cycles of 500-step phases (at least 500)
    """

    kind: str = "sapp"
    setup: str = "imagenet"
    min_phase_steps: int = AUTO_MIN_PHASE_STEPS

    def __post_init__(self) -> None:
        if self.setup not in PLAN_SETUPS:
            raise ValueError(f"AutoPlan setup must be one of {', '.join(PLAN_SETUPS)}, got {self.setup!r}")
        require_int("min_phase_steps", self.min_phase_steps, 1)

    @property
    def _template(self) -> _Template | None:
        return _TEMPLATES.get((self.setup, self.kind))

    def cycles(self, total_steps: int) -> int:
        """How many cycles fit: each of their phases gets ``min_phase_steps``, at most the paper's count."""
        template = self._template
        if template is None:
            return 0
        per_cycle = len(template.unit) * self.min_phase_steps
        return min(template.paper_cycles, int(template.middle * total_steps // (100 * per_cycle)))

    def plan_for(self, total_steps: int) -> PhasePlan:
        if self._template is None:
            return PhasePlan.named(f"{self.setup}_{self.kind}")
        return PhasePlan.cycled(f"{self.setup}_{self.kind}", self.cycles(total_steps))

    def resolve(self, total_steps: int) -> StepSchedule:
        return self.plan_for(total_steps).resolve(total_steps)

    def describe(self, total_steps: int) -> str:
        """What this plan picks for ``total_steps``, in words (the sparsifier logs it when training starts)."""
        template = self._template
        if template is None:
            return f"auto, {total_steps} steps: the {self.setup}_{self.kind} plan (no cycles to choose)"
        cycles = self.cycles(total_steps)
        unit = ", ".join(template.unit)
        text = f"auto, {total_steps} steps: {cycles} of the paper's {template.paper_cycles} ({unit})"
        if cycles:
            per_phase = round(template.middle / 100 * total_steps / (cycles * len(template.unit)))
            return f"{text} cycles of {per_phase}-step phases (at least {self.min_phase_steps})"
        text += f" cycles (a phase needs {self.min_phase_steps} steps)"
        if template.absorb == "tail":
            return f"{text}: one ramp over {template.middle + template.tail[0][1]:g}% of training"
        return f"{text}: dense until the last {sum(f for _, f in template.tail):g}% of training"

    def to_config(self) -> str:
        """The spelling :meth:`PhasePlan.parse` reads back (``"auto"``, ``"criteo_auto:50"``)."""
        name = "auto" if self.setup == "imagenet" else f"{self.setup}_auto"
        return name if self.min_phase_steps == AUTO_MIN_PHASE_STEPS else f"{name}:{self.min_phase_steps}"


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


# --- the cursor ------------------------------------------------------------------------------------------
@dataclass
class PlanCursor:
    """Where training stands in a schedule: the phase of each step, where phases begin, and the sparsity each
    layer is due there. Pure bookkeeping (no tensors); the sparsifier moves the masks.

    ``ramp_start`` holds each layer's sparsity when the current sparsification phase began (its ramp runs from
    there to ``target``); ``every_n_steps`` thins the ramp's moves (its last step always moves).

    Example:
        >>> schedule = PhasePlan.from_pairs([("dense", 0.5), ("sparsify", 0.5)]).resolve(10)
        >>> cursor = PlanCursor(schedule, target=0.8, ramp=Ramp("cubic"))
        >>> cursor.entered(cursor.advance(0))  # training starts in the dense phase
        >>> cursor.advance(4), cursor.advance(5)
        (None, Position(index=1, phase=<Phase.SPARSIFY: 1>, tau=0.0))
        >>> cursor.entered(cursor.advance(5)); cursor.begin_ramp([0.0, 0.2])  # two layers
        >>> [round(s, 4) for s in cursor.ramp_targets(0.5)], cursor.ramp_targets(1.0)
        ([0.7, 0.725], [0.8, 0.8])
    """

    schedule: StepSchedule
    target: float
    ramp: Ramp = field(default_factory=Ramp)
    every_n_steps: int = 1
    segment_index: int | None = None
    ramp_start: list[float] = field(default_factory=list)

    @property
    def phase(self) -> Phase | None:
        """The phase of the segment the cursor stands in (``None`` before the first :meth:`advance`)."""
        return None if self.segment_index is None else self.schedule.plan.segments[self.segment_index].phase

    def advance(self, step: int) -> Position | None:
        """Stand at ``step``: its position where it begins a new segment (the caller then enters that phase and
        calls :meth:`entered`), else ``None``."""
        position = self.schedule.locate(step)
        return position if position.index != self.segment_index else None

    def entered(self, position: Position) -> None:
        self.segment_index = position.index

    def begin_ramp(self, current: Sequence[float]) -> None:
        """A sparsification phase begins with the layers at these sparsities."""
        self.ramp_start = list(current)

    def ramp_due(self, step: int) -> Position | None:
        """Inside a sparsification phase: the position where the kept set moves at ``step`` (every
        ``every_n_steps`` steps from the phase's start, and its last step), else ``None``."""
        position = self.schedule.locate(step)
        if position.phase is not Phase.SPARSIFY or position.index != self.segment_index:
            return None
        start, end = self.schedule.start(position.index), self.schedule.ends[position.index]
        return position if (step - start) % self.every_n_steps == 0 or step == end - 1 else None

    def ramp_targets(self, tau: float) -> list[float]:
        """Each layer's sparsity at ``tau`` of the current sparsification phase."""
        return [self.ramp.sparsity(tau, self.target, start) for start in self.ramp_start]

    def target_sparsity(self, step: int) -> float:
        """The sparsity the plan asks for at ``step`` (0 in dense phases; a ramp from the layers' mean start)."""
        position = self.schedule.locate(step)
        if position.phase is Phase.DENSE:
            return 0.0
        if position.phase is Phase.SPARSE:
            return self.target
        start = sum(self.ramp_start) / max(1, len(self.ramp_start))
        return self.ramp.sparsity(position.tau, self.target, start)
