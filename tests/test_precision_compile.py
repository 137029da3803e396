"""Mixed and low precision (pruned blocks stay exact zeros, logits float32) and torch.compile (no recompiles)."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import (
    ALGORITHM_IDS,
    BLOCK,
    PRUNED,
    STEPS,
    MaskRecorder,
    TinyNet,
    make_trainer,
    pruning,
    state_of,
    tiny_loader,
)

from sapp_lightning import Phase, block_sparsity, keep_count


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


def test_logits_stay_float32_when_the_model_is_converted():
    callback = pruning("sapp")
    model = TinyNet()
    callback.sparsifier.prepare(model)
    logits = model.fc1.parametrizations.weight[0].logits
    model.to(torch.bfloat16)
    assert model.fc1.parametrizations.weight.original.dtype == torch.bfloat16
    assert logits.dtype == torch.float32 and model.fc1.parametrizations.weight[0].logits is logits
    model.half()
    assert logits.dtype == torch.float32 and model.fc1.weight.dtype == torch.float16
    model.double()
    assert logits.dtype == torch.float64  # wider is kept


def test_attention_and_its_gradient_are_float32_for_bf16_weights():
    from sapp_lightning.algorithms import BlockAttention
    from sapp_lightning.blocks import BlockLayout

    torch.manual_seed(0)
    weight = torch.randn(64, 256).to(torch.bfloat16)
    reparam = BlockAttention(BlockLayout.for_weight(weight, 16), clip=None)
    with torch.no_grad():
        reparam.logits.normal_(0, 0.5)
    upstream = torch.randn(64, 256).to(torch.bfloat16).float()  # what a bf16 model back-propagates
    effective = reparam(weight)
    assert effective.dtype == torch.bfloat16
    (effective.float() * upstream).sum().backward()
    grad = reparam.logits.grad.clone()
    reference = BlockAttention(BlockLayout.for_weight(weight, 16), clip=None)
    reference.load_state_dict(reparam.state_dict())
    (reference(weight.float()) * upstream).sum().backward()
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, reference.logits.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("algorithm", ["sapp", "acdc", "powerprop"])
def test_precision_on_gpu(tmp_path, algorithm, precision):
    weight_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    check_precision_run(tmp_path, algorithm, precision, weight_dtype, accelerator="gpu", devices=1, deterministic=False)


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

    torch._dynamo.reset()
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
        torch._dynamo.reset()


@pytest.mark.parametrize("algorithm", ["sapp", pytest.param("acdc", marks=pytest.mark.slow)])
def test_compiled_module_trains_through_every_phase_without_recompiling(tmp_path, algorithm):
    check_compiled_run(tmp_path, algorithm, "eager", exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHM_IDS)
def test_inductor_compiled_module_trains_through_every_phase_without_recompiling(tmp_path, algorithm):
    check_compiled_run(tmp_path, algorithm, "inductor", exact=False)
