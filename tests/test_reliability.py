"""Reliability: resume, DDP mask agreement, mixed precision, torch.compile, bad input and odd states."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import ALGORITHM_IDS, TinyNet, make_trainer, tiny_data, tiny_loader
from lightning_fabric.plugins.environments.lightning import find_free_network_port
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from sapp_lightning import BlockPruning, Phase, block_sparsity, committed_state_dict, keep_count

BLOCK = 4
PRUNED = {"conv": 14, "fc1": 192}  # blocks per pruned layer; fc2 (6 blocks) stays dense with min_blocks=10
# 64 samples in batches of 8, 10 epochs: 80 steps. Phases start at steps 0, 16, 48, 64 and 72.
PLAN = [("dense", 0.2), ("sparsify", 0.4), ("sparse", 0.2), ("dense", 0.1), ("sparse", 0.1)]
STEPS = 80
PHASE_STARTS = [0, 16, 48, 64, 72]


def pruning(algorithm: str = "sapp", sparsity: float = 0.5, cls=BlockPruning, **kwargs) -> BlockPruning:
    kwargs.setdefault("plan", PLAN)
    return cls(algorithm, sparsity=sparsity, block_size=BLOCK, min_blocks=10, **kwargs)


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


class MaskRecorder(pl.Callback):
    """Placed before BlockPruning: keeps the masks as they are when fit ends, before the commit."""

    def __init__(self, callback: BlockPruning):
        self.callback, self.masks = callback, None

    def on_fit_end(self, trainer, pl_module):
        self.masks = [layer.mask.clone() for layer in self.callback.layers]


class Inject(pl.Callback):
    """Placed before BlockPruning: runs ``fn(callback)`` right after optimizer step ``step``."""

    def __init__(self, callback: BlockPruning, step: int, fn):
        self.callback, self.step, self.fn = callback, step, fn

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            with torch.no_grad():
                self.fn(self.callback)


# --- resume ---------------------------------------------------------------------------------------
class ResumableLoader(DataLoader):
    """A DataLoader that resumes mid-epoch: Lightning saves its ``state_dict`` in every checkpoint."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip, self._yielded = 0, 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self._yielded += 1
                yield batch

    def state_dict(self):
        # Lightning 2.6 does not fetch ahead from a loader with a length: every batch yielded was trained on
        return {"consumed": self._yielded}

    def load_state_dict(self, state):
        self._skip = state["consumed"]


def resumable_loader() -> ResumableLoader:
    return ResumableLoader(tiny_data(), batch_size=8, shuffle=False)


def run(tmp_path, algorithm="sapp", ckpt_path=None, checkpoint=None, callback=None, **trainer_kwargs):
    torch.manual_seed(0)
    model = TinyNet(optimizer="adam", lr=1e-2)
    callback = callback or pruning(algorithm)
    recorder = MaskRecorder(callback)
    checkpoints = [checkpoint] if isinstance(checkpoint, pl.Callback) else list(checkpoint or [])
    trainer = make_trainer(
        tmp_path, [recorder, callback, *checkpoints], enable_checkpointing=bool(checkpoints), **trainer_kwargs
    )
    trainer.fit(model, resumable_loader(), ckpt_path=ckpt_path)
    return model, callback, recorder, trainer


class SaveAt(pl.Callback):
    """Placed after BlockPruning: ``trainer.save_checkpoint`` after the given optimizer steps, as
    ``ModelCheckpoint(every_n_train_steps=...)`` does (without writing a file at every step)."""

    def __init__(self, dirpath, steps):
        self.dirpath, self.steps = dirpath, set(steps)

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(self.dirpath / f"step={trainer.global_step}.ckpt")


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


# checkpoint file -> its step and phase: three mid-epoch ones (8 steps per epoch) and one written at an epoch end
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
    assert "_block_pruning_config" in torch.load(last, weights_only=False)["state_dict"]  # written before the commit
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
    broken = {k: v for k, v in checkpoint["state_dict"].items() if k != "_block_pruning_config"}
    with pytest.raises(ValueError, match="no '_block_pruning_config' entry"):
        committed_state_dict(broken)


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


# --- distributed ----------------------------------------------------------------------------------
class CountingPruning(BlockPruning):
    """Records every cross-rank mask verification (phase starts and the end of training)."""

    def _verify_masks(self, trainer, when):
        self.verified = getattr(self, "verified", []) + [(trainer.global_step, trainer.world_size, when)]
        super()._verify_masks(trainer, when)


class CorruptingPruning(BlockPruning):
    """On rank 1 only, swaps a kept and a pruned block of fc1 when the first sparse phase begins."""

    def _enter(self, phase, tau):
        super()._enter(phase, tau)
        if phase is Phase.SPARSE and torch.distributed.get_rank() == 1:
            layer = self.layers[1]
            mask = layer.mask.clone()
            flat = mask.view(-1)
            kept, pruned = int(flat.nonzero()[0]), int((~flat).nonzero()[0])
            flat[kept], flat[pruned] = False, True  # same number of kept blocks
            layer.set_mask(mask)


class RankDump(pl.Callback):
    """Placed after BlockPruning: each rank writes the masks at every phase start and its committed weights."""

    def __init__(self, callback, out):
        self.callback, self.out, self.phases = callback, out, []

    def _record(self, trainer):
        if not self.phases or self.phases[-1][1] != self.callback.segment_index:
            masks = [layer.mask.clone() for layer in self.callback.layers]
            self.phases.append((trainer.global_step, self.callback.segment_index, masks))

    def on_train_start(self, trainer, pl_module):
        self._record(trainer)

    def on_train_batch_end(self, trainer, *args):
        self._record(trainer)

    def on_fit_end(self, trainer, pl_module):
        torch.save(
            {"phases": self.phases, "state": state_of(pl_module), "verified": self.callback.verified},
            self.out / f"rank{trainer.global_rank}.pt",
        )


