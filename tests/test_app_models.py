"""The app's Lightning modules (sapp_lightning/app/models): the image classifier's optimizer groups (SA++'s logits at
their own learning rate), its training accuracy logged at every step, and the learning-rate plan laid over the
steps Lightning estimates."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from helpers import make_trainer
from pytorch_lightning.loggers import CSVLogger

from sapp_lightning import BlockPruning
from sapp_lightning.algorithms import BlockAttention
from sapp_lightning.app.data import FashionMNISTDataModule
from sapp_lightning.app.models import MLP, ImageClassifier
from sapp_lightning.app.models.lightning import planned_steps
from sapp_lightning.app.plots import read_train_accuracy


def test_image_classifier_decays_matrices_and_the_attention_logits_not_biases(tmp_path):
    from sapp_lightning.app.models import ImageClassifier

    class Groups(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            logits = {id(m.logits) for m in pl_module.modules() if isinstance(m, BlockAttention)}
            self.groups = [
                (g["initial_lr"], g["weight_decay"], {id(p) in logits for p in g["params"]})
                for g in trainer.optimizers[0].param_groups
            ]

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    module = ImageClassifier(net, 4, lr=0.05, weight_decay=1e-4)
    groups = Groups()
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 4, 4), torch.randint(4, (16,)))
    trainer = make_trainer(tmp_path, [BlockPruning("sapp", 0.5, 4, min_blocks=1), groups], max_epochs=1)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert groups.groups == [(0.05, 1e-4, {False, True}), (0.05, 0.0, {False})]  # the logits as in the paper


def test_the_image_classifier_logs_its_training_accuracy_at_every_step(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.randn(24, 3, 2, 2)
    y = net(x).argmax(1)  # labels the untrained (and, at lr 0, unchanging) net gets right, then 1, 2, 4 per batch wrong
    for start, wrong in ((0, 1), (8, 2), (16, 4)):
        y[start : start + wrong] = (y[start : start + wrong] + 1) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = make_trainer(tmp_path, max_epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(ImageClassifier(net, num_classes=3, lr=0.0), loader)
    accuracy = read_train_accuracy(tmp_path)
    assert accuracy.index.tolist() == list(range(6)) and accuracy.tolist() == [0.875, 0.75, 0.5] * 2


@pytest.mark.parametrize(
    "trainer_options",
    [{}, {"limit_train_batches": 3}, {"limit_train_batches": 0.5, "accumulate_grad_batches": 2}, {"max_steps": 7}],
)
def test_the_modules_plan_their_learning_rate_over_what_lightning_estimates(tmp_path, fashion_dir, trainer_options):
    class Compare(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # after setup: estimated_stepping_batches is safe to ask here
            self.pair = (planned_steps(trainer), trainer.estimated_stepping_batches)

    compare = Compare()
    datamodule = FashionMNISTDataModule(data_dir=fashion_dir, batch_size=16, val_size=20)
    module = ImageClassifier(MLP((1, 28, 28), 10, hidden=[16]), num_classes=10)
    trainer = make_trainer(tmp_path, [compare], max_epochs=4, limit_val_batches=0, **trainer_options)
    trainer.fit(module, datamodule=datamodule)
    assert compare.pair[0] == compare.pair[1]
