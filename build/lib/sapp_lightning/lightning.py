"""``BlockPruning`` for the unified ``lightning`` package (``import lightning.pytorch as L``).

The same callback as :class:`sapp_lightning.BlockPruning` (which serves ``pytorch_lightning``), on
``lightning.pytorch.Callback``; ``lightning`` is not a dependency of sapp_lightning, so this module needs it
installed (``pip install lightning``).

Example:
    >>> import lightning.pytorch as L
    >>> from sapp_lightning.lightning import BlockPruning
    >>> pruning = BlockPruning("sapp", sparsity=0.9, block_size=16)
    >>> isinstance(pruning, L.Callback)
    True
"""

from __future__ import annotations

try:
    import lightning.pytorch as L
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sapp_lightning.lightning needs the unified `lightning` package (pip install lightning); with "
        "pytorch_lightning use `from sapp_lightning import BlockPruning`"
    ) from err

from .callback import BlockPruningHooks


class BlockPruning(BlockPruningHooks, L.Callback):
    """:class:`sapp_lightning.BlockPruning` for ``lightning.pytorch``: the same arguments, hooks and behaviour."""


__all__ = ["BlockPruning"]
