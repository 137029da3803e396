"""Bad input and odd states: one test per error message, warnings that name the layer, and states that must
leave the model alone."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import (
    BLOCK,
    PHASE_STARTS,
    PLAN,
    PRUNED,
    Inject,
    TinyNet,
    assert_same_state,
    make_trainer,
    pruning,
    state_of,
    tiny_loader,
)
from torch import nn

from sapp_lightning import BlockPruning, BlockSparsifier, block_sparsity, keep_count


def test_unknown_algorithm_lists_every_registered_one():
    with pytest.raises(
        ValueError, match="unknown algorithm 'sa'; expected one of 'acdc', 'gmp', 'magnitude', 'powerprop', 'sapp'"
    ):
        BlockPruning("sa", sparsity=0.5, block_size=4)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", None, True])
def test_sparsity_outside_range(bad):
    with pytest.raises(ValueError, match=re.escape("sparsity must be a number in [0, 1)")):
        BlockPruning("acdc", sparsity=bad, block_size=4)


@pytest.mark.parametrize("bad", [0, -2, (4, 0)])
def test_block_size_below_one(bad):
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BlockPruning("acdc", sparsity=0.5, block_size=bad)


def test_plan_not_covering_training():
    with pytest.raises(ValueError, match="must cover training exactly"):
        BlockPruning("acdc", sparsity=0.5, block_size=4, plan=[("dense", 0.5), ("sparse", 0.3)])


def test_invalid_regex():
    with pytest.raises(ValueError, match="include holds an invalid regular expression"):
        BlockPruning("acdc", sparsity=0.5, block_size=4, include=["fc("])


def test_bad_prune_mode():
    with pytest.raises(ValueError, match="prune_mode must be one of 'zero', 'mask'"):
        BlockPruning("acdc", sparsity=0.5, block_size=4, prune_mode="delete")


def test_no_layer_with_enough_blocks_leaves_the_model_untouched(tmp_path):
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    callback = BlockPruning("sapp", sparsity=0.5, block_size=64)
    with pytest.raises(ValueError, match=r"no layer has at least min_blocks=100 blocks of size \(64, 64\)"):
        make_trainer(tmp_path, [callback]).fit(model, tiny_loader())
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_no_candidate_layer(tmp_path):
    callback = BlockPruning("acdc", sparsity=0.5, block_size=4, include=["nothing_matches"])
    with pytest.raises(ValueError, match="no layer to prune"):
        make_trainer(tmp_path, [callback]).fit(TinyNet(), tiny_loader())


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


def test_bad_check_finite_every_n_steps():
    with pytest.raises(ValueError, match="check_finite_every_n_steps must be an int >= 0"):
        pruning("sapp", check_finite_every_n_steps=-1)


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


class NoEligibleNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(3, 3, 3, groups=3)
        self.conv1d = nn.Conv1d(3, 4, 3)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.conv1d(self.depthwise(x).flatten(2)).mean(-1) * self.scale

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_model_with_no_eligible_layer_is_refused_untouched_and_the_callback_stays_usable(tmp_path):
    model = NoEligibleNet()
    before = state_of(model)
    callback = pruning("sapp")
    with pytest.raises(ValueError, match=r"no layer to prune: the model has no nn.Linear or nn.Conv2d \(groups=1\)"):
        make_trainer(tmp_path, [callback]).fit(model, tiny_loader())
    assert_same_state(state_of(model), before)
    make_trainer(tmp_path, [callback], max_epochs=2).fit(TinyNet(), tiny_loader())
    assert [layer.name for layer in callback.layers] == list(PRUNED)


def test_a_second_fit_with_the_same_callback_is_refused(tmp_path):
    callback = pruning("sapp")
    make_trainer(tmp_path, [callback], max_epochs=2).fit(TinyNet(), tiny_loader())
    other = TinyNet()
    before = state_of(other)
    with pytest.raises(RuntimeError, match="already committed a model at the end of an earlier fit"):
        make_trainer(tmp_path, [callback], max_epochs=2).fit(other, tiny_loader())
    assert_same_state(state_of(other), before)


def test_after_a_failed_fit_the_callback_and_model_say_what_to_do(tmp_path):
    def fail(callback):
        raise KeyError("boom")

    model = TinyNet()
    keys = list(model.state_dict())
    callback = pruning("acdc")
    with pytest.raises(KeyError, match="boom"):
        make_trainer(tmp_path, [Inject(callback, 30, fail), callback]).fit(model, tiny_loader())
    with pytest.raises(RuntimeError, match="already pruned a model in an earlier fit that did not finish"):
        make_trainer(tmp_path, [callback]).fit(model, tiny_loader())
    with pytest.raises(ValueError, match=r"layer\(s\) 'conv', 'fc1' already carry the masks of another BlockPruning"):
        make_trainer(tmp_path, [pruning("acdc")]).fit(model, tiny_loader())
    callback.commit()
    assert list(model.state_dict()) == keys
    make_trainer(tmp_path, [pruning("acdc")], max_epochs=2).fit(model, tiny_loader())  # a new run from there


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluation_without_fit_leaves_model_and_callback_alone(tmp_path, stage):
    model = TinyNet()
    model.test_step = model.validation_step
    model.predict_step = lambda batch, *args: model(batch[0])
    before = state_of(model)
    callback = pruning("sapp")
    getattr(make_trainer(tmp_path, [callback]), stage)(model, tiny_loader())
    assert_same_state(state_of(model), before)
    assert callback.layers == [] and callback.phase is None
    make_trainer(tmp_path, [callback], max_epochs=2).fit(model, tiny_loader())  # still good for a fit
    committed = state_of(model)
    getattr(make_trainer(tmp_path, [callback]), stage)(model, tiny_loader())  # and after it
    assert_same_state(state_of(model), committed)


class TiedNet(TinyNet):
    """fc1's weight is also an embedding table (weight tying)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(24, 128)
        self.embedding.weight = self.fc1.weight


