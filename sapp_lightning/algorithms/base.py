"""What every pruning algorithm shares: the registry, the per-layer state and the base class."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..blocks import BlockLayout

PruneMode = Literal["zero", "mask"]
PRUNE_MODES: tuple[str, ...] = ("zero", "mask")

ALGORITHMS: dict[str, type[PruningAlgorithm]] = {}


def register(name: str):
    """Class decorator: make an algorithm available under ``name`` (the CLI and YAML id)."""

    def decorate(cls: type[PruningAlgorithm]) -> type[PruningAlgorithm]:
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return decorate


def get_algorithm(name: str) -> type[PruningAlgorithm]:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {', '.join(repr(a) for a in ALGORITHMS)}")
    return ALGORITHMS[name]


def algorithm_option_names() -> set[str]:
    """Every knob some registered algorithm takes (the union of their constructors' arguments)."""
    return {name for c in ALGORITHMS.values() for name in inspect.signature(c.__init__).parameters} - {"self"}


def build_algorithm(algorithm: str | PruningAlgorithm, **options: Any) -> PruningAlgorithm:
    """An algorithm object from a registered name and its knobs, or a copy of a given object.

    Knobs that the named algorithm does not have (``attention_clipping`` for ``"acdc"``) are ignored, so that one
    configuration serves every algorithm of a sweep; ``None`` means the algorithm's default.
    """
    given = {key: value for key, value in options.items() if value is not None}
    if isinstance(algorithm, PruningAlgorithm):
        if given:
            raise ValueError(
                f"{', '.join(sorted(given))} belong to the algorithm object: pass them to "
                f"{type(algorithm).__name__}(...) instead, not next to it"
            )
        return copy.deepcopy(algorithm)
    if not isinstance(algorithm, str):
        raise TypeError(f"algorithm must be a name or a PruningAlgorithm, got {type(algorithm).__name__}")
    cls = get_algorithm(algorithm)
    known = algorithm_option_names()
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(
            f"unknown algorithm option(s) {', '.join(map(repr, unknown))}; the algorithms take "
            f"{', '.join(sorted(known))}"
        )
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{key: value for key, value in given.items() if key in accepted})


class BlockReparam(nn.Module):
    """A parametrization ``weight -> weight * expand(block_scale(weight))`` with a per-block mask.

    With the mask alone as the factor (ACDC and magnitude in ``prune_mode="mask"``) an all-ones mask is an exact
    identity, and the forward returns ``weight`` itself: no full-size multiply in dense phases.

    Example:
        >>> layout = BlockLayout.for_weight(torch.zeros(32, 32), block_size=16)
        >>> reparam, weight = BlockReparam(layout), torch.randn(32, 32)
        >>> reparam(weight) is weight
        True
        >>> reparam.block_mask[0, 1] = False  # kernel block (0, 1) = weight[16:, :16]; seen by the version counter
        >>> bool((reparam(weight)[16:, :16] == 0).all()), bool((reparam(weight)[:16] == weight[:16]).all())
        (True, True)
    """

    def __init__(self, layout: BlockLayout) -> None:
        super().__init__()
        self.layout = layout
        self.register_buffer("block_mask", torch.ones(layout.grid_shape, dtype=torch.bool))
        self._mask_seen: tuple[int, int, int] | None = None
        self._mask_all_ones = False

    def block_scale(self, weight: Tensor) -> Tensor:
        return self.block_mask

    def mask_is_all_ones(self) -> bool:
        """Whether every block is kept. Read from the mask (one host sync) only after it changed: an in-place
        change bumps its version counter, a new tensor changes its identity or storage."""
        mask = self.block_mask
        seen = (id(mask), mask.data_ptr(), mask._version)
        if seen != self._mask_seen:
            self._mask_all_ones = bool(mask.all())
            self._mask_seen = seen
        return self._mask_all_ones

    def mark_mask_changed(self) -> None:
        """Make the next forward read the mask again: for a change its version counter does not see (a write
        through ``.data``, or a collective that fills the buffer outside autograd's tracking)."""
        self._mask_seen = None

    def forward(self, weight: Tensor) -> Tensor:
        scale = self.block_scale(weight)
        # under torch.compile the multiply stays in the graph, so that no phase change recompiles it
        if scale is self.block_mask and not torch.compiler.is_compiling() and self.mask_is_all_ones():
            return weight
        return self.layout.scale(weight, scale)


