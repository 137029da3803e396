"""Every training loop drives the same sparsifier: the lightning.pytorch Trainer (sapp_lightning.lightning), Fabric, a
plain PyTorch loop (torch.amp, gradient accumulation) and the Hugging Face Trainer (sapp_lightning.huggingface). In
each: exact final block counts, the model's own state_dict keys after the commit, and a bit-identical resume (CPU).
The pytorch_lightning callback and manual optimization: test_callback.py."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import transformers  # a test dependency ([dev]), never one of sapp_lightning
from helpers import (
    BLOCK,
    EXPECTED_KEPT,
    MODEL_BLOCK,
    MODEL_PLAN,
    MODEL_SPARSITY,
    PHASE_STARTS,
    PLAN,
    PhaseStarts,
    TinyNet,
    assert_exact_blocks,
    assert_same_state,
    kept_blocks,
    make_trainer,
    resumable_loader,
    state_of,
    tiny_bert,
    tiny_loader,
    tokens,
)

from sapp_lightning import BlockSparsifier

# --- lightning.pytorch ------------------------------------------------------------------------------------------------


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
        trainer = make_trainer(tmp_path, [callback, *callbacks], trainer_class=L.Trainer)
        trainer.fit(model, resumable_loader(), ckpt_path=ckpt_path)
        assert list(model.state_dict()) == keys and kept_blocks(model, "net.") == EXPECTED_KEPT
        return model, callback

    full, callback = fit([SaveAtStep()])
    assert isinstance(callback, L.Callback) and not isinstance(callback, pl.Callback)
    resumed, _ = fit([], ckpt_path=tmp_path / "step29.ckpt")  # inside the sparsification phase; epoch 3 starts
    assert_same_state(state_of(resumed), state_of(full))


# --- Lightning Fabric -------------------------------------------------------------------------------------------------


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


# --- a plain PyTorch loop: torch.amp and gradient accumulation --------------------------------------------------------


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


# --- the Hugging Face Trainer -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hugging_face_trainer_fine_tunes_a_tiny_bert_to_the_target_sparsity(tmp_path):
    from sapp_lightning.huggingface import BlockPruningCallback

    torch.manual_seed(0)
    model = tiny_bert()
    keys = list(model.state_dict())
    data = [{"input_ids": tokens()[i % 4], "labels": torch.tensor(i % 2)} for i in range(96)]
    args = transformers.TrainingArguments(
        str(tmp_path), max_steps=36, per_device_train_batch_size=8, gradient_accumulation_steps=2, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    pruning = BlockPruningCallback("sapp", MODEL_SPARSITY, MODEL_BLOCK, min_blocks=4, plan=MODEL_PLAN)
    starts = []
    pruning.sparsifier.add_listener(lambda s, e: starts.append(e.step) if e.kind == "phase_start" else None)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[pruning]).train()
    assert starts == [0, 9, 18]  # 36 optimizer steps (after accumulation): the plan's 25% / 25% / 50%
    assert_exact_blocks(pruning.sparsifier, MODEL_SPARSITY)
    assert list(model.state_dict()) == keys
    assert pruning.sparsifier.report().block_sparsity == pytest.approx(MODEL_SPARSITY, abs=0.02)
