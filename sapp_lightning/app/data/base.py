"""What the data modules share: a seeded, rank-sharded batch sampler and a loader that resumes mid-epoch.

A checkpoint written inside an epoch (``ModelCheckpoint(every_n_train_steps=N)``) resumes at the next batch of
the same epoch, in the same order, so a killed-and-resumed run trains on exactly the batches of an uninterrupted
one. Three pieces make that work:

* :class:`ShardedBatchSampler`: the batches of an epoch are a pure function of ``(seed, epoch)``, cut for one
  rank of ``num_replicas``; iteration can begin at any batch by arithmetic (restored batches are never loaded).
* :class:`ResumableDataLoader`: wraps a ``DataLoader`` over that sampler and counts the batches it has *yielded*
  (worker prefetching runs the sampler ahead of training, so the sampler's own position would overshoot). Lightning
  (2.x) saves ``state_dict()`` of a train loader that has one in every checkpoint and calls ``load_state_dict`` on
  resume, before it starts iterating; it calls ``sampler.set_epoch(epoch)`` at every epoch start.
* :class:`SeededItems`: random transforms seeded per ``(seed, epoch, index)``, so augmentation does not depend on
  which worker or which process (original or resumed) built the batch.

The loader is deliberately not a ``DataLoader`` subclass: Lightning re-creates ``DataLoader`` objects to put its own
``DistributedSampler`` in (under DDP with ``use_distributed_sampler=True``), which would shard a second time. It
leaves every other iterable alone, so the sharding here (rank and world size from the trainer) is the only one.

Not torchdata's ``StatefulDataLoader`` (which Lightning resumes natively): its state is tied to the worker count. A
state saved with 2 workers does not load into a loader with none, nor the reverse (torchdata 0.11: ``AssertionError:
State doesn't contain key '_num_yielded'`` / ``'_snapshot'``), while a resumed run may change ``data.num_workers``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "MISSING_DATA",
    "DatasetDownloadError",
    "DatasetNotFoundError",
    "ResumableDataLoader",
    "SeededItems",
    "ShardedBatchSampler",
    "SplitDataModule",
    "collate_batch",
    "resolve_seed",
]


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not where the configuration points; the message says where it looked and how to get it."""


class DatasetDownloadError(RuntimeError):
    """Downloading a data set failed (no network, say); the message says how else to get it."""


#: what ``sapp-train`` reports as one paragraph instead of a traceback
MISSING_DATA = (DatasetNotFoundError, DatasetDownloadError)


def collate_batch(batch: Any) -> Any:
    """For datasets whose ``__getitems__`` already builds the whole batch: pass it through."""
    return batch


