"""What the in-memory and folder data modules share: one dataset per split, the same loaders."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


def collate_batch(batch: Any) -> Any:
    """For datasets whose ``__getitems__`` already builds the whole batch: pass it through."""
    return batch


class SplitDataModule(pl.LightningDataModule):
    """A LightningDataModule whose ``setup`` fills ``self.datasets`` (``"train"``, ``"val"``, ``"test"``).

    Subclasses set ``batch_size`` and ``num_workers``; ``collate_fn`` (None: torch's default) and
    ``test_split`` (the split ``test_dataloader`` serves) are class attributes.
    """

    collate_fn: Any = None
    test_split = "test"
    batch_size: int
    num_workers: int

    def __init__(self) -> None:
        super().__init__()
        self.datasets: dict[str, Dataset] = {}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for the {split} dataloader")
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, shuffle=False)
