"""The algorithms package: the registry and the base class (unknown names and options, prune modes, algorithm
objects, the block mask's forward), ACDC, gradual magnitude pruning, and the one-shot methods' single pruning step.
SA++ and PowerPropagation have files of their own (test_sapp.py, test_powerprop.py)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from helpers import (
    BLOCK,
    PLAN,
    PRUNED,
    TinyNet,
    assert_same_state,
    fit_and_probe,
    loop_sparsifier,
    make_trainer,
    paper_pruning,
    pruning,
    state_of,
    tiny_loader,
)

from sapp_lightning import BlockPruning, Phase, block_sparsity, keep_count
from sapp_lightning.algorithms.base import BlockReparam
from sapp_lightning.algorithms.sapp import BlockAttention
from sapp_lightning.blocks import BlockLayout

# --- the registry and the base class ----------------------------------------------------------------------------------


def test_unknown_algorithm_lists_every_registered_one():
    with pytest.raises(
        ValueError, match="unknown algorithm 'sa'; expected one of 'acdc', 'gmp', 'magnitude', 'powerprop', 'sapp'"
    ):
        BlockPruning("sa", sparsity=0.5, block_size=4)


def test_bad_prune_mode():
    with pytest.raises(ValueError, match="prune_mode must be one of 'zero', 'mask'"):
        BlockPruning("acdc", sparsity=0.5, block_size=4, prune_mode="delete")


def test_a_knob_next_to_an_algorithm_object_is_refused():
    from sapp_lightning.algorithms import SequentialAttentionPP

    with pytest.raises(ValueError, match=r"attention_clipping, logit_l2 belong to the algorithm object: pass them to "):
        BlockPruning(SequentialAttentionPP(), 0.5, BLOCK, attention_clipping=False, logit_l2=0.1)


def test_an_algorithm_that_is_neither_a_name_nor_an_object():
    with pytest.raises(TypeError, match="algorithm must be a name or a PruningAlgorithm, got int"):
        BlockPruning(3, 0.5, BLOCK)


def test_an_unknown_algorithm_option_is_refused_and_another_algorithms_is_ignored():
    with pytest.raises(ValueError, match=r"unknown algorithm option\(s\) 'scroe'; the algorithms take "):
        loop_sparsifier(scroe="magnitude")
    assert loop_sparsifier("acdc", score="magnitude").algorithm.config() == {"prune_mode": "zero"}


def test_an_algorithm_object_carries_its_knobs_and_equals_the_named_form(tmp_path):
    from sapp_lightning.algorithms import SequentialAttentionPP

    def fit(callback):
        torch.manual_seed(0)
        model = TinyNet()
        make_trainer(tmp_path, [callback], max_epochs=4).fit(model, tiny_loader())
        return state_of(model)

    algorithm = SequentialAttentionPP(attention_clipping=False, logit_l2=0.05)
    by_object = BlockPruning(algorithm, sparsity=0.5, block_size=BLOCK, min_blocks=10, plan=PLAN)
    by_name = pruning("sapp", attention_clipping=False, logit_l2=0.05)
    assert by_object.algorithm is not algorithm and by_object.config() == by_name.config()
    assert_same_state(fit(by_object), fit(by_name))
    assert algorithm.effective_logit_l2 == 0.0  # the user's object stays unattached


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


# --- ACDC -------------------------------------------------------------------------------------------------------------
def test_acdc_alternates_and_regrows_pruned_blocks_from_zero(tmp_path):
    _, callback, _, probe, _ = fit_and_probe(tmp_path, "acdc", sparsity=0.5, plan="criteo")
    sparse_kept = [keep_count(n, 0.5) for n in PRUNED.values()]
    for row in probe.rows:
        assert row["kept"] == (sparse_kept if row["phase"] is Phase.SPARSE else list(PRUNED.values()))
    phases = [row["phase"] for row in probe.rows]
    assert phases.count(Phase.SPARSE) > 0 and phases.count(Phase.DENSE) > 0
    switches = sum(1 for a, b in zip(phases, phases[1:]) if a != b)
    assert switches >= 10


def test_acdc_in_zero_mode_keeps_pruned_weights_at_zero_during_sparse_phases(tmp_path):
    class WeightProbe(pl.Callback):
        def __init__(self, cb):
            self.cb, self.checked = cb, 0

        def on_train_batch_end(self, trainer, pl_module, *args):
            if self.cb.phase is Phase.SPARSE:
                layer = self.cb.layers[1]
                norms = layer.layout.block_norms(layer.raw_weight.detach())
                assert (norms[~layer.mask] == 0).all()
                assert (norms[layer.mask] > 0).all()
                self.checked += 1

    torch.manual_seed(0)
    callback = paper_pruning("acdc")
    weight_probe = WeightProbe(callback)
    make_trainer(tmp_path, [callback, weight_probe]).fit(TinyNet(), tiny_loader())
    assert weight_probe.checked > 0


def test_acdc_mask_mode_keeps_values_under_the_mask(tmp_path):
    class Probe(pl.Callback):
        seen = False

        def on_train_batch_end(self, trainer, pl_module, *args):
            layer = callback.layers[1]
            if callback.phase is Phase.SPARSE and not Probe.seen:
                Probe.seen = True
                raw = layer.layout.block_norms(layer.raw_weight.detach())
                effective = layer.layout.block_norms(layer.effective_weight().detach())
                assert (raw[~layer.mask] > 0).all() and (effective[~layer.mask] == 0).all()

    torch.manual_seed(0)
    callback = paper_pruning("acdc", prune_mode="mask")
    make_trainer(tmp_path, [callback, Probe()]).fit(TinyNet(), tiny_loader())
    assert Probe.seen


def test_mask_mode_dense_phase_leaves_the_weight_untouched_and_commits_exactly(tmp_path):
    """ACDC in prune_mode="mask": dense phases skip the multiply; the committed model is the one that trained."""
    torch.manual_seed(0)
    model = TinyNet()
    callback = BlockPruning("acdc", 0.5, 4, min_blocks=10, prune_mode="mask")
    make_trainer(tmp_path, [callback], max_epochs=10).fit(model, tiny_loader())
    layout = BlockLayout.for_module(model.fc1, 4)
    assert int((layout.block_sq_norms(model.fc1.weight.detach()) == 0).sum()) == layout.num_blocks // 2


# --- gradual magnitude pruning ----------------------------------------------------------------------------------------
def test_gmp_follows_the_cubic_ramp_then_fine_tunes_at_the_final_mask(tmp_path):
    _, callback, _, probe, _ = fit_and_probe(tmp_path, "gmp", sparsity=0.9)  # its own plan: imagenet_gmp
    schedule = callback.schedule
    assert [round(seg.fraction, 2) for seg in schedule.plan.segments] == [0.1, 0.75, 0.15]
    assert schedule.ends == (8, 68, 80)
    from sapp_lightning.schedules import cubic_sparsity

    rows = {row["step"]: row for row in probe.rows}  # state after step n = the masks of step n's forward
    for step in (8, 20, 38, 67):  # the ramp's first step, inside it, and its last
        tau = schedule.locate(step).tau
        expected = [keep_count(n, cubic_sparsity(tau, 0.9)) for n in PRUNED.values()]
        assert rows[step]["kept"] == expected, step
        assert rows[step]["target"] == pytest.approx(cubic_sparsity(tau, 0.9))
    assert rows[20]["kept"] == [8, 107]  # tau = 12/59: 1 - (1 - tau)^3 = 49.4% of the way to 90%
    ramp = [rows[step] for step in range(8, 68)]
    for before, after in zip(ramp, ramp[1:]):  # masks re-chosen every step, among the blocks still kept
        assert all(not (b & ~a).any() for a, b in zip(before["masks"], after["masks"]))
    final = rows[67]["masks"]
    for step in range(68, 80):  # the fine-tuning keeps the final mask
        assert all(torch.equal(a, b) for a, b in zip(rows[step]["masks"], final))
    assert rows[79]["kept"] == [keep_count(n, 0.9) for n in PRUNED.values()]


def test_gmp_zeroes_pruned_blocks_in_place_and_adds_nothing_to_the_forward(tmp_path):
    model, callback, _, probe, _ = fit_and_probe(tmp_path, "gmp", sparsity=0.5)
    assert not callback.algorithm.reparametrizes
    assert block_sparsity(model, BLOCK, min_blocks=10).zero_blocks == sum(keep_count(n, 0.5) for n in PRUNED.values())


# --- one-shot: magnitude and PowerPropagation -------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["magnitude", "powerprop"])
def test_one_shot_methods_prune_once_at_the_final_fine_tuning(tmp_path, algorithm):
    _, callback, _, probe, _ = fit_and_probe(tmp_path, algorithm)
    start = callback.schedule.start(1)
    assert start == round(0.85 * callback.schedule.total_steps)
    for row in probe.rows:
        expected = [keep_count(n, 0.5) for n in PRUNED.values()] if row["step"] >= start else list(PRUNED.values())
        assert row["kept"] == expected