def resolve_seed(seed: int | None) -> int:
    """``seed``; else the ``PL_GLOBAL_SEED`` that ``pl.seed_everything`` sets (the same on every rank); else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed)


class ShardedBatchSampler(Sampler[np.ndarray]):
    """Batches of row indices for one rank; the order is a pure function of ``(seed, epoch)``.

    The rows are permuted with ``numpy.random.default_rng([seed, epoch])`` (or kept in order when ``shuffle`` is
    False) and cut into global batches of ``batch_size``; rank ``r`` of ``R`` takes batches ``r, r + R, ...``, so the
    ranks see disjoint rows of one permutation. When the batch count is not a multiple of ``R``, training
    (``shuffle=True``) drops the few extra batches (different rows each epoch) and evaluation pads with repeats of
    the first batches, so every rank runs the same number of steps. Indices within a batch are sorted (file and
    memory-map order). Each batch is an int64 array, or with ``with_epoch`` a list of ``(epoch, index)`` pairs for
    :class:`SeededItems`.

    ``epoch`` and ``start`` say where the next ``iter()`` begins: ``set_epoch`` moves to another epoch's first
    batch; :class:`ResumableDataLoader` sets ``start`` to skip batches already trained on.

    Example:
        >>> sampler = ShardedBatchSampler(10, batch_size=4, shuffle=False)
        >>> [b.tolist() for b in sampler]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        >>> sampler.start = 2  # begin at the third batch: nothing before it is computed or loaded
        >>> [b.tolist() for b in sampler]
        [[8, 9]]
        >>> ranks = [ShardedBatchSampler(12, 2, shuffle=True, seed=1, num_replicas=2, rank=r) for r in range(2)]
        >>> [len(r) for r in ranks], sorted(i for r in ranks for b in r for i in b.tolist()) == list(range(12))
        ([3, 3], True)
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        with_epoch: bool = False,
    ) -> None:
        if batch_size < 1 or num_rows < 0:
            raise ValueError(f"need batch_size >= 1 and num_rows >= 0, got {batch_size} and {num_rows}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.num_rows, self.batch_size, self.shuffle, self.seed = num_rows, batch_size, shuffle, seed
        self.num_replicas, self.rank, self.with_epoch = num_replicas, rank, with_epoch
        self.global_batches = math.ceil(num_rows / batch_size)
        per_rank = self.global_batches / num_replicas
        self.num_batches = math.floor(per_rank) if shuffle else math.ceil(per_rank)
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """The next ``iter()`` begins at ``epoch``'s first batch (a no-op when ``epoch`` is already the next one)."""
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __iter__(self) -> Iterator[np.ndarray]:
        # Not a generator function: epoch and start are read now, so changing them later cannot touch this pass.
        return self.batches(self.epoch, self.start)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """This rank's batches of ``epoch`` from batch number ``start`` on."""
        order = None
        if self.shuffle and start < self.num_batches:
            # int32 when it fits: the permutation is the one per-row array in memory (0.13 GB for 33M rows).
            order = np.arange(self.num_rows, dtype=np.int32 if self.num_rows < 2**31 else np.int64)
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        for k in range(start, self.num_batches):
            b = (self.rank + k * self.num_replicas) % self.global_batches
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.num_rows)
            rows = np.arange(lo, hi) if order is None else np.sort(order[lo:hi]).astype(np.int64)
            yield [(epoch, int(i)) for i in rows] if self.with_epoch else rows


