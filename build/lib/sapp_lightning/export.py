"""Block-sparse inference: turn the pruned ``nn.Linear`` layers of a committed model into sparse modules.

After ``trainer.fit`` returns, :class:`~sapp_lightning.BlockPruning` leaves plain weights whose pruned blocks
are exact zeros. :func:`to_block_sparse` replaces each ``nn.Linear`` whose weight is sparse enough with a
:class:`BlockSparseLinear` that keeps only the nonzero blocks, as a ``torch.sparse`` BSR or CSR matrix, and
computes ``y = (W @ x.T).T + b`` with ``torch.sparse.mm`` (on CPU ``F.linear(x, W_bsr)`` is several times slower
than dense; ``torch.sparse.mm(W, x.T)`` is the fast form). :func:`save_block_sparse` and
:func:`load_block_sparse` store and restore an exported model.

Only ``nn.Linear`` layers are exported; convolutions stay dense.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sapp_lightning.export import BlockSparseLinear, to_block_sparse
    >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> with torch.no_grad():  # what a committed model looks like: 3 of every 4 blocks of 8x8 are zero
    ...     keep = (torch.arange(32).reshape(4, 8) % 4 == 0).repeat_interleave(8, 0).repeat_interleave(8, 1)
    ...     _ = net[0].weight.mul_(keep)
    >>> sparse = to_block_sparse(net, block_size=8, min_sparsity=0.5, layout="bsr")
    >>> isinstance(sparse[0], BlockSparseLinear), isinstance(sparse[2], nn.Linear)
    (True, True)
    >>> x = torch.randn(5, 64)
    >>> torch.testing.assert_close(sparse(x), net(x))
    >>> sparse[0]
    BlockSparseLinear(in_features=64, out_features=32, layout=bsr, blocksize=(8, 8), nonzero_blocks=8/32)
"""

from __future__ import annotations

import copy
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .blocks import BlockLayout, BlockSize, normalize_block_size

FORMAT = "sapp_lightning.block_sparse/1"
LAYOUTS = ("auto", "bsr", "csr")

_SPARSE_LAYOUTS = {"bsr": torch.sparse_bsr, "csr": torch.sparse_csr}


class BlockSparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a ``torch.sparse`` BSR or CSR matrix (inference only).

    The sparse weight and the bias are non-persistent buffers: ``.to(device)`` moves them, and the model's
    ``state_dict`` leaves them out (:func:`save_block_sparse` stores them). Build one with :meth:`from_linear`.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        if weight.layout not in (torch.sparse_bsr, torch.sparse_csr):
            raise ValueError(f"BlockSparseLinear needs a sparse BSR or CSR weight, got layout {weight.layout}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: str, blocksize: tuple[int, int] | None = None) -> BlockSparseLinear:
        """A sparse copy of ``linear``; ``blocksize`` is ``(rows, cols)`` of ``linear.weight`` for BSR."""
        weight = linear.weight.detach()
        if layout == "bsr":
            if blocksize is None:
                raise ValueError("layout 'bsr' needs a blocksize")
            sparse = weight.to_sparse_bsr(blocksize)
        elif layout == "csr":
            sparse = weight.to_sparse_csr()
        else:
            raise ValueError(f"layout must be 'bsr' or 'csr', got {layout!r}")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(sparse, bias)

    @property
    def layout(self) -> str:
        return "bsr" if self.weight.layout == torch.sparse_bsr else "csr"

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        # (W @ x^T)^T: the sparse matrix on the left is the fast CPU kernel; a contiguous x^T is faster to read.
        y = torch.sparse.mm(self.weight, flat.t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def to_dense_linear(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (for checking, or to fine-tune again)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}"
        if self.layout == "bsr":
            blocksize = tuple(self.weight.values().shape[1:])
            rows, cols = self.out_features // blocksize[0], self.in_features // blocksize[1]
            text += f", blocksize={blocksize}, nonzero_blocks={self.weight.values().shape[0]}/{rows * cols}"
        else:
            text += f", nonzero={self.weight.values().numel()}/{self.out_features * self.in_features}"
        return text

    # --- storage ---------------------------------------------------------------------------------
    def parts(self) -> dict[str, Any]:
        """Plain tensors that rebuild this module (``torch.load(weights_only=True)`` reads them)."""
        w = self.weight
        return {
            "layout": self.layout,
            "shape": [self.out_features, self.in_features],
            "crow_indices": w.crow_indices(),
            "col_indices": w.col_indices(),
            "values": w.values(),
            "bias": self.bias,
        }

    @classmethod
    def from_parts(cls, parts: dict[str, Any]) -> BlockSparseLinear:
        build = torch.sparse_bsr_tensor if parts["layout"] == "bsr" else torch.sparse_csr_tensor
        weight = build(parts["crow_indices"], parts["col_indices"], parts["values"], size=tuple(parts["shape"]))
        return cls(weight, parts["bias"])


# --- export --------------------------------------------------------------------------------------------
def zero_block_fraction(weight: Tensor, block_size: BlockSize) -> float:
    """Fraction of the blocks of a Linear weight (paper orientation ``fan_in x fan_out``) that are all zero."""
    layout = BlockLayout.for_weight(weight, block_size, kind="linear")
    with torch.no_grad():
        zero = layout.block_sq_norms(weight) == 0
    return float(zero.float().mean())


def _bsr_blocksize(linear: nn.Linear, block_size: tuple[int, int]) -> tuple[int, int] | None:
    """The BSR blocksize of ``linear.weight`` (``out x in``) for paper blocks ``(fan_in rows, fan_out cols)``,
    or ``None`` where the blocks do not tile the weight (edge blocks): BSR needs equal blocks."""
    rows, cols = block_size[1], block_size[0]
    out_features, in_features = linear.weight.shape
    if out_features % rows or in_features % cols:
        return None
    return rows, cols


def _time_layout(module: BlockSparseLinear, batch: int, repeats: int = 5) -> float:
    x = torch.randn(batch, module.in_features, dtype=module.weight.dtype, device=module.weight.device)
    with torch.no_grad():
        module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _sparse_module(linear: nn.Linear, block_size: tuple[int, int], layout: str, sample_batch: int) -> BlockSparseLinear:
    blocksize = _bsr_blocksize(linear, block_size)
    if layout == "bsr" and blocksize is None:
        raise ValueError(
            f"layout 'bsr' needs blocks that tile the weight: {tuple(linear.weight.shape)} (out x in) is not "
            f"a multiple of {blocksize or (block_size[1], block_size[0])}; use layout='csr' or 'auto'"
        )
    if layout != "auto":
        return BlockSparseLinear.from_linear(linear, layout, blocksize)
    candidates = [BlockSparseLinear.from_linear(linear, "csr")]
    if blocksize is not None:
        candidates.append(BlockSparseLinear.from_linear(linear, "bsr", blocksize))
    return min(candidates, key=lambda m: _time_layout(m, sample_batch))


def _matches(name: str, patterns: Sequence[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)


def to_block_sparse(
    model: nn.Module,
    block_size: BlockSize,
    min_sparsity: float = 0.5,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layout: str = "auto",
    sample_batch: int = 64,
    inplace: bool = False,
) -> nn.Module:
    """Replace the block-sparse ``nn.Linear`` layers of a committed model with :class:`BlockSparseLinear`.

    Args:
        model: a model whose pruning was committed (``trainer.fit`` returned, or ``BlockPruning.commit()``);
            a layer still carrying a parametrization (masks, SA++'s attention) is refused.
        block_size: the block size the model was pruned with (``(fan_in, fan_out)`` as in ``BlockPruning``).
        min_sparsity: a layer is exported when at least this fraction of its blocks are all zero; sparser
            layers than that are where a sparse product beats the dense one. Others stay ``nn.Linear``.
        include / exclude: regular expressions searched in module names (as in ``BlockPruning``).
        layout: ``"bsr"``, ``"csr"``, or ``"auto"``: time both on a random batch of ``sample_batch`` rows and
            keep the faster (BSR only when the blocks tile the weight).
        inplace: change ``model`` itself instead of a deep copy.

    Returns:
        The model with its sparse layers replaced (for inference: the sparse modules have no gradients).
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    block = normalize_block_size(block_size)
    includes = [re.compile(p) for p in ([include] if isinstance(include, str) else include or [])]
    excludes = [re.compile(p) for p in ([exclude] if isinstance(exclude, str) else exclude or [])]
    uncommitted = [name for name, m in model.named_modules() if parametrize.is_parametrized(m, "weight")]
    if uncommitted:
        raise ValueError(
            f"layer(s) {', '.join(map(repr, uncommitted[:5]))} still carry a parametrization (pruning masks not "
            "committed?): export the model after trainer.fit returned, or call BlockPruning.commit() first"
        )
    target = model if inplace else copy.deepcopy(model)
    replaced = 0
    for name, module in list(target.named_modules()):
        if type(module) is not nn.Linear or (includes and not _matches(name, includes)) or _matches(name, excludes):
            continue
        if zero_block_fraction(module.weight, block) < min_sparsity:
            continue
        _set_submodule(target, name, _sparse_module(module, block, layout, sample_batch))
        replaced += 1
    if replaced == 0:
        warnings.warn(
            f"to_block_sparse: no nn.Linear layer has {min_sparsity:.0%} or more zero blocks of size {block}; "
            "the model is unchanged (was it pruned with this block size, and committed?)",
            stacklevel=2,
        )
    return target


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise ValueError("to_block_sparse exports layers inside a model, not a bare nn.Linear; wrap it")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


# --- storage -------------------------------------------------------------------------------------------
def save_block_sparse(model: nn.Module, path: str | Path) -> None:
    """Save an exported model: the sparse layers as index/value tensors, everything else as its state_dict.

    The file holds tensors only (``torch.load(weights_only=True)`` reads it); :func:`load_block_sparse`
    rebuilds the model into a fresh instance of the architecture.
    """
    sparse = {name: m.parts() for name, m in model.named_modules() if isinstance(m, BlockSparseLinear)}
    if not sparse:
        raise ValueError("the model has no BlockSparseLinear layer; export it with to_block_sparse first")
    torch.save({"format": FORMAT, "sparse_layers": sparse, "state_dict": model.state_dict()}, str(path))


def load_block_sparse(path: str | Path, model: nn.Module, map_location: Any = "cpu") -> nn.Module:
    """Load a file of :func:`save_block_sparse` into ``model``, a fresh (dense) instance of the architecture.

    Each stored sparse layer replaces the ``nn.Linear`` of the same name (its shape must match), then the rest
    of the state is loaded strictly. Returns ``model``, changed in place.
    """
    saved = torch.load(str(path), map_location=map_location, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} is not a block-sparse model saved by save_block_sparse (format {FORMAT})")
    for name, parts in saved["sparse_layers"].items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r}, which {path} stores as block-sparse") from None
        shape = [getattr(current, "out_features", None), getattr(current, "in_features", None)]
        if not isinstance(current, nn.Linear | BlockSparseLinear) or shape != list(parts["shape"]):
            raise ValueError(
                f"layer {name!r} of the model is {current.__class__.__name__} {shape}, but {path} stores a "
                f"{parts['shape'][0]} x {parts['shape'][1]} linear layer there: build the same architecture"
            )
        _set_submodule(model, name, BlockSparseLinear.from_parts(parts))
    model.load_state_dict(saved["state_dict"], strict=True)
    return model
