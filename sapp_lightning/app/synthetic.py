"""Tiny data sets in the real on-disk formats (IDX.gz, ImageFolder, Criteo TSV, ml-100k), and the smoke run that
trains a recipe on them in seconds: ``sapp-train recipe=NAME smoke=true`` reads generated data through the recipe's
own data module, model and pruning, on the CPU, for a few steps of each epoch.

Example:
    >>> import tempfile
    >>> overrides = smoke_overrides("FashionMNISTDataModule", Path(tempfile.mkdtemp()))
    >>> [o for o in overrides if o.startswith("data.")]  # doctest: +ELLIPSIS
    ['data.data_dir=.../fashion', 'data.val_size=20', 'data.batch_size=8', 'data.num_workers=0']
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gzipped: bool = True) -> None:
    """A minimal IDX writer: magic (0x0800 + ndim for unsigned bytes), big-endian dims, raw bytes."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 + array.ndim if magic is None else magic
    payload = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(payload) if gzipped else payload)


def make_fashion_dir(folder: Path, n_train: int = 40, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """The four gzipped IDX files with random images and labels 0..9; returns the arrays written."""
    from .data.fashion_mnist import FILES

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": np.arange(n_test)[::-1] % 10,
    }
    for key, array in arrays.items():
        write_idx(folder / FILES[key], array)
    return arrays


def make_imagefolder(
    root: Path,
    classes: int | Sequence[str] = 3,
    per_class: int = 4,
    size: int = 40,
    *,
    splits: Sequence[str] = ("train", "val"),
    mixed: bool = False,
) -> Path:
    """ImageNet's layout, ``root/<split>/<class>/<image>``, with ``per_class`` random RGB images of ``size x size``.

    ``classes``: how many (``n00000000``, ``n00000001``, ...) or their folder names. ``mixed``: image ``i`` is
    ``size - 8 + 4 i`` pixels high and every other one a PNG, as a folder gathered from elsewhere has them."""
    from PIL import Image

    names = [f"n{c:08d}" for c in range(classes)] if isinstance(classes, int) else list(classes)
    rng = np.random.default_rng(0)
    for split in splits:
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size - 8 + 4 * i if mixed else size, size, 3), dtype=np.uint8)
                if mixed and i % 2:
                    Image.fromarray(pixels).save(folder / f"img{i}.png", format="PNG")
                else:
                    Image.fromarray(pixels).save(folder / f"img{i}.JPEG", format="JPEG")
    return root


def make_criteo_tsv(path: Path, rows: int = 700, seed: int = 0) -> Path:
    """Kaggle train.txt layout, with missing and negative values sprinkled in."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(rows):
        label = str(int(rng.random() < 0.25))
        ints = ["" if rng.random() < 0.2 else str(int(rng.integers(-2, 1000))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 2**32)):08x}" for _ in range(26)]
        lines.append("\t".join([label, *ints, *cats]))
    path.write_text("\n".join(lines) + "\n")
    return path


def make_ml100k_dir(folder: Path, users: int = 30, items: int = 40, ratings: int = 400, seed: int = 0) -> Path:
    """GroupLens' ml-100k layout with random rows: ``u.data`` (tabs), ``u.user`` and ``u.item`` (pipes, latin-1)."""
    from .data.movielens import GENRES

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genders, jobs = ("M", "F"), ("student", "writer", "other", "technician")
    user_lines = [
        f"{u}|{rng.integers(7, 74)}|{genders[u % 2]}|{jobs[u % 4]}|{rng.integers(10000, 99999)}"
        for u in range(1, users + 1)
    ]
    item_lines = []
    for i in range(1, items + 1):
        date = "" if i % 17 == 0 else f"01-Jan-{rng.integers(1930, 1999)}"
        flags = "|".join(str(int(rng.random() < 0.2)) for _ in GENRES)
        item_lines.append(f"{i}|Film {i} (1995)|{date}||http://us.imdb.com/M/title-exact?{i}|{flags}")
    rating_lines = [
        f"{rng.integers(1, users + 1)}\t{rng.integers(1, items + 1)}\t{rng.integers(1, 6)}\t{880_000_000 + 60 * r}"
        for r in rng.permutation(ratings)
    ]
    (folder / "u.user").write_text("\n".join(user_lines) + "\n")
    (folder / "u.item").write_text("\n".join(item_lines) + "\n", encoding="latin-1")
    (folder / "u.data").write_text("\n".join(rating_lines) + "\n")
    return folder


def _fashion(folder: Path) -> Path:
    make_fashion_dir(folder, n_train=100, n_test=20)
    return folder


# --- smoke runs ----------------------------------------------------------------------------------------------
# Per data module: write its data under a folder and return the overrides that read it (small batches, no workers).
_SMOKE_DATA: dict[str, Callable[[Path], list[str]]] = {
    "FashionMNISTDataModule": lambda root: [
        f"data.data_dir={_fashion(root / 'fashion')}",
        "data.val_size=20",
        "data.batch_size=8",
    ],
    "ImageNetDataModule": lambda root: [
        f"data.root={make_imagefolder(root / 'imagenet')}",
        "data.image_size=32",
        "data.val_resize=36",
        "data.batch_size=2",
    ],
    "CriteoDataModule": lambda root: [
        f"data.path={make_criteo_tsv(root / 'criteo.txt')}",
        "data.table_size=50",
        f"data.cache_dir={root / 'criteo_cache'}",
        "data.batch_size=32",
    ],
    "MovieLensCTRDataModule": lambda root: [
        f"data.data_dir={make_ml100k_dir(root / 'ml-100k')}",
        "data.batch_size=8",
        "data.val_fraction=0.2",
        "data.test_fraction=0.2",
        "data.download=false",
    ],
}
# A few CPU steps of each of two epochs, every step logged; the batch is the data module's (global batch off).
SMOKE_TRAINER = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.num_nodes=1",
    "trainer.strategy=auto",
    "trainer.sync_batchnorm=false",
    "trainer.precision=32-true",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "global_batch_size=null",
]


def smoke_overrides(data_module: str, root: Path) -> list[str]:
    """Write the generated data a data module (its class name) reads under ``root``; the overrides for it."""
    if data_module not in _SMOKE_DATA:
        raise ValueError(f"smoke=true has no generated data for {data_module}; it knows {', '.join(_SMOKE_DATA)}")
    root.mkdir(parents=True, exist_ok=True)
    return [*_SMOKE_DATA[data_module](root), "data.num_workers=0"] + SMOKE_TRAINER


def smoke_config(cfg: Any) -> Any:
    """``cfg`` turned into a smoke run: its data module on generated data (in the run folder's ``smoke_data``),
    :data:`SMOKE_TRAINER`'s short CPU training."""
    from omegaconf import OmegaConf, open_dict

    overrides = smoke_overrides(cfg.data._target_.rsplit(".", 1)[-1], Path(cfg.output_dir) / "smoke_data")
    with open_dict(cfg):
        for override in overrides:
            key, _, value = override.partition("=")
            OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"v={value}"]).v, force_add=True)
    return cfg
