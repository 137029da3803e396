"""The forward parametrizations (BlockReparam, BlockAttention, BlockPowerProp): gradients, zero blocks, every shape,
half precision, and the exact identity of an all-ones mask."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import TinyNet, make_trainer, tiny_loader
from torch import nn
from torch.nn.utils import parametrize

from sapp_lightning import BlockPruning
from sapp_lightning.algorithms.base import BlockReparam
from sapp_lightning.algorithms.powerprop import BlockPowerProp
from sapp_lightning.algorithms.sapp import BlockAttention
from sapp_lightning.blocks import BlockLayout

SHAPES = {
    "linear": ((12, 8), (4, 4)),  # tiles: the block view
    "ragged": ((10, 7), (4, 4)),  # kernel 7 x 10: edge blocks of 3 rows and 2 columns
    "conv": ((6, 8, 3, 3), (4, 3)),  # 4 | cin: the conv block view
    "conv-ragged": ((6, 5, 3, 3), (4, 4)),  # 4 does not divide cin = 5: blocks span taps, padded copy
    "conv-1x1": ((6, 8, 1, 1), (4, 3)),
}


def norm_scaled_reference(layout: BlockLayout, weight: torch.Tensor, mask: torch.Tensor, alpha=2.0) -> torch.Tensor:
    """``||V_b||^(alpha-1) V_b m_b`` through autograd, with a norm whose gradient at 0 is 0."""
    sq = layout.block_sq_norms(weight)
    norms = torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt() * (sq > 0)
    return weight * layout.expand(norms ** (alpha - 1) * mask)


def powerprop(shape: str, dtype=torch.float64, zero_block: bool = True, alpha: float = 2.0):
    weight_shape, block = SHAPES[shape]
    torch.manual_seed(0)
    weight = torch.randn(*weight_shape, dtype=dtype)
    layout = BlockLayout.for_weight(weight, block)
    reparam = BlockPowerProp(layout, alpha).to(dtype)
    reparam.block_mask[0, 0] = False
    if zero_block:  # an all-zero block that is kept (a zero-initialised layer, or zeroed in prune_mode="zero")
        weight = layout.scale(weight, (torch.arange(layout.num_blocks) != 1).reshape(layout.grid_shape))
    return reparam, layout, weight.requires_grad_()


@pytest.mark.parametrize("alpha", [2.0, 3.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_powerprop_one_path_passes_gradcheck_for_every_shape(shape, alpha):
    """gradcheck (with a pruned and an all-zero block) and gradgradcheck in float64, and the gradient of the
    autograd formula, for tiling, ragged and conv shapes alike, at the paper's alpha and another."""
    reparam, layout, weight = powerprop(shape, alpha=alpha)
    torch.autograd.gradcheck(reparam, (weight,))
    grad = torch.randn_like(weight)
    (ours,) = torch.autograd.grad(reparam(weight), weight, grad)
    mask = reparam.block_mask
    (reference,) = torch.autograd.grad(norm_scaled_reference(layout, weight, mask, alpha), weight, grad)
    torch.testing.assert_close(ours, reference)
    # ||V|| V has no second derivative at V = 0: gradgradcheck away from the zero block
    reparam, _, weight = powerprop(shape, zero_block=False, alpha=alpha)
    torch.autograd.gradgradcheck(reparam, (weight,))


@pytest.mark.parametrize("shape", ["linear", "ragged", "conv"])
def test_powerprop_alpha_one_is_the_masked_weight_and_alpha_one_and_a_half_passes_gradcheck(shape):
    reparam, layout, weight = powerprop(shape, zero_block=False, alpha=1.0)
    torch.testing.assert_close(reparam(weight), layout.scale(weight, reparam.block_mask), rtol=0, atol=0)
    reparam, layout, weight = powerprop(shape, zero_block=False, alpha=1.5)
    torch.autograd.gradcheck(reparam, (weight,))
    torch.autograd.gradgradcheck(reparam, (weight,))


@pytest.mark.parametrize("shape", SHAPES)
def test_powerprop_gradient_at_a_zero_block_is_zero_not_nan(shape):
    reparam, layout, _ = powerprop(shape, dtype=torch.float32)
    weight = torch.zeros(SHAPES[shape][0], requires_grad=True)
    (grad,) = torch.autograd.grad(reparam(weight), weight, torch.randn_like(weight), create_graph=True)
    assert torch.equal(grad, torch.zeros_like(grad))
    (second,) = torch.autograd.grad(grad.square().sum(), weight, allow_unused=True, materialize_grads=True)
    assert torch.isfinite(second).all()


