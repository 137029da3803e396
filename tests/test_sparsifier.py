"""BlockSparsifier (sparsifier.py), with every algorithm: exact final block counts, the commit back to the model's own
weights and keys, optimizer state reset at every phase boundary, what listeners hear, how often and over what the
masks move (sparsify_every_n_steps, sparsify_regrowth, ranking), its arguments, and the order of its calls."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from helpers import (
    ALGORITHM_IDS,
    BLOCK,
    EXPECTED_KEPT,
    PHASE_STARTS,
    PLAN,
    PRUNED,
    STEPS,
    TinyNet,
    drive,
    fit_and_probe,
    loop_sparsifier,
    make_trainer,
    pruning,
    run,
    tiny_loader,
)

from sapp_lightning import BlockPruning, BlockSparsifier, Phase, block_sparsity, exponential_sparsity, keep_count

# --- exact blocks, the commit, optimizer resets, listeners ------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHM_IDS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_every_pruned_layer_ends_at_the_target_with_exact_zero_blocks(tmp_path, algorithm, sparsity):
    model, callback, _, _, _ = fit_and_probe(tmp_path, algorithm, sparsity)
    report = block_sparsity(model, BLOCK, min_blocks=10)
    assert [layer.name for layer in report.layers] == list(PRUNED)
    for layer in report.layers:
        assert layer.num_blocks - layer.zero_blocks == keep_count(PRUNED[layer.name], sparsity)
    dense = block_sparsity(model, BLOCK)["fc2"]
    assert dense.zero_blocks == 0  # under min_blocks: untouched
    assert callback.achieved_sparsity() == pytest.approx(
        1 - sum(keep_count(n, sparsity) for n in PRUNED.values()) / sum(PRUNED.values())
    )


@pytest.mark.parametrize("algorithm", ALGORITHM_IDS)
def test_commit_leaves_plain_weights_with_the_original_keys_and_same_outputs(tmp_path, algorithm):
    model, _, recorder, _, keys_before = fit_and_probe(tmp_path, algorithm)
    assert list(model.state_dict().keys()) == keys_before
    for module in model.modules():
        assert not hasattr(module, "parametrizations")
        assert not any("block_mask" in name for name, _ in module.named_buffers())
    assert all(isinstance(m.weight, torch.nn.Parameter) for m in (model.conv, model.fc1, model.fc2))
    with torch.no_grad():
        assert torch.equal(model(recorder.probe), recorder.output)
    # loads into the same architecture with no trace of this package
    plain = TinyNet()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(recorder.probe), recorder.output)


@pytest.mark.parametrize("algorithm", ALGORITHM_IDS)
def test_optimizer_state_is_reset_at_every_phase_boundary(tmp_path, algorithm):
    _, callback, _, probe, _ = fit_and_probe(tmp_path, algorithm)
    boundaries = {callback.schedule.start(i) for i in range(1, len(callback.schedule.ends))}
    checked = 0
    for row in probe.rows:
        if row["step"] in boundaries:
            assert row["optimizer_state"] == 0
            checked += 1
        elif row["step"] > 1:
            assert row["optimizer_state"] > 0
    assert checked == len(boundaries)


def test_listeners_hear_every_phase_and_see_masks_and_attention(tmp_path):
    callback = pruning("sapp")
    heard = []

    def listen(sparsifier, event):
        states = sparsifier.layer_states()
        heard.append((event.kind, event.step, event.segment_index, [s.num_kept for s in states]))
        assert [s.name for s in states] == list(PRUNED) and all(s.importance_name == "attention" for s in states)
        for state, layer in zip(states, sparsifier.layers):
            assert torch.equal(state.mask, layer.mask) and state.importance.shape == layer.layout.grid_shape

    callback.sparsifier.add_listener(listen)
    make_trainer(tmp_path, [callback]).fit(TinyNet(), tiny_loader())
    kinds = [(kind, step, index) for kind, step, index, _ in heard]
    ends = [("phase_end", step, index) for index, step in enumerate(PHASE_STARTS[1:])]
    starts = [("phase_start", step, index) for index, step in enumerate(PHASE_STARTS)]
    assert kinds == [starts[0], *[x for pair in zip(ends, starts[1:]) for x in pair], ("commit", STEPS, 4)]
    assert heard[-1][3] == EXPECTED_KEPT  # the final masks, before the commit folds them in
    assert heard[2][3] == list(PRUNED.values())  # phase 1 (sparsify) starts from all blocks


# --- how often and over what the masks move ---------------------------------------------------------------------------


def test_sparsify_every_n_steps_moves_the_mask_in_steps_and_reaches_the_target_on_the_last_one():
    kept = {}
    for every in (1, 5):
        kept[every] = []
        drive(loop_sparsifier(sparsify_every_n_steps=every), each_step=lambda s, rows=kept[every]: rows.append(
            s.layers[1].num_kept))  # fmt: skip
    # rows[k] holds the masks of forward pass k + 1 (step() moves them to where the next pass needs them)
    changes = {every: [k + 2 for k in range(len(rows) - 1) if rows[k + 1] != rows[k]] for every, rows in kept.items()}
    assert set(changes[5]) <= {8, 13, 18, 23}
    assert len(changes[1]) > len(changes[5]) >= 3
    last = kept[5][22]  # the masks of the last sparsification step (23)
    assert last == kept[1][22] == keep_count(PRUNED["fc1"], 0.5)  # the target, on the phase's last step
    assert exponential_sparsity(1.0, 0.5) == 0.5


def test_sparsify_regrowth_lets_a_dropped_block_come_back_within_the_phase():
    def promote_a_dropped_block(s):
        if s.phase is Phase.SPARSIFY and s.steps_done == 15:
            layer = s.layers[1]
            dropped = (~layer.mask).view(-1).nonzero()[0]
            with torch.no_grad():
                layer.reparam.logits.view(-1)[dropped] = 50.0
            promote_a_dropped_block.block = int(dropped)
        if s.steps_done == 20:
            promote_a_dropped_block.back = bool(s.layers[1].mask.view(-1)[promote_a_dropped_block.block])

    for regrowth, expected in ((True, True), (False, False)):
        drive(loop_sparsifier(sparsify_regrowth=regrowth, attention_clipping=False), each_step=promote_a_dropped_block)
        assert promote_a_dropped_block.back is expected


def test_global_ranking_reaches_the_target_over_all_layers_not_in_each():
    glob, local = loop_sparsifier("acdc", 0.75, ranking="global"), loop_sparsifier("acdc", 0.75)
    drive(glob)
    drive(local)
    total = sum(PRUNED.values())
    kept_global = [layer.num_kept for layer in glob.layers]
    assert sum(kept_global) == total - round(0.75 * total)
    assert kept_global != [keep_count(n, 0.75) for n in PRUNED.values()]  # layers end at other sparsities
    assert [layer.num_kept for layer in local.layers] == [keep_count(n, 0.75) for n in PRUNED.values()]
    with warnings.catch_warnings(record=True) as caught:  # the total is on target: no layer is "below" its own
        warnings.simplefilter("always")
        glob.commit()
    assert not [w for w in caught if "below the target" in str(w.message)]


# --- arguments, call order, training length ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", None, True])
def test_sparsity_outside_range(bad):
    with pytest.raises(ValueError, match=re.escape("sparsity must be a number in [0, 1)")):
        BlockPruning("acdc", sparsity=bad, block_size=4)


def test_bad_min_blocks():
    with pytest.raises(ValueError, match=re.escape("min_blocks must be an int >= 0")):
        BlockPruning("sapp", 0.5, BLOCK, min_blocks=-1)


def test_bad_check_finite_every_n_steps():
    with pytest.raises(ValueError, match="check_finite_every_n_steps must be an int >= 0"):
        pruning("sapp", check_finite_every_n_steps=-1)


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(sparsify_every_n_steps=0), "sparsify_every_n_steps must be an int >= 1"),
        (dict(ranking="model"), "ranking must be 'layer' or 'global'"),
    ],
)
def test_bad_sparsifier_options(option, message):
    with pytest.raises(ValueError, match=message):
        loop_sparsifier(**option)


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


def test_resume_with_another_training_length_is_refused(tmp_path, full_runs):
    ckpt_dir, _, _ = full_runs("sapp")
    with pytest.raises(ValueError, match="planned over 80 optimizer steps, but this run has 96"):
        run(tmp_path, ckpt_path=ckpt_dir / "step=29.ckpt", max_epochs=12)
