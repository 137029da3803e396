"""Rows of preprocessed Criteo files as a torch Dataset that builds a whole batch per call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .cache import load_cache
from .layout import Segment
from .parse import CriteoArrays, empty_arrays

__all__ = ["CriteoRows"]


class CriteoRows(Dataset):
    """Rows of one or more preprocessed files, read a whole batch per call.

    ``dataset[index_array]`` (and ``__getitems__``, which a ``DataLoader`` with a batch sampler calls) returns
    ``(dense float32 [B, 13], cats int64 [B, 26], label float32 [B])`` with one fancy-index per memory map;
    ``dataset[i]`` returns one unbatched row. Categoricals are hashed here: ``raw % table_size`` (missing stays 0),
    so ``table_size`` can change without preprocessing again. Memory maps are opened lazily and not pickled, so
    worker processes started with ``spawn`` or ``forkserver`` reopen them instead of copying the data.

    Example:
        >>> import shutil, tempfile
        >>> from sapp_lightning.app.data.criteo import preprocess
        >>> folder = Path(tempfile.mkdtemp())
        >>> row = "\\t".join(["1"] + ["3"] * 13 + ["000003e9"] * 26)  # hash 1001
        >>> _ = (folder / "train.txt").write_text((row + "\\n") * 4)
        >>> rows = CriteoRows([(preprocess(folder / "train.txt", folder, progress=False), 1, 4)], [100] * 26)
        >>> dense, cats, label = rows[np.array([0, 2])]
        >>> len(rows), dense.shape, cats[0, 0].item(), label.tolist()
        (3, torch.Size([2, 13]), 1, [1.0, 1.0])
        >>> shutil.rmtree(folder)
    """

    def __init__(self, segments: Sequence[Segment], table_size: Sequence[int]) -> None:
        self.segments = [(Path(e), int(a), int(b)) for e, a, b in segments]
        self.offsets = np.cumsum([0] + [b - a for _, a, b in self.segments])
        self.modulus = np.asarray(table_size, dtype=np.int64)
        self._arrays: list[CriteoArrays] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def _maps(self) -> list[CriteoArrays]:
        if self._arrays is None:
            self._arrays = [load_cache(entry) for entry, _, _ in self.segments]
        return self._arrays

    def __getitem__(self, index: int | np.ndarray | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        scalar = np.ndim(index) == 0
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        label, dense, cats = empty_arrays(len(idx))
        segment = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(segment):  # a loop over files (at most 23), never over rows
            where = segment == s
            rows = idx[where] - self.offsets[s] + self.segments[s][1]
            arrays = self._maps()[s]
            label[where], dense[where], cats[where] = arrays.label[rows], arrays.dense[rows], arrays.cats[rows]
        batch = (
            torch.from_numpy(dense),
            torch.from_numpy(cats.astype(np.int64) % self.modulus),
            torch.from_numpy(label.astype(np.float32)),
        )
        return tuple(t[0] for t in batch) if scalar else batch

    def __getitems__(self, indices: Sequence[int] | np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        return self[np.asarray(indices, dtype=np.int64)]
