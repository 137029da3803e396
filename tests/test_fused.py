"""Fused CPU kernels of the block parametrizations (fused.py): on unless turned off, the eager values and gradients
for every shape, and the same masks and weights after training."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import REPARAM_SHAPES, TinyNet, make_trainer, tiny_loader

from sapp_lightning import BlockPruning
from sapp_lightning.algorithms.powerprop import BlockPowerProp
from sapp_lightning.algorithms.sapp import BlockAttention
from sapp_lightning.blocks import BlockLayout


def test_fused_kernels_are_on_unless_turned_off():
    from sapp_lightning import fused

    assert fused.fused_kernels_enabled() == (os.environ.get("SAPP_FUSED_KERNELS", "1") != "0")
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
    weight_shape, block = REPARAM_SHAPES[shape]
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
@pytest.mark.parametrize("shape", REPARAM_SHAPES)
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
