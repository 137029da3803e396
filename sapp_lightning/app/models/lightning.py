"""LightningModules for the recipes: image classification and click-through-rate prediction.

They know nothing about pruning: the app adds :class:`~sapp_lightning.BlockPruning` to the Trainer
like any user would.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy


def planned_steps(trainer: pl.Trainer) -> int:
    """``trainer.estimated_stepping_batches``, counted on a loader of the datamodule's own.

    Asking the Trainer from ``configure_optimizers`` sets its train dataloader up before a checkpoint is restored,
    and a resumable loader then starts its epoch over (Lightning-AI/pytorch-lightning#20550): a run resumed from a
    mid-epoch checkpoint would see other batches than the uninterrupted one.
    """
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not trainer.max_epochs or trainer.max_epochs < 0:
        return max(1, int(trainer.estimated_stepping_batches))
    batches = len(datamodule.train_dataloader())
    limit = trainer.limit_train_batches
    batches = min(batches, int(limit)) if isinstance(limit, int) else int(batches * limit)
    steps = math.ceil(batches / trainer.accumulate_grad_batches) * trainer.max_epochs
    return max(1, min(steps, trainer.max_steps) if trainer.max_steps not in (-1, None) else steps)


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels (SA++'s logits included, as in the paper); none on biases and norms."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier with SGD + momentum and a per-step cosine schedule with linear warm-up.

    ``lr`` is the peak learning rate at a global batch of ``lr_reference_batch`` (when given) and is
    scaled linearly with the actual global batch, ``datamodule.batch_size x devices x accumulation``
    (the ImageNet recipe: 0.8 at 2048). Logs ``train/loss`` and ``train/acc`` (top-1 on each training batch: the
    paper's Fig. 3) every step, and ``{val,test}/{loss,acc}``.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-5,
        nesterov: bool = False,
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
        lr_reference_batch: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        # a plain tensor that stays on the device until Lightning writes the logs (every log_every_n_steps): half
        # the cost of a torchmetrics object's per-step state updates (bench/train_acc_cost.py)
        self.log("train/acc", (logits.detach().argmax(dim=-1) == y).float().mean())
        return loss

    def _evaluate(self, batch, stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", accuracy, prog_bar=stage == "val")

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.lr
        if hp.lr_reference_batch:
            batch_size = getattr(self.trainer.datamodule, "batch_size", None)
            if batch_size is None:
                raise ValueError("lr_reference_batch needs a datamodule with a batch_size attribute to scale the LR")
            global_batch = batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
            lr = hp.lr * global_batch / hp.lr_reference_batch
        groups = _param_groups(self, hp.weight_decay)
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum, nesterov=hp.nesterov)
        total = planned_steps(self.trainer)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        warmup = round(total * hp.warmup_epochs / epochs) if epochs else 0

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CTRModule(pl.LightningModule):
    """Binary cross-entropy on click logits; Adam with the learning rate decaying exponentially per step
    from ``lr`` to ``final_lr`` (the paper's Criteo setting: 2e-2 to 3e-4). Logs ``{val,test}/loss``
    (mean BCE, the paper's metric) and ``{val,test}/auroc``."""

    def __init__(
        self,
        net: nn.Module,
        lr: float = 2e-2,
        final_lr: float = 3e-4,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": cls()
                for stage in ("val", "test")
                for name, cls in (("loss", MeanMetric), ("auroc", BinaryAUROC))
            }
        )

    def forward(self, dense, categorical):
        return self.net(dense, categorical)

    def training_step(self, batch, batch_idx):
        dense, categorical, label = batch
        loss = F.binary_cross_entropy_with_logits(self(dense, categorical), label)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        dense, categorical, label = batch
        logits = self(dense, categorical)
        losses = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
        self.metrics[f"{stage}_loss"].update(losses)
        self.metrics[f"{stage}_auroc"].update(logits, label.long())
        self.log(f"{stage}/loss", self.metrics[f"{stage}_loss"], prog_bar=stage == "val")
        self.log(f"{stage}/auroc", self.metrics[f"{stage}_auroc"])

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = planned_steps(self.trainer)
        ratio = hp.final_lr / hp.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: ratio ** min(1.0, step / total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
