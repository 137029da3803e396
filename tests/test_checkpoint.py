"""Plain weights from checkpoints (checkpoint.py): committed_state_dict folds a training checkpoint (a file, a loaded
dict, a bare state_dict) exactly as the commit does, with each algorithm's own settings; checkpoint files are read
with ``torch.load(weights_only=True)``, and one that holds a pickled callable is refused, naming its type, unless
trusted."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import (
    ALGORITHM_IDS,
    BLOCK,
    PRUNED,
    TinyNet,
    assert_same_state,
    pruning,
    run,
    save_checkpoint_holding,
    state_of,
)
from pytorch_lightning.callbacks import ModelCheckpoint

from sapp_lightning import UnsafeCheckpointError, block_sparsity, committed_state_dict, keep_count, load_checkpoint

# --- committed_state_dict ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm, prune_mode", [(a, None) for a in ALGORITHM_IDS] + [("acdc", "mask")])
def test_last_checkpoint_resumes_a_finished_run_and_converts_to_the_committed_weights(tmp_path, algorithm, prune_mode):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    model, _, _, _ = run(tmp_path, callback=pruning(algorithm, prune_mode=prune_mode), checkpoint=saver, max_epochs=4)
    committed = state_of(model)
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)  # written before the commit
    assert all(isinstance(value, torch.Tensor) for value in saved["state_dict"].values())  # tensors only
    assert saved["callbacks"]["BlockPruning"]["config"]["algorithm"] == algorithm
    assert any(".parametrizations." in k or k.endswith("_block_mask") for k in saved["state_dict"])
    # the helper folds a training checkpoint exactly as the commit did, and the result loads into a plain model
    plain_state = committed_state_dict(last)
    assert_same_state(plain_state, committed)
    plain = TinyNet()
    plain.load_state_dict(plain_state)
    assert committed_state_dict(plain_state) == plain_state  # nothing left to fold
    # resuming the finished run commits the same weights again
    resumed, callback, _, trainer = run(
        tmp_path / "again", callback=pruning(algorithm, prune_mode=prune_mode), ckpt_path=last, max_epochs=4
    )
    assert trainer.global_step == 32
    assert_same_state(state_of(resumed), committed)


def test_committed_state_dict_accepts_a_loaded_checkpoint_and_a_bare_state_dict(tmp_path, full_runs):
    ckpt_dir, _, _ = full_runs("sapp")
    checkpoint = torch.load(ckpt_dir / "step=53.ckpt", weights_only=False)
    from_path = committed_state_dict(ckpt_dir / "step=53.ckpt")
    assert_same_state(committed_state_dict(checkpoint), from_path)
    assert_same_state(committed_state_dict(checkpoint["state_dict"]), from_path)
    assert list(from_path) == list(TinyNet().state_dict())
    report = block_sparsity(_loaded(from_path), BLOCK, min_blocks=10)
    assert [layer.num_blocks - layer.zero_blocks for layer in report.layers] == [
        keep_count(n, 0.5) for n in PRUNED.values()
    ]
    bare = dict(checkpoint["state_dict"])  # a plain dict: the metadata that records the configuration is gone
    with pytest.raises(ValueError, match="holds parametrization or mask entries .* but no BlockPruning configuration"):
        committed_state_dict(bare)
    config = checkpoint["callbacks"]["BlockPruning"]["config"]
    assert_same_state(committed_state_dict(bare, config=config), from_path)


def _loaded(state):
    model = TinyNet()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize(
    "algorithm, options",
    [
        ("powerprop", dict(alpha=3.0)),
        ("sapp", dict(softmax_scope="global", softmax_over="kept", clip_bounds=(0.5, 1.5))),
    ],
)
def test_committed_state_dict_folds_with_the_algorithms_own_settings(algorithm, options):
    """The algorithm's knobs change its forward (alpha, one softmax over all layers, the clip bounds): folding a
    training state must use them, so that the folded weights are the ones the model computed with."""
    from sapp_lightning import BlockSparsifier

    torch.manual_seed(0)
    model = TinyNet()
    sparsifier = BlockSparsifier(algorithm, 0.5, BLOCK, min_blocks=10, **options)
    sparsifier.prepare(model)
    with torch.no_grad():
        for layer in sparsifier.layers:
            for logits in sparsifier.algorithm.trainable_parameters(layer):
                logits.normal_()
            layer.set_mask(torch.rand(layer.layout.grid_shape) > 0.5)
    training_state = model.state_dict()
    computed = {name: layer.effective_weight().detach().clone() for name, layer in
                ((layer.name, layer) for layer in sparsifier.layers)}  # fmt: skip
    folded = committed_state_dict(training_state)
    for name, weight in computed.items():
        torch.testing.assert_close(folded[f"{name}.weight"], weight, rtol=0, atol=1e-6)


# --- safe loading -----------------------------------------------------------------------------------------------------


SYSTEM = re.escape(f"{os.system.__module__}.system")  # posix.system


class RunsACommand:
    """What a malicious checkpoint carries: unpickling it calls ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_that_would_run_a_command_is_refused_naming_it_and_runs_nothing(tmp_path):
    marker = tmp_path / "it-ran"
    path = save_checkpoint_holding(tmp_path / "evil.ckpt", RunsACommand(f"touch {marker}"))
    message = rf"checkpoint {re.escape(str(path))} holds {SYSTEM}, beyond tensors and plain data: it was not opened"
    with pytest.raises(UnsafeCheckpointError, match=message + r".* with trusted=True \(sapp-train: trusted=true\)"):
        committed_state_dict(path)
    with pytest.raises(UnsafeCheckpointError, match=message):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_pickled_partial_is_refused_and_opens_when_trusted(tmp_path):
    path = save_checkpoint_holding(tmp_path / "partial.ckpt", functools.partial(print, "called"))  # inert until called
    with pytest.raises(UnsafeCheckpointError, match=r"holds .*functools\.partial.*, beyond tensors and plain data"):
        committed_state_dict(path)
    assert torch.equal(committed_state_dict(path, trusted=True)["fc.weight"], torch.ones(2, 2))
    assert load_checkpoint(path, trusted=True)["callbacks"]["Evil"].func is print


def test_the_type_is_named_from_torchs_message_where_torch_cannot_list_them(tmp_path, monkeypatch):
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint")  # torch < 2.5
    path = save_checkpoint_holding(tmp_path / "partial.ckpt", functools.partial(print, "called"))
    with pytest.raises(UnsafeCheckpointError, match=r"holds functools\.partial, beyond tensors and plain data"):
        load_checkpoint(path)


def test_paths_in_hyperparameters_are_allowed(tmp_path):
    path = tmp_path / "paths.ckpt"
    torch.save({"state_dict": {}, "datamodule_hyper_parameters": {"data_dir": Path("/data/fashion")}}, path)
    assert load_checkpoint(path)["datamodule_hyper_parameters"]["data_dir"] == Path("/data/fashion")