MASK_SUFFIX = "_block_mask"  # a layer without a parametrization keeps its mask in the buffer ``<param>_block_mask``


@dataclass(eq=False)
class PrunedLayer:
    """One pruned weight: its module, the parameter's name, its block layout and where its mask lives.

    Build one with :meth:`inject`, which puts the mask (a buffer, or the algorithm's parametrization) on the module.
    """

    name: str
    module: nn.Module
    layout: BlockLayout
    reparam: BlockReparam | None
    param_name: str = "weight"
    num_kept: int = field(init=False)
    parameter_order: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.num_kept = self.layout.num_blocks
        self.parameter_order = tuple(self.module._parameters)

    @classmethod
    def inject(
        cls, name: str, module: nn.Module, layout: BlockLayout, reparam: BlockReparam | None, param_name: str = "weight"
    ) -> PrunedLayer:
        layer = cls(name, module, layout, None, param_name)  # records the parameter order first
        weight = getattr(module, param_name)
        if reparam is not None:
            reparam.to(weight.device)
            parametrize.register_parametrization(module, param_name, reparam)
        else:
            mask = torch.ones(layout.grid_shape, dtype=torch.bool, device=weight.device)
            module.register_buffer(param_name + MASK_SUFFIX, mask)
        layer.reparam = reparam
        return layer

    @property
    def mask(self) -> Tensor:
        if self.reparam is not None:
            return self.reparam.block_mask
        return getattr(self.module, self.param_name + MASK_SUFFIX)

    @property
    def raw_weight(self) -> nn.Parameter:
        """The trained tensor: the parametrization's ``original`` or the plain weight."""
        if self.reparam is not None:
            return getattr(self.module.parametrizations, self.param_name).original
        return getattr(self.module, self.param_name)

    def effective_weight(self) -> Tensor:
        """What the layer computes with (the parametrization's output, or the masked-in-place weight)."""
        return getattr(self.module, self.param_name)

    def set_mask(self, mask: Tensor) -> None:
        self.mask.copy_(mask)
        self.num_kept = int(mask.sum())

    def refresh_kept_count(self) -> None:
        self.num_kept = int(self.mask.sum())

    @torch.no_grad()
    def zero_pruned_(self) -> None:
        """Zero the stored weights of pruned blocks in place."""
        if self.num_kept < self.layout.num_blocks:
            self.layout.scale_(self.raw_weight, self.mask)

    @torch.no_grad()
    def commit(self) -> None:
        """Leave a plain Parameter holding exactly what the layer computed, under its own name."""
        if self.reparam is not None:
            parametrize.remove_parametrizations(self.module, self.param_name, leave_parametrized=True)
            self.reparam = None
            # removal re-registers the parameter last; restore the original order of the state_dict keys
            params = self.module._parameters
            for name in self.parameter_order:
                if name in params:
                    params[name] = params.pop(name)
        else:
            self.zero_pruned_()
            delattr(self.module, self.param_name + MASK_SUFFIX)

    def state_keys(self, prefix: str) -> list[str]:
        """The state_dict keys (under the model's ``prefix`` for this layer) that hold the mask and parametrization."""
        if self.reparam is None:
            return [f"{prefix}{self.param_name}{MASK_SUFFIX}"]
        base = f"{prefix}parametrizations.{self.param_name}."
        return [base + "original"] + [f"{base}0.{key}" for key in self.reparam.state_dict()]