def test_a_tied_weight_stays_dense_with_a_warning_and_is_pruned_once_when_included(tmp_path):
    model = TiedNet()
    before = state_of(model)
    callback = pruning("sapp")
    with pytest.warns(
        UserWarning, match=r"tied weights stay dense: fc1 \(tied with embedding.weight\).*include=\[\.\.\.\]"
    ):
        make_trainer(tmp_path, [callback], max_epochs=2).fit(model, tiny_loader())
    assert [layer.name for layer in callback.layers] == ["conv"]
    assert model.embedding.weight is model.fc1.weight
    assert "fc1  " in callback.sparsifier.summary() and "tied with embedding.weight" in callback.sparsifier.summary()
    model = TiedNet()
    with pytest.raises(ValueError, match=r"include names 'fc1', whose weight is tied with embedding.weight: sapp in "):
        make_trainer(tmp_path, [pruning("sapp", include=["fc1"])]).fit(model, tiny_loader())
    assert list(state_of(model)) == list(before)  # refused before anything changed
    callback = pruning("acdc", include=["fc1"])
    make_trainer(tmp_path, [callback], max_epochs=2).fit(model, tiny_loader())
    assert [layer.name for layer in callback.layers] == ["fc1"]  # pruned once, through its first owner
    assert model.embedding.weight is model.fc1.weight  # still one tensor, with the same zero blocks for both
    assert block_sparsity(model, BLOCK, include=["fc1"])["fc1"].zero_blocks == PRUNED["fc1"] - keep_count(192, 0.5)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluation_without_fit_leaves_the_model_alone(tmp_path, stage):
    model = TinyNet()
    model.test_step = model.validation_step
    model.predict_step = lambda batch, *args: model(batch[0])
    keys = list(model.state_dict())
    trainer = make_trainer(tmp_path, [pruning("sapp")])
    getattr(trainer, stage)(model, tiny_loader())
    assert list(model.state_dict()) == keys


# --- the sparsifier's own messages ---------------------------------------------------------------------------
def test_a_knob_next_to_an_algorithm_object_is_refused():
    from sapp_lightning.algorithms import SequentialAttentionPP

    with pytest.raises(ValueError, match=r"attention_clipping, logit_l2 belong to the algorithm object: pass them to "):
        BlockPruning(SequentialAttentionPP(), 0.5, BLOCK, attention_clipping=False, logit_l2=0.1)


