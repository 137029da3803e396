"""Block PowerPropagation (algorithms/powerprop.py): the norm-scaled forward and its hand-written backward
(gradients, zero blocks, every shape, half precision), the user's init kept, alpha, and the all-zero weights it
leaves dense (a zero block never moves under PowerPropagation)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import (
    PRUNED,
    REPARAM_SHAPES,
    TinyNet,
    drive,
    loop_sparsifier,
    make_trainer,
    paper_pruning,
    tiny_loader,
    zero_blocks_,
)
from torch import nn
from torch.nn.utils import parametrize

from sapp_lightning import BlockPruning, BlockSparsifier, keep_count
from sapp_lightning.algorithms.powerprop import BlockPowerProp
from sapp_lightning.blocks import BlockLayout


def test_powerprop_starts_from_the_users_init():
    torch.manual_seed(0)
    model = TinyNet()
    before = model.fc1.weight.detach().clone()
    callback = paper_pruning("powerprop")
    callback.sparsifier.prepare(model)
    torch.testing.assert_close(model.fc1.weight, before, rtol=1e-5, atol=1e-6)
    raw = model.fc1.parametrizations.weight.original
    layout = callback.layers[1].layout
    assert not torch.allclose(raw, before)
    torch.testing.assert_close(layout.block_norms(raw.detach()) ** 2, layout.block_norms(before))


@pytest.mark.parametrize("weight_shape", [(10, 12), (6, 4, 3, 3), (10, 7)], ids=["linear", "conv", "ragged"])
def test_powerprop_gradients_match_the_norm_scaled_formula(weight_shape):
    """BlockPowerProp has a hand-written backward where blocks tile the weight: float64 gradcheck, double
    backward, the same gradient as autograd through ``||V_b|| V_b mask_b``, and none into pruned blocks."""
    from sapp_lightning.algorithms.powerprop import BlockPowerProp
    from sapp_lightning.blocks import BlockLayout

    torch.manual_seed(0)
    weight = torch.randn(*weight_shape, dtype=torch.float64, requires_grad=True)
    layout = BlockLayout.for_weight(weight, 2)
    reparam = BlockPowerProp(layout).double()
    reparam.block_mask[0, 0] = False
    torch.autograd.gradcheck(reparam, (weight,))
    torch.autograd.gradgradcheck(reparam, (weight,))
    grad = torch.randn(weight_shape, dtype=torch.float64)
    (ours,) = torch.autograd.grad(reparam(weight), weight, grad)
    norms = layout.block_sq_norms(weight).sqrt() * reparam.block_mask
    (reference,) = torch.autograd.grad(weight * layout.expand(norms), weight, grad)
    torch.testing.assert_close(ours, reference)
    pruned = layout.expand((~reparam.block_mask).double()).bool()
    assert (ours[pruned] == 0).all() and (ours[~pruned] != 0).all()


def norm_scaled_reference(layout: BlockLayout, weight: torch.Tensor, mask: torch.Tensor, alpha=2.0) -> torch.Tensor:
    """``||V_b||^(alpha-1) V_b m_b`` through autograd, with a norm whose gradient at 0 is 0."""
    sq = layout.block_sq_norms(weight)
    norms = torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt() * (sq > 0)
    return weight * layout.expand(norms ** (alpha - 1) * mask)


def powerprop(shape: str, dtype=torch.float64, zero_block: bool = True, alpha: float = 2.0):
    weight_shape, block = REPARAM_SHAPES[shape]
    torch.manual_seed(0)
    weight = torch.randn(*weight_shape, dtype=dtype)
    layout = BlockLayout.for_weight(weight, block)
    reparam = BlockPowerProp(layout, alpha).to(dtype)
    reparam.block_mask[0, 0] = False
    if zero_block:  # an all-zero block that is kept (a zero-initialised layer, or zeroed in prune_mode="zero")
        zero_blocks_(weight, block, blocks=[1])
    return reparam, layout, weight.requires_grad_()


@pytest.mark.parametrize("alpha", [2.0, 3.0])
@pytest.mark.parametrize("shape", REPARAM_SHAPES)
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


@pytest.mark.parametrize("shape", REPARAM_SHAPES)
def test_powerprop_gradient_at_a_zero_block_is_zero_not_nan(shape):
    reparam, layout, _ = powerprop(shape, dtype=torch.float32)
    weight = torch.zeros(REPARAM_SHAPES[shape][0], requires_grad=True)
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


# --- alpha ------------------------------------------------------------------------------------------------------------


def test_powerprop_alpha_keeps_the_init_trains_differently_and_is_part_of_the_configuration():
    from sapp_lightning.algorithms import PowerPropagation

    torch.manual_seed(0)
    reference, model = TinyNet(), None
    for alpha in (2, 3):
        torch.manual_seed(0)
        model = TinyNet()
        loop_sparsifier("powerprop", alpha=alpha).prepare(model)
        torch.testing.assert_close(model.fc1.weight, reference.fc1.weight)  # W starts at the user's init either way
    runs = {alpha: loop_sparsifier("powerprop", alpha=alpha) for alpha in (2, 3)}
    models = {alpha: drive(s) for alpha, s in runs.items()}
    assert not torch.allclose(models[2].fc1.weight, models[3].fc1.weight)
    for s in runs.values():
        assert [layer.zero_blocks for layer in s.report().layers] == [n - keep_count(n, 0.5) for n in PRUNED.values()]
    assert runs[3].algorithm.config() == {"prune_mode": "mask", "alpha": 3.0}
    assert runs[2].algorithm.config() == PowerPropagation().config() == {"prune_mode": "mask"}  # as before alpha
    with pytest.raises(ValueError, match=r"alpha: checkpoint 3\.0, this callback None"):
        fresh = loop_sparsifier("powerprop")
        fresh.prepare(TinyNet())
        fresh.load_state_dict(runs[3].state_dict())


@pytest.mark.parametrize("alpha", [0.5, True, "2"])
def test_bad_powerprop_alpha(alpha):
    from sapp_lightning.algorithms import PowerPropagation

    with pytest.raises(ValueError, match=r"alpha must be a number >= 1 \(the paper's block PowerPropagation is 2\)"):
        PowerPropagation(alpha=alpha)


# --- all-zero weights stay dense --------------------------------------------------------------------------------------


def test_powerprop_leaves_an_all_zero_weight_dense_saying_why_and_refuses_a_model_with_only_such_weights():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    nn.init.zeros_(model[2].weight)  # as torchvision's ViT head: a zero block never moves under PowerPropagation
    sparsifier = BlockSparsifier("powerprop", 0.5, 8, min_blocks=4)
    with pytest.warns(UserWarning, match=r"stay dense: 2 \(all zero: PowerPropagation's all-zero blocks get no"):
        sparsifier.prepare(model)
    assert [layer.name for layer in sparsifier.layers] == ["0"]
    assert {c.name: c.reason for c in sparsifier.choices}["2"].startswith("all zero")
    fresh = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    for layer in fresh:
        nn.init.zeros_(layer.weight)
    with pytest.raises(ValueError, match=r"no layer to prune: 0 is all zero: .*; 1 is all zero: "):
        BlockSparsifier("powerprop", 0.5, 8, min_blocks=4).prepare(fresh)
    assert not any("parametrizations" in name for name, _ in fresh.named_modules())  # untouched


def test_powerprop_names_an_all_zero_attention_input_projection_by_its_parameter():
    attention = nn.MultiheadAttention(32, 2)
    nn.init.zeros_(attention.in_proj_weight)
    model = nn.ModuleDict({"attn": attention, "fc": nn.Linear(64, 64)})
    sparsifier = BlockSparsifier("powerprop", 0.5, 8, min_blocks=4)
    with pytest.warns(UserWarning, match=r"stay dense: attn.in_proj_weight \(all zero"):
        sparsifier.prepare(model)
    assert [layer.name for layer in sparsifier.layers] == ["attn.out_proj", "fc"]
    assert {c.name: c.reason for c in sparsifier.choices}["attn.in_proj_weight"].startswith("all zero")
