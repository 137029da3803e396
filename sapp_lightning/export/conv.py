"""``nn.Conv2d`` (``groups == 1``) with a block-sparse kernel in the paper's ``(kh*kw*C_in) x C_out`` layout."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import BlockLayout
from .matrix import BlockSparseMatrix


def unsupported(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` has no block-sparse path, or ``None``."""
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: the kernel pads with zeros"
    if isinstance(conv.padding, str) and _same_padding(conv) is None:
        return "padding='same' with an even kernel span pads one side more: the kernel pads both sides alike"
    return None


def _same_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    if conv.padding == "valid":
        return 0, 0
    spans = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    return None if any(s % 2 for s in spans) else (spans[0] // 2, spans[1] // 2)


class BlockSparseConv2d(nn.Module):
    """A 2-D convolution through :class:`~.matrix.BlockSparseMatrix` (inference only).

    On the CPU kernel (``"own"``) the input is read channels-last (a channels-last input costs no copy, an NCHW one a
    copy of the input, never an im2col) and the output is a channels-last ``(B, C_out, OH, OW)`` tensor, which the
    next layers (batch norm, ReLU, this project's next convolution) take as it is. A 1x1 convolution is a plain product
    over the pixels (every ``stride``-th one, copied together). The ``torch.sparse`` kernels use an im2col copy.

    Example:
        >>> conv = nn.Conv2d(16, 32, 3, padding=1)
        >>> with torch.no_grad():
        ...     conv.weight[:16] = 0  # the first 16 output channels: one of two block columns of 16
        >>> sparse = BlockSparseConv2d.from_conv(conv, block=(16, 16))
        >>> sparse.matrix.nonzero_blocks, sparse.matrix.num_blocks  # (3 * 3 * 16) / 16 = 9 block rows
        (9, 18)
        >>> x = torch.randn(2, 16, 8, 8)
        >>> torch.testing.assert_close(sparse(x), conv(x))
    """

    def __init__(self, matrix: BlockSparseMatrix, bias: Tensor | None, geometry: dict[str, Any]) -> None:
        super().__init__()
        self.matrix = matrix
        self.register_buffer("bias", bias, persistent=False)
        self.in_channels, self.out_channels = int(geometry["in_channels"]), matrix.fan_out
        self.kernel_size, self.stride = tuple(geometry["kernel_size"]), tuple(geometry["stride"])
        self.padding, self.dilation = tuple(geometry["padding"]), tuple(geometry["dilation"])

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, block: tuple[int, int], kernel: str = "own") -> BlockSparseConv2d:
        """A sparse copy of ``conv``; ``block`` is the pruning's ``(fan_in, fan_out)`` block size."""
        why = unsupported(conv)
        if why is not None:
            raise ValueError(f"no block-sparse convolution for this layer: {why}")
        layout = BlockLayout("conv2d", tuple(conv.weight.shape), block)
        matrix = BlockSparseMatrix.from_kernel(layout.to_kernel(conv.weight.detach()), block, kernel)
        padding = _same_padding(conv) if isinstance(conv.padding, str) else conv.padding
        geometry = {"in_channels": conv.in_channels, "kernel_size": conv.kernel_size, "stride": conv.stride,
                    "padding": padding, "dilation": conv.dilation}  # fmt: skip
        return cls(matrix, None if conv.bias is None else conv.bias.detach().clone(), geometry)

    def _geometry(self) -> dict[str, tuple[int, int]]:
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation}  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        batched = x.dim() == 4
        x = x if batched else x.unsqueeze(0)
        # (B, H, W, C) as a view where x is channels-last already
        pixels = x.permute(0, 2, 3, 1) if x.is_contiguous(memory_format=torch.channels_last) else None
        if pixels is None:
            pixels = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        batch, height, width, _ = pixels.shape
        if self.kernel_size == (1, 1) and self.padding == (0, 0):  # a product over (every s-th) pixel
            if self.stride != (1, 1):
                pixels = pixels[:, :: self.stride[0], :: self.stride[1]]
                batch, height, width, _ = pixels.shape
            y = self.matrix.mm(pixels.reshape(-1, self.in_channels), self.bias).view(batch, height, width, -1)
        else:
            y = self.matrix.conv(pixels, self.bias, self._geometry())
        y = y.permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
        return y if batched else y.squeeze(0)

    def to_dense_conv(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` (for checking, or to fine-tune again)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None)  # fmt: skip
        layout = BlockLayout("conv2d", tuple(conv.weight.shape), self.matrix.block)
        kernel_matrix = self.matrix.to_dense()
        conv.to(device=kernel_matrix.device, dtype=kernel_matrix.dtype)
        with torch.no_grad():
            conv.weight.copy_(layout.from_kernel(kernel_matrix))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def __repr__(self) -> str:  # one line: the matrix is described here already
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        m = self.matrix
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, kernel={m.kernel}, "
            f"nonzero_blocks={m.nonzero_blocks}/{m.num_blocks}"
        )

    # --- storage ---------------------------------------------------------------------------------------------
    def parts(self) -> dict[str, Any]:
        geometry = {"in_channels": self.in_channels, **{k: list(v) for k, v in self._geometry().items()}}
        return {"module": "conv2d", "matrix": self.matrix.parts(), "bias": self.bias, "geometry": geometry}

    @classmethod
    def from_parts(cls, parts: dict[str, Any]) -> BlockSparseConv2d:
        return cls(BlockSparseMatrix.from_parts(parts["matrix"]), parts["bias"], parts["geometry"])

    def dense_shape(self) -> tuple[list[int], str]:
        """``(weight shape, "conv2d")``: what a dense layer must look like to take this one's place."""
        return [self.out_channels, self.in_channels, *self.kernel_size], "conv2d"
