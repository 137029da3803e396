"""Block-sparse inference: turn the pruned linear layers of a committed model into sparse modules.

After ``trainer.fit`` returns, :class:`~sapp_lightning.BlockPruning` leaves plain weights whose pruned blocks
are exact zeros. :func:`to_block_sparse` replaces each linear layer whose weight is sparse enough (``nn.Linear``
and its subclasses, Hugging Face's ``Conv1D``) with a :class:`BlockSparseLinear` that keeps only the nonzero
blocks, as a ``torch.sparse`` BSR or CSR matrix, and computes ``y = (W @ x.T).T + b`` with ``torch.sparse.mm``
(on CPU ``F.linear(x, W_bsr)`` is several times slower than dense; ``torch.sparse.mm(W, x.T)`` is the fast form).
Which layout, or dense, follows :func:`layout_rule` for the batch the model will run, measured on CPU
(docs/results.md section 3). Every weight of the model gets a row in the returned model's
``block_sparse_summary`` (an :class:`ExportSummary`, also logged): its layout, or why it stays dense.
:func:`save_block_sparse` and :func:`load_block_sparse` store and restore an exported model.

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
    >>> print(sparse.block_sparse_summary.format())
    layer  type    export   zero blocks      indices  why dense / note
    0      Linear  bsr 8x8  75% (8/32 kept)  int32    layout='bsr' asked
    2      Linear  dense    0% (4/4 kept)             0.0% zero blocks, under min_sparsity=50%
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .blocks import BlockLayout, BlockSize, KernelKind, is_hf_conv1d, kernel_kind, normalize_block_size
from .tables import text_table
from .targets import parameter_owners, weight_kinds

log = logging.getLogger(__name__)

FORMAT = "sapp_lightning.block_sparse/2"
_READABLE_FORMATS = ("sapp_lightning.block_sparse/1", FORMAT)  # /1: int64 indices, nn.Linear layers only
LAYOUTS = ("auto", "bsr", "csr")
DEFAULT_BATCH_SIZE = 32

# The layout rule (docs/results.md section 3 has the measurements behind each number; one CPU thread, MKL):
DENSE_MARGIN = 1.1  # the rule was fitted counting a layout as a win only when at least this much faster than dense
MIN_ZERO = 0.8  # under 80% zero blocks sparse products win 1.0-1.5x at best and lose at 1-4 and 100+ rows
FEW_ROWS = 2  # 1-2 rows: dense is a memory-bound GEMV, hard to beat ...
FEW_ROWS_CSR_MIN_ZERO = 0.9  # ... CSR needs 90% zero blocks there; BSR with blocks of 16+ beats it
BIG_BLOCK = 16  # blocks this large (both sides): BSR for 1-2 rows, CSR from 4 rows on (measured up to 256)
SMALL_BLOCK_BSR_ROWS = 16  # blocks under 16: BSR (padded) from 16 rows, CSR below
BSR_PAD = 16  # MKL's BSR product is fast only for a multiple of 16 right-hand columns (batch rows): pad to it
BSR_UNPADDED_ROWS = 4  # ... except up to 4 rows with blocks of 16+, where its unpadded kernel is faster still

_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)  # candidates for the saved file, smallest first


def _fits(dtype: torch.dtype, value: int) -> bool:
    return value <= (255 if dtype == torch.uint8 else torch.iinfo(dtype).max)


def _memory_index_dtype(largest: int) -> torch.dtype:
    """int32 (MKL's own index type: int64 indices are converted on every product) unless an index needs more."""
    return torch.int32 if _fits(torch.int32, largest) else torch.int64


def _file_index_dtype(indices: Tensor) -> torch.dtype:
    """The smallest integer type holding every value of ``indices`` (they are never negative)."""
    largest = int(indices.max()) if indices.numel() else 0
    return next(dtype for dtype in _INDEX_DTYPES if _fits(dtype, largest))


def _compact(t: Tensor) -> Tensor:
    """``t`` with a storage of its own size: ``torch.save`` writes whole storages, and ``to_sparse_csr`` leaves
    its column indices in one twice as large as needed."""
    if t.storage_offset() == 0 and t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _sparse(crow: Tensor, col: Tensor, values: Tensor, shape: Sequence[int], layout: str, check: bool) -> Tensor:
    build = torch.sparse_bsr_tensor if layout == "bsr" else torch.sparse_csr_tensor
    dtype = _memory_index_dtype(max(int(crow[-1]) if crow.numel() else 0, *shape))
    return build(crow.to(dtype), col.to(dtype), values, size=tuple(shape), check_invariants=check)


class BlockSparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a ``torch.sparse`` BSR or CSR matrix (inference only).

    ``W`` is ``out x in`` as in ``nn.Linear``; a Hugging Face ``Conv1D`` (weight stored ``in x out``,
    ``y = x W + b``) becomes the same module with its weight transposed (``source == "hf_conv1d"``). The sparse
    weight and the bias are non-persistent buffers: ``.to(device)`` moves them, and the model's ``state_dict``
    leaves them out (:func:`save_block_sparse` stores them). Indices are int32 in memory. Build one with
    :meth:`from_linear`.

    Example:
        >>> layer = nn.Linear(32, 16)
        >>> with torch.no_grad():
        ...     layer.weight[:, 16:] = 0
        >>> sparse = BlockSparseLinear.from_linear(layer, "bsr", blocksize=(16, 16))
        >>> sparse.weight.col_indices().dtype, sparse.weight.values().shape
        (torch.int32, torch.Size([1, 16, 16]))
        >>> x = torch.randn(3, 32)
        >>> torch.testing.assert_close(sparse(x), layer(x))
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, source: str = "linear") -> None:
        super().__init__()
        if weight.layout not in (torch.sparse_bsr, torch.sparse_csr):
            raise ValueError(f"BlockSparseLinear needs a sparse BSR or CSR weight, got layout {weight.layout}")
        self.out_features, self.in_features = weight.shape
        self.source = source
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Module, layout: str, blocksize: tuple[int, int] | None = None) -> BlockSparseLinear:
        """A sparse copy of ``linear`` (an ``nn.Linear`` or a Hugging Face ``Conv1D``); ``blocksize`` is
        ``(rows, cols)`` of the ``out x in`` matrix, needed for BSR."""
        source = "hf_conv1d" if is_hf_conv1d(linear) else "linear"
        weight = linear.weight.detach()
        if source == "hf_conv1d":
            weight = weight.t().contiguous()
        if layout == "bsr":
            if blocksize is None:
                raise ValueError("layout 'bsr' needs a blocksize")
            sparse = weight.to_sparse_bsr(blocksize)
        elif layout == "csr":
            sparse = weight.to_sparse_csr()
        else:
            raise ValueError(f"layout must be 'bsr' or 'csr', got {layout!r}")
        values = _compact(sparse.values())
        sparse = _sparse(sparse.crow_indices(), sparse.col_indices(), values, weight.shape, layout, check=False)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(sparse, bias, source)

    @property
    def layout(self) -> str:
        return "bsr" if self.weight.layout == torch.sparse_bsr else "csr"

    @property
    def blocksize(self) -> tuple[int, int] | None:
        return tuple(self.weight.values().shape[1:]) if self.layout == "bsr" else None  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        pad = self.layout == "bsr" and rows % BSR_PAD and self.weight.device.type == "cpu"
        if pad and (rows > BSR_UNPADDED_ROWS or min(self.blocksize) < BIG_BLOCK):
            # MKL's BSR kernel is 3-100x slower when the column count is not a multiple of 16: pad with zeros.
            padded = flat.new_zeros(self.in_features, rows + BSR_PAD - rows % BSR_PAD)
            padded[:, :rows] = flat.t()
            y = torch.sparse.mm(self.weight, padded)[:, :rows].t()
        else:
            # (W @ x^T)^T: the sparse matrix on the left is the fast CPU kernel; a contiguous x^T is faster to read.
            y = torch.sparse.mm(self.weight, flat.t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def to_dense_linear(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (for checking, or to fine-tune again; a Conv1D's weight is its ``.T``)."""
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
            rows, cols = self.out_features // self.blocksize[0], self.in_features // self.blocksize[1]
            text += f", blocksize={self.blocksize}, nonzero_blocks={self.weight.values().shape[0]}/{rows * cols}"
        else:
            text += f", nonzero={self.weight.values().numel()}/{self.out_features * self.in_features}"
        return text + (", source=Conv1D" if self.source == "hf_conv1d" else "")

    # --- storage ---------------------------------------------------------------------------------
    def parts(self) -> dict[str, Any]:
        """Plain tensors that rebuild this module (``torch.load(weights_only=True)`` reads them), with the
        indices in the smallest integer type that holds them (uint8, int16, int32 or int64)."""
        w = self.weight
        crow, col = w.crow_indices(), w.col_indices()
        return {
            "layout": self.layout,
            "shape": [self.out_features, self.in_features],
            "source": self.source,
            "crow_indices": crow.to(_file_index_dtype(crow)).clone(),
            "col_indices": col.to(_file_index_dtype(col)).clone(),
            "values": _compact(w.values()),
            "bias": self.bias,
        }

    @classmethod
    def from_parts(cls, parts: dict[str, Any]) -> BlockSparseLinear:
        # Indices back to int32 (the kernels take int32 or int64 only); a damaged file fails here, not in MKL.
        layout, shape = parts["layout"], parts["shape"]
        weight = _sparse(parts["crow_indices"], parts["col_indices"], parts["values"], shape, layout, check=True)
        return cls(weight, parts["bias"], parts.get("source", "linear"))


# --- which layout --------------------------------------------------------------------------------------
def zero_block_fraction(weight: Tensor, block_size: BlockSize, kind: KernelKind = "linear") -> float:
    """Fraction of the blocks of a weight (paper orientation ``fan_in x fan_out``) that are all zero; ``kind``
    is ``"linear"`` for an ``nn.Linear`` weight (``out x in``), ``"hf_conv1d"`` for a Conv1D's (``in x out``).

    Example:
        >>> w = torch.zeros(16, 32)
        >>> w[:8, :8] = 1.0
        >>> zero_block_fraction(w, 8), zero_block_fraction(w.t(), 8, kind="hf_conv1d")
        (0.875, 0.875)
    """
    layout = BlockLayout.for_weight(weight, block_size, kind=kind)
    with torch.no_grad():
        zero = layout.block_sq_norms(weight) == 0
    return float(zero.float().mean())


def layout_rule(batch_size: int, blocksize: tuple[int, int] | None, zero_fraction: float) -> tuple[str | None, str]:
    """The layout for a layer on CPU: ``("bsr" | "csr" | None for dense, why)``; deterministic, no timing.

    Args:
        batch_size: rows the layer multiplies per call (batch x tokens for sequence inputs).
        blocksize: ``(rows, cols)`` BSR blocks of the ``out x in`` matrix, or ``None`` where the blocks do not
            tile it (edge blocks): then BSR is impossible and only CSR is considered.
        zero_fraction: fraction of all-zero blocks (:func:`zero_block_fraction`).

    The rule, from one-thread timings of dense ``F.linear`` against ``torch.sparse.mm`` over batches 1-256,
    blocks 4-64 and sparsities 50-95% (docs/results.md §3):

    * dense under 80% zero blocks (``MIN_ZERO``);
    * BSR where the blocks tile and either both block sides are 16 or more and the batch is 1 or 2, or a block
      side is under 16 and the batch is 16 or more;
    * CSR otherwise, except at a batch of 1 or 2 under 90% zero blocks: dense there.

    Example:
        >>> layout_rule(1, (16, 16), 0.9)[0], layout_rule(32, (16, 16), 0.9)[0], layout_rule(256, (8, 8), 0.9)[0]
        ('bsr', 'csr', 'bsr')
        >>> layout_rule(1, (8, 8), 0.85)
        (None, 'batch 1: CSR needs 90% zero blocks to beat dense (85.0% here), BSR blocks of 16+')
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if zero_fraction < MIN_ZERO:
        return None, f"{zero_fraction:.1%} zero blocks: under {MIN_ZERO:.0%}, no sparse layout beats dense"
    if blocksize is not None:
        big = min(blocksize) >= BIG_BLOCK
        if big and batch_size <= FEW_ROWS:
            return "bsr", f"batch {batch_size}, blocks of {BIG_BLOCK}+: BSR"
        if not big and batch_size >= SMALL_BLOCK_BSR_ROWS:
            return "bsr", f"batch {batch_size} >= {SMALL_BLOCK_BSR_ROWS}, blocks under {BIG_BLOCK}: BSR"
    edge = "" if blocksize is not None else "edge blocks force CSR; "
    if batch_size <= FEW_ROWS and zero_fraction < FEW_ROWS_CSR_MIN_ZERO:
        why = f"batch {batch_size}: CSR needs {FEW_ROWS_CSR_MIN_ZERO:.0%} zero blocks to beat dense"
        why += f" ({zero_fraction:.1%} here)" + ("" if blocksize is None else f", BSR blocks of {BIG_BLOCK}+")
        return None, edge + why
    return "csr", edge + f"batch {batch_size}: CSR"


def _bsr_blocksize(shape: Sequence[int], block_size: tuple[int, int]) -> tuple[int, int] | None:
    """The BSR blocksize of an ``out x in`` matrix for paper blocks ``(fan_in rows, fan_out cols)``, or ``None``
    where the blocks do not tile the matrix (edge blocks): BSR needs equal blocks."""
    rows, cols = block_size[1], block_size[0]
    out_features, in_features = shape
    if out_features % rows or in_features % cols:
        return None
    return rows, cols


# --- the summary ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportChoice:
    """One weight of the model: exported (``layout`` is ``"bsr"`` or ``"csr"``) or left dense, and why."""

    name: str
    type_name: str
    layout: str | None
    reason: str = ""
    blocksize: tuple[int, int] | None = None
    nonzero_blocks: int | None = None
    num_blocks: int | None = None
    index_dtype: str | None = None

    @property
    def exported(self) -> bool:
        return self.layout is not None

    @property
    def zero_fraction(self) -> float | None:
        if self.num_blocks is None or self.nonzero_blocks is None:
            return None
        return 1.0 - self.nonzero_blocks / self.num_blocks


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`to_block_sparse` did with every weight of the model; :meth:`format` prints it."""

    choices: tuple[ExportChoice, ...]
    batch_size: int
    block_size: tuple[int, int]

    @property
    def exported(self) -> list[ExportChoice]:
        return [c for c in self.choices if c.exported]

    @property
    def dense(self) -> list[ExportChoice]:
        return [c for c in self.choices if not c.exported]

    def __getitem__(self, name: str) -> ExportChoice:
        for choice in self.choices:
            if choice.name == name:
                return choice
        raise KeyError(name)

    def format(self) -> str:
        """One row per weight: its export (layout and blocksize, or dense), zero blocks, index dtype, why."""
        rows = []
        for c in self.choices:
            export = "dense"
            if c.exported:
                export = c.layout + (f" {c.blocksize[0]}x{c.blocksize[1]}" if c.blocksize else "")
            zeros = "—"
            if c.zero_fraction is not None:
                zeros = f"{c.zero_fraction:.0%} ({c.nonzero_blocks}/{c.num_blocks} kept)"
            rows.append((c.name, c.type_name, export, zeros, c.index_dtype or "", c.reason))
        return text_table(("layer", "type", "export", "zero blocks", "indices", "why dense / note"), rows)

    def __str__(self) -> str:
        return self.format()


_MHA_OUT_PROJ = (
    "MultiheadAttention never calls out_proj: it passes out_proj.weight to its fused inference kernel (no sparse "
    "support) or to F.linear (slower than dense with a sparse weight)"
)


def _no_kernel(module: nn.Module, param_name: str) -> str:
    type_name = type(module).__name__
    if isinstance(module, nn.MultiheadAttention):
        return f"no sparse kernel: MultiheadAttention passes {param_name} to its fused attention"
    if isinstance(module, nn.Embedding):
        return "no sparse kernel for Embedding (a table lookup, not a product)"
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return f"no sparse kernel for {type_name} (torch.sparse has no convolution)"
    return f"no sparse kernel for {type_name}"


# --- export --------------------------------------------------------------------------------------------
def _matches(name: str, patterns: Sequence[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)


def to_block_sparse(
    model: nn.Module,
    block_size: BlockSize,
    min_sparsity: float = 0.5,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layout: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    inplace: bool = False,
    sample_batch: int | None = None,
) -> nn.Module:
    """Replace the block-sparse linear layers of a committed model with :class:`BlockSparseLinear`.

    ``nn.Linear`` (and subclasses that keep its forward) and Hugging Face ``Conv1D`` layers are exported;
    convolutions, embeddings and ``nn.MultiheadAttention``'s projections stay dense (torch has no faster sparse
    kernel for them, or MultiheadAttention would not use it). The returned model's ``block_sparse_summary``
    (an :class:`ExportSummary`, also logged at INFO on ``sapp_lightning.export``) lists every weight: layout,
    blocksize, nonzero blocks and index dtype, or why it stayed dense.

    Args:
        model: a model whose pruning was committed (``trainer.fit`` returned, or ``BlockPruning.commit()``);
            a layer still carrying a parametrization (masks, SA++'s attention) is refused.
        block_size: the block size the model was pruned with (``(fan_in, fan_out)`` as in ``BlockPruning``).
        min_sparsity: a layer is exported only when at least this fraction of its blocks are all zero.
        include / exclude: regular expressions searched in module names (as in ``BlockPruning``).
        layout: ``"auto"`` follows :func:`layout_rule` for ``batch_size`` (BSR, CSR, or dense where neither is
            expected to beat dense); ``"bsr"`` or ``"csr"`` force that layout on every sparse-enough layer
            (``"bsr"`` needs blocks that tile the weight).
        batch_size: rows each layer will multiply per call, for ``layout="auto"``: the batch, times the
            sequence length for token inputs (a ViT on one image: 197). Default 32.
        inplace: change ``model`` itself instead of a deep copy.
        sample_batch: the former name of ``batch_size`` (``auto`` used to time the layouts at export).

    Returns:
        The model with its sparse layers replaced (for inference: the sparse modules have no gradients), with
        the summary as its ``block_sparse_summary`` attribute.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Conv1d(1, 1, 3))
        >>> with torch.no_grad():
        ...     net[0].weight[16:] = 0  # 1 of 4 rows of blocks of 16 kept: 75% zero blocks
        ...     net[0].weight[:, 16:] = 0  # and 1 of 4 columns: 94%
        >>> for batch in (1, 64):
        ...     summary = to_block_sparse(net, block_size=16, batch_size=batch).block_sparse_summary
        ...     for c in summary.choices:
        ...         print(batch, c.name, c.layout, c.reason)
        1 0 bsr batch 1, blocks of 16+: BSR
        1 2 None no sparse kernel for Conv1d (torch.sparse has no convolution)
        64 0 csr batch 64: CSR
        64 2 None no sparse kernel for Conv1d (torch.sparse has no convolution)
    """
    if sample_batch is not None:
        warnings.warn("to_block_sparse: sample_batch is now batch_size", DeprecationWarning, stacklevel=2)
        batch_size = sample_batch
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
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
    out_projs = {id(m.out_proj) for m in target.modules() if isinstance(m, nn.MultiheadAttention)}
    asked = _Asked(block, min_sparsity, includes, excludes, layout, batch_size, parameter_owners(target), out_projs)
    choices = []
    for name, module in list(target.named_modules()):
        for param_name, _ in weight_kinds(module):
            label = name if param_name == "weight" else f"{name}.{param_name}"
            choice = _choose(name, label, module, param_name, asked)
            if choice.exported:
                sparse = BlockSparseLinear.from_linear(module, choice.layout, choice.blocksize)
                _set_submodule(target, name, sparse)
                choice = dataclasses.replace(choice, index_dtype=str(sparse.weight.crow_indices().dtype)[6:])
            choices.append(choice)
    summary = ExportSummary(tuple(choices), batch_size, block)
    target.block_sparse_summary = summary
    log.info("to_block_sparse (block %s, batch %d):\n%s", block, batch_size, summary.format())
    if not summary.exported:
        warnings.warn(
            f"to_block_sparse: no nn.Linear layer (nor Conv1D) became block-sparse with blocks {block} at batch "
            f"{batch_size}; the model is unchanged (was it pruned with this block size, and committed?):\n"
            + summary.format(),
            stacklevel=2,
        )
    return target


@dataclass(frozen=True)
class _Asked:
    """The arguments of one :func:`to_block_sparse` call, and what it found out about the model."""

    block: tuple[int, int]
    min_sparsity: float
    includes: Sequence[re.Pattern]
    excludes: Sequence[re.Pattern]
    layout: str
    batch_size: int
    owners: dict[int, list[str]]  # parameter id -> every module.param name holding it (ties)
    out_projs: set[int]  # ids of nn.MultiheadAttention's out_proj modules


def _block_counts(module: nn.Module, param_name: str, block: tuple[int, int]) -> dict[str, int]:
    """``nonzero_blocks`` and ``num_blocks`` of a weight that has a block grid (none for depthwise convolutions)."""
    kind = "linear" if isinstance(module, nn.MultiheadAttention) else kernel_kind(module)
    weight = getattr(module, param_name)
    if kind is None or weight.dtype.is_complex:
        return {}
    grid = BlockLayout(kind, tuple(weight.shape), block)
    with torch.no_grad():
        kept = int((grid.block_sq_norms(weight.detach()) != 0).sum())
    return {"nonzero_blocks": kept, "num_blocks": grid.num_blocks}


def _choose(name: str, label: str, module: nn.Module, param_name: str, asked: _Asked) -> ExportChoice:
    block, min_sparsity, layout = asked.block, asked.min_sparsity, asked.layout
    type_name = type(module).__name__
    counts = _block_counts(module, param_name, block)  # shown for the layers that stay dense too

    def dense(why: str) -> ExportChoice:
        return ExportChoice(label, type_name, None, why, **counts)

    hf = is_hf_conv1d(module)
    if id(module) in asked.out_projs:
        return dense(_MHA_OUT_PROJ)
    if not (isinstance(module, nn.Linear) or hf):
        return dense(_no_kernel(module, param_name))
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        return dense(f"{type_name} overrides nn.Linear.forward")
    if asked.includes and not _matches(name, asked.includes):
        return dense("not included")
    if _matches(name, asked.excludes):
        return dense("excluded")
    weight = module.weight
    if weight.device.type == "cpu" and weight.dtype not in (torch.float32, torch.float64):
        return dense(f"{weight.dtype}: torch's CPU sparse kernels take float32/64")
    tied = [o for o in asked.owners.get(id(weight), []) if o != f"{label}.weight"]
    if tied:
        return dense(f"tied with {', '.join(tied)}")
    zero = 1.0 - counts["nonzero_blocks"] / counts["num_blocks"]
    matrix_shape = tuple(weight.shape[::-1] if hf else weight.shape)  # out x in
    blocksize = _bsr_blocksize(matrix_shape, block)
    if zero < min_sparsity:
        return dense(f"{zero:.1%} zero blocks, under min_sparsity={min_sparsity:.0%}")
    if layout == "bsr" and blocksize is None:
        raise ValueError(
            f"layout 'bsr' needs blocks that tile the weight: {label} is {matrix_shape} (out x in), not "
            f"a multiple of {(block[1], block[0])}; use layout='csr' or 'auto'"
        )
    if layout == "auto":
        chosen, why = layout_rule(asked.batch_size, blocksize, zero)
    else:
        chosen, why = layout, f"layout={layout!r} asked"
    if chosen is None:
        return dense(why)
    return ExportChoice(label, type_name, chosen, why, blocksize if chosen == "bsr" else None, **counts)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise ValueError("to_block_sparse exports layers inside a model, not a bare nn.Linear; wrap it")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


# --- storage -------------------------------------------------------------------------------------------
def save_block_sparse(model: nn.Module, path: str | Path) -> None:
    """Save an exported model: the sparse layers as index/value tensors, everything else as its state_dict.

    Indices are stored in the smallest integer type that holds them (uint8, int16, int32, int64; at 90% of 16x16
    blocks a 1024x1024 BSR layer's column indices are uint8, a CSR layer's int16). The file holds tensors only
    (``torch.load(weights_only=True)`` reads it); :func:`load_block_sparse` rebuilds the model into a fresh
    instance of the architecture.
    """
    sparse = {name: m.parts() for name, m in model.named_modules() if isinstance(m, BlockSparseLinear)}
    if not sparse:
        raise ValueError("the model has no BlockSparseLinear layer; export it with to_block_sparse first")
    torch.save({"format": FORMAT, "sparse_layers": sparse, "state_dict": model.state_dict()}, str(path))


def _linear_shape(module: nn.Module) -> tuple[list[int | None], str | None]:
    """``([out, in], source)`` of a linear layer of the model, or ``([None, None], None)``."""
    if isinstance(module, BlockSparseLinear):
        return [module.out_features, module.in_features], module.source
    if is_hf_conv1d(module):
        return [module.weight.shape[1], module.weight.shape[0]], "hf_conv1d"
    if isinstance(module, nn.Linear):
        return [module.out_features, module.in_features], "linear"
    return [None, None], None


def load_block_sparse(path: str | Path, model: nn.Module, map_location: Any = "cpu") -> nn.Module:
    """Load a file of :func:`save_block_sparse` into ``model``, a fresh (dense) instance of the architecture.

    Each stored sparse layer replaces the ``nn.Linear`` or ``Conv1D`` of the same name (its type and shape must
    match), with int32 indices in memory, then the rest of the state is loaded strictly. Returns ``model``,
    changed in place.
    """
    saved = torch.load(str(path), map_location=map_location, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") not in _READABLE_FORMATS:
        raise ValueError(f"{path} is not a block-sparse model saved by save_block_sparse (format {FORMAT})")
    for name, parts in saved["sparse_layers"].items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r}, which {path} stores as block-sparse") from None
        shape, source = _linear_shape(current)
        if shape != list(parts["shape"]) or source != parts.get("source", "linear"):
            kind = "Conv1D" if parts.get("source") == "hf_conv1d" else "linear"
            raise ValueError(
                f"layer {name!r} of the model is {current.__class__.__name__} {shape}, but {path} stores a "
                f"{parts['shape'][0]} x {parts['shape'][1]} {kind} layer there: build the same architecture"
            )
        _set_submodule(model, name, BlockSparseLinear.from_parts(parts))
    model.load_state_dict(saved["state_dict"], strict=True)
    return model
