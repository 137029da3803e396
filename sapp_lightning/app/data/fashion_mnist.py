"""Fashion-MNIST as an in-memory LightningDataModule.

The four gzipped IDX files are read with ``gzip`` + ``numpy`` into uint8 tensors (about 55 MB); batches are
normalized to float32 as they are built. Where the files come from, first match wins:

1. the configured ``data_dir`` (the files directly in it, or in ``data_dir/FashionMNIST/raw``);
2. the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
3. a download by ``prepare_data()`` (``torchvision.datasets.FashionMNIST(download=True)``) into ``data_dir``,
   or ``~/.cache/sapp_lightning/fashion-mnist`` when no ``data_dir`` is set.

Example (needs one of the sources above)::

    from sapp_lightning.app.data.fashion_mnist import FashionMNISTDataModule

    dm = FashionMNISTDataModule(batch_size=128)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))   # float32 [128, 1, 28, 28], int64 [128]
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import DatasetDownloadError, DatasetNotFoundError, SplitDataModule, collate_batch

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions.
_UBYTE = 0x08


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sapp_lightning/fashion-mnist`` (``~/.cache/...`` by default): where downloads go."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sapp_lightning" / "fashion-mnist"


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes with ``ndim`` dimensions.

    Raises ``ValueError`` naming the file when it is not valid gzip, has the wrong magic number or its
    size does not match its header.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"Fashion-MNIST file {path} is corrupt: not a complete gzip file ({err})") from err
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != ndim:
        expected = 0x0800 + ndim
        found = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise ValueError(f"Fashion-MNIST file {path} is corrupt: bad IDX magic number {found}, expected {expected:08x}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise ValueError(
            f"Fashion-MNIST file {path} is corrupt: header says {dims} = {int(np.prod(dims))} bytes of data, "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _candidate_dirs(data_dir: str | None) -> list[Path]:
    """Folders searched for the four files, in priority order; the last ones are where downloads land."""
    # DEBIAN_DIR and the cache are read at call time so tests (and users) can point them elsewhere.
    root = Path(data_dir).expanduser() if data_dir is not None else None
    cache = default_cache_dir()
    return (
        [root, root / "FashionMNIST" / "raw", DEBIAN_DIR]
        if root
        else [DEBIAN_DIR, cache, cache / "FashionMNIST" / "raw"]
    )


def find_fashion_mnist(data_dir: str | None = None) -> Path | None:
    """The first folder holding all four gzipped IDX files (see the module docstring), or None."""
    return next((d for d in _candidate_dirs(data_dir) if all((d / n).is_file() for n in FILES.values())), None)


def _not_found_message(data_dir: str | None) -> str:
    return (
        f"Fashion-MNIST not found (searched {', '.join(map(str, _candidate_dirs(data_dir)))}). Options: "
        f"(1) set data_dir to a folder holding {', '.join(FILES.values())}; "
        f"(2) `apt-get install dataset-fashion-mnist` (files in {DEBIAN_DIR}); "
        "(3) download=True and call prepare_data() on a machine with network access."
    )


def load_fashion_mnist(folder: str | Path) -> dict[str, Tensor]:
    """Read the four files of ``folder`` into uint8 images ``[N, 1, 28, 28]`` and int64 labels ``[N]``."""
    folder = Path(folder)
    out: dict[str, Tensor] = {}
    for split in ("train", "test"):
        images = read_idx(folder / FILES[f"{split}_images"], ndim=3)
        labels = read_idx(folder / FILES[f"{split}_labels"], ndim=1)
        if images.shape[1:] != (28, 28):
            raise ValueError(f"Fashion-MNIST {split} images in {folder} are {images.shape[1:]}, expected (28, 28)")
        if len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST {split} in {folder}: {len(images)} images but {len(labels)} labels")
        if labels.size and labels.max() >= len(CLASSES):
            raise ValueError(f"Fashion-MNIST {split} labels in {folder} go up to {labels.max()}, expected < 10")
        # np.frombuffer arrays are read-only; torch wants writable memory, so copy once here.
        out[f"{split}_images"] = torch.from_numpy(images.copy()).unsqueeze(1)
        out[f"{split}_labels"] = torch.from_numpy(labels.astype(np.int64))
    return out


class NormalizedImages(Dataset):
    """uint8 images + int64 labels in memory; items and batches come out normalized float32.

    ``__getitems__`` lets the DataLoader fetch a whole batch with one gather instead of one per sample; the
    DataLoader must then use :func:`collate_batch`. The gather and the scaling run in numpy: single-threaded,
    so they do not wait on torch's intra-op thread pool, which the training step keeps busy on a small machine.

    Example:
        >>> data = NormalizedImages(torch.full((3, 1, 2, 2), 255, dtype=torch.uint8), torch.tensor([0, 1, 2]))
        >>> images, labels = data.__getitems__([2, 0])
        >>> images.shape, round(images[0, 0, 0, 0].item(), 4), labels.tolist()  # (1 - 0.2860) / 0.3530
        (torch.Size([2, 1, 2, 2]), 2.0227, [2, 0])
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: float = MEAN, std: float = STD) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, indices: list[int] | np.ndarray) -> tuple[Tensor, Tensor]:
        index = np.asarray(indices, dtype=np.int64)
        # (x / 255 - mean) / std as one multiply and one subtract, in place on a fresh float32 copy of the batch.
        images = self.images.numpy()[index].astype(np.float32)
        images *= np.float32(1.0 / (255.0 * self.std))
        images -= np.float32(self.mean / self.std)
        return torch.from_numpy(images), torch.from_numpy(self.labels.numpy()[index])


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST: 55k train / ``val_size`` val (seeded split of the official 60k) / official 10k test.

    Batches are ``(images float32 [B, 1, 28, 28], labels int64 [B])``, normalized with mean 0.2860 and
    std 0.3530. ``seed`` fixes the val split and the train order (a function of ``(seed, epoch)``: loaders resume
    mid-epoch). ``num_classes`` and ``input_shape`` are class attributes; ``source_dir`` (the folder the files were
    read from) is set by ``setup``. See the module docstring for where the files are looked for.
    """

    collate_fn = staticmethod(collate_batch)

    num_classes: int = 10
    input_shape: tuple[int, int, int] = (1, 28, 28)
    classes: tuple[str, ...] = CLASSES

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
        download: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_size < 1:
            raise ValueError(f"val_size must be >= 1, got {val_size}")
        self.save_hyperparameters()
        self.data_dir = None if data_dir is None else str(data_dir)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_size, self.seed, self.download = val_size, seed, download
        self.source_dir: Path | None = None
        self.datasets: dict[str, NormalizedImages] = {}

    def prepare_data(self) -> None:
        """Download the files when no source has them (Lightning runs this on rank 0 only)."""
        if not self.download or find_fashion_mnist(self.data_dir) is not None:
            return
        root = Path(self.data_dir).expanduser() if self.data_dir is not None else default_cache_dir()
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(root), train=train, download=True)
        except Exception as err:  # any failure (no network, bad mirror, disk) gets the same advice
            raise DatasetDownloadError(
                f"Downloading Fashion-MNIST into {root} failed ({err}). " + _not_found_message(self.data_dir)
            ) from err

    def setup(self, stage: str | None = None) -> None:
        """Read the files and build the three splits (all at once: it takes well under a second)."""
        if self.datasets:
            return
        folder = find_fashion_mnist(self.data_dir)
        if folder is None:
            raise DatasetNotFoundError(_not_found_message(self.data_dir))
        data = load_fashion_mnist(folder)
        n_train = len(data["train_labels"])
        if self.val_size >= n_train:
            raise ValueError(f"val_size={self.val_size} leaves no training images (train set has {n_train})")
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
        self.datasets = {
            "train": NormalizedImages(data["train_images"][train_idx], data["train_labels"][train_idx]),
            "val": NormalizedImages(data["train_images"][val_idx], data["train_labels"][val_idx]),
            "test": NormalizedImages(data["test_images"], data["test_labels"]),
        }
        self.source_dir = folder