def carries_block_pruning(module: nn.Module) -> bool:
    """Whether a sparsifier already put its mask on one of ``module``'s weights (and did not commit)."""
    if any(name.endswith(MASK_SUFFIX) for name in module._buffers):
        return True
    if not parametrize.is_parametrized(module):
        return False
    return any(isinstance(p, BlockReparam) for plist in module.parametrizations.values() for p in plist)


class PruningAlgorithm:
    """Base class: one subclass per method, holding its own knobs and what it adds to training.

    Subclasses set ``plan_kind`` (which of the paper's plans they follow), ``default_plan``, ``default_prune_mode`` and
    ``default_ramp``, and
    override :meth:`make_reparam` and/or :meth:`block_scores`. An algorithm with parameters of its own (SA++'s
    logits) also overrides :meth:`trainable_parameters`, :meth:`attach` and :meth:`before_optimizer_step`.
    One instance serves one sparsifier (the sparsifier copies the object it is given).

    Example:
        >>> from sapp_lightning.algorithms import ACDC
        >>> ACDC(prune_mode="mask").config()
        {'prune_mode': 'mask'}
    """

    name: ClassVar[str]
    plan_kind: ClassVar[str]
    default_prune_mode: ClassVar[PruneMode] = "zero"
    #: how sparsity rises inside a sparsification phase (:class:`~sapp_lightning.schedules.Ramp`)
    default_ramp: ClassVar[str] = "exponential"
    #: the plan a sparsifier lays out when none is given (``PhasePlan.parse``'s spelling)
    default_plan: ClassVar[str] = "imagenet"
    #: what :meth:`block_importance` calls the score (a label for plots and logs)
    importance_name: ClassVar[str] = "block norm"

    def __init__(self, prune_mode: PruneMode | None = None) -> None:
        if prune_mode is not None and prune_mode not in PRUNE_MODES:
            raise ValueError(
                f"prune_mode must be one of {', '.join(map(repr, PRUNE_MODES))} or None, got {prune_mode!r}"
            )
        self.prune_mode: PruneMode = prune_mode or self.default_prune_mode

    def config(self) -> dict[str, Any]:
        """The algorithm's settings that must match for a checkpoint to resume (plain types only)."""
        return {"prune_mode": self.prune_mode}

    def make_reparam(self, layout: BlockLayout, sparsity: float) -> BlockReparam | None:
        """The forward parametrization for a layer, or ``None`` to mask in place after each step."""
        return BlockReparam(layout) if self.prune_mode == "mask" else None

    def block_scores(self, layer: PrunedLayer) -> Tensor:
        """Importance of each block, higher is kept; default: squared Frobenius norm of the effective weight."""
        with torch.no_grad():
            return layer.layout.block_sq_norms(layer.effective_weight())

    def global_block_scores(self, layer: PrunedLayer) -> Tensor:
        """:meth:`block_scores` on a scale shared by every layer, for one ranking over all of them
        (``ranking="global"``); default: the block scores themselves (block norms compare across layers)."""
        return self.block_scores(layer)

    def block_importance(self, layer: PrunedLayer) -> Tensor:
        """The score in readable units (same order as :meth:`block_scores`): here the block's Frobenius norm."""
        return self.block_scores(layer).sqrt()

    def cannot_train(self, weight: Tensor) -> str | None:
        """Why this algorithm could not train ``weight`` (it then stays dense), or ``None``."""
        return None

    def trainable_parameters(self, layer: PrunedLayer) -> list[nn.Parameter]:
        """Parameters the algorithm adds to a layer; they must reach an optimizer."""
        return []

    def attach(self, layers: Sequence[PrunedLayer], optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Wire the algorithm's own parameters to the optimizers (called once, before training)."""

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called with each optimizer right before it steps (gradients complete and unscaled)."""

    @property
    def zeroes_pruned_weights(self) -> bool:
        return self.prune_mode == "zero"

    @property
    def reparametrizes(self) -> bool:
        """Whether :meth:`make_reparam` puts a parametrization in the forward (else masks apply in place)."""
        return self.prune_mode == "mask"

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({options})"
