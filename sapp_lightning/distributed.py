"""Masks must be the same on every rank: checksums that tell two masks apart, and the check across ranks.

Pure torch. The caller supplies the gather (Lightning's ``trainer.strategy.all_gather``, Fabric's
``fabric.all_gather``); without one, ``torch.distributed`` is used when it is initialized.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor


class MaskedLayer(Protocol):
    """What the check across ranks reads of a pruned layer."""

    name: str
    mask: Tensor


AllGather = Callable[[Tensor], Tensor]  # (...) -> (world_size, ...)

# a (non-linear) hash of each kept block's index, so that swapped blocks change the sum
_HASH_MULTIPLIER, _HASH_MULTIPLIER_2, _HASH_MASK = 2654435761, 2246822519, 2**31 - 1


def mask_checksum(mask: Tensor) -> Tensor:
    """``[kept blocks, sum of a hash of their indices]`` as int64, the same on every device.

    The hash is not linear in the index, so moving two kept blocks in opposite directions (as a tie broken
    differently does) changes the sum.

    Example:
        >>> a, b = torch.zeros(6, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)
        >>> a[[1, 4]] = True; b[[2, 3]] = True   # same count, same index sum
        >>> bool((mask_checksum(a) == mask_checksum(b)).all())
        False
    """
    flat = mask.reshape(-1)
    x = (torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) * _HASH_MULTIPLIER) & _HASH_MASK
    x = x ^ (x >> 15)
    x = ((x * _HASH_MULTIPLIER_2) & _HASH_MASK) ^ (x >> 13)
    return torch.stack([flat.sum(dtype=torch.int64), (x * flat).sum()])


def torch_all_gather(tensor: Tensor) -> Tensor:
    """``torch.distributed.all_gather`` stacked to ``(world_size, ...)``."""
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor)
    return torch.stack(parts)


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def is_rank_zero() -> bool:
    return world_size() == 1 or torch.distributed.get_rank() == 0


def rank_zero_info(logger: logging.Logger, message: str) -> None:
    """Log ``message`` at INFO on rank zero. Where the application configured no logging at all (no handler from
    ``logger`` up to the root, no level set on ``logger`` or its parents), it goes to stderr instead, as Python's
    last-resort handler does for warnings: the set-up summary shows by default, and a configured application
    decides (a library adds no handler of its own)."""
    if not is_rank_zero():
        return
    configured = logger.hasHandlers() or any(
        node.level != logging.NOTSET for node in _ancestors(logger) if node is not logging.root
    )
    if configured:
        logger.info(message)
    else:
        print(message, file=sys.stderr)


def _ancestors(logger: logging.Logger):
    node: logging.Logger | None = logger
    while node is not None:
        yield node
        node = node.parent  # type: ignore[assignment]


def rank_zero_warn(message: str) -> None:
    """``warnings.warn`` on rank zero only (every rank sees the same thing)."""
    if is_rank_zero():
        warnings.warn(message, UserWarning, stacklevel=3)


def verify_masks_agree(layers: Sequence[MaskedLayer], all_gather: AllGather, when: str, step: int, who: str) -> None:
    """Raise ``RuntimeError`` naming the layers whose masks differ between ranks (one gather, one host sync)."""
    if not layers:
        return
    sums = torch.stack([mask_checksum(layer.mask) for layer in layers])  # (layers, 2)
    gathered = all_gather(sums).reshape(-1, len(layers), 2)  # (world_size, layers, 2)
    differs = (gathered != gathered[0]).any(dim=2).any(dim=0)
    if not bool(differs.any()):
        return
    bad = [layers[i].name for i in differs.nonzero().flatten().tolist()]
    kept = {layers[i].name: gathered[:, i, 0].tolist() for i in differs.nonzero().flatten().tolist()}
    raise RuntimeError(
        f"{who}: the masks of layer(s) {', '.join(map(repr, bad))} differ across ranks {when} "
        f"(step {step}; kept blocks on ranks 0..{gathered.shape[0] - 1}: {kept}). The ranks "
        "chose blocks from different weights or scores: every pruned parameter must be synchronized "
        "(DDP) and nothing may change it on one rank only."
    )
