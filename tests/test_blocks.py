import pytest
import torch
from torch import nn

from sapp_lightning import BlockPruning
from sapp_lightning.blocks import BlockLayout, keep_count, normalize_block_size, top_k_mask


def reference_kernel(module):
    if isinstance(module, nn.Linear):
        return module.weight.T
    cout, cin, kh, kw = module.weight.shape
    return module.weight.permute(2, 3, 1, 0).reshape(kh * kw * cin, cout)


def reference_block_norms(kernel, r, c):
    n, m = kernel.shape
    rows, cols = -(-n // r), -(-m // c)
    out = torch.zeros(rows, cols)
    for i in range(rows):
        for j in range(cols):
            out[i, j] = kernel[i * r : (i + 1) * r, j * c : (j + 1) * c].norm()
    return out


@pytest.mark.parametrize(
    "module, block, grid",
    [
        (nn.Linear(390, 400), 20, (20, 20)),  # the paper's Criteo layer, 390 = 19.5 blocks
        (nn.Linear(390, 400), 10, (39, 40)),
        (nn.Linear(390, 400), 5, (78, 80)),
        (nn.Linear(12, 10), (4, 5), (3, 2)),  # rectangular, divisible
        (nn.Linear(13, 11), (4, 5), (4, 3)),  # rectangular, ragged
        (nn.Conv2d(3, 64, 7), 8, (19, 8)),  # ResNet50 stem: 147 x 64
        (nn.Conv2d(8, 6, 3), (4, 3), (18, 2)),  # r divides cin
        (nn.Conv2d(5, 6, 3), (4, 4), (12, 2)),  # ragged in both
    ],
)
def test_grid_and_norms_match_the_papers_kernel_layout(module, block, grid):
    layout = BlockLayout.for_module(module, block)
    r, c = normalize_block_size(block)
    kernel = reference_kernel(module)
    assert layout.kernel_shape == tuple(kernel.shape)
    assert layout.grid_shape == grid
    assert layout.num_blocks == grid[0] * grid[1]
    assert torch.equal(layout.to_kernel(module.weight), kernel)
    assert torch.equal(layout.from_kernel(layout.to_kernel(module.weight)), module.weight)
    torch.testing.assert_close(layout.block_norms(module.weight.detach()), reference_block_norms(kernel.detach(), r, c))
    assert int(layout.block_weight_counts().sum()) == module.weight.numel()


@pytest.mark.parametrize(
    "module, block",
    [
        (nn.Linear(12, 10), (4, 5)),
        (nn.Linear(13, 11), (4, 5)),
        (nn.Conv2d(8, 6, 3), (4, 3)),
        (nn.Conv2d(5, 6, 3), (4, 4)),
        (nn.Conv2d(8, 6, 3), (3, 3)),  # r does not divide cin: generic path
        (nn.Conv2d(8, 6, 1), (4, 3)),  # 1x1: no spreading over taps
        (nn.Embedding(12, 6), (4, 3)),
    ],
)
def test_scale_zeroes_exactly_the_masked_blocks(module, block):
    layout = BlockLayout.for_module(module, block)
    r, c = layout.block_size
    mask = torch.rand(layout.grid_shape) > 0.5
    scaled = layout.scale(module.weight.detach(), mask)
    assert torch.equal(scaled, module.weight.detach() * layout.expand(mask.float()))
    in_place = module.weight.detach().clone()
    assert layout.scale_(in_place, mask) is in_place
    assert torch.equal(in_place, scaled)
    kernel = layout.to_kernel(scaled)
    for i, j in (mask == 0).nonzero().tolist():
        assert (kernel[i * r : (i + 1) * r, j * c : (j + 1) * c] == 0).all()
    norms = layout.block_norms(scaled)
    assert torch.equal(norms[~mask] == 0, torch.ones_like(norms[~mask], dtype=torch.bool))
    assert (norms[mask] > 0).all()


def test_conv_block_rows_are_consecutive_input_channels_at_one_tap():
    conv = nn.Conv2d(8, 4, 3, bias=False)
    layout = BlockLayout.for_module(conv, (4, 4))
    mask = torch.ones(layout.grid_shape, dtype=torch.bool)
    mask[0, 0] = False  # kernel rows 0-3: tap (0, 0), input channels 0-3
    scaled = layout.scale(conv.weight.detach(), mask)
    assert (scaled[:, 0:4, 0, 0] == 0).all()
    assert (scaled[:, 4:8, 0, 0] != 0).all()
    assert (scaled[:, :, 0, 1] != 0).all()


def test_top_k_breaks_ties_by_index_and_respects_eligibility():
    scores = torch.tensor([1.0, 5.0, 5.0, 5.0, 0.0])
    assert top_k_mask(scores, 2).tolist() == [False, True, True, False, False]
    eligible = torch.tensor([True, False, True, True, True])
    assert top_k_mask(scores, 2, eligible).tolist() == [False, False, True, True, False]
    assert top_k_mask(scores, 10, eligible).tolist() == eligible.tolist()


@pytest.mark.parametrize("n, s, k", [(100, 0.9, 10), (400, 0.95, 20), (6240, 0.99, 62), (3, 0.9, 1), (10, 0.0, 10)])
def test_keep_count(n, s, k):
    assert keep_count(n, s) == k


@pytest.mark.parametrize("bad", [0, -1, (0, 4), (4, 0), (2, 2, 2), "8", 2.5, True])
def test_bad_block_size_is_rejected(bad):
    with pytest.raises(ValueError, match="block_size"):
        normalize_block_size(bad)


@pytest.mark.parametrize(
    "weight_shape, block",
    [((10, 12), (4, 5)), ((6, 8, 3, 3), (4, 3)), ((12, 6), (3, 3)), ((11, 13), (4, 5))],
    ids=["linear", "conv", "embedding-like", "ragged"],
)
def test_scale_gradients_match_the_expanded_product(weight_shape, block):
    """``scale`` has its own backward where blocks tile the weight: it must pass float64 gradcheck, give the
    gradients of the expanded product, and support double backward (gradient penalties)."""
    torch.manual_seed(0)
    weight = torch.randn(*weight_shape, dtype=torch.float64, requires_grad=True)
    layout = BlockLayout.for_weight(weight, block)
    per_block = torch.randn(layout.grid_shape, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(layout.scale, (weight, per_block))
    torch.autograd.gradgradcheck(layout.scale, (weight, per_block))
    grad = torch.randn(weight_shape, dtype=torch.float64)
    ours = torch.autograd.grad(layout.scale(weight, per_block), (weight, per_block), grad)
    reference = torch.autograd.grad(weight * layout.expand(per_block), (weight, per_block), grad)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [0, -2, (4, 0)])
def test_block_size_below_one(bad):
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BlockPruning("acdc", sparsity=0.5, block_size=bad)