@pytest.mark.parametrize("alpha", [2.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["ragged", "conv-ragged", "linear"])
def test_powerprop_right_inverse_keeps_zero_blocks_zero_and_round_trips(shape, dtype, alpha):
    reparam, layout, weight = powerprop(shape, dtype=torch.float32, alpha=alpha)
    weight = weight.detach().to(dtype)
    raw = reparam.right_inverse(weight)
    assert raw.dtype == dtype and torch.isfinite(raw).all()
    zero = layout.block_sq_norms(weight) == 0
    assert (layout.block_sq_norms(raw)[zero] == 0).all()
    reparam.block_mask.fill_(True)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(reparam(raw).float(), weight.float(), rtol=tolerance, atol=tolerance)


class ZeroHead(nn.Module):
    """A hidden layer and a zero-initialised classifier whose 10 outputs do not fill a 16-block (like ViT's head)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(48, 64)
        self.head = nn.Linear(64, 10)
        nn.init.zeros_(self.head.weight)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_initialised_ragged_layer_trains_with_finite_weights(dtype):
    torch.manual_seed(0)
    model = ZeroHead()
    for module in (model.body, model.head):
        parametrize.register_parametrization(module, "weight", BlockPowerProp(BlockLayout.for_module(module, 16)))
    model.to(dtype)
    bias_before = model.head.bias.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 48, dtype=dtype), torch.randint(10, (32,))
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.head.parametrizations.weight.original.dtype == dtype
    assert not torch.equal(model.head.bias, bias_before)  # the step did run
    # ||V|| V has a zero gradient at V = 0: a zero-initialised block stays zero (and, as the head, passes no
    # gradient to the layers below). Finite, but a zero-initialised layer does not learn under PowerPropagation.
    assert torch.equal(model.head.weight, torch.zeros_like(model.head.weight))


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
@pytest.mark.parametrize("prune_mode", ["mask", "zero"])
def test_powerprop_trains_a_stock_vision_transformer(tmp_path, prune_mode, precision):
    """torchvision's ViT: zero-initialised head (64 x 10, not a multiple of the block) and a 16x16-patch conv; it
    crashed with NaN at step 1 when the non-tiling fallback went through autograd's sqrt."""
    from torchvision.models import VisionTransformer

    class ViT(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = VisionTransformer(32, 16, num_layers=1, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10)

        def forward(self, x):
            return self.net(x.to(self.dtype))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]).float(), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(10, (32,)))
    model = ViT()
    plan = [("dense", 0.5), ("sparse", 0.5)]
    callback = BlockPruning(
        "powerprop", 0.5, 16, min_blocks=2, prune_mode=prune_mode, plan=plan, check_finite_every_n_steps=1
    )
    trainer = make_trainer(tmp_path, [callback], max_epochs=2, precision=precision)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    assert "net.heads.head" not in [layer.name for layer in callback.layers]  # a zero block never moves: dense
    assert {c.name: c.reason for c in callback.sparsifier.choices}["net.heads.head"].startswith("all zero")
    assert model.net.heads.head.weight.abs().sum() > 0  # so the head trains
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_powerprop_edge_blocks_in_zero_mode_stay_finite_and_zero(tmp_path):
    """TinyNet's conv kernel (27 x 8) has an edge row of blocks; prune_mode="zero" zeroes pruned blocks in place, and
    the norm-scaled forward must give them a zero gradient, not NaN."""
    torch.manual_seed(0)
    model = TinyNet()
    callback = BlockPruning("powerprop", 0.5, 4, min_blocks=10, prune_mode="zero", check_finite_every_n_steps=1)
    make_trainer(tmp_path, [callback], max_epochs=10).fit(model, tiny_loader())
    conv = model.conv.weight  # committed: plain weights
    layout = BlockLayout.for_module(model.conv, 4)
    norms = layout.block_sq_norms(conv.detach())
    assert torch.isfinite(conv).all()
    assert int((norms == 0).sum()) == layout.num_blocks - round(0.5 * layout.num_blocks)


