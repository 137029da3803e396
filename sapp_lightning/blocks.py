"""How a weight tensor is seen as a kernel matrix and cut into blocks.

Pure torch, no Lightning. Blocks live in the paper's orientation: the *kernel matrix* is
``fan_in x fan_out`` (TensorFlow's ``y = x @ W``):

* ``nn.Linear``: ``kernel = weight.T``
* ``nn.Conv2d``: ``kernel = weight.permute(2, 3, 1, 0).reshape(kh * kw * cin, cout)``
* ``nn.Conv1d``: the same with ``kh = 1``: ``weight.permute(2, 1, 0).reshape(k * cin, cout)``
* Hugging Face ``Conv1D`` (GPT-2's attention and MLP): ``kernel = weight``, already stored ``(in, out)``
* ``nn.Embedding``: ``kernel = weight`` (rows are table entries)

A block size ``(rows, cols)`` tiles the kernel; where it does not divide a dimension the edge
blocks are smaller and each still counts as one block (SPEC section 2.3).

Example:
    >>> import torch
    >>> layout = BlockLayout.for_weight(torch.nn.Linear(390, 400).weight, block_size=20)
    >>> layout.grid_shape, layout.num_blocks
    ((20, 20), 400)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from . import fused

KernelKind = Literal["linear", "conv2d", "conv1d", "hf_conv1d", "embedding"]
_KERNEL_IS_WEIGHT = ("embedding", "hf_conv1d")  # kinds whose weight is stored fan_in x fan_out already
_CONV = ("conv2d", "conv1d")
BlockSize = int | tuple[int, int]


def normalize_block_size(block_size: BlockSize) -> tuple[int, int]:
    """Return ``(rows, cols)`` for an int or a pair, raising ``ValueError`` when below 1."""
    if isinstance(block_size, bool):
        raise ValueError(f"block_size must be an int or a (rows, cols) pair of ints >= 1, got {block_size!r}")
    if isinstance(block_size, int):
        pair = (block_size, block_size)
    else:
        try:
            pair = tuple(int(v) for v in block_size)
        except TypeError:
            raise ValueError(
                f"block_size must be an int or a (rows, cols) pair of ints >= 1, got {block_size!r}"
            ) from None
        if len(pair) != 2 or any(float(v) != float(orig) for v, orig in zip(pair, block_size)):
            raise ValueError(f"block_size must be an int or a (rows, cols) pair of ints >= 1, got {block_size!r}")
    if min(pair) < 1:
        raise ValueError(f"block_size must be >= 1 in both dimensions, got {block_size!r}")
    return pair  # type: ignore[return-value]


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (a linear layer storing its weight ``(in, out)``),
    recognised without importing ``transformers``."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(weight, "dim", lambda: 0)() == 2


def kernel_kind(module: nn.Module) -> KernelKind | None:
    """The kernel layout used for ``module``'s weight, or ``None`` if it cannot be blocked (grouped and
    depthwise convolutions, other types)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "conv2d"
    if isinstance(module, nn.Conv1d) and module.groups == 1:
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if is_hf_conv1d(module):
        return "hf_conv1d"
    return None


