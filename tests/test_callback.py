"""The Lightning callback (callback.py): its hooks (the plan laid over optimizer steps under accumulation, max_steps
and manual optimization; curves to every logger), bit-identical resume from inside any phase, the commit, mixed and
low precision (pruned blocks stay exact zeros, logits float32), torch.compile without recompiles, and the states
and arguments it refuses."""

from __future__ import annotations

import math
import re

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import (
    ALGORITHM_IDS,
    BLOCK,
    EXPECTED_KEPT,
    PHASE_STARTS,
    PLAN,
    PRUNED,
    RESUME_POINTS,
    STEPS,
    Inject,
    MaskRecorder,
    PhaseStarts,
    TinyNet,
    assert_same_state,
    kept_blocks,
    make_trainer,
    paper_pruning,
    pruning,
    run,
    state_of,
    tiny_loader,
)
from pytorch_lightning.callbacks import ModelCheckpoint

from sapp_lightning import BlockPruning, BlockSparsifier, Phase, block_sparsity, committed_state_dict, keep_count

# --- hooks ------------------------------------------------------------------------------------------------------------


def test_pytorch_lightning_trainer(tmp_path):
    torch.manual_seed(0)
    model, callback = TinyNet(), pruning("sapp")
    keys = list(model.state_dict())
    starts = PhaseStarts(callback.sparsifier)
    make_trainer(tmp_path, [callback]).fit(model, tiny_loader())
    assert starts.steps == PHASE_STARTS
    assert kept_blocks(model) == EXPECTED_KEPT and list(model.state_dict()) == keys


def test_curves_reach_every_logger(tmp_path):
    import pandas as pd
    from pytorch_lightning.loggers import CSVLogger

    torch.manual_seed(0)
    logger = CSVLogger(tmp_path, name="run")
    callback = paper_pruning("sapp", sparsity=0.75)
    make_trainer(tmp_path, [callback], logger=logger, log_every_n_steps=1).fit(TinyNet(), tiny_loader())
    metrics = pd.read_csv(logger.experiment.metrics_file_path)
    steps = metrics.dropna(subset=["pruning/sparsity"])
    assert {"pruning/sparsity", "pruning/target_sparsity", "pruning/phase"} <= set(metrics.columns)
    assert steps["pruning/target_sparsity"].max() == 0.75
    assert set(steps["pruning/phase"].unique()) == {0.0, 1.0, 2.0}
    assert steps["pruning/sparsity"].iloc[-1] == pytest.approx(callback.achieved_sparsity())
    per_layer = metrics.dropna(subset=["pruning/layer/fc1"])
    assert len(per_layer) == len(callback.plan.segments) - 1  # one row per phase end


class TwoOptimizers(TinyNet):
    """Manual optimization, GAN-style: each batch steps one optimizer for conv + fc1 and one for fc2
    (``every`` > 1: the batch steps them only every ``every``-th batch, accumulating in between)."""

    def __init__(self, every: int = 1):
        super().__init__()
        self.automatic_optimization = False
        self.every = every

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, second = self.optimizers()
        self.manual_backward(F.cross_entropy(self(x), y))
        if (batch_idx + 1) % self.every == 0:
            for optimizer in (first, second):
                optimizer.step()
                optimizer.zero_grad()

    def configure_optimizers(self):
        body = list(self.conv.parameters()) + list(self.fc1.parameters())
        return torch.optim.SGD(body, lr=0.05), torch.optim.SGD(self.fc2.parameters(), lr=0.05)


def test_manual_optimization_with_two_optimizers_follows_the_plan_in_batches(tmp_path):
    callback = pruning("sapp")
    starts = PhaseStarts(callback.sparsifier)
    trainer = make_trainer(tmp_path, [callback])
    trainer.fit(TwoOptimizers(), tiny_loader())
    assert trainer.global_step == 2 * STEPS  # Lightning counts each optimizer's step
    assert starts.steps == PHASE_STARTS  # the plan counts batches that step the optimizers
    assert callback.sparsifier.steps_done == STEPS


def test_manual_optimization_with_max_steps_and_two_optimizers_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"training ends after 40 batches while the phase plan was laid over 80.*"):
        make_trainer(tmp_path, [pruning("sapp")], max_epochs=None, max_steps=80).fit(TwoOptimizers(), tiny_loader())


