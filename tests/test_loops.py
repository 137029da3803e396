"""Every training loop drives the same sparsifier: pytorch_lightning and lightning.pytorch Trainers, Fabric, a plain
PyTorch loop (torch.amp, gradient accumulation), and manual optimization with several optimizers. In each: exact
final block counts, the model's own state_dict keys after the commit, and a bit-identical resume (CPU)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import (
    BLOCK,
    PHASE_STARTS,
    PLAN,
    PRUNED,
    STEPS,
    TinyNet,
    assert_same_state,
    make_trainer,
    pruning,
    resumable_loader,
    state_of,
    tiny_loader,
)

from sapp_lightning import BlockPruning, BlockSparsifier, block_sparsity, keep_count

EXPECTED_KEPT = [keep_count(n, 0.5) for n in PRUNED.values()]


def kept_blocks(model: torch.nn.Module, prefix: str = "") -> list[int]:
    report = block_sparsity(model, BLOCK, min_blocks=10)
    assert [layer.name for layer in report.layers] == [prefix + name for name in PRUNED]
    return [layer.num_blocks - layer.zero_blocks for layer in report.layers]


class PhaseStarts:
    """A sparsifier listener: the step at which each phase started."""

    def __init__(self, sparsifier: BlockSparsifier):
        self.steps: list[int] = []
        sparsifier.add_listener(lambda s, event: self.steps.append(event.step) if event.kind == "phase_start" else None)


# --- pytorch_lightning and lightning.pytorch ------------------------------------------------------------------
def test_pytorch_lightning_trainer(tmp_path):
    torch.manual_seed(0)
    model, callback = TinyNet(), pruning("sapp")
    keys = list(model.state_dict())
    starts = PhaseStarts(callback.sparsifier)
    make_trainer(tmp_path, [callback]).fit(model, tiny_loader())
    assert starts.steps == PHASE_STARTS
    assert kept_blocks(model) == EXPECTED_KEPT and list(model.state_dict()) == keys


def test_lightning_pytorch_trainer_resumes_bit_identically(tmp_path):
    import lightning.pytorch as L  # a test dependency ([dev]), not one of sapp_lightning

    from sapp_lightning.lightning import BlockPruning as LBlockPruning

    class LitTiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyNet(optimizer="adam", lr=1e-2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return self.net.configure_optimizers()

    class SaveAtStep(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 29:
                trainer.save_checkpoint(tmp_path / "step29.ckpt")

    def fit(callbacks, ckpt_path=None):
        torch.manual_seed(0)
        model, callback = LitTiny(), LBlockPruning("sapp", sparsity=0.5, block_size=BLOCK, min_blocks=10, plan=PLAN)
        keys = list(model.state_dict())
        trainer = L.Trainer(
            max_epochs=10, callbacks=[callback, *callbacks], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", deterministic=True,
        )  # fmt: skip
        trainer.fit(model, resumable_loader(), ckpt_path=ckpt_path)
        assert list(model.state_dict()) == keys and kept_blocks(model, "net.") == EXPECTED_KEPT
        return model, callback

    full, callback = fit([SaveAtStep()])
    assert isinstance(callback, L.Callback) and not isinstance(callback, pl.Callback)
    resumed, _ = fit([], ckpt_path=tmp_path / "step29.ckpt")  # inside the sparsification phase; epoch 3 starts
    assert_same_state(state_of(resumed), state_of(full))


# --- Lightning Fabric ------------------------------------------------------------------------------------------
def fabric_run(tmp_path, stop_at: int | None = None, resume: bool = False):
    """The README's Fabric loop; ``stop_at`` saves a checkpoint there and returns, ``resume`` continues from it."""
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    model = TinyNet(optimizer="adam", lr=1e-2)
    keys = list(model.state_dict())
    sparsifier = BlockSparsifier("sapp", sparsity=0.5, block_size=BLOCK, min_blocks=10, plan=PLAN)
    sparsifier.prepare(model)  # before the optimizer is made: SA++'s logits are parameters of the model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(tiny_loader())
    state = {"model": model, "optimizer": optimizer, "pruning": sparsifier}
    if resume:
        fabric.load(tmp_path / "fabric.ckpt", state)
    sparsifier.attach([optimizer])
    sparsifier.start(total_steps=10 * len(loader))
    for step_in_run in range(sparsifier.steps_done, 10 * len(loader)):
        x, y = list(loader)[step_in_run % len(loader)]
        fabric.backward(F.cross_entropy(model(x), y))
        sparsifier.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
        if sparsifier.steps_done == stop_at:
            fabric.save(tmp_path / "fabric.ckpt", state)
            return None
    sparsifier.commit()
    assert list(model.state_dict()) == keys
    return model.module


def test_fabric_loop_resumes_bit_identically(tmp_path):
    full = fabric_run(tmp_path)
    assert kept_blocks(full) == EXPECTED_KEPT
    assert fabric_run(tmp_path, stop_at=29) is None
    resumed = fabric_run(tmp_path, resume=True)
    assert_same_state(state_of(resumed), state_of(full))


# --- a plain PyTorch loop: torch.amp and gradient accumulation --------------------------------------------------
def plain_run(tmp_path, stop_at: int | None = None, resume: bool = False, accumulate: int = 2):
    """The README's plain loop: bf16 autocast, a GradScaler, ``accumulate`` batches per optimizer step."""
    torch.manual_seed(0)
    model = TinyNet()
    keys = list(model.state_dict())
    sparsifier = BlockSparsifier("sapp", sparsity=0.5, block_size=BLOCK, min_blocks=10, plan=PLAN, logit_l2=1e-3)
    sparsifier.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    loader = tiny_loader()
    epochs = 10
    if resume:
        saved = torch.load(tmp_path / "plain.pt", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        sparsifier.load_state_dict(saved["pruning"])
    starts = PhaseStarts(sparsifier)
    sparsifier.attach([optimizer])
    sparsifier.start(total_steps=epochs * len(loader) // accumulate)
    batches = [batch for _ in range(epochs) for batch in loader]
    for index in range(sparsifier.steps_done * accumulate, len(batches)):
        x, y = batches[index]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y) / accumulate
        scaler.scale(loss).backward()
        if (index + 1) % accumulate:
            continue
        scaler.unscale_(optimizer)  # the logits' L2 gradient is added to unscaled gradients
        sparsifier.before_optimizer_step(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        sparsifier.step()
        if sparsifier.steps_done == stop_at:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
            torch.save(state | {"pruning": sparsifier.state_dict()}, tmp_path / "plain.pt")
            return None, starts.steps
    sparsifier.commit()
    assert list(model.state_dict()) == keys
    return model, starts.steps


def test_plain_loop_with_amp_and_accumulation_resumes_bit_identically(tmp_path):
    full, starts = plain_run(tmp_path)
    assert starts == [step // 2 for step in PHASE_STARTS]  # 40 optimizer steps: the plan in steps, not batches
    assert kept_blocks(full) == EXPECTED_KEPT
    plain_run(tmp_path, stop_at=13)  # inside the sparsification phase [8, 24)
    resumed, starts = plain_run(tmp_path, resume=True)
    assert starts == [24, 32, 36]  # the phases still to come start where they did
    assert_same_state(state_of(resumed), state_of(full))


# --- training progress in one unit -----------------------------------------------------------------------------
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