@dataclass(frozen=True)
class BlockLayout:
    """The block grid of one weight tensor, in the fan_in x fan_out kernel orientation."""

    kind: KernelKind
    weight_shape: tuple[int, ...]
    block_size: tuple[int, int]

    @classmethod
    def for_weight(cls, weight: Tensor, block_size: BlockSize, kind: KernelKind | None = None) -> BlockLayout:
        """Layout for a weight; ``kind`` defaults to ``linear`` for 2-D, ``conv1d`` for 3-D and ``conv2d`` for 4-D."""
        if kind is None:
            kind = {2: "linear", 3: "conv1d", 4: "conv2d"}.get(weight.dim())
            if kind is None:
                raise ValueError(f"cannot block a {weight.dim()}-D weight; expected 2-D (Linear) or 4-D (Conv2d)")
        return cls(kind, tuple(weight.shape), normalize_block_size(block_size))

    @classmethod
    def for_module(cls, module: nn.Module, block_size: BlockSize) -> BlockLayout:
        kind = kernel_kind(module)
        if kind is None:
            raise ValueError(f"cannot block the weight of {type(module).__name__}")
        return cls(kind, tuple(module.weight.shape), normalize_block_size(block_size))

    # --- shapes -------------------------------------------------------------------------------
    @property
    def conv_dims(self) -> tuple[int, int, int, int]:
        """``(cout, cin, kh, kw)`` of a convolution (``kh = 1`` for Conv1d)."""
        if self.kind == "conv1d":
            cout, cin, k = self.weight_shape
            return cout, cin, 1, k
        cout, cin, kh, kw = self.weight_shape
        return cout, cin, kh, kw

    @property
    def kernel_shape(self) -> tuple[int, int]:
        if self.kind == "linear":
            out_features, in_features = self.weight_shape
            return in_features, out_features
        if self.kind in _CONV:
            cout, cin, kh, kw = self.conv_dims
            return kh * kw * cin, cout
        rows, cols = self.weight_shape
        return rows, cols

    @property
    def grid_shape(self) -> tuple[int, int]:
        (n, m), (r, c) = self.kernel_shape, self.block_size
        return math.ceil(n / r), math.ceil(m / c)

    @property
    def num_blocks(self) -> int:
        gr, gc = self.grid_shape
        return gr * gc

    @property
    def num_weights(self) -> int:
        return math.prod(self.weight_shape)

    def block_weight_counts(self) -> Tensor:
        """Number of weights in each block (edge blocks hold fewer), shape ``grid_shape``."""
        (n, m), (r, c) = self.kernel_shape, self.block_size
        rows = torch.full((self.grid_shape[0],), r, dtype=torch.long)
        cols = torch.full((self.grid_shape[1],), c, dtype=torch.long)
        rows[-1] = n - r * (self.grid_shape[0] - 1)
        cols[-1] = m - c * (self.grid_shape[1] - 1)
        return rows[:, None] * cols[None, :]

    # --- kernel view --------------------------------------------------------------------------
    def to_kernel(self, weight: Tensor) -> Tensor:
        """The fan_in x fan_out kernel matrix of ``weight`` (a view where possible)."""
        if self.kind == "linear":
            return weight.t()
        if self.kind in _CONV:
            cout, cin, kh, kw = self.conv_dims
            return weight.reshape(cout, cin, kh, kw).permute(2, 3, 1, 0).reshape(kh * kw * cin, cout)
        return weight

    def from_kernel(self, kernel: Tensor) -> Tensor:
        """Inverse of :meth:`to_kernel` (a view of ``kernel``)."""
        if self.kind == "linear":
            return kernel.t()
        if self.kind == "conv1d":
            cout, cin, k = self.weight_shape
            return kernel.reshape(k, cin, cout).permute(2, 1, 0)
        if self.kind == "conv2d":
            cout, cin, kh, kw = self.weight_shape
            return kernel.reshape(kh, kw, cin, cout).permute(3, 2, 0, 1)
        return kernel

    # --- block <-> weight ---------------------------------------------------------------------
    def expand(self, per_block: Tensor) -> Tensor:
        """Broadcast one value per block (shape ``grid_shape``) to the weight's shape."""
        (n, m), (r, c) = self.kernel_shape, self.block_size
        kernel = per_block.repeat_interleave(r, dim=0)[:n].repeat_interleave(c, dim=1)[:, :m]
        return self.from_kernel(kernel)

    def block_view(self, weight: Tensor) -> Tensor | None:
        """A view of ``weight`` whose axes 1 and 3 run inside a block (the others index blocks), or ``None``
        when the blocks do not tile the weight exactly or it is not contiguous. Axes: Linear
        ``(gc, c, gr, r)``; Embedding ``(gr, r, gc, c)``; Conv2d ``(gc, c, cin/r, r, kh, kw)``, since with
        ``r | cin`` a block's rows are ``r`` consecutive input channels at one tap."""
        (n, m), (r, c) = self.kernel_shape, self.block_size
        gr, gc = self.grid_shape
        if n % r or m % c or not weight.is_contiguous():
            return None
        if self.kind == "linear":
            return weight.view(gc, c, gr, r)
        if self.kind in _KERNEL_IS_WEIGHT:
            return weight.view(gr, r, gc, c)
        cout, cin, kh, kw = self.conv_dims
        return weight.view(gc, c, cin // r, r, kh, kw) if cin % r == 0 else None

    def grid_to_view(self, per_block: Tensor) -> Tensor:
        """``per_block`` (``grid_shape``) laid out to broadcast over :meth:`block_view`."""
        if self.kind == "linear":
            return per_block.t()[:, None, :, None]
        if self.kind in _KERNEL_IS_WEIGHT:
            return per_block[:, None, :, None]
        cout, cin, kh, kw = self.conv_dims
        grid = per_block.reshape(kh, kw, cin // self.block_size[0], cout // self.block_size[1])
        return grid.permute(3, 2, 0, 1)[:, None, :, None, :, :]

    def view_to_grid(self, reduced: Tensor) -> Tensor:
        """Inverse of :meth:`grid_to_view` for a :meth:`block_view` reduced over axes 1 and 3."""
        if self.kind == "linear":
            return reduced.t()
        if self.kind in _KERNEL_IS_WEIGHT:
            return reduced
        return reduced.permute(2, 3, 1, 0).reshape(self.grid_shape)

    # --- one blocked form for every shape -----------------------------------------------------
    def blocked(self, weight: Tensor) -> tuple[Tensor, bool]:
        """``(blocks, padded)``: a tensor whose axes 1 and 3 run inside a block, for any shape.

        Where the blocks tile ``weight`` this is :meth:`block_view` (no copy, ``padded=False``); otherwise it is
        the kernel matrix zero-padded to whole blocks, a ``(gr, r, gc, c)`` copy (``padded=True``), whose padding
        adds nothing to a block's sums. Differentiable; :meth:`grid_to_blocks` lays a per-block tensor out to
        broadcast over it and :meth:`from_blocks` maps a result back to the weight's shape.

        Example:
            >>> layout = BlockLayout.for_weight(torch.ones(10, 7), block_size=4)  # ragged: 7 = 4 + 3
            >>> blocks, padded = layout.blocked(torch.ones(10, 7))
            >>> tuple(blocks.shape), padded
            ((2, 4, 3, 4), True)
            >>> layout.blocks_to_grid(sum_inside_blocks(blocks), padded).tolist()  # entries per block
            [[16.0, 16.0, 8.0], [12.0, 12.0, 6.0]]
        """
        view = self.block_view(weight)
        if view is not None:
            return view, False
        (n, m), (r, c) = self.kernel_shape, self.block_size
        gr, gc = self.grid_shape
        kernel = self.to_kernel(weight)
        if n % r or m % c:
            kernel = torch.nn.functional.pad(kernel, (0, gc * c - m, 0, gr * r - n))
        return kernel.reshape(gr, r, gc, c), True

    def grid_to_blocks(self, per_block: Tensor, padded: bool) -> Tensor:
        """``per_block`` (``grid_shape``) laid out to broadcast over :meth:`blocked`'s tensor."""
        return per_block[:, None, :, None] if padded else self.grid_to_view(per_block)

    def blocks_to_grid(self, reduced: Tensor, padded: bool) -> Tensor:
        """Inverse of :meth:`grid_to_blocks` for :meth:`blocked`'s tensor reduced over axes 1 and 3."""
        return reduced if padded else self.view_to_grid(reduced)

    def from_blocks(self, blocks: Tensor, padded: bool) -> Tensor:
        """Inverse of :meth:`blocked`: ``blocks`` (same shape) back in the weight's shape."""
        if not padded:
            return blocks.view(self.weight_shape)
        (n, m), (r, c) = self.kernel_shape, self.block_size
        gr, gc = self.grid_shape
        weight = self.from_kernel(blocks.reshape(gr * r, gc * c)[:n, :m])
        return weight.contiguous() if self.kind == "conv2d" else weight  # conv needs it; F.linear takes a .t()

    def scale(self, weight: Tensor, per_block: Tensor) -> Tensor:
        """``weight * expand(per_block)``, without materializing the expansion when blocks tile exactly.

        Differentiable in both arguments; when ``per_block`` needs a gradient (attention, block norms) the
        backward sums inside blocks in a cache-friendly order (see :class:`_ScaleBlocks`).
        """
        per_block = per_block.to(weight.dtype)
        view = self.block_view(weight)
        if view is None:
            return weight * self.expand(per_block)
        grid = self.grid_to_view(per_block)
        if per_block.requires_grad and torch.is_grad_enabled():
            return _ScaleBlocks.apply(view, grid).view(self.weight_shape)
        return (view * spread_over_taps(grid, view)).view(self.weight_shape)

    def scale_(self, weight: Tensor, per_block: Tensor) -> Tensor:
        """In-place :meth:`scale`: ``weight *= expand(per_block)``."""
        per_block = per_block.to(weight.dtype)
        view = self.block_view(weight)
        if view is None:
            return weight.mul_(self.expand(per_block))
        view.mul_(spread_over_taps(self.grid_to_view(per_block), view))
        return weight

    def block_sq_norms(self, weight: Tensor) -> Tensor:
        """Squared Frobenius norm of each block, shape ``grid_shape``, in float32 or wider."""
        if weight.dtype in (torch.float16, torch.bfloat16):
            weight = weight.float()
        view = self.block_view(weight)
        if view is not None:  # no permuted copy, no padding (PowerPropagation computes this every forward)
            return self.view_to_grid(sum_inside_blocks(view.square()))
        (n, m), (r, c) = self.kernel_shape, self.block_size
        gr, gc = self.grid_shape
        sq = self.to_kernel(weight).square()
        if n % r or m % c:
            sq = torch.nn.functional.pad(sq, (0, gc * c - m, 0, gr * r - n))
        return sq.reshape(gr, r, gc, c).sum(dim=(1, 3))

    def block_norms(self, weight: Tensor) -> Tensor:
        """Frobenius norm of each block, shape ``grid_shape``."""
        return self.block_sq_norms(weight).sqrt()


def sum_inside_blocks(view: Tensor, keepdim: bool = False) -> Tensor:
    """Sum a :meth:`BlockLayout.block_view` over its in-block axes 1 and 3.

    Axis 1 first: it strides over whole rows, so that reduction reads memory in order, and what is left for
    axis 3 is ``1 / c`` of the tensor. ``sum(dim=(1, 3))`` in one call is 3-4x slower on CPU.
    """
    return view.sum(1, keepdim=True).sum(3, keepdim=True) if keepdim else view.sum(1).sum(2)


def block_sq_sums(blocks: Tensor) -> Tensor:
    """Sum of squares of each block of a :meth:`BlockLayout.blocked` tensor, keeping the reduced axes.

    One read of the weight where the last axis is contiguous inside a block (a Linear view or a padded copy):
    ``vector_norm`` over it, squared back (1/r of the size), then summed over axis 1; squaring the whole tensor
    first costs a full-size write and read more. Conv views keep :func:`sum_inside_blocks` of the squares.
    """
    if blocks.dim() == 4 and blocks.stride(3) == 1:
        return torch.linalg.vector_norm(blocks, dim=3, keepdim=True).square_().sum(1, keepdim=True)
    return sum_inside_blocks(blocks.square(), keepdim=True)


def spread_over_taps(grid: Tensor, view: Tensor) -> Tensor:
    """``grid`` (from :meth:`BlockLayout.grid_to_view`) repeated over a conv view's in-block axis 3.

    A conv weight is stored ``(cout, cin, kh, kw)``, so its block factor changes every ``kh * kw`` elements
    and a broadcast multiply runs in 9-element pieces: 4-7x slower than a plain multiply for 3x3 kernels.
    Materializing the grid over the ``r`` input channels of a block (``1 / c`` of the weight's size) leaves
    one broadcast axis with ``r * kh * kw`` contiguous elements. Linear and 1x1 grids are returned as they are.

    Example:
        >>> layout = BlockLayout.for_weight(torch.zeros(32, 64, 3, 3), block_size=16)
        >>> view = layout.block_view(torch.zeros(32, 64, 3, 3))
        >>> grid = layout.grid_to_view(torch.ones(layout.grid_shape))
        >>> tuple(grid.shape), tuple(spread_over_taps(grid, view).shape)
        ((2, 1, 4, 1, 3, 3), (2, 1, 4, 16, 3, 3))
    """
    if view.dim() != 6 or view.shape[4] * view.shape[5] == 1:
        return grid
    shape = list(grid.shape)
    shape[3] = view.shape[3]
    return grid.expand(shape).contiguous()


class _ScaleBlocks(torch.autograd.Function):
    """``view * grid`` for a blocked view and a per-block grid that broadcasts over it.

    Autograd's own backward for the broadcast reduces ``grad * view`` over both in-block axes at once, which
    on CPU costs more than the rest of the scaling together; this one reduces with :func:`sum_inside_blocks`.
    """

    @staticmethod
    def forward(ctx, view: Tensor, grid: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(view, grid)
        return view * spread_over_taps(grid, view)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        view, grid = ctx.saved_tensors
        if all(ctx.needs_input_grad) and fused.active(grad, view, grid):
            both = fused.scale_backward(grad, view, grid)  # one pass for the gradient and the block sums
            if both is not None:
                return both
        factor = spread_over_taps(grid, view)  # recomputed (1 / c of the weight): differentiable for gradgrad
        if not ctx.needs_input_grad[1]:
            return grad * factor, None
        product = grad * view
        grad_grid = sum_inside_blocks(product, keepdim=True)
        if not ctx.needs_input_grad[0]:
            return None, grad_grid
        if torch.is_grad_enabled():  # create_graph=True: no out= (it is not differentiable)
            return grad * factor, grad_grid
        return torch.mul(grad, factor, out=product), grad_grid  # one full-size buffer for both


def keep_count(num_blocks: int, sparsity: float) -> int:
    """Blocks a layer keeps at ``sparsity``: ``max(1, round((1 - sparsity) * num_blocks))``."""
    return max(1, round((1.0 - sparsity) * num_blocks))


def top_k_mask(scores: Tensor, k: int, eligible: Tensor | None = None) -> Tensor:
    """Boolean mask keeping the ``k`` highest ``scores`` among ``eligible`` blocks.

    Ties go to the lower flat index, so the result is deterministic on every device and rank.
    If fewer than ``k`` blocks are eligible, all eligible blocks are kept.

    Example:
        >>> top_k_mask(torch.tensor([[1.0, 3.0], [3.0, 0.0]]), k=2).tolist()
        [[False, True], [True, False]]
    """
    flat = scores.detach().reshape(-1).float()
    if eligible is not None:
        flat = torch.where(eligible.reshape(-1), flat, torch.full_like(flat, -math.inf))
        k = min(k, int(eligible.sum()))
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    mask[order] = True
    return mask.reshape(scores.shape)
