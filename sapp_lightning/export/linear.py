"""``nn.Linear`` (and Hugging Face's ``Conv1D``) with a block-sparse weight."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import is_hf_conv1d
from .matrix import BlockSparseMatrix


class BlockSparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a :class:`~.matrix.BlockSparseMatrix` (inference only).

    ``W`` is ``out x in`` as in ``nn.Linear``; a Hugging Face ``Conv1D`` (weight stored ``in x out``, ``y = x W + b``)
    becomes the same module (``source == "hf_conv1d"``). The matrix and the bias are non-persistent buffers:
    ``.to(device)`` moves them and the model's ``state_dict`` leaves them out
    (:func:`~sapp_lightning.export.save_block_sparse` stores them). Build one with :meth:`from_linear`.

    Example:
        >>> layer = nn.Linear(32, 16)
        >>> with torch.no_grad():
        ...     layer.weight[:, 16:] = 0
        >>> sparse = BlockSparseLinear.from_linear(layer, "own", blocksize=(16, 16))
        >>> sparse
        BlockSparseLinear(in_features=32, out_features=16, kernel=own, blocksize=(16, 16), nonzero_blocks=1/2)
        >>> x = torch.randn(3, 32)
        >>> torch.testing.assert_close(sparse(x), layer(x))
    """

    def __init__(self, matrix: BlockSparseMatrix, bias: Tensor | None, source: str = "linear") -> None:
        super().__init__()
        self.matrix = matrix
        self.in_features, self.out_features = matrix.fan_in, matrix.fan_out
        self.source = source
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_linear(
        cls, linear: nn.Module, layout: str = "own", blocksize: tuple[int, int] | None = None
    ) -> BlockSparseLinear:
        """A sparse copy of ``linear`` (an ``nn.Linear`` or a Hugging Face ``Conv1D``).

        ``layout`` is the kernel: ``"own"`` (this project's CPU kernel), ``"bsr"`` or ``"csr"`` (``torch.sparse``).
        ``blocksize`` is ``(rows, cols)`` of the ``out x in`` weight (the pruning's ``(fan_out, fan_in)`` block),
        needed for ``"own"`` and ``"bsr"``.
        """
        source = "hf_conv1d" if is_hf_conv1d(linear) else "linear"
        weight = linear.weight.detach()
        kernel_matrix = weight if source == "hf_conv1d" else weight.t()
        if blocksize is None:
            if layout != "csr":
                raise ValueError(f"layout {layout!r} needs a blocksize")
            blocksize = (1, 1)
        matrix = BlockSparseMatrix.from_kernel(kernel_matrix, (blocksize[1], blocksize[0]), layout)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(matrix, bias, source)

    @property
    def layout(self) -> str:
        """The kernel: ``"own"``, ``"bsr"`` or ``"csr"``."""
        return self.matrix.kernel

    @property
    def blocksize(self) -> tuple[int, int] | None:
        """``(rows, cols)`` of the ``out x in`` weight's blocks (``None`` for CSR)."""
        return None if self.layout == "csr" else (self.matrix.block[1], self.matrix.block[0])

    @property
    def weight(self) -> Tensor:
        """The ``out x in`` weight as a ``torch.sparse`` tensor: the ``"bsr"`` and ``"csr"`` kernels' own, a CSR
        copy of the ``"own"`` kernel's (made on first use, for code that looks at ``layer.weight``)."""
        return self.matrix.weight if self.layout != "own" else self.matrix.torch_sparse()

    def forward(self, x: Tensor, columns: tuple[int, int] | None = None) -> Tensor:
        if columns is None and x.dim() == 2:
            return self.matrix.mm(x, self.bias)
        lead = x.shape[:-1]
        bias = self.bias if columns is None or self.bias is None else self.bias[columns[0] : columns[1]]
        y = self.matrix.mm(x.reshape(-1, self.in_features), bias, columns)
        return y.reshape(*lead, y.shape[-1])

    def to_dense_linear(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (for checking, or to fine-tune again; a Conv1D's weight is its ``.T``)."""
        kernel_matrix = self.matrix.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(device=kernel_matrix.device, dtype=kernel_matrix.dtype)
        with torch.no_grad():
            linear.weight.copy_(kernel_matrix.t())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def __repr__(self) -> str:  # one line: the matrix is described here already
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        m = self.matrix
        text = f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.layout}"
        if self.blocksize is not None:
            text += f", blocksize={self.blocksize}, nonzero_blocks={m.nonzero_blocks}/{m.num_blocks}"
        else:
            text += f", nonzero={m.weight.values().numel()}/{self.out_features * self.in_features}"
        return text + (", source=Conv1D" if self.source == "hf_conv1d" else "")

    # --- storage ---------------------------------------------------------------------------------------------
    def parts(self) -> dict[str, Any]:
        """Plain tensors that rebuild this module (``torch.load(weights_only=True)`` reads them)."""
        return {"module": "linear", "source": self.source, "matrix": self.matrix.parts(), "bias": self.bias}

    @classmethod
    def from_parts(cls, parts: dict[str, Any]) -> BlockSparseLinear:
        if "matrix" not in parts:  # formats 1 and 2: a torch.sparse weight of the out x in matrix
            out_features, in_features = parts["shape"]
            values = parts["values"]
            block = (values.shape[2], values.shape[1]) if parts["layout"] == "bsr" else (1, 1)
            parts = {**parts, "matrix": {"kernel": parts["layout"], "fan_in": in_features, "fan_out": out_features,
                                         "block": block, "crow_indices": parts["crow_indices"],
                                         "col_indices": parts["col_indices"], "values": values}}  # fmt: skip
        return cls(BlockSparseMatrix.from_parts(parts["matrix"]), parts["bias"], parts.get("source", "linear"))

    def dense_shape(self) -> tuple[list[int], str]:
        """``([out, in], source)``: what a dense layer must look like to take this one's place."""
        return [self.out_features, self.in_features], self.source
