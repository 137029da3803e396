"""The MovieLens-100k CTR LightningDataModule: tables -> chronological split -> coded tensors -> loaders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..base import SplitDataModule, collate_batch
from .download import download_ml100k
from .features import (
    CATEGORICAL_FEATURES,
    DENSE_FEATURES,
    CTRFeatures,
    build_features,
    chronological_split,
    join_tables,
)
from .sources import default_cache_dir, find_source, load_movielens

__all__ = ["MovieLensCTRDataModule", "TensorRows"]


class TensorRows(Dataset):
    """Equal-length tensors in memory; ``__getitems__`` builds a whole batch with one gather per tensor.

    The gather runs in numpy (single-threaded): torch's indexing waits on the intra-op thread pool, which costs
    milliseconds per batch on a busy 2-core machine.

    Example:
        >>> rows = TensorRows(torch.arange(5), torch.arange(5) * 10)
        >>> rows.__getitems__([4, 0])
        (tensor([4, 0]), tensor([40,  0]))
    """

    def __init__(self, *tensors: Tensor) -> None:
        if len({len(t) for t in tensors}) != 1:
            raise ValueError(f"tensors differ in length: {[len(t) for t in tensors]}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int] | np.ndarray) -> tuple[Tensor, ...]:
        index = np.asarray(indices, dtype=np.int64)
        return tuple(torch.from_numpy(t.numpy()[index]) for t in self.tensors)


class MovieLensCTRDataModule(SplitDataModule):
    """MovieLens-100k click-through batches ``(dense float32 [B, 6], cats int64 [B, 26], label float32 [B])``.

    ``num_dense`` (6), ``dense_names`` and ``categorical_names`` are known at construction; ``cardinalities``
    (one table size per categorical feature, index 0 = unknown/missing), ``vocabularies`` and ``rows`` (per split:
    ``user_id``, ``item_id``, ``timestamp``, ``label``) after ``prepare_data()`` + ``setup()``. ``seed`` orders the
    train batches (default: ``PL_GLOBAL_SEED``, else 0). See the package docstring for the sources, the split and
    the features.
    """

    collate_fn = staticmethod(collate_batch)

    num_dense: int = len(DENSE_FEATURES)
    dense_names: tuple[str, ...] = DENSE_FEATURES
    categorical_names: tuple[str, ...] = CATEGORICAL_FEATURES

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 1024,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        download: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) "
                "and sum to less than 1"
            )
        self.save_hyperparameters()
        self.data_dir = None if data_dir is None else str(data_dir)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_fraction, self.test_fraction, self.download = val_fraction, test_fraction, download
        self.source: str | None = None
        self.features: CTRFeatures | None = None
        self.rows: dict[str, pd.DataFrame] = {}
        self.datasets: dict[str, TensorRows] = {}

    @property
    def cardinalities(self) -> list[int]:
        """Table size per categorical feature (``categorical_names`` order); after ``setup()``.

        Before ``setup()`` it raises ``AttributeError`` (so ``getattr(dm, "cardinalities", None)`` is None).
        """
        return self._features().cardinalities

    @property
    def vocabularies(self) -> dict[str, pd.Index]:
        """Train-split vocabulary per categorical feature: value ``v`` has code ``index(v) + 1``."""
        return self._features().vocabularies

    def _features(self) -> CTRFeatures:
        if self.features is None:
            # An AttributeError, so that ``getattr(dm, "cardinalities", None)`` reads None before setup.
            raise AttributeError(
                "MovieLensCTRDataModule: cardinalities and vocabularies come from the train split; "
                "call prepare_data() and setup() first"
            )
        return self.features

    def prepare_data(self) -> None:
        """Download GroupLens' zip when no source is found and ``download`` is set (rank 0 only). Never runs pip."""
        if self.download and find_source(self.data_dir) is None:
            download_ml100k(self.data_dir if self.data_dir is not None else default_cache_dir())

    def setup(self, stage: str | None = None) -> None:
        """Read, split and code all three splits (about a second for the full data set)."""
        if self.features is not None:
            return
        tables = load_movielens(self.data_dir)
        splits = chronological_split(join_tables(tables), self.val_fraction, self.test_fraction)
        self.features = build_features(splits)
        self.rows = {k: v.loc[:, ["user_id", "item_id", "timestamp", "label"]] for k, v in splits.items()}
        self.datasets = {k: TensorRows(*t) for k, t in self.features.tensors.items()}
        self.source = tables.source