def test_an_algorithm_that_is_neither_a_name_nor_an_object():
    with pytest.raises(TypeError, match="algorithm must be a name or a PruningAlgorithm, got int"):
        BlockPruning(3, 0.5, BLOCK)


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(min_blocks=-1), "min_blocks must be an int >= 0"),
        (dict(schedule_exponent=0), "schedule_exponent must be > 0"),
        (dict(logit_l2=-1.0), "logit_l2 must be >= 0 or None"),
        (dict(total_steps=2.5), "total_steps must be an int >= 1 or None"),
        (dict(total_steps=0), "total_steps must be an int >= 1 or None"),
    ],
)
def test_bad_numeric_options(option, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BlockPruning("sapp", 0.5, BLOCK, **option)


def test_sparsifier_calls_out_of_order_say_the_order():
    sparsifier = BlockSparsifier("acdc", 0.5, BLOCK, min_blocks=10)
    with pytest.raises(
        RuntimeError, match=r"step\(\) needs a sparsifier that is training, but it is new .*prepare -> "
    ):
        sparsifier.step()
    sparsifier.prepare(TinyNet())
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        sparsifier.start(0)


def test_report_before_prepare():
    with pytest.raises(RuntimeError, match="report\\(\\) lists the pruned layers, which are chosen when"):
        BlockSparsifier("acdc", 0.5, BLOCK).report()


def test_sapp_without_an_optimizer():
    sparsifier = BlockSparsifier("sapp", 0.5, BLOCK, min_blocks=10)
    sparsifier.prepare(TinyNet())
    with pytest.raises(ValueError, match="SequentialAttentionPP trains attention logits and needs an optimizer"):
        sparsifier.attach([])


def test_a_loop_longer_than_the_plan_warns_once_and_a_shorter_one_warns_at_the_commit():
    sparsifier = BlockSparsifier("acdc", 0.5, BLOCK, min_blocks=10, plan=PLAN)
    sparsifier.prepare(TinyNet())
    sparsifier.start(total_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            sparsifier.step()
    assert [str(w.message) for w in caught if "goes on past the 4 steps" in str(w.message)] != []
    assert len(caught) == 1
    short = BlockSparsifier("acdc", 0.5, BLOCK, min_blocks=10, plan=PLAN)
    short.prepare(TinyNet())
    short.start(total_steps=80)
    short.step()
    with pytest.warns(UserWarning, match=r"below the target .*training stopped after 1 of the 80 steps of the plan"):
        short.commit()


def test_a_state_of_another_version_is_refused():
    sparsifier = BlockSparsifier("acdc", 0.5, BLOCK, min_blocks=10)
    sparsifier.prepare(TinyNet())
    with pytest.raises(ValueError, match="unsupported BlockPruning checkpoint state version 1 .*committed_state_dict"):
        sparsifier.load_state_dict({"version": 1})


def test_two_block_pruning_callbacks_on_one_trainer_are_refused_by_lightning(tmp_path):
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `BlockPruning`"):
        make_trainer(tmp_path, [pruning("sapp"), pruning("acdc")])


def test_an_endless_fit_is_refused(tmp_path):
    with pytest.raises(ValueError, match="BlockPruning needs a finite training length: set max_epochs or max_steps"):
        make_trainer(tmp_path, [pruning("acdc")], max_epochs=-1).fit(TinyNet(), tiny_loader())


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


def test_powerprop_names_an_all_zero_attention_input_projection_by_its_parameter():
    attention = nn.MultiheadAttention(32, 2)
    nn.init.zeros_(attention.in_proj_weight)
    model = nn.ModuleDict({"attn": attention, "fc": nn.Linear(64, 64)})
    sparsifier = BlockSparsifier("powerprop", 0.5, 8, min_blocks=4)
    with pytest.warns(UserWarning, match=r"stay dense: attn.in_proj_weight \(all zero"):
        sparsifier.prepare(model)
    assert [layer.name for layer in sparsifier.layers] == ["attn.out_proj", "fc"]
    assert {c.name: c.reason for c in sparsifier.choices}["attn.in_proj_weight"].startswith("all zero")


def test_a_callback_takes_a_sparsifier_or_its_arguments_not_both():
    sparsifier = BlockSparsifier("acdc", sparsity=0.5, block_size=4)
    with pytest.raises(ValueError, match="pass either a BlockSparsifier or its arguments to BlockPruning, not both"):
        BlockPruning(sparsifier, sparsity=0.9)


def test_a_callback_refuses_a_sparsifier_that_already_pruned_a_model():
    sparsifier = BlockSparsifier("acdc", sparsity=0.5, block_size=4, min_blocks=1)
    sparsifier.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="BlockPruning needs a new BlockSparsifier, got one that is already prepared"):
        BlockPruning(sparsifier)
