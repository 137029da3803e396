"""Whether saved pruning state belongs to this run (compatibility.py): a checkpoint of another configuration is refused
naming each difference, as are another state version, a knob the checkpoint set and this run does not, and a
checkpoint written after the commit."""

from __future__ import annotations

import pytest
import torch
from helpers import BLOCK, PLAN, TinyNet, assert_same_state, loop_sparsifier, run, state_of

from sapp_lightning import BlockPruning, BlockSparsifier, committed_state_dict

CHANGES = {
    "algorithm": (dict(algorithm="acdc"), "algorithm: checkpoint 'sapp', this callback 'acdc'"),
    "sparsity": (dict(sparsity=0.75), "sparsity: checkpoint 0.5, this callback 0.75"),
    "block_size": (dict(block_size=8), "block_size: checkpoint [4, 4], this callback [8, 8]"),
    "include": (dict(include=["fc1"]), "include: checkpoint [], this callback ['fc1']"),
    "exclude": (dict(exclude=["conv"]), "layers: checkpoint ['conv', 'fc1'], this callback ['fc1']"),
    "plan": (dict(plan="imagenet"), "plan: checkpoint [['dense', 0.2]"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_resume_with_another_configuration_names_the_difference(tmp_path, full_runs, change):
    ckpt_dir, _, _ = full_runs("sapp")
    options, expected = CHANGES[change]
    settings = dict(algorithm="sapp", sparsity=0.5, block_size=BLOCK, min_blocks=10, plan=PLAN) | options
    callback = BlockPruning(settings.pop("algorithm"), **settings)
    with pytest.raises(ValueError, match="different BlockPruning configuration") as error:
        run(tmp_path, callback=callback, ckpt_path=ckpt_dir / "step=29.ckpt")
    assert expected in str(error.value)
    for key in ("algorithm", "sparsity", "block_size", "include"):  # only what changed is named
        assert (f"{key}: checkpoint" in str(error.value)) == (key == change)


def test_a_state_of_another_version_is_refused():
    sparsifier = BlockSparsifier("acdc", 0.5, BLOCK, min_blocks=10)
    sparsifier.prepare(TinyNet())
    with pytest.raises(ValueError, match="unsupported BlockPruning checkpoint state version 1 .*committed_state_dict"):
        sparsifier.load_state_dict({"version": 1})


def test_resuming_a_run_that_set_a_knob_without_it_is_refused():
    """Knobs at their default are left out of the configuration; one set in the checkpoint must still count."""
    saved = loop_sparsifier(softmax_over="kept")
    saved.prepare(TinyNet())
    fresh = loop_sparsifier()
    fresh.prepare(TinyNet())
    with pytest.raises(ValueError, match=r"softmax_over: checkpoint 'kept', this callback None"):
        fresh.load_state_dict(saved.state_dict())


def test_checkpoint_saved_after_fit_loads_into_a_plain_model_and_refuses_to_resume(tmp_path):
    model, callback, _, trainer = run(tmp_path, max_epochs=4)
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    probe = torch.randn(5, 3, 8, 8)
    plain = TinyNet.load_from_checkpoint(path, weights_only=False)
    with torch.no_grad():
        assert torch.equal(plain(probe), model(probe))
    assert_same_state(committed_state_dict(path), state_of(model))
    with pytest.raises(ValueError, match=r"holds no BlockPruning configuration.*after BlockPruning committed"):
        run(tmp_path / "again", ckpt_path=path, max_epochs=4)
