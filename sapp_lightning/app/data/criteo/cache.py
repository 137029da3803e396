"""The preprocessed cache of one Criteo source file: three raw arrays plus a manifest, opened as memory maps.

* ``label.bin``  uint8   ``[N]``
* ``dense.bin``  float32 ``[N, 13]``: ``log(max(x, 0) + 1)``, missing -> 0 (DLRM's transform)
* ``cats.bin``   uint32  ``[N, 26]``: the raw 32-bit hash, missing -> 0

``manifest.json`` records the format version, the source file (path, size, mtime) and ``max_rows``; the cache is
reused while they match and rebuilt when they change. A cache is written under a temporary name and renamed into
place at the end, so an interrupted run never leaves a half cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .parse import NUM_CATEGORICAL, NUM_DENSE, CriteoArrays, empty_arrays, iter_blocks, parse_block

__all__ = ["FORMAT_VERSION", "load_cache", "preprocess"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_BLOCK_BYTES = 32 << 20  # ~130k rows per block: big enough for pyarrow's threads, small in memory
_FILES = {"label": (np.uint8, ()), "dense": (np.float32, (NUM_DENSE,)), "cats": (np.uint32, (NUM_CATEGORICAL,))}


def _source_record(source: Path) -> dict:
    stat = source.stat()
    return {"name": source.name, "path": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _entry_dir(source: Path, cache_dir: Path, max_rows: int | None) -> Path:
    # The path digest keeps two different ``train.txt`` files apart in one shared cache folder.
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"{source.name}-{digest}-{'all' if max_rows is None else max_rows}"


def read_manifest(entry: Path) -> dict | None:
    """The manifest of a cache folder, or None when it is missing or unreadable."""
    try:
        return json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _cache_is_valid(entry: Path, source: Path, max_rows: int | None) -> bool:
    manifest = read_manifest(entry)
    if manifest is None or manifest.get("format_version") != FORMAT_VERSION:
        return False
    if manifest.get("source") != _source_record(source) or manifest.get("max_rows") != max_rows:
        return False
    rows = manifest.get("rows")
    if not isinstance(rows, int):
        return False
    for name, (dtype, shape) in _FILES.items():  # also catches a truncated or foreign file
        expected = rows * np.dtype(dtype).itemsize * math.prod(shape)
        if not (entry / f"{name}.bin").is_file() or (entry / f"{name}.bin").stat().st_size != expected:
            return False
    return True


def _write_cache(source: Path, entry: Path, max_rows: int | None, progress: bool, block_bytes: int) -> None:
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        record, rows, positives, start = _source_record(source), 0, 0, time.perf_counter()
        handles = {name: open(tmp / f"{name}.bin", "wb") for name in _FILES}
        try:
            bar = tqdm(
                total=record["size"], unit="B", unit_scale=True, desc=f"Criteo {source.name}", disable=not progress
            )
            with bar:
                for block in iter_blocks(source, max_rows, block_bytes):
                    arrays = parse_block(block, str(source), first_line=rows + 1)
                    for name in _FILES:
                        getattr(arrays, name).tofile(handles[name])
                    rows, positives = rows + len(arrays.label), positives + int(arrays.label.sum())
                    bar.update(len(block))
        finally:
            for handle in handles.values():
                handle.close()
        seconds = time.perf_counter() - start
        manifest = {"format_version": FORMAT_VERSION, "source": record, "max_rows": max_rows, "rows": rows}
        manifest |= {"positives": positives, "seconds": round(seconds, 3)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if _cache_is_valid(entry, source, max_rows):  # another process (a second node) finished first
            shutil.rmtree(tmp)
            return
        if entry.exists():  # stale: its source changed
            shutil.rmtree(entry)
        os.replace(tmp, entry)
        log.info(
            "Criteo: parsed %d rows of %s in %.1f s (%.0f rows/s)", rows, source, seconds, rows / max(seconds, 1e-9)
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def preprocess(
    source: str | os.PathLike,
    cache_dir: str | os.PathLike,
    max_rows: int | None = None,
    progress: bool = True,
    block_bytes: int = _BLOCK_BYTES,
) -> Path:
    """Parse one Criteo text file into a memory-mappable cache folder (unless a valid one exists); return it.

    Only the first ``max_rows`` lines are read when it is set (each ``max_rows`` has its own cache).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> row = "\\t".join(["1"] + ["3"] * 13 + ["05db9164"] * 26)
        >>> _ = (folder / "train.txt").write_text((row + "\\n") * 5)
        >>> entry = preprocess(folder / "train.txt", folder / "cache", progress=False)
        >>> arrays = load_cache(entry)
        >>> arrays.cats.shape, read_manifest(entry)["rows"]
        ((5, 26), 5)
        >>> shutil.rmtree(folder)
    """
    source = Path(source)
    entry = _entry_dir(source, Path(cache_dir), max_rows)
    if _cache_is_valid(entry, source, max_rows):
        log.debug("Criteo: reusing %s", entry)
    else:
        _write_cache(source, entry, max_rows, progress, block_bytes)
    return entry


def load_cache(entry: str | os.PathLike) -> CriteoArrays:
    """Open a folder made by :func:`preprocess` as read-only memory-mapped arrays (nothing is read yet)."""
    entry = Path(entry)
    rows = json.loads((entry / "manifest.json").read_text())["rows"]
    if rows == 0:  # numpy cannot map an empty file
        return empty_arrays()
    return CriteoArrays(
        *(np.memmap(entry / f"{n}.bin", dtype=d, mode="r", shape=(rows, *s)) for n, (d, s) in _FILES.items())
    )
