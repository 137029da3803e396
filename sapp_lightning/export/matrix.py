"""A kernel matrix with its all-zero blocks dropped, and the products over it on each device.

:class:`BlockSparseMatrix` holds the ``fan_in x fan_out`` kernel matrix of a pruned weight (the paper's orientation,
:class:`~sapp_lightning.blocks.BlockLayout`) in one of three forms, its ``kernel``:

* ``"own"``: packed once for this project's CPU kernel (:mod:`.kernels`): the nonzero blocks block column by block
  column (the order the kernel visits them), ``int32`` indices, each block's values contiguous and its columns
  padded to a multiple of 8. Without the compiled kernel, on another device or in another dtype the same matrix runs
  through ``torch.sparse`` (a CSR copy made once, with one warning), on CUDA through torch's Triton BSR kernel.
* ``"bsr"`` / ``"csr"``: a ``torch.sparse`` matrix of the ``fan_out x fan_in`` weight, multiplied with
  ``torch.sparse.mm`` (MKL on CPU), as before this project had its own kernel.

Example:
    >>> import torch
    >>> kernel = torch.randn(40, 24) * (torch.rand(5, 3) > 0.5).repeat_interleave(8, 0).repeat_interleave(8, 1)
    >>> matrix = BlockSparseMatrix.from_kernel(kernel, (8, 8), "own")
    >>> matrix.num_blocks, matrix.nonzero_blocks == int((kernel.reshape(5, 8, 3, 8).abs().sum((1, 3)) > 0).sum())
    (15, True)
    >>> x = torch.randn(3, 40)
    >>> torch.testing.assert_close(matrix.mm(x), x @ kernel)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import BlockLayout
from ..report import measure_layer
from . import kernels

KERNELS = ("own", "bsr", "csr")
BSR_PAD = 16  # MKL's BSR product is fast only for a multiple of 16 right-hand columns (batch rows): pad to it
BSR_UNPADDED_ROWS = 4  # ... except up to 4 rows with blocks of 16+, where its unpadded kernel is faster still
BIG_BLOCK = 16
_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)  # candidates for a saved file, smallest first
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _fits(dtype: torch.dtype, value: int) -> bool:
    return value <= (255 if dtype == torch.uint8 else torch.iinfo(dtype).max)


def smallest_index_dtype(indices: Tensor) -> torch.dtype:
    """The smallest integer type holding every value of ``indices`` (never negative): what a saved file uses."""
    largest = int(indices.max()) if indices.numel() else 0
    return next(dtype for dtype in _INDEX_DTYPES if _fits(dtype, largest))


def _compact(t: Tensor) -> Tensor:
    """``t`` with a storage of its own size: ``torch.save`` writes whole storages."""
    if t.storage_offset() == 0 and t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


class BlockSparseMatrix(nn.Module):
    """The kernel matrix ``K`` (``fan_in x fan_out``) of a block-sparse weight; :meth:`mm` computes ``x @ K + b``.

    Build one with :meth:`from_kernel`. Its tensors are non-persistent buffers (``.to(device)`` moves them; a model's
    ``state_dict`` leaves them out and :func:`~sapp_lightning.export.save_block_sparse` stores :meth:`parts`).
    Inference only: no gradient flows back through :meth:`mm` on the ``"own"`` kernel.
    """

    def __init__(self, fan_in: int, fan_out: int, block: Sequence[int], kernel: str, tensors: dict[str, Tensor]):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
        self.fan_in, self.fan_out, self.block, self.kernel = int(fan_in), int(fan_out), tuple(block), kernel
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)
        self._copies: dict[tuple, Tensor] = {}  # the same matrix for torch.sparse or Triton, made on first use

    # --- building ------------------------------------------------------------------------------------------
    @classmethod
    def from_kernel(cls, kernel_matrix: Tensor, block: Sequence[int], kernel: str = "own") -> BlockSparseMatrix:
        """Drop the all-zero ``block = (rows, cols)`` blocks of ``kernel_matrix`` (``fan_in x fan_out``).

        A block is kept when any of its entries is nonzero, so the product is exact. ``"bsr"`` needs blocks that
        tile the matrix.
        """
        kernel_matrix = kernel_matrix.detach()
        fan_in, fan_out = kernel_matrix.shape
        r, c = int(block[0]), int(block[1])
        if kernel == "own":
            return cls(fan_in, fan_out, (r, c), kernel, _pack(kernel_matrix, r, c))
        weight = kernel_matrix.t().contiguous()
        if kernel == "bsr":
            if fan_in % r or fan_out % c or r != c:
                raise ValueError(f"a BSR matrix needs square blocks that tile it: {fan_out} x {fan_in} by {c} x {r}")
            sparse = weight.to_sparse_bsr((c, r))
        elif kernel == "csr":
            sparse = weight.to_sparse_csr()
        else:
            raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
        return cls(fan_in, fan_out, (r, c), kernel, {"weight": _torch_sparse(sparse, check=False)})

    # --- what it holds ---------------------------------------------------------------------------------------
    @property
    def grid_shape(self) -> tuple[int, int]:
        return math.ceil(self.fan_in / self.block[0]), math.ceil(self.fan_out / self.block[1])

    @property
    def num_blocks(self) -> int:
        rows, cols = self.grid_shape
        return rows * cols

    @property
    def nonzero_blocks(self) -> int:
        if self.kernel == "own":
            return int(self.rows.numel())
        if self.kernel == "bsr":
            return int(self.weight.values().shape[0])
        kernel_matrix = self.to_dense()
        layer = measure_layer("", kernel_matrix, BlockLayout("hf_conv1d", tuple(kernel_matrix.shape), self.block))
        return layer.num_blocks - layer.zero_blocks

    @property
    def index_dtype(self) -> torch.dtype:
        return self.rows.dtype if self.kernel == "own" else self.weight.crow_indices().dtype

    def to_dense(self) -> Tensor:
        """The ``fan_in x fan_out`` kernel matrix, zeros included."""
        if self.kernel != "own":
            return self.weight.to_dense().t()
        r, c = self.block
        rows, cols = self.grid_shape
        out = self.values.new_zeros(cols, rows, r, c)
        panel = torch.repeat_interleave(torch.arange(cols, device=self.ptr.device), self.ptr.long().diff())
        out[panel, self.rows.long()] = self.values[:, :, :c]
        return out.permute(1, 2, 0, 3).reshape(rows * r, cols * c)[: self.fan_in, : self.fan_out]

    # --- the product ---------------------------------------------------------------------------------------------
    def mm(self, x: Tensor, bias: Tensor | None = None, columns: tuple[int, int] | None = None) -> Tensor:
        """``x @ K[:, start:stop] + bias`` for ``x`` of ``rows x fan_in``; ``columns = (start, stop)`` (block
        aligned on the ``"own"`` kernel) computes a slice of the outputs (one of Q, K and V of an attention)."""
        call = self.__dict__.get("_call")
        if call is not None and columns is None and x.device.type == "cpu" and x.dtype == torch.float32:
            # the common case in as few Python steps as possible: at 1 row the product itself takes microseconds
            if x.requires_grad:
                x = self._detached(x)
            return call[0](x.contiguous(), call[1], call[2], call[3], bias, *call[4:])
        if self.kernel == "own" and x.device.type == "cpu" and x.dtype == torch.float32:
            ext = kernels.extension()
            if ext is not None:
                args = (self.fan_in, self.fan_out, self.block[0], self.block[1], True)
                self.__dict__["_call"] = (ext.linear, self.ptr, self.rows, self.values, *args)
                return self._own_mm(ext, x, bias, columns)
            _warn_once("no-kernel", "BlockSparseMatrix: the CPU kernel is not built; products use torch.sparse (CSR)")
        start, stop = columns or (0, self.fan_out)
        if self.kernel == "own" and x.device.type != "cpu":
            y = self._gpu_mm(x)
        elif self.kernel == "own":
            y = _sparse_mm(self._copy("csr", x), x, None)
        else:
            y = _sparse_mm(self.weight, x, self.block)
        y = y if columns is None else y[:, start:stop]
        return y if bias is None else y + bias

    @staticmethod
    def _detached(x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            _warn_once("grad", "block-sparse layers are for inference: no gradient flows back through them")
        return x.detach()

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), ...: new buffers, so a new call tuple on next use
        self.__dict__.pop("_call", None)
        self._copies.clear()
        return super()._apply(fn, recurse)

    def _own_mm(self, ext: Any, x: Tensor, bias: Tensor | None, columns: tuple[int, int] | None) -> Tensor:
        if x.requires_grad:
            x = self._detached(x)
        ptr, width = self.ptr, self.fan_out
        if columns is not None:
            start, stop = columns
            c = self.block[1]
            if start % c or (stop % c and stop != self.fan_out):
                raise ValueError(f"columns {columns} do not follow the matrix's blocks of {c} columns")
            ptr, width = ptr[start // c : math.ceil(stop / c) + 1], stop - start
        x = x.contiguous()
        bias = None if bias is None else bias.detach().contiguous()
        return ext.linear(x, ptr, self.rows, self.values, bias, self.fan_in, width, *self.block, True)

    def conv(self, x: Tensor, bias: Tensor | None, geometry: dict[str, tuple[int, int]]) -> Tensor:
        """A convolution with this matrix as its kernel: ``x`` is ``(B, H, W, C)`` (channels-last, contiguous);
        returns ``(B, OH, OW, fan_out)``. ``geometry`` holds ``kernel_size``, ``stride``, ``padding``,
        ``dilation``."""
        if self.kernel == "own" and x.device.type == "cpu" and x.dtype == torch.float32:
            ext = kernels.extension()
            if ext is not None:
                g = geometry
                bias = None if bias is None else bias.detach().contiguous()
                args = (self.fan_in, self.fan_out, self.block[0], self.block[1])
                return ext.conv(x.detach().contiguous(), self.ptr, self.rows, self.values, bias, *args,
                                list(g["kernel_size"]), list(g["stride"]), list(g["padding"]), list(g["dilation"]),
                                True)  # fmt: skip
        cols = im2col(x, **geometry)
        batch, out_h, out_w, _ = cols.shape
        return self.mm(cols.reshape(-1, self.fan_in), bias).reshape(batch, out_h, out_w, self.fan_out)

    def torch_sparse(self) -> Tensor:
        """The ``fan_out x fan_in`` weight as a ``torch.sparse`` CSR tensor (a copy for the ``"own"`` kernel)."""
        return self.weight if self.kernel != "own" else self._copy("csr", self.values)

    def _copy(self, layout: str, like: Tensor) -> Tensor:
        """This ``"own"`` matrix as a torch.sparse weight (``fan_out x fan_in``) on ``like``'s device and dtype."""
        key = (layout, like.device, like.dtype)
        if key not in self._copies:
            weight = self.to_dense().t().to(device=like.device, dtype=like.dtype).contiguous()
            r, c = self.block
            sparse = weight.to_sparse_bsr((c, r)) if layout == "bsr" else weight.to_sparse_csr()
            self._copies[key] = _torch_sparse(sparse, check=False)
        return self._copies[key]

    def _gpu_mm(self, x: Tensor) -> Tensor:
        """On a GPU: torch's Triton ``bsr_dense_mm`` where the blocks allow it (both sides powers of 2 of 16 or
        more, tiling the matrix), else ``torch.sparse.mm`` on a CSR copy (cuSPARSE)."""
        r, c = self.block
        pow2 = all(side >= BIG_BLOCK and side & (side - 1) == 0 for side in (r, c))
        if pow2 and not (self.fan_in % r or self.fan_out % c) and x.dtype in (torch.float16, torch.bfloat16,
                                                                               torch.float32):  # fmt: skip
            try:
                from torch.sparse._triton_ops import bsr_dense_mm
            except ImportError:  # no Triton
                bsr_dense_mm = None
            if bsr_dense_mm is not None:
                rows = x.shape[0]
                padded = x.new_zeros(self.fan_in, rows + (-rows) % BSR_PAD)  # Triton wants columns in 16s
                padded[:, :rows] = x.t()
                return bsr_dense_mm(self._copy("bsr", x), padded)[:, :rows].t()
        return torch.sparse.mm(self._copy("csr", x), x.t()).t()

    # --- storage -------------------------------------------------------------------------------------------------
    def parts(self) -> dict[str, Any]:
        """Plain tensors that rebuild this matrix (``torch.load(weights_only=True)`` reads them), indices in the
        smallest integer type that holds them, an ``"own"`` matrix's values without their column padding."""
        out: dict[str, Any] = {"kernel": self.kernel, "fan_in": self.fan_in, "fan_out": self.fan_out}
        out["block"] = list(self.block)
        if self.kernel == "own":
            out["ptr"] = self.ptr.to(smallest_index_dtype(self.ptr)).clone()
            out["rows"] = self.rows.to(smallest_index_dtype(self.rows)).clone()
            out["values"] = self.values[:, :, : self.block[1]].contiguous()
        else:
            crow, col = self.weight.crow_indices(), self.weight.col_indices()
            out["crow_indices"] = crow.to(smallest_index_dtype(crow)).clone()
            out["col_indices"] = col.to(smallest_index_dtype(col)).clone()
            out["values"] = _compact(self.weight.values())
        return out

    @classmethod
    def from_parts(cls, parts: dict[str, Any]) -> BlockSparseMatrix:
        fan_in, fan_out, block, kernel = parts["fan_in"], parts["fan_out"], parts["block"], parts["kernel"]
        if kernel == "own":
            r, c = block
            ptr, rows, values = parts["ptr"].to(torch.int32), parts["rows"].to(torch.int32), parts["values"]
            panels = math.ceil(fan_out / c)
            ok = ptr.shape == (panels + 1,) and values.shape == (rows.numel(), r, c) and int(ptr[-1]) == rows.numel()
            if not ok or (rows.numel() and int(rows.max()) >= math.ceil(fan_in / r)):
                raise ValueError(f"damaged block-sparse matrix: {panels} block columns, {rows.numel()} blocks")
            values = F.pad(values, (0, (-c) % 8)).contiguous()
            return cls(fan_in, fan_out, block, kernel, {"ptr": ptr, "rows": rows, "values": values})
        sparse = _sparse_from(parts["crow_indices"], parts["col_indices"], parts["values"], (fan_out, fan_in), kernel)
        return cls(fan_in, fan_out, block, kernel, {"weight": sparse})

    def extra_repr(self) -> str:
        return (
            f"fan_in={self.fan_in}, fan_out={self.fan_out}, kernel={self.kernel}, block={self.block}, "
            f"nonzero_blocks={self.nonzero_blocks}/{self.num_blocks}"
        )