def test_all_ones_mask_is_an_exact_identity_and_changes_are_seen():
    layout = BlockLayout.for_weight(torch.zeros(32, 48), 16)
    reparam, weight = BlockReparam(layout), torch.randn(32, 48)
    assert reparam(weight) is weight
    reparam.block_mask[1, 0] = False  # in place
    masked = reparam(weight)
    assert torch.equal(masked, weight * layout.expand(reparam.block_mask.float()))
    reparam.block_mask.fill_(True)
    assert reparam(weight) is weight
    reparam.load_state_dict({"block_mask": torch.zeros(layout.grid_shape, dtype=torch.bool)})
    assert torch.equal(reparam(weight), torch.zeros_like(weight))
    reparam.block_mask = torch.ones(layout.grid_shape, dtype=torch.bool)  # a new tensor
    assert reparam(weight) is weight
    reparam.block_mask.data[0, 0] = False  # invisible to the version counter: the explicit hook
    reparam.mark_mask_changed()
    assert torch.equal(reparam(weight), weight * layout.expand(reparam.block_mask.float()))
    assert BlockAttention(layout)(weight) is not weight  # attention is a factor of its own: never skipped


def test_mask_mode_dense_phase_leaves_the_weight_untouched_and_commits_exactly(tmp_path):
    """ACDC in prune_mode="mask": dense phases skip the multiply; the committed model is the one that trained."""
    torch.manual_seed(0)
    model = TinyNet()
    callback = BlockPruning("acdc", 0.5, 4, min_blocks=10, prune_mode="mask")
    make_trainer(tmp_path, [callback], max_epochs=10).fit(model, tiny_loader())
    layout = BlockLayout.for_module(model.fc1, 4)
    assert int((layout.block_sq_norms(model.fc1.weight.detach()) == 0).sum()) == layout.num_blocks // 2


# --- fused CPU kernels (sapp_lightning.fused) --------------------------------------------------------
def test_fused_kernels_are_on_unless_turned_off():
    from sapp_lightning import fused

    assert fused.fused_kernels_enabled() == (__import__("os").environ.get("SAPP_FUSED_KERNELS", "1") != "0")
    weight = torch.randn(4, 4)
    with torch.enable_grad():  # building a graph (double backward): the differentiable eager formulas run
        assert not fused.active(weight)


@pytest.fixture
def fused_kernels():
    from sapp_lightning import fused

    before = fused.fused_kernels_enabled()
    if not fused.use_fused_kernels(True):
        pytest.skip("the fused kernels cannot be built here (no C++ compiler?)")
    yield fused
    fused.use_fused_kernels(before)


def reparams(shape: str):
    weight_shape, block = SHAPES[shape]
    torch.manual_seed(0)
    weight = torch.randn(*weight_shape)
    layout = BlockLayout.for_weight(weight, block)
    attention = BlockAttention(layout, clip=0.2)
    with torch.no_grad():
        attention.logits.normal_()
    out = [attention, BlockPowerProp(layout)]
    for reparam in out:
        reparam.block_mask[0, 0] = False
    return out, weight


@pytest.mark.slow  # builds the C++ extension on first use (about 30 s, then cached)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_kernels_give_the_eager_values_and_gradients(fused_kernels, shape):
    modules, template = reparams(shape)
    for reparam in modules:
        weight = template.clone().requires_grad_()
        params = [weight, *reparam.parameters()]
        upstream = torch.randn_like(weight)
        results = []
        for on in (False, True):
            fused_kernels.use_fused_kernels(on)
            out = reparam(weight)
            results.append((out, *torch.autograd.grad(out, params, upstream)))
        for eager, fast in zip(*results):
            scale = eager.abs().max().clamp_min(1.0)
            torch.testing.assert_close(fast / scale, eager / scale, rtol=0, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["sapp", "powerprop"])
def test_fused_kernels_train_to_the_same_masks_and_weights(tmp_path, fused_kernels, algorithm):
    runs = []
    for on in (False, True):
        fused_kernels.use_fused_kernels(on)
        torch.manual_seed(0)
        model = TinyNet()
        plan = [("dense", 0.2), ("sparsify", 0.4), ("sparse", 0.2), ("dense", 0.1), ("sparse", 0.1)]
        callback = BlockPruning(algorithm, 0.5, 4, min_blocks=10, plan=plan if algorithm == "sapp" else "imagenet")
        make_trainer(tmp_path / str(on), [callback], max_epochs=10).fit(model, tiny_loader())
        runs.append(model.state_dict())
    for (key, eager), fast in zip(runs[0].items(), runs[1].values()):
        assert torch.equal(eager == 0, fast == 0), key  # the same blocks pruned
        torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5, msg=key)
