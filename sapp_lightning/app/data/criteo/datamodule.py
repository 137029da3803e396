"""The Criteo LightningDataModule: sources -> caches (``prepare_data``) -> DLRM split (``setup``) -> loaders."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..base import SplitDataModule, collate_batch
from .cache import preprocess, read_manifest
from .dataset import CriteoRows
from .layout import LAYOUTS, check_days, dlrm_split, resolve_sources
from .parse import NUM_CATEGORICAL, NUM_DENSE

__all__ = ["CriteoDataModule"]


def _default_cache_dir(data_folder: Path) -> Path:
    # Next to the data when possible: the cache is as large as the data (~7 GB for Kaggle).
    if os.access(data_folder, os.W_OK):
        return data_folder / "sapp_cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sapp_lightning" / "criteo"


def _table_sizes(table_size: int | Sequence[int]) -> list[int]:
    sizes = [table_size] * NUM_CATEGORICAL if isinstance(table_size, int) else list(table_size)
    if len(sizes) != NUM_CATEGORICAL or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise ValueError(f"table_size must be an int or a list of {NUM_CATEGORICAL} ints, got {table_size!r}")
    if min(sizes) < 1:
        raise ValueError(f"table_size values must be >= 1, got {table_size!r}")
    return sizes


class CriteoDataModule(SplitDataModule):
    """Criteo Kaggle or 1TB click logs: preprocessed once to memory maps, served in vectorized batches.

    Args:
        path: Kaggle ``train.txt`` (any file name works) or the folder holding it, or the folder holding
            the 1TB ``day_0`` ... ``day_23`` files (decompressed).
        layout: ``"kaggle"``, ``"terabyte"`` or ``"auto"`` (a file or a folder with ``train.txt`` is
            Kaggle; a folder with ``day_N`` files is terabyte).
        cache_dir: where the preprocessed arrays go; default ``<data folder>/sapp_cache`` when that folder
            is writable, else ``~/.cache/sapp_lightning/criteo`` (``$XDG_CACHE_HOME`` respected).
        table_size: hash table size per categorical feature: one int for all 26, or a list of 26.
        batch_size: rows per batch and per device (the paper uses 32768).
        num_workers: DataLoader worker processes (batches are built in them).
        max_rows: read only the first ``max_rows`` lines of each source file (quick runs; the split is
            then made on those rows).
        days: terabyte only: the day files to use, increasing; the last one is halved into test/val and
            the others are train (default: all 24, i.e. days 0-22 train, day 23 test/val).
        seed: shuffle seed; default the ``PL_GLOBAL_SEED`` set by ``pl.seed_everything`` (else 0), which
            is the same on every rank. The train order is a function of ``(seed, epoch)`` only.
        pin_memory: default: when CUDA is available.
        progress: show a tqdm bar while preprocessing.

    Splits follow DLRM (:mod:`.layout`): Kaggle days 0-5 train, day 6 halved into test (first half) and val
    (second half); terabyte days 0-22 train, day 23 halved the same way. Preprocessing runs in ``prepare_data``
    (once per node); ``setup`` only opens the memory maps. Loaders shard by rank themselves and resume mid-epoch
    (:class:`~sapp_lightning.app.data.base.ResumableDataLoader`).

    Example:
        >>> import shutil, tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> row = "\\t".join(["1"] + ["3"] * 13 + ["05db9164"] * 26)
        >>> _ = (folder / "train.txt").write_text((row + "\\n") * 70)
        >>> dm = CriteoDataModule(folder, table_size=1000, batch_size=16, progress=False)
        >>> dm.num_dense, len(dm.cardinalities)
        (13, 26)
        >>> dm.setup("fit")
        >>> dense, cats, label = next(iter(dm.train_dataloader()))
        >>> dense.shape, cats.shape, cats.dtype, label.shape
        (torch.Size([16, 13]), torch.Size([16, 26]), torch.int64, torch.Size([16]))
        >>> len(dm.train_set), len(dm.test_set), len(dm.val_set)
        (60, 5, 5)
        >>> shutil.rmtree(folder)
    """

    collate_fn = staticmethod(collate_batch)
    setup_first = "call setup() before asking for a dataloader"
    num_dense: int = NUM_DENSE

    def __init__(
        self,
        path: str | os.PathLike,
        layout: str = "auto",
        cache_dir: str | os.PathLike | None = None,
        table_size: int | Sequence[int] = 1_000_000,
        batch_size: int = 32768,
        num_workers: int = 0,
        max_rows: int | None = None,
        days: Sequence[int] | None = None,
        seed: int | None = None,
        pin_memory: bool | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be None or an int >= 1, got {max_rows!r}")
        self.cardinalities = _table_sizes(table_size)
        self.path = Path(path).expanduser()
        self.layout, self.sources = resolve_sources(self.path, layout, check_days(days))
        data_folder = self.path.parent if self.path.is_file() else self.path
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir(data_folder)
        self.batch_size, self.num_workers, self.max_rows, self.seed = batch_size, num_workers, max_rows, seed
        self.pin_memory, self.progress = pin_memory, progress
        self.datasets: dict[str, CriteoRows] = {}

    @property
    def train_set(self) -> CriteoRows | None:
        return self.datasets.get("train")

    @property
    def val_set(self) -> CriteoRows | None:
        return self.datasets.get("val")

    @property
    def test_set(self) -> CriteoRows | None:
        return self.datasets.get("test")

    def prepare_data(self) -> None:
        """Build (or validate) the cache of every source file; Lightning runs it once per node."""
        for source in self.sources:
            preprocess(source, self.cache_dir, self.max_rows, self.progress)

    def setup(self, stage: str | None = None) -> None:
        """Open the caches (building any that are missing) and cut the DLRM train/val/test split."""
        entries = [preprocess(source, self.cache_dir, self.max_rows, self.progress) for source in self.sources]
        rows = [read_manifest(entry)["rows"] for entry in entries]
        splits = {name: CriteoRows(s, self.cardinalities) for name, s in dlrm_split(self.layout, entries, rows).items()}
        for name in ("train", "val", "test"):
            if len(splits[name]) == 0:
                raise ValueError(f"the Criteo {name} split is empty: {sum(rows)} rows are too few")
        self.datasets = splits
