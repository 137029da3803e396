"""Which layers of a model get pruned: type, include/exclude patterns and the block-count rule."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from .blocks import BlockLayout, BlockSize, kernel_kind

DEFAULT_TYPES = ("linear", "conv2d")  # embeddings only when a user includes them


def compile_patterns(patterns: str | Sequence[str] | None, argument: str) -> tuple[re.Pattern, ...]:
    """Compile a list of regular expressions, naming the argument in the error for a bad one."""
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as err:
            raise ValueError(f"{argument} holds an invalid regular expression {pattern!r}: {err}") from None
    return tuple(compiled)


@dataclass(frozen=True)
class Candidate:
    name: str
    module: nn.Module
    layout: BlockLayout
    param_name: str = "weight"


def candidate_layers(
    model: nn.Module,
    block_size: BlockSize,
    include: Iterable[re.Pattern] = (),
    exclude: Iterable[re.Pattern] = (),
) -> list[Candidate]:
    """Layers whose weight can be pruned, before the block-count rule.

    Without ``include``: every ``nn.Linear`` and ``nn.Conv2d`` with ``groups == 1``. With it: the
    blockable modules (those two and ``nn.Embedding``) whose name matches one pattern. ``exclude``
    removes matches in both cases. Patterns are searched (``re.search``) in module names.
    """
    include, exclude = tuple(include), tuple(exclude)
    found = []
    for name, module in model.named_modules():
        kind = kernel_kind(module)
        if kind is None:
            continue
        if include:
            if not any(p.search(name) for p in include):
                continue
        elif kind not in DEFAULT_TYPES:
            continue
        if any(p.search(name) for p in exclude):
            continue
        found.append(Candidate(name, module, BlockLayout.for_module(module, block_size)))
    return found


def shared_weight_owners(model: nn.Module, candidates: Sequence[Candidate]) -> dict[str, list[str]]:
    """For each candidate whose weight another module also holds, the names of all holders."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append(f"{name}.{param_name}" if name else param_name)
    shared = {}
    for cand in candidates:
        owners = sorted(set(holders.get(id(cand.module.weight), [])))
        if len(owners) > 1:
            shared[cand.name] = owners
    return shared


def select_layers(
    model: nn.Module,
    block_size: BlockSize,
    min_blocks: int,
    include: Sequence[re.Pattern] = (),
    exclude: Sequence[re.Pattern] = (),
) -> tuple[list[Candidate], list[Candidate]]:
    """The layers to prune and the candidates left dense for having fewer than ``min_blocks`` blocks.

    Raises ``ValueError`` (before anything is changed) when nothing can be pruned or a chosen weight is
    shared by two modules.
    """
    candidates = candidate_layers(model, block_size, include, exclude)
    chosen = [c for c in candidates if c.layout.num_blocks >= min_blocks]
    if not chosen:
        if candidates:
            found = ", ".join(f"{c.name} ({c.layout.num_blocks} blocks)" for c in candidates[:10])
            size = tuple(candidates[0].layout.block_size)
            raise ValueError(
                f"no layer has at least min_blocks={min_blocks} blocks of size {size}; "
                f"candidates: {found}. Use a smaller block_size or min_blocks."
            )
        raise ValueError(
            "no layer to prune: the model has no nn.Linear or nn.Conv2d (groups=1) layer"
            + (" matching include/exclude" if include or exclude else "")
        )
    shared = shared_weight_owners(model, chosen)
    if shared:
        name, owners = next(iter(shared.items()))
        raise ValueError(
            f"the weight of layer {name!r} is shared by {', '.join(owners)}; BlockPruning cannot prune a "
            "shared weight consistently. Exclude the layer (exclude=[...]) or untie the weights."
        )
    return chosen, [c for c in candidates if c.layout.num_blocks < min_blocks]