def _pack(kernel_matrix: Tensor, r: int, c: int) -> dict[str, Tensor]:
    """The own kernel's layout: ``ptr`` (block columns + 1), ``rows`` (block row of each kept block, ascending in
    each block column), ``values`` (kept blocks ``r x cp``, ``cp`` = ``c`` rounded up to 8, zero padded)."""
    fan_in, fan_out = kernel_matrix.shape
    layout = BlockLayout("hf_conv1d", (fan_in, fan_out), (r, c))  # the kind whose kernel matrix is the weight
    rows, cols = layout.grid_shape
    padded = F.pad(kernel_matrix, (0, cols * c - fan_out, 0, rows * r - fan_in))
    blocks = padded.reshape(rows, r, cols, c).permute(2, 0, 1, 3)  # block column, block row, r, c
    with torch.no_grad():  # the zero blocks are those report.measure_layer counts: a block whose squares sum to 0
        kept = (layout.block_sq_norms(kernel_matrix) != 0).t()
    ptr = torch.zeros(cols + 1, dtype=torch.int32, device=kernel_matrix.device)
    ptr[1:] = kept.sum(1).cumsum(0)
    block_rows = kept.nonzero()[:, 1].to(torch.int32).contiguous()  # row-major: block column by block column
    values = F.pad(blocks[kept], (0, (-c) % 8)).contiguous()
    return {"ptr": ptr, "rows": block_rows, "values": values}


