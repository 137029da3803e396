"""What the tests share: tiny models and data, a quiet Trainer, the pruning settings most tests use, state helpers
and probes. Tests import these by name (``from conftest import ...``)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sapp_lightning import ALGORITHMS, BlockPruning

ALGORITHM_IDS = tuple(ALGORITHMS)  # every registered algorithm: a new one is tested without anyone listing it

BLOCK = 4
PRUNED = {"conv": 14, "fc1": 192}  # blocks per pruned layer; fc2 (6 blocks) stays dense with min_blocks=10
# 64 samples in batches of 8, 10 epochs: 80 steps. Phases start at steps 0, 16, 48, 64 and 72.
PLAN = [("dense", 0.2), ("sparsify", 0.4), ("sparse", 0.2), ("dense", 0.1), ("sparse", 0.1)]
STEPS = 80
PHASE_STARTS = [0, 16, 48, 64, 72]


class TinyNet(pl.LightningModule):
    """conv (27x8 kernel: 7x2 blocks of 4x4, a ragged edge) -> fc1 (128x24: 32x6) -> fc2 (24x4: 6x1)."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, weight_decay: float = 0.0, freeze_params=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(128, 24)
        self.fc2 = nn.Linear(24, 4)
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        # A user who lists parameters before fit: parameters added later are left out.
        self.frozen_params = list(self.parameters()) if freeze_params else None

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        params = self.frozen_params if self.frozen_params is not None else self.parameters()
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)


def tiny_data(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    return TensorDataset(x, y)


def tiny_loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    return DataLoader(tiny_data(n), batch_size=batch_size, shuffle=False)


def make_trainer(tmp_path, callbacks, max_epochs: int = 10, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=max_epochs,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        accelerator="cpu",
    )
    options.update(kwargs)
    return pl.Trainer(**options)


@pytest.fixture
def seeded():
    pl.seed_everything(0, verbose=False)


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