def test_manual_accumulation_is_refused_after_the_first_epoch_and_total_steps_fixes_it(tmp_path):
    with pytest.raises(ValueError, match=r"only 4 of the 8 batches of epoch 0 stepped.*total_steps=\.\.\.\).*about 40"):
        make_trainer(tmp_path, [pruning("sapp")]).fit(TwoOptimizers(every=2), tiny_loader())
    callback = pruning("sapp", total_steps=40)
    starts = PhaseStarts(callback.sparsifier)
    make_trainer(tmp_path, [callback]).fit(TwoOptimizers(every=2), tiny_loader())
    assert starts.steps == [step // 2 for step in PHASE_STARTS]


@pytest.mark.parametrize("limit", [dict(accumulate_grad_batches=2), dict(max_epochs=None, max_steps=40)])
def test_accumulation_and_max_steps_lay_the_plan_over_the_optimizer_steps(tmp_path, limit):
    callback = pruning("acdc")
    starts = PhaseStarts(callback.sparsifier)
    make_trainer(tmp_path, [callback], **limit).fit(TinyNet(), tiny_loader())
    assert callback.schedule.total_steps == 40
    assert starts.steps == [step // 2 for step in PHASE_STARTS]


def test_the_callback_drives_a_sparsifier_it_is_given_and_reads_through_to_it(tmp_path):
    sparsifier = BlockSparsifier("acdc", sparsity=0.5, block_size=BLOCK, min_blocks=10, plan=PLAN)
    callback = BlockPruning(sparsifier, total_steps=STEPS)
    assert callback.sparsifier is sparsifier
    trainer = make_trainer(tmp_path, [callback])
    torch.manual_seed(0)
    trainer.fit(TinyNet(), tiny_loader())
    assert callback.report().zero_blocks == sparsifier.report().zero_blocks == sum(PRUNED.values()) // 2
    assert (callback.layers, callback.plan, callback.phase) == (sparsifier.layers, sparsifier.plan, sparsifier.phase)
    assert "achieved_sparsity" in dir(callback)


# --- resume and commit ------------------------------------------------------------------------------------------------


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


def test_commit_is_idempotent(tmp_path):
    model, callback, _, _ = run(tmp_path, max_epochs=4)
    before = state_of(model)
    callback.commit()
    callback.on_fit_end(None, model)
    assert_same_state(state_of(model), before)
    assert_same_state(committed_state_dict(model.state_dict()), before)


# --- what it refuses --------------------------------------------------------------------------------------------------


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


def test_two_block_pruning_callbacks_on_one_trainer_are_refused_by_lightning(tmp_path):
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `BlockPruning`"):
        make_trainer(tmp_path, [pruning("sapp"), pruning("acdc")])


def test_an_endless_fit_is_refused(tmp_path):
    with pytest.raises(ValueError, match="BlockPruning needs a finite training length: set max_epochs or max_steps"):
        make_trainer(tmp_path, [pruning("acdc")], max_epochs=-1).fit(TinyNet(), tiny_loader())


def test_a_callback_takes_a_sparsifier_or_its_arguments_not_both():
    sparsifier = BlockSparsifier("acdc", sparsity=0.5, block_size=4)
    with pytest.raises(ValueError, match="pass either a BlockSparsifier or its arguments to BlockPruning, not both"):
        BlockPruning(sparsifier, sparsity=0.9)


def test_a_callback_refuses_a_sparsifier_that_already_pruned_a_model():
    sparsifier = BlockSparsifier("acdc", sparsity=0.5, block_size=4, min_blocks=1)
    sparsifier.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="BlockPruning needs a new BlockSparsifier, got one that is already prepared"):
        BlockPruning(sparsifier)


@pytest.mark.parametrize("total_steps", [2.5, 0])
def test_bad_total_steps(total_steps):
    with pytest.raises(ValueError, match=re.escape("total_steps must be an int >= 1 or None")):
        BlockPruning("sapp", 0.5, BLOCK, total_steps=total_steps)


# --- precision --------------------------------------------------------------------------------------------------------


class PrecisionProbe(pl.Callback):
    """Placed after BlockPruning: checks every step that pruned blocks are exact zeros and logits float32."""

    def __init__(self, callback):
        self.callback, self.losses, self.sparse_steps, self.activation_dtypes = callback, [], 0, set()

    def on_train_start(self, trainer, pl_module):
        pl_module.fc1.register_forward_hook(lambda m, i, out: self.activation_dtypes.add(out.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, *args):
        self.losses.append(float(outputs["loss"].detach().float()))
        for layer in self.callback.layers:
            for logits in self.callback.algorithm.trainable_parameters(layer):
                assert logits.dtype == torch.float32
            effective = layer.module.weight.detach()
            zero = layer.layout.block_sq_norms(effective) == 0
            assert torch.equal(zero[~layer.mask], torch.ones_like(zero[~layer.mask]))
        if self.callback.phase is Phase.SPARSE:
            self.sparse_steps += 1


def check_precision_run(tmp_path, algorithm, precision, weight_dtype, **trainer_kwargs):
    torch.manual_seed(0)
    model = TinyNet(optimizer="adam", lr=1e-2)
    callback = pruning(algorithm)
    probe = PrecisionProbe(callback)
    trainer = make_trainer(tmp_path, [callback, probe], max_epochs=5, precision=precision, **trainer_kwargs)
    trainer.fit(model, tiny_loader())
    assert probe.sparse_steps > 0 and len(probe.losses) == STEPS // 2
    assert all(math.isfinite(loss) for loss in probe.losses)
    expected_activation = {"bf16": torch.bfloat16, "16": torch.float16}[precision.split("-")[0]]
    assert probe.activation_dtypes == {expected_activation}  # the run really computed in low precision
    assert model.fc1.weight.dtype == weight_dtype
    report = block_sparsity(model, BLOCK, min_blocks=10)
    assert [layer.num_blocks - layer.zero_blocks for layer in report.layers] == [
        keep_count(n, 0.5) for n in PRUNED.values()
    ]


@pytest.mark.parametrize("algorithm", ["sapp", "powerprop"])
def test_bf16_mixed_on_cpu(tmp_path, algorithm):
    check_precision_run(tmp_path, algorithm, "bf16-mixed", torch.float32)


@pytest.mark.parametrize("algorithm", ["sapp", "acdc"])
def test_bf16_true_on_cpu_keeps_the_logits_float32(tmp_path, algorithm):
    check_precision_run(tmp_path, algorithm, "bf16-true", torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("algorithm", ["sapp", "acdc", "powerprop"])
def test_precision_on_gpu(tmp_path, algorithm, precision):
    weight_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    check_precision_run(tmp_path, algorithm, precision, weight_dtype, accelerator="gpu", devices=1, deterministic=False)


# --- torch.compile ----------------------------------------------------------------------------------------------------


class QuietNet(TinyNet):
    """TinyNet without ``self.log`` in the compiled steps (Lightning's logging recompiles on its own)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


class CompileProbe(pl.Callback):
    """Placed after BlockPruning: the number of frames compiled so far, at each optimizer step."""

    def __init__(self, callback, counter):
        self.callback, self.counter, self.rows = callback, counter, []

    def on_train_batch_end(self, trainer, *args):
        self.rows.append((trainer.global_step, self.callback.phase, self.counter.frame_count))


def compiled_run(tmp_path, algorithm, backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.compiler.reset()
    counter = CompileCounterWithBackend(backend)
    torch.manual_seed(0)
    model = QuietNet()
    callback = pruning(algorithm)
    probe = CompileProbe(callback, counter)
    recorder = MaskRecorder(callback)
    trainer = make_trainer(tmp_path, [recorder, callback, probe], max_epochs=5)
    trainer.fit(torch.compile(model, backend=counter), tiny_loader())
    return model, recorder.masks, probe.rows, counter


def eager_run(tmp_path, algorithm):
    torch.manual_seed(0)
    model = QuietNet()
    callback = pruning(algorithm)
    recorder = MaskRecorder(callback)
    make_trainer(tmp_path, [recorder, callback], max_epochs=5).fit(model, tiny_loader())
    return model, recorder.masks


def check_compiled_run(tmp_path, algorithm, backend, exact):
    try:
        model, masks, rows, counter = compiled_run(tmp_path, algorithm, backend)
        phases = [phase for _, phase, _ in rows]
        assert set(phases) == {Phase.DENSE, Phase.SPARSIFY, Phase.SPARSE} and len(rows) == STEPS // 2
        # one compilation at the first step, none at any of the four phase changes
        assert {frames for _, _, frames in rows} == {1}
        eager_model, eager_masks = eager_run(tmp_path / "eager", algorithm)
        assert all(torch.equal(a, b) for a, b in zip(masks, eager_masks))
        for (key, a), b in zip(state_of(model).items(), state_of(eager_model).values()):
            assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-3, atol=1e-4), key
        # the commit gives parametrized layers their plain class back: one more compilation, then stable
        batch = next(iter(tiny_loader()))
        for _ in range(3):
            model.training_step(batch, 0)
        assert counter.frame_count == (2 if algorithm in ("sapp", "powerprop") else 1)
    finally:
        torch.compiler.reset()


@pytest.mark.parametrize("algorithm", ["sapp", pytest.param("acdc", marks=pytest.mark.slow)])
def test_compiled_module_trains_through_every_phase_without_recompiling(tmp_path, algorithm):
    check_compiled_run(tmp_path, algorithm, "eager", exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHM_IDS)
def test_inductor_compiled_module_trains_through_every_phase_without_recompiling(tmp_path, algorithm):
    check_compiled_run(tmp_path, algorithm, "inductor", exact=False)
