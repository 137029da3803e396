"""Tiny data sets in the real on-disk formats (IDX.gz, ImageFolder, Criteo TSV) for app tests."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from sapp_lightning.app.data.fashion_mnist import FILES as FASHION_FILES


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gzipped: bool = True) -> None:
    """A minimal IDX writer: magic (0x0800 + ndim for unsigned bytes), big-endian dims, raw bytes."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 + array.ndim if magic is None else magic
    payload = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(payload) if gzipped else payload)


def make_fashion_dir(folder: Path, n_train: int = 40, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """The four gzipped IDX files with random images and labels 0..9; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": np.arange(n_test)[::-1] % 10,
    }
    for key, array in arrays.items():
        write_idx(folder / FASHION_FILES[key], array)
    return arrays


def make_imagefolder(root: Path, classes: int = 3, per_class: int = 4, size: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
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
    from sapp_lightning.app.data.movielens import GENRES

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


def write_all(root: Path) -> dict[str, Path]:
    """Every data set a recipe reads, in its real format, under ``root`` (for ``.ci/wheel_check.sh``)."""
    make_fashion_dir(root / "fashion", n_train=100, n_test=20)
    return {
        "fashion": root / "fashion",
        "imagenet": make_imagefolder(root / "imagenet"),
        "criteo": make_criteo_tsv(root / "criteo.txt"),
        "movielens": make_ml100k_dir(root / "ml-100k"),
    }


if __name__ == "__main__":
    import sys

    for name, path in write_all(Path(sys.argv[1])).items():
        print(f"{name}={path}")
