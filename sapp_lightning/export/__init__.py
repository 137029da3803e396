"""Block-sparse inference: run a committed model's pruned layers without their zero blocks.

After ``trainer.fit`` returns, :class:`~sapp_lightning.BlockPruning` leaves plain weights whose pruned blocks are
exact zeros. :func:`to_block_sparse` replaces every layer the sparsifier prunes (chosen the same way, through
:mod:`sapp_lightning.targets`) with a module that keeps only the nonzero blocks:

* ``nn.Linear`` (and subclasses keeping its forward), Hugging Face ``Conv1D``: :class:`BlockSparseLinear`;
* ``nn.Conv2d`` (groups 1; any kernel size, stride, padding, dilation): :class:`BlockSparseConv2d`, through the
  paper's ``(kh*kw*C_in) x C_out`` layout, without an im2col copy;
* ``nn.MultiheadAttention``: :class:`BlockSparseMultiheadAttention` (sparse projections and
  ``F.scaled_dot_product_attention``, the original's outputs).

On CPU the product is this project's C++ kernel (:mod:`.kernels`, built once per machine; weights packed at export in
the order it reads them); without a compiler, ``torch.sparse``; on CUDA, torch's Triton BSR kernel. A layer stays
dense where dense measured faster at the batch you give (:func:`kernel_rule`). The returned model's
``block_sparse_summary`` (also logged) names each weight's kernel, or why it stays dense. :func:`save_block_sparse`
and :func:`load_block_sparse` store the result and restore it into your model class; ``sapp-export RUN_DIR`` does
all of it for a ``sapp-train`` run. docs/results.md section 3 has the measurements.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sapp_lightning.export import BlockSparseLinear, to_block_sparse
    >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> with torch.no_grad():  # what a committed model looks like: 3 of every 4 blocks of 8x8 are zero
    ...     keep = (torch.arange(32).reshape(4, 8) % 4 == 0).repeat_interleave(8, 0).repeat_interleave(8, 1)
    ...     _ = net[0].weight.mul_(keep)
    >>> sparse = to_block_sparse(net, block_size=8)
    >>> isinstance(sparse[0], BlockSparseLinear), isinstance(sparse[2], nn.Linear)
    (True, True)
    >>> x = torch.randn(5, 64)
    >>> torch.testing.assert_close(sparse(x), net(x))
    >>> print(sparse.block_sparse_summary.format())  # doctest: +NORMALIZE_WHITESPACE
    layer  type    kernel   zero blocks      indices  why / note
    0      Linear  own 8x8  75% (8/32 kept)  int32    batch 32, 75.0% zero blocks: own kernel (dense is faster
                                                      under 20%)
    2      Linear  dense    0% (4/4 kept)             no zero blocks
"""

from .attention import BlockSparseMultiheadAttention
from .conv import BlockSparseConv2d
from .convert import DEFAULT_BATCH_SIZE, LAYOUTS, kernel_rule, layout_rule, to_block_sparse, zero_block_fraction
from .linear import BlockSparseLinear
from .matrix import BlockSparseMatrix
from .storage import FORMAT, load_block_sparse, save_block_sparse
from .summary import ExportChoice, ExportSummary

__all__ = [
    "BlockSparseConv2d",
    "BlockSparseLinear",
    "BlockSparseMatrix",
    "BlockSparseMultiheadAttention",
    "DEFAULT_BATCH_SIZE",
    "ExportChoice",
    "ExportSummary",
    "FORMAT",
    "LAYOUTS",
    "kernel_rule",
    "layout_rule",
    "load_block_sparse",
    "save_block_sparse",
    "to_block_sparse",
    "zero_block_fraction",
]
