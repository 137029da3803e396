"""What logging ``train/acc`` costs a dense demo fit: the image classifier as it is (a plain tensor per step) against
the same model logging a torchmetrics ``MulticlassAccuracy`` object (what it did until 2026-12-07), and against no
training accuracy at all; whole fits of the demo's MLP on Fashion-MNIST, interleaved round by round in one process.

    python bench/train_acc_cost.py --epochs 2 --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import fashion_mnist, load, quiet, trainer_kwargs  # noqa: E402
from sapp_lightning.app.models import MLP, ImageClassifier  # noqa: E402


class MetricObject(ImageClassifier):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.train_acc = MulticlassAccuracy(10, average="micro", validate_args=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.train_acc(logits.detach(), y)
        self.log("train/acc", self.train_acc)
        return loss


class NoAccuracy(ImageClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss


VARIANTS = {"plain tensor (now)": ImageClassifier, "torchmetrics object": MetricObject, "none": NoAccuracy}


def fit_seconds(cls: type[ImageClassifier], epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    module = cls(MLP((1, 28, 28), 10, hidden=[512, 512]), num_classes=10, lr=0.05)
    with tempfile.TemporaryDirectory() as logs:  # the demo's CSV logger, written every 20 steps as the recipe does
        options = trainer_kwargs() | {"logger": CSVLogger(logs), "log_every_n_steps": 20}
        trainer = pl.Trainer(max_epochs=epochs, **options)
        started = time.perf_counter()
        trainer.fit(module, datamodule=fashion_mnist(256))
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    loads = []
    for r in range(args.rounds):
        for name, cls in VARIANTS.items():
            times[name].append(fit_seconds(cls, args.epochs, seed=r))
        loads.append(load())
        print(f"[round {r + 1}/{args.rounds}] " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    base = statistics.median(times["none"])
    print(f"\n{args.epochs}-epoch dense fits, {args.threads} threads, {args.rounds} rounds, load average "
          f"{min(loads):.2f}-{max(loads):.2f}: median fit, and over the fit without training accuracy")  # fmt: skip
    for name, values in times.items():
        print(f"  {name}: {statistics.median(values):.2f} s ({statistics.median(values) / base:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
