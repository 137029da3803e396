"""Health checks of a run (health.py): NaN or infinite weights and logits, named with their layer and the likely
cause, checked at phase starts and every n steps; a warning naming the layer a sparsity rounds to no pruned block,
and the layers whose kept blocks ended all zero; none in a dense run."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import BLOCK, PHASE_STARTS, PLAN, Inject, TinyNet, make_trainer, pruning, tiny_loader
from torch import nn

from sapp_lightning import BlockPruning, BlockSparsifier, keep_count


def set_value(target: str, value: float):
    def corrupt(callback):
        layer = {layer.name: layer for layer in callback.layers}[target.split(".")[0]]
        tensor = layer.reparam.logits if target.endswith("logits") else layer.raw_weight
        tensor.view(-1)[3] = value

    return corrupt


@pytest.mark.parametrize(
    "algorithm, step, target, value, every, expected",
    [
        # a phase boundary (step 48) checks whatever check_finite_every_n_steps says
        ("sapp", 48, "fc1.logits", math.nan, 100, "at step 48 in layer 'fc1' (attention logits)"),
        # inside a phase: every n steps
        ("sapp", 55, "conv.weight", math.inf, 5, "at step 55 in layer 'conv' (weight)"),
        ("acdc", 20, "fc1.weight", -math.inf, 10, "at step 20 in layer 'fc1' (weight)"),
        ("powerprop", 80, "conv.weight", math.nan, 100, "when training ended in layer 'conv' (weight)"),
    ],
)
def test_nan_or_inf_is_reported_with_the_layer(tmp_path, algorithm, step, target, value, every, expected):
    torch.manual_seed(0)
    model = TinyNet()
    callback = pruning(algorithm, check_finite_every_n_steps=every)
    inject = Inject(callback, step, set_value(target, value))
    with pytest.raises(FloatingPointError, match="NaN or infinite values") as error:
        make_trainer(tmp_path, [inject, callback]).fit(model, tiny_loader())
    assert expected in str(error.value)
    assert "'fc2'" not in str(error.value)


def test_finite_checks_run_at_phase_starts_and_every_n_steps_only(tmp_path):
    callback = pruning("sapp", check_finite_every_n_steps=30)
    checks, check_finite = [], callback.sparsifier.check_finite
    callback.sparsifier.check_finite = lambda when: (checks.append(when), check_finite(when))
    make_trainer(tmp_path, [callback]).fit(TinyNet(), tiny_loader())
    expected = [f"at step {s}" for s in sorted(PHASE_STARTS + [30, 60])] + ["when training ended"]
    assert checks == expected  # never per step: one host sync each


@pytest.mark.parametrize(
    "algorithm, dtype, corrupt, cause",
    [
        ("acdc", torch.float32, "weight", r"; training diverged \(lower the learning rate, clip gradients, or check"),
        ("acdc", torch.float16, "weight", r"; float16 overflowed \(its largest value is 65504\): train in bf16-mixed"),
        ("sapp", torch.float32, "logits", r"; only SA\+\+'s attention logits diverged: lower their learning rate or"),
    ],
)
def test_a_non_finite_error_names_the_cause_that_fits_what_is_non_finite(algorithm, dtype, corrupt, cause):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    sparsifier = BlockSparsifier(algorithm, 0.5, 8, min_blocks=4)
    (layer, _) = sparsifier.prepare(model)
    model.to(dtype)
    tensor = sparsifier.algorithm.trainable_parameters(layer)[0] if corrupt == "logits" else layer.raw_weight
    with torch.no_grad():
        tensor.view(-1)[5] = math.inf
    what = "attention logits" if corrupt == "logits" else "weight"
    with pytest.raises(FloatingPointError, match=rf"NaN or infinite values now in layer '0' \({what}\){cause}"):
        sparsifier.check_finite("now")


class TwoLayerNet(pl.LightningModule):
    """big: 20 x 20 = 400 blocks of 4x4; small: 20 x 5 = 100 blocks; head: 5 blocks."""

    def __init__(self):
        super().__init__()
        self.big = nn.Linear(80, 80)
        self.small = nn.Linear(80, 20)
        self.head = nn.Linear(20, 4)

    def forward(self, x):
        return self.head(F.relu(self.small(F.relu(self.big(x.flatten(1)[:, :80])))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_sparsity_that_rounds_to_zero_pruned_blocks_warns_naming_the_layer(tmp_path):
    assert keep_count(400, 0.004) == 398 and keep_count(100, 0.004) == 100
    model = TwoLayerNet()
    callback = BlockPruning("magnitude", sparsity=0.004, block_size=BLOCK, min_blocks=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [callback], max_epochs=2).fit(model, tiny_loader())
    messages = [str(w.message) for w in caught if "BlockPruning" in str(w.message)]
    rounding = [m for m in messages if "rounds to 0 pruned blocks" in m]
    assert len(rounding) == 1 and "small (100 blocks)" in rounding[0] and "big" not in rounding[0]
    assert not any("below the target" in m for m in messages)  # each layer reached its own target
    report = callback.report()
    assert (report["big"].zero_blocks, report["small"].zero_blocks) == (2, 0)


class DeadUnitNet(pl.LightningModule):
    """``hidden`` starts all zero with bias -1: ReLU outputs 0, so its weights never get a gradient."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(16, 16)  # 4x4 blocks of 4x4
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            self.hidden.weight.zero_()
            self.hidden.bias.fill_(-1.0)

    def forward(self, x):
        return self.head(F.relu(self.hidden(x.flatten(1)[:, :16])))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("algorithm, prune_mode", [("magnitude", "zero"), ("sapp", "mask")])
def test_kept_blocks_that_end_all_zero_warn_naming_the_layer(tmp_path, algorithm, prune_mode):
    callback = BlockPruning(algorithm, sparsity=0.5, block_size=BLOCK, min_blocks=16, plan=PLAN, prune_mode=prune_mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [callback], max_epochs=2).fit(DeadUnitNet(), tiny_loader())
    dead = [str(w.message) for w in caught if "kept blocks are all zero" in str(w.message)]
    assert len(dead) == 1 and "8 kept blocks" in dead[0] and "hidden: 8 of 8" in dead[0]
    assert ("prune_mode='zero' a unit" in dead[0]) == (prune_mode == "zero")
    assert callback.report()["hidden"].zero_blocks == 16  # the report counts them as pruned


def test_sparsity_zero_is_a_quiet_dense_run(tmp_path):
    callback = pruning("sapp", sparsity=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [callback], max_epochs=2).fit(TinyNet(), tiny_loader())
    assert not [w for w in caught if "BlockPruning" in str(w.message)]
    assert callback.report().zero_blocks == 0
