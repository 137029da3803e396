"""The block-sparse products, kernel by kernel: this project's C++ kernel (its AVX2 and its baseline x86-64 code, one
thread and several), torch.sparse where the kernel is not built (or the dtype is not float32), BSR and CSR, and
CUDA (skipped without a GPU). Exactness against the dense product for edge blocks, empty block rows and columns,
blocks that straddle two convolution taps, and batches of 1 to 300 rows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from export_utils import disable_own_kernel

from sapp_lightning.export import BlockSparseMatrix, kernels
from sapp_lightning.export.matrix import im2col

ROWS = (1, 2, 3, 5, 6, 7, 13, 64, 300)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def block_sparse_kernel(fan_in: int, fan_out: int, block: tuple[int, int], keep: float, seed: int = 0) -> torch.Tensor:
    """A ``fan_in x fan_out`` kernel matrix keeping ``keep`` of its blocks (edge blocks where they do not tile), with
    its first block column and its last block row empty."""
    gen = torch.Generator().manual_seed(seed)
    r, c = block
    grid = torch.rand(math.ceil(fan_in / r), math.ceil(fan_out / c), generator=gen) < keep
    grid[:, 0] = False  # outputs that are the bias alone
    grid[-1, :] = False  # inputs no block reads
    mask = grid.repeat_interleave(r, 0)[:fan_in].repeat_interleave(c, 1)[:, :fan_out]
    return torch.randn(fan_in, fan_out, generator=gen) * mask


SHAPES = [  # fan_in, fan_out, block (rows, cols): tiling, edge blocks, blocks narrower/wider than 16, not square
    (64, 48, (8, 8)),
    (62, 20, (8, 8)),
    (100, 70, (16, 16)),
    (64, 96, (8, 32)),
    (50, 40, (4, 12)),
    (33, 17, (5, 10)),
    (40, 72, (16, 24)),
]


@pytest.mark.parametrize("fan_in, fan_out, block", SHAPES)
@pytest.mark.parametrize("kernel", ["own", "own_without_compiler", "csr", "bsr"])
def test_the_product_equals_the_dense_one(fan_in, fan_out, block, kernel, monkeypatch):
    if kernel == "bsr" and (fan_in % block[0] or fan_out % block[1] or block[0] != block[1]):
        pytest.skip("BSR needs square blocks that tile the matrix")
    if kernel == "own_without_compiler":
        disable_own_kernel(monkeypatch)
    kernel_matrix = block_sparse_kernel(fan_in, fan_out, block, keep=0.4)
    bias = torch.randn(fan_out)
    matrix = BlockSparseMatrix.from_kernel(kernel_matrix, block, kernel.removesuffix("_without_compiler"))
    torch.testing.assert_close(matrix.to_dense(), kernel_matrix)
    for rows in ROWS:
        x = torch.randn(rows, fan_in)
        torch.testing.assert_close(matrix.mm(x, bias), x @ kernel_matrix + bias)
        torch.testing.assert_close(matrix.mm(x), x @ kernel_matrix)
    again = BlockSparseMatrix.from_parts(matrix.parts())
    torch.testing.assert_close(again.mm(x, bias), x @ kernel_matrix + bias)


@pytest.mark.parametrize("fan_in, fan_out, block", SHAPES)
def test_the_baseline_code_equals_the_avx2_code(fan_in, fan_out, block):
    """The kernel is compiled twice; the CPU picks one. Both must give the dense product."""
    ext = kernels.extension()
    if ext is None:
        pytest.skip("the kernel is not built here")
    kernel_matrix = block_sparse_kernel(fan_in, fan_out, block, keep=0.5, seed=1)
    matrix = BlockSparseMatrix.from_kernel(kernel_matrix, block)
    bias = torch.randn(fan_out)
    for rows in ROWS:
        x = torch.randn(rows, fan_in)
        for vector in (True, False):
            y = ext.linear(x, matrix.ptr, matrix.rows, matrix.values, bias, fan_in, fan_out, *block, vector)
            torch.testing.assert_close(y, x @ kernel_matrix + bias)


def test_several_threads_give_the_dense_product():
    """Large enough to run in parallel (the kernel keeps products under 2**20 multiply-adds on one thread)."""
    kernel_matrix = block_sparse_kernel(256, 200, (16, 16), keep=0.5)
    matrix = BlockSparseMatrix.from_kernel(kernel_matrix, (16, 16))
    x = torch.randn(300, 256)
    threads = torch.get_num_threads()
    try:
        for n in (2, 3):
            torch.set_num_threads(n)
            torch.testing.assert_close(matrix.mm(x), x @ kernel_matrix, rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_a_matrix_without_any_nonzero_block_gives_the_bias():
    matrix = BlockSparseMatrix.from_kernel(torch.zeros(40, 24), (8, 8))
    assert matrix.nonzero_blocks == 0 and matrix.num_blocks == 15
    bias = torch.randn(24)
    torch.testing.assert_close(matrix.mm(torch.randn(3, 40), bias), bias.expand(3, 24))


def test_a_slice_of_the_outputs():
    kernel_matrix = block_sparse_kernel(32, 96, (8, 16), keep=0.5)
    matrix = BlockSparseMatrix.from_kernel(kernel_matrix, (8, 16))
    bias = torch.randn(96)
    x = torch.randn(5, 32)
    for start, stop in [(0, 32), (32, 64), (64, 96), (16, 48)]:
        expected = x @ kernel_matrix[:, start:stop] + bias[start:stop]
        torch.testing.assert_close(matrix.mm(x, bias[start:stop], columns=(start, stop)), expected)
    with pytest.raises(ValueError, match="do not follow the matrix's blocks of 16 columns"):
        matrix.mm(x, columns=(8, 40))


def test_an_input_of_the_wrong_width_is_refused_before_the_kernel_reads_it():
    matrix = BlockSparseMatrix.from_kernel(block_sparse_kernel(32, 16, (8, 8), keep=0.5), (8, 8))
    with pytest.raises(RuntimeError, match=r"x: contiguous float32 \(M, 32\)"):
        matrix.mm(torch.randn(2, 24))


def test_a_damaged_matrix_is_refused_when_loaded():
    parts = BlockSparseMatrix.from_kernel(block_sparse_kernel(32, 16, (8, 8), keep=0.5), (8, 8)).parts()
    parts["rows"] = parts["rows"][:-1]
    with pytest.raises(ValueError, match="damaged block-sparse matrix"):
        BlockSparseMatrix.from_parts(parts)


def test_packed_values_are_stored_without_their_column_padding():
    matrix = BlockSparseMatrix.from_kernel(block_sparse_kernel(30, 20, (5, 10), keep=0.5), (5, 10))
    assert matrix.values.shape[1:] == (5, 16)  # columns padded to 8s for the kernel's vector loads
    assert matrix.parts()["values"].shape[1:] == (5, 10)
    assert matrix.ptr.dtype == matrix.rows.dtype == torch.int32


# --- convolutions ----------------------------------------------------------------------------------------------
CONVS = [  # channels in, out, kernel, stride, padding, dilation, block
    (8, 16, (3, 3), (1, 1), (1, 1), (1, 1), (8, 8)),
    (8, 16, (3, 3), (2, 2), (1, 1), (1, 1), (8, 8)),
    (5, 12, (2, 3), (1, 2), (0, 1), (2, 1), (8, 8)),  # blocks straddle taps (8 rows, 5 channels), edge blocks
    (16, 20, (1, 1), (2, 2), (0, 0), (1, 1), (16, 16)),
    (6, 10, (5, 5), (3, 3), (2, 2), (1, 1), (4, 4)),
]


@pytest.mark.parametrize("cin, cout, kernel_size, stride, padding, dilation, block", CONVS)
@pytest.mark.parametrize("kernel", ["own", "own_without_compiler", "csr"])
def test_the_convolution_equals_the_dense_one(cin, cout, kernel_size, stride, padding, dilation, block, kernel,
                                              monkeypatch):  # fmt: skip
    if kernel == "own_without_compiler":
        disable_own_kernel(monkeypatch)
    kh, kw = kernel_size
    kernel_matrix = block_sparse_kernel(kh * kw * cin, cout, block, keep=0.5)
    weight = kernel_matrix.reshape(kh, kw, cin, cout).permute(3, 2, 0, 1)  # the paper's layout, back
    matrix = BlockSparseMatrix.from_kernel(kernel_matrix, block, kernel.removesuffix("_without_compiler"))
    bias = torch.randn(cout)
    geometry = {"kernel_size": kernel_size, "stride": stride, "padding": padding, "dilation": dilation}
    for batch, height, width in [(1, 7, 9), (3, 11, 6)]:
        x = torch.randn(batch, cin, height, width)
        y = matrix.conv(x.permute(0, 2, 3, 1).contiguous(), bias, geometry)
        torch.testing.assert_close(y.permute(0, 3, 1, 2), F.conv2d(x, weight, bias, stride, padding, dilation))


def test_im2col_orders_taps_then_channels_as_the_kernel_matrix():
    x = torch.arange(2 * 4 * 4 * 3.0).reshape(2, 4, 4, 3)
    cols = im2col(x, (2, 2), (2, 2), (0, 0), (1, 1))
    assert cols.shape == (2, 2, 2, 12)
    torch.testing.assert_close(cols[1, 1, 0], torch.cat([x[1, 2, 0], x[1, 2, 1], x[1, 3, 0], x[1, 3, 1]]))


# --- CUDA ------------------------------------------------------------------------------------------------------
@CUDA
@pytest.mark.parametrize("block", [(16, 16), (8, 8), (16, 32)])  # Triton (blocks of 16+, powers of 2), else CSR
def test_the_product_on_cuda(block):
    kernel_matrix = block_sparse_kernel(64, 96, block, keep=0.4)
    matrix = BlockSparseMatrix.from_kernel(kernel_matrix, block).cuda()
    bias = torch.randn(96, device="cuda")
    for rows in (1, 5, 16, 33):
        x = torch.randn(rows, 64, device="cuda")
        expected = x @ kernel_matrix.cuda() + bias
        torch.testing.assert_close(matrix.mm(x, bias), expected, rtol=1e-3, atol=1e-3)


@CUDA
def test_the_convolution_on_cuda():
    kernel_matrix = block_sparse_kernel(9 * 16, 32, (16, 16), keep=0.5)
    weight = kernel_matrix.reshape(3, 3, 16, 32).permute(3, 2, 0, 1).cuda()
    matrix = BlockSparseMatrix.from_kernel(kernel_matrix, (16, 16)).cuda()
    x = torch.randn(2, 16, 8, 8, device="cuda")
    geometry = {"kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)}
    y = matrix.conv(x.permute(0, 2, 3, 1).contiguous(), None, geometry).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, F.conv2d(x, weight, None, 1, 1), rtol=1e-3, atol=1e-3)