@pytest.fixture
def free_port(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(find_free_network_port()))


def ddp_trainer(tmp_path, callbacks, strategy="ddp_fork"):
    if strategy == "ddp_fork" and torch.cuda.is_initialized():  # a process that touched CUDA cannot fork
        strategy = "ddp_spawn"
    return make_trainer(tmp_path, callbacks, strategy=strategy, devices=2, accelerator="cpu")


@pytest.mark.parametrize(
    "algorithm, strategy",
    [("sapp", "ddp_fork"), ("acdc", "ddp_fork"), pytest.param("sapp", "ddp_spawn", marks=pytest.mark.slow)],
)
def test_ddp_masks_agree_on_every_rank_at_every_phase_boundary(tmp_path, free_port, algorithm, strategy):
    torch.manual_seed(0)
    model = TinyNet()
    callback = pruning(algorithm, cls=CountingPruning)
    ddp_trainer(tmp_path, [callback, RankDump(callback, tmp_path)], strategy).fit(model, tiny_loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # each rank trains 40 steps on its half of the data: the plan's five phases start at 0, 8, 24, 32, 36
    for rank in ranks:
        assert [(step, index) for step, index, _ in rank["phases"]] == [(0, 0), (8, 1), (24, 2), (32, 3), (36, 4)]
        assert [(step, world) for step, world, _ in rank["verified"]] == [(s, 2) for s in (0, 8, 24, 32, 36, 40)]
    for (_, _, masks0), (_, _, masks1) in zip(ranks[0]["phases"], ranks[1]["phases"]):
        assert all(torch.equal(a, b) for a, b in zip(masks0, masks1))
    sparse_masks = ranks[0]["phases"][2][2]
    assert [int(m.sum()) for m in sparse_masks] == [keep_count(n, 0.5) for n in PRUNED.values()]
    assert_same_state(ranks[0]["state"], ranks[1]["state"])
    assert_same_state(state_of(model), ranks[0]["state"])  # the launcher brought rank 0's weights back
    assert "_block_pruning_config" not in ranks[0]["state"]


def test_ddp_masks_that_differ_across_ranks_raise_naming_the_layer(tmp_path, free_port):
    callback = pruning("sapp", cls=CorruptingPruning)
    with pytest.raises(Exception, match=r"the masks of layer\(s\) 'fc1' differ across ranks at the start of phase 2"):
        ddp_trainer(tmp_path, [callback]).fit(TinyNet(), tiny_loader())


def test_mask_checksum_tells_swapped_blocks_apart():
    callback = pruning("acdc")
    callback.setup(_FakeTrainer(callback), TinyNet(), "fit")
    layer = callback.layers[1]
    a = torch.zeros_like(layer.mask).view(-1)
    b = a.clone()
    a[[1, 4]] = True
    b[[2, 3]] = True  # same count, same index sum
    layer.set_mask(a.view_as(layer.mask))
    sum_a = callback._mask_checksum(layer)
    layer.set_mask(b.view_as(layer.mask))
    assert not torch.equal(sum_a, callback._mask_checksum(layer))
    assert sum_a.dtype == torch.int64


class _FakeTrainer:
    def __init__(self, callback):
        self.callbacks = [callback]


# --- precision ------------------------------------------------------------------------------------
class PrecisionProbe(pl.Callback):
    """Placed after BlockPruning: checks every step that pruned blocks are exact zeros and logits float32."""

    def __init__(self, callback):
        self.callback, self.losses, self.sparse_steps, self.activation_dtypes = callback, [], 0, set()

    def on_train_start(self, trainer, pl_module):
        pl_module.fc1.register_forward_hook(lambda m, i, out: self.activation_dtypes.add(out.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, *args):
        self.losses.append(float(outputs["loss"].detach().float()))
        for layer in self.callback.layers:
            for logits in self.callback.algorithm.extra_parameters(layer):
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
    callback.setup(_FakeTrainer(callback), model, "fit")
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


# --- torch.compile --------------------------------------------------------------------------------
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


# --- bad input and odd states ---------------------------------------------------------------------
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
    class Counting(BlockPruning):
        def _check_finite(self, when):
            self.checks = getattr(self, "checks", []) + [when]
            super()._check_finite(when)

    callback = pruning("sapp", cls=Counting, check_finite_every_n_steps=30)
    make_trainer(tmp_path, [callback]).fit(TinyNet(), tiny_loader())
    expected = [f"at step {s}" for s in sorted(PHASE_STARTS + [30, 60])] + ["when training ended"]
    assert callback.checks == expected  # never per step: one host sync each


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


def test_a_weight_shared_by_two_modules_is_refused_unless_excluded(tmp_path):
    model = TiedNet()
    before = state_of(model)
    with pytest.raises(ValueError, match=r"the weight of layer 'fc1' is shared by embedding.weight, fc1.weight"):
        make_trainer(tmp_path, [pruning("sapp")]).fit(model, tiny_loader())
    assert_same_state(state_of(model), before)
    callback = pruning("sapp", exclude=["fc1"])
    make_trainer(tmp_path, [callback], max_epochs=2).fit(model, tiny_loader())
    assert [layer.name for layer in callback.layers] == ["conv"]
    assert model.embedding.weight is model.fc1.weight
