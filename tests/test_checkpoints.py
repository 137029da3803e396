"""Checkpoints: bit-identical resume from inside any phase, refused mismatches, plain weights from any checkpoint."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ALGORITHM_IDS,
    BLOCK,
    PLAN,
    PRUNED,
    STEPS,
    SaveAt,
    TinyNet,
    assert_same_state,
    make_trainer,
    pruning,
    run,
    state_of,
    tiny_loader,
)
from pytorch_lightning.callbacks import ModelCheckpoint

from sapp_lightning import BlockPruning, Phase, block_sparsity, committed_state_dict, keep_count


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """One uninterrupted run per algorithm with a checkpoint after every optimizer step (cached)."""
    cache = {}

    def get(algorithm):
        if algorithm not in cache:
            root = tmp_path_factory.mktemp(f"full-{algorithm}")
            mid_epoch = SaveAt(root / "ckpt", [step for name, step, _ in RESUME_POINTS.values() if name[0] == "s"])
            every_epoch = ModelCheckpoint(dirpath=root / "ckpt", filename="epoch-{step}", save_top_k=-1)
            model, callback, recorder, trainer = run(root, algorithm, checkpoint=[mid_epoch, every_epoch])
            assert trainer.global_step == STEPS
            cache[algorithm] = (root / "ckpt", state_of(model), recorder.masks)
        return cache[algorithm]

    return get


RESUME_POINTS = {
    "dense": ("step=10.ckpt", 10, Phase.DENSE),
    "sparsify": ("step=29.ckpt", 29, Phase.SPARSIFY),
    "sparse": ("step=53.ckpt", 53, Phase.SPARSE),
    "epoch_end": ("epoch-step=40.ckpt", 40, Phase.SPARSIFY),
}


@pytest.mark.parametrize("point", list(RESUME_POINTS))
@pytest.mark.parametrize("algorithm", ["sapp", "acdc"])
def test_resume_from_inside_any_phase_is_bit_identical(tmp_path, full_runs, algorithm, point):
    ckpt_dir, final_state, final_masks = full_runs(algorithm)
    filename, step, phase = RESUME_POINTS[point]
    ckpt = ckpt_dir / filename
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == step
    assert PLAN[saved["callbacks"]["BlockPruning"]["segment_index"]][0] == phase.name.lower()
    assert (step % 8 == 0) == (point == "epoch_end")
    model, callback, recorder, trainer = run(tmp_path, algorithm, ckpt_path=ckpt)
    assert trainer.global_step == STEPS
    assert_same_state(state_of(model), final_state)
    assert all(torch.equal(a, b) for a, b in zip(recorder.masks, final_masks))
    assert callback.achieved_sparsity() > 0.4


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


def test_resume_with_another_training_length_is_refused(tmp_path, full_runs):
    ckpt_dir, _, _ = full_runs("sapp")
    with pytest.raises(ValueError, match="planned over 80 optimizer steps, but this run has 96"):
        run(tmp_path, ckpt_path=ckpt_dir / "step=29.ckpt", max_epochs=12)


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


def test_commit_is_idempotent(tmp_path):
    model, callback, _, _ = run(tmp_path, max_epochs=4)
    before = state_of(model)
    callback.commit()
    callback.on_fit_end(None, model)
    assert_same_state(state_of(model), before)
    assert_same_state(committed_state_dict(model.state_dict()), before)


@pytest.mark.parametrize("algorithm", ALGORITHM_IDS)
def test_resume_inside_a_sparsification_phase_is_bit_identical(tmp_path, algorithm):
    plan = [("dense", 0.2), ("sparsify", 0.4), ("sparse", 0.2), ("dense", 0.1), ("sparse", 0.1)]

    def run(ckpt_path=None, checkpoint=None):
        torch.manual_seed(0)
        model = TinyNet(optimizer="adam", lr=1e-2)
        cb = pruning(algorithm, plan=plan)
        callbacks = [cb] + ([checkpoint] if checkpoint else [])
        trainer = make_trainer(tmp_path, callbacks, enable_checkpointing=checkpoint is not None)
        trainer.fit(model, tiny_loader(), ckpt_path=ckpt_path)
        return model, cb

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    full, _ = run(checkpoint=saver)
    middle = tmp_path / "ckpt" / "epoch=2-step=24.ckpt"  # step 24 of 80: inside sparsify [16, 48)
    state = torch.load(middle, weights_only=False)["callbacks"]["BlockPruning"]
    assert state["segment_index"] == 1
    resumed, _ = run(ckpt_path=middle)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


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
