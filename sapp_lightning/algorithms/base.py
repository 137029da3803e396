"""What every pruning algorithm shares: the registry, the per-layer state and the base class."""

from __future__ import annotations

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


MASK_BUFFER = "weight_block_mask"  # where a layer without a parametrization keeps its mask


@dataclass(eq=False)
class PrunedLayer:
    """One pruned layer: its module, block layout and where its mask lives."""

    name: str
    module: nn.Module
    layout: BlockLayout
    reparam: BlockReparam | None
    num_kept: int = field(init=False)
    parameter_order: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.num_kept = self.layout.num_blocks
        self.parameter_order = tuple(self.module._parameters)

    @property
    def mask(self) -> Tensor:
        if self.reparam is not None:
            return self.reparam.block_mask
        return getattr(self.module, MASK_BUFFER)

    @property
    def raw_weight(self) -> nn.Parameter:
        """The trained tensor: the parametrization's ``original`` or the plain ``weight``."""
        if self.reparam is not None:
            return self.module.parametrizations.weight.original
        return self.module.weight

    def effective_weight(self) -> Tensor:
        return self.module.weight

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
        """Leave a plain ``weight`` Parameter holding exactly what the layer computed."""
        if self.reparam is not None:
            parametrize.remove_parametrizations(self.module, "weight", leave_parametrized=True)
            self.reparam = None
            # removal re-registers ``weight`` last; restore the original order of the state_dict keys
            params = self.module._parameters
            for name in self.parameter_order:
                if name in params:
                    params[name] = params.pop(name)
        else:
            self.zero_pruned_()
            delattr(self.module, MASK_BUFFER)


class PruningAlgorithm:
    """Base class: one subclass per method, holding only what is its own.

    Subclasses set ``plan_kind`` (which of the paper's plans they default to) and
    ``default_prune_mode``, and override :meth:`make_reparam` and/or :meth:`block_scores`.
    """

    name: ClassVar[str]
    plan_kind: ClassVar[str]
    default_prune_mode: ClassVar[PruneMode] = "zero"
    #: whether the algorithm trains parameters of its own (they must reach the optimizer)
    has_trainable_state: ClassVar[bool] = False

    def __init__(self, prune_mode: PruneMode | None = None, **options: Any) -> None:
        self.prune_mode: PruneMode = prune_mode or self.default_prune_mode
        self.options = options

    def make_reparam(self, layout: BlockLayout) -> BlockReparam | None:
        """The forward parametrization for a layer, or ``None`` to mask in place after each step."""
        return BlockReparam(layout) if self.prune_mode == "mask" else None

    def block_scores(self, layer: PrunedLayer) -> Tensor:
        """Importance of each block, higher is kept; default: Frobenius norm of the effective weight."""
        with torch.no_grad():
            return layer.layout.block_sq_norms(layer.effective_weight())

    def extra_parameters(self, layer: PrunedLayer) -> list[nn.Parameter]:
        return []

    @property
    def zeroes_pruned_weights(self) -> bool:
        return self.prune_mode == "zero"
