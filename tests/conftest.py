"""Tiny models and a quiet Trainer factory shared by the tests."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ALGORITHM_IDS = ("sapp", "acdc", "magnitude", "powerprop")


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