def _torch_sparse(sparse: Tensor, check: bool) -> Tensor:
    """``sparse`` with int32 indices (MKL's own: int64 ones are converted on every product) in compact storages."""
    crow, col = sparse.crow_indices(), sparse.col_indices()
    layout = "bsr" if sparse.layout == torch.sparse_bsr else "csr"
    return _sparse_from(crow, col, _compact(sparse.values()), tuple(sparse.shape), layout, check)


def _sparse_from(crow: Tensor, col: Tensor, values: Tensor, shape: Sequence[int], layout: str, check=True) -> Tensor:
    build = torch.sparse_bsr_tensor if layout == "bsr" else torch.sparse_csr_tensor
    largest = max(int(crow[-1]) if crow.numel() else 0, *shape)
    dtype = torch.int32 if _fits(torch.int32, largest) else torch.int64
    return build(crow.to(dtype), col.to(dtype), values, size=tuple(shape), check_invariants=check)


def _sparse_mm(weight: Tensor, x: Tensor, block: tuple[int, int] | None) -> Tensor:
    """``x @ weight.T`` with ``torch.sparse.mm`` (the sparse matrix on the left: the fast CPU form)."""
    rows = x.shape[0]
    bsr = weight.layout == torch.sparse_bsr
    pad = bsr and rows % BSR_PAD and weight.device.type == "cpu"
    if pad and (rows > BSR_UNPADDED_ROWS or min(weight.values().shape[1:]) < BIG_BLOCK):
        # MKL's BSR kernel is 3-100x slower when the column count is not a multiple of 16: pad with zeros
        padded = x.new_zeros(weight.shape[1], rows + BSR_PAD - rows % BSR_PAD)
        padded[:, :rows] = x.t()
        return torch.sparse.mm(weight, padded)[:, :rows].t()
    return torch.sparse.mm(weight, x.t().contiguous()).t()


def im2col(
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """A convolution's input rows in the kernel matrix's order: ``x`` ``(B, H, W, C)`` to ``(B, OH, OW, kh*kw*C)``
    (taps row-major, channels inside a tap). A copy ``kh * kw`` times the input: only the torch.sparse path uses it.

    Example:
        >>> x = torch.arange(2 * 3 * 3 * 1.0).reshape(2, 3, 3, 1)
        >>> im2col(x, (2, 2), (1, 1), (0, 0), (1, 1))[0, 0, 0].tolist()
        [0.0, 1.0, 3.0, 4.0]
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    batch, height, width, _ = x.shape
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = F.pad(x, (0, 0, pw, pw, ph, ph))
    taps = [
        xp[:, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return torch.stack(taps, dim=3).reshape(batch, out_h, out_w, -1)