class SeededItems(Dataset):
    """``dataset[index]`` with torch's RNG seeded from ``(seed, epoch, index)``: keys are ``(epoch, index)`` pairs.

    Random transforms (torchvision's draw from torch's global RNG) then give the same result for a row in a given
    epoch whichever worker or process builds it. The RNG is forked, so the caller's stream is left untouched.

    Example:
        >>> class Noisy:
        ...     def __getitem__(self, index):
        ...         return index + torch.rand(()).item()
        >>> noisy = SeededItems(Noisy(), seed=3)
        >>> noisy[(0, 1)] == noisy[(0, 1)], noisy[(0, 1)] == noisy[(1, 1)]  # keys are (epoch, index)
        (True, False)
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class ResumableDataLoader:
    """A data loader that Lightning checkpoints mid-epoch and resumes at the next batch, in the same order.

    Iterating yields the batches of ``batch_sampler`` from its ``(epoch, start)``; a pass that is not interrupted
    by ``set_epoch`` or ``load_state_dict`` is followed by the next epoch. ``state_dict()`` is ``{"epoch", "batch",
    "batches"}``: the latest pass's epoch, the batches it has yielded, and the batches per epoch (a mid-epoch
    position means nothing for another batch size or world size, so loading one of those raises). A state at the
    end of an epoch resumes at the first batch of the next. ``sampler`` is where Lightning calls ``set_epoch``.

    Example:
        >>> def run(loader, epochs):
        ...     return [batch.tolist() for _ in range(epochs) for batch in loader]
        >>> data = torch.arange(60, 66)
        >>> full = run(ResumableDataLoader(data, ShardedBatchSampler(6, 2, shuffle=True)), 2)  # 2 epochs, 3 batches
        >>> full[:3] != full[3:]  # reshuffled per epoch
        True
        >>> loader = ResumableDataLoader(data, ShardedBatchSampler(6, 2, shuffle=True))
        >>> batches = iter(loader)
        >>> seen = [next(batches).tolist(), next(batches).tolist()]
        >>> state = loader.state_dict()  # what Lightning writes into a checkpoint
        >>> state
        {'epoch': 0, 'batch': 2, 'batches': 3}
        >>> resumed = ResumableDataLoader(data, ShardedBatchSampler(6, 2, shuffle=True))  # e.g. in a new process
        >>> resumed.load_state_dict(state)
        >>> seen + run(resumed, 2) == full  # the rest of epoch 0, then epoch 1
        True
    """

    def __init__(
        self,
        dataset: Any,
        batch_sampler: ShardedBatchSampler,
        collate_fn: Callable[[Any], Any] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.sampler = self.batch_sampler = batch_sampler
        self.loader = DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
        )
        self._progress: list[int] | None = None  # [epoch, batches yielded] of the latest pass

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing happens until the first batch is asked for, which Lightning does after set_epoch.
        sampler = self.batch_sampler
        if sampler.start and sampler.start >= len(sampler):  # a restored position at an epoch's end
            sampler.epoch, sampler.start = sampler.epoch + 1, 0
        progress = self._progress = [sampler.epoch, sampler.start]
        batches = iter(self.loader)  # the sampler's epoch and start are read here
        sampler.epoch, sampler.start = progress[0] + 1, 0
        for batch in batches:
            progress[1] += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the latest pass stands (before any pass: where the next one begins)."""
        epoch, batch = self._progress or (self.batch_sampler.epoch, self.batch_sampler.start)
        return {"epoch": epoch, "batch": batch, "batches": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next pass begins at ``state``'s position (the next epoch when ``state`` is at an epoch's end)."""
        epoch, batch, batches = int(state["epoch"]), int(state["batch"]), int(state["batches"])
        if batch >= batches:
            epoch, batch = epoch + 1, 0
        if batch and batches != len(self):
            raise ValueError(
                f"cannot resume inside an epoch of {batches} batches with a loader of {len(self)} batches per epoch "
                "(batch size, data or number of devices changed): resume from a checkpoint written at an epoch end"
            )
        self.batch_sampler.epoch, self.batch_sampler.start = epoch, batch
        self._progress = None

    # Lightning shuts a DataLoader's persistent workers down at teardown through ``_iterator``: forward it.
    @property
    def _iterator(self) -> Any:
        return self.loader._iterator

    @_iterator.setter
    def _iterator(self, value: Any) -> None:
        self.loader._iterator = value


class SplitDataModule(pl.LightningDataModule):
    """A LightningDataModule whose ``setup`` fills ``self.datasets`` (``"train"``, ``"val"``, ``"test"``).

    Loaders are :class:`ResumableDataLoader` over a :class:`ShardedBatchSampler` whose rank and world size come
    from the attached trainer, whatever the trainer's ``use_distributed_sampler`` says. Subclasses set
    ``batch_size``, ``num_workers`` and ``seed`` (None: :func:`resolve_seed`); class attributes: ``collate_fn``
    (None: torch's default), ``test_split`` (the split ``test_dataloader`` serves), ``seeded_augmentation`` (wrap the
    train set in :class:`SeededItems`, for random transforms) and ``pin_memory`` (None: when CUDA is available).
    """

    collate_fn: Any = None
    test_split = "test"
    seeded_augmentation = False
    setup_first = "call setup() before asking for the {split} dataloader"
    batch_size: int
    num_workers: int
    seed: int | None = None
    pin_memory: bool | None = None

    def __init__(self) -> None:
        super().__init__()
        self.datasets: dict[str, Sized] = {}

    def _loader(self, split: str, shuffle: bool) -> ResumableDataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}: {self.setup_first.format(split=split)}")
        dataset = self.datasets[split]
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        seed = resolve_seed(self.seed)
        seeded = self.seeded_augmentation and shuffle
        sampler = ShardedBatchSampler(len(dataset), self.batch_size, shuffle, seed, world, rank, with_epoch=seeded)
        return ResumableDataLoader(
            SeededItems(dataset, seed) if seeded else dataset,
            sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available() if self.pin_memory is None else self.pin_memory,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> ResumableDataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.test_split, shuffle=False)
