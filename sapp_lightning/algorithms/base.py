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
    """A parametrization ``weight -> weight * expand(block_scale(weight))`` with a per-block mask."""

    def __init__(self, layout: BlockLayout) -> None:
        super().__init__()
        self.layout = layout
        self.register_buffer("block_mask", torch.ones(layout.grid_shape, dtype=torch.bool))

    def block_scale(self, weight: Tensor) -> Tensor:
        return self.block_mask

    def forward(self, weight: Tensor) -> Tensor:
        return self.layout.scale(weight, self.block_scale(weight))


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
