"""Criteo click logs (Kaggle ``train.txt`` or the 1TB ``day_0`` ... ``day_23``) as a LightningDataModule.

Both layouts hold one impression per line, tab-separated, no header, 40 fields: ``label``, 13 integer
features ``I1..I13`` and 26 categorical features ``C1..C26`` written as 8 hex digits (a 32-bit hash). An
empty field is a missing value.

**Preprocessing, once per source file.** The text is streamed in blocks of whole lines, parsed with
pyarrow's multithreaded CSV reader plus a vectorized hex decoder, and appended to three raw arrays in a
cache folder, then opened as ``numpy.memmap`` so 45M (or 4B) rows never need to fit in memory:

* ``label.bin``  uint8   ``[N]``
* ``dense.bin``  float32 ``[N, 13]``: ``log(max(x, 0) + 1)``, missing -> 0 (DLRM's transform)
* ``cats.bin``   uint32  ``[N, 26]``: the raw 32-bit hash, missing -> 0

A ``manifest.json`` records the format version, the source file (path, size, mtime) and ``max_rows``;
the cache is reused while they match and rebuilt when they change. Each cache is written under a
temporary name and renamed into place at the end, so an interrupted run never leaves a half cache.

**Malformed lines raise** :class:`CriteoFormatError` naming the file and line number (wrong field count,
a label other than 0/1, a non-integer ``I`` field, a ``C`` field that is not 8 hex digits). Nothing is
skipped silently: a damaged download should be noticed, not trained on.

**Categoricals are hashed when batches are built**: ``index = raw % table_size[feature]`` (missing
stays 0), so ``table_size`` can change without preprocessing again.

**Splits follow facebookresearch/dlrm.** ``data_utils.getCriteoAdData`` cuts Kaggle's ``train.txt``
into 7 consecutive "days" with ``divmod(N, 7)``, the first ``N % 7`` days one row longer;
``data_utils.transformCriteoAdData`` takes days 0-5 as train and halves day 6 with
``np.array_split(day6, 2)``: the first half (``ceil(n/2)`` rows) is **test**, the second **val**
(``dlrm_data_pytorch.CriteoDataset`` agrees: ``test_size = ceil(n / 2)``). The 1TB layout uses days
0-22 as train and halves day 23 the same way. Rows are not shuffled before the split. DLRM's dense
transform is the same (negatives -> 0, then ``log(x + 1)``); its categorical handling with
``--max-ind-range`` is this module's ``raw % table_size``.

Example (needs the data; :class:`CriteoDataModule` has a runnable one on a tiny file)::

    from sapp_lightning.models import CriteoPaperNet, CTRModule

    dm = CriteoDataModule("/data/criteo/train.txt", batch_size=32768, table_size=1_000_000)
    net = CriteoPaperNet(num_dense=dm.num_dense, cardinalities=dm.cardinalities)  # before setup: no parsing yet
    trainer.fit(CTRModule(net), dm)  # batches: (dense float32 [B, 13], cats int64 [B, 26], label float32 [B])
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

__all__ = [
    "FORMAT_VERSION",
    "NUM_CATEGORICAL",
    "NUM_DENSE",
    "CriteoArrays",
    "CriteoBatchSampler",
    "CriteoDataModule",
    "CriteoFormatError",
    "CriteoRows",
    "halve",
    "kaggle_day_sizes",
    "load_cache",
    "parse_block",
    "preprocess",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
NUM_DENSE = 13
NUM_CATEGORICAL = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_CATEGORICAL
KAGGLE_DAYS = 7
TERABYTE_DAYS = 24
LAYOUTS = ("kaggle", "terabyte", "auto")

_BLOCK_BYTES = 32 << 20  # ~130k rows per block: big enough for pyarrow's threads, small in memory
_DENSE_NAMES = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
_CAT_NAMES = [f"C{i}" for i in range(1, NUM_CATEGORICAL + 1)]
_COLUMN_NAMES = ["label", *_DENSE_NAMES, *_CAT_NAMES]
_READ = pacsv.ReadOptions(column_names=_COLUMN_NAMES, use_threads=True, block_size=4 << 20)
# No quoting or escaping: Criteo fields never hold quotes, and a stray one must not swallow lines.
_PARSE = pacsv.ParseOptions(
    delimiter="\t", quote_char=False, double_quote=False, escape_char=False, ignore_empty_lines=False
)
# Only "" is missing (the default null list would also accept "NA", "null", ...). Hashes are read as
# binary so no UTF-8 check runs and their offsets/bytes buffers can be decoded in numpy.
_CONVERT = pacsv.ConvertOptions(
    column_types={**{n: pa.int64() for n in ["label", *_DENSE_NAMES]}, **{n: pa.binary() for n in _CAT_NAMES}},
    null_values=[""],
    strings_can_be_null=False,
    quoted_strings_can_be_null=False,
    check_utf8=False,
)
_INT_RE = re.compile(rb"[+-]?[0-9]+")
_HEX_RE = re.compile(rb"[0-9a-fA-F]{8}")


class CriteoFormatError(ValueError):
    """A line of a Criteo file that is not 40 tab-separated fields of the expected kinds."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        super().__init__(f"{source}, line {line}: {reason}")
        self.source, self.line, self.reason = source, line, reason

    def __reduce__(self):  # picklable although __init__ takes three arguments
        return type(self), (self.source, self.line, self.reason)


class CriteoArrays(NamedTuple):
    """Parsed rows: ``label`` uint8 [N], ``dense`` float32 [N, 13] (log-transformed), ``cats`` uint32 [N, 26]."""

    label: np.ndarray
    dense: np.ndarray
    cats: np.ndarray


# ----------------------------------------------------------------------------------------------- parsing


def _empty_arrays(rows: int = 0) -> CriteoArrays:
    return CriteoArrays(
        np.zeros(rows, np.uint8), np.zeros((rows, NUM_DENSE), np.float32), np.zeros((rows, NUM_CATEGORICAL), np.uint32)
    )


class _BadBlock(Exception):
    """Raised inside the fast path; the slow path then finds and names the offending line."""


def _decode_hex(chunk: pa.BinaryArray) -> np.ndarray:
    """8-hex-digit binary values -> uint32, empty -> 0, all in numpy (no Python loop over rows)."""
    n = len(chunk)
    out = np.zeros(n, np.uint32)
    _, offsets_buf, data_buf = chunk.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, count=n + 1, offset=chunk.offset * 4)
    lengths = np.diff(offsets)
    present = lengths != 0
    if not present.any():
        return out
    if (lengths[present] != 8).any():
        raise _BadBlock("categorical of the wrong length")
    # Every value is 8 bytes or empty, so the values lie back to back: one reshape, no gather.
    chars = np.frombuffer(data_buf, np.uint8, count=offsets[-1] - offsets[0], offset=offsets[0]).reshape(-1, 8)
    # uint8 arithmetic (wrapping below 0) is several times faster than a 256-entry lookup table.
    if not (((chars - 48) <= 9) | (((chars | 0x20) - 97) <= 5)).all():  # 0-9, a-f, A-F
        raise _BadBlock("non-hex categorical")
    nibbles = (chars & 0x0F) + 9 * (chars >> 6)  # '0'-'9' -> 0-9, 'a'-'f' and 'A'-'F' -> 10-15
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]  # [m, 4] bytes, most significant first
    out[present] = packed.view(">u4")[:, 0]
    return out


def _parse_fast(data: bytes) -> CriteoArrays:
    table = pacsv.read_csv(io.BytesIO(data), _READ, _PARSE, _CONVERT)
    expected_rows = data.count(b"\n") + (not data.endswith(b"\n"))
    if table.num_rows != expected_rows:  # pyarrow drops some empty lines; those are malformed here
        raise _BadBlock("row count")
    label = table.column("label")
    if label.null_count or not pc.all(pc.is_in(label, pa.array([0, 1]))).as_py():
        raise _BadBlock("label")
    out = _empty_arrays(table.num_rows)
    out.label[:] = label.to_numpy()
    for j, name in enumerate(_DENSE_NAMES):
        values = pc.fill_null(table.column(name), 0).to_numpy()
        # DLRM: negative counts (e.g. -1 in I2) are clipped to 0 before log(x + 1).
        out.dense[:, j] = np.log1p(np.maximum(values, 0).astype(np.float64))
    for j, name in enumerate(_CAT_NAMES):
        row = 0
        for chunk in table.column(name).chunks:
            out.cats[row : row + len(chunk), j] = _decode_hex(chunk)
            row += len(chunk)
    return out


def _line_problem(line: bytes) -> str | None:
    """Why one line is malformed (the slow, per-line check run only after the fast path failed)."""
    fields = line.split(b"\t")
    if len(fields) != NUM_FIELDS:
        return f"expected {NUM_FIELDS} tab-separated fields, found {len(fields)}"
    if fields[0] not in (b"0", b"1"):
        return f"label must be 0 or 1, found {fields[0].decode(errors='replace')!r}"
    for name, field in zip(_DENSE_NAMES, fields[1 : 1 + NUM_DENSE]):
        if field and not _INT_RE.fullmatch(field):
            return f"{name} is not an integer: {field.decode(errors='replace')!r}"
    for name, field in zip(_CAT_NAMES, fields[1 + NUM_DENSE :]):
        if field and not _HEX_RE.fullmatch(field):
            return f"{name} is not 8 hex digits: {field.decode(errors='replace')!r}"
    return None


def _locate_error(data: bytes, source: str, first_line: int, cause: Exception) -> CriteoFormatError:
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    for k, line in enumerate(lines):
        if (reason := _line_problem(line)) is not None:
            return CriteoFormatError(source, first_line + k, reason)
    # The fast parser refused something the line check accepts (e.g. an integer beyond int64).
    last = first_line + len(lines) - 1
    return CriteoFormatError(source, first_line, f"could not parse lines {first_line}-{last}: {cause}")


def parse_block(data: bytes, source: str = "<bytes>", first_line: int = 1) -> CriteoArrays:
    """Parse whole Criteo lines (bytes) into arrays; raise :class:`CriteoFormatError` on a bad line.

    ``source`` and ``first_line`` (the 1-based line number of the first line in ``data``) only serve the
    error message.

    Example:
        >>> row = "\\t".join(["1", "3", "", "-1"] + [""] * 10 + ["05db9164"] + [""] * 25)
        >>> arrays = parse_block((row + "\\n").encode())
        >>> arrays.label.tolist(), hex(arrays.cats[0, 0]), int(arrays.cats[0, 1])  # C2 missing -> 0
        ([1], '0x5db9164', 0)
        >>> arrays.dense[0, :3].tolist() == [np.float32(np.log(4)), 0, 0]  # log(3 + 1); missing and -1 -> 0
        True
        >>> try:
        ...     parse_block(b"1\\t2\\n", source="train.txt", first_line=7)
        ... except CriteoFormatError as error:
        ...     print(error)
        train.txt, line 7: expected 40 tab-separated fields, found 2
    """
    if not data:
        return _empty_arrays()
    try:
        return _parse_fast(data)
    except (pa.ArrowInvalid, _BadBlock) as error:
        raise _locate_error(data, source, first_line, error) from None


def _iter_blocks(path: Path, max_rows: int | None, block_bytes: int) -> Iterator[bytes]:
    """Yield blocks of whole lines from a file, stopping after ``max_rows`` lines."""
    rows_left = math.inf if max_rows is None else max_rows
    carry = b""
    with open(path, "rb") as fh:
        while rows_left > 0:
            chunk = fh.read(block_bytes)
            if not chunk:
                if carry:  # a last line without a final newline
                    yield carry
                return
            buffer = carry + chunk
            cut = buffer.rfind(b"\n") + 1
            block, carry = buffer[:cut], buffer[cut:]
            if not block:
                continue
            if max_rows is not None:  # counting costs a pass over the bytes: only when a cap is set
                rows = block.count(b"\n")
                if rows > rows_left:
                    newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n"))
                    block, rows = block[: newlines[int(rows_left) - 1] + 1], int(rows_left)
                rows_left -= rows
            yield block


# ------------------------------------------------------------------------------------------------- cache


_FILES = {"label": (np.uint8, ()), "dense": (np.float32, (NUM_DENSE,)), "cats": (np.uint32, (NUM_CATEGORICAL,))}


def _source_record(source: Path) -> dict:
    stat = source.stat()
    return {"name": source.name, "path": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _entry_dir(source: Path, cache_dir: Path, max_rows: int | None) -> Path:
    # The path digest keeps two different ``train.txt`` files apart in one shared cache folder.
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"{source.name}-{digest}-{'all' if max_rows is None else max_rows}"


def _read_manifest(entry: Path) -> dict | None:
    try:
        return json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _cache_is_valid(entry: Path, source: Path, max_rows: int | None) -> bool:
    manifest = _read_manifest(entry)
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
                for block in _iter_blocks(source, max_rows, block_bytes):
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
        return _empty_arrays()
    return CriteoArrays(
        *(np.memmap(entry / f"{n}.bin", dtype=d, mode="r", shape=(rows, *s)) for n, (d, s) in _FILES.items())
    )


# ------------------------------------------------------------------------------------------------ splits


def kaggle_day_sizes(rows: int, days: int = KAGGLE_DAYS) -> list[int]:
    """DLRM's cut of Kaggle's single file into ``days`` consecutive chunks; the first ``rows % days`` get one more.

    Example:
        >>> kaggle_day_sizes(1000), kaggle_day_sizes(1001)
        ([143, 143, 143, 143, 143, 143, 142], [143, 143, 143, 143, 143, 143, 143])
    """
    size, extra = divmod(rows, days)
    return [size + (d < extra) for d in range(days)]


def halve(rows: int) -> tuple[int, int]:
    """DLRM's ``np.array_split(day, 2)`` of the last day: (test rows, val rows), test first and larger.

    Example:
        >>> halve(143)
        (72, 71)
    """
    test = (rows + 1) // 2
    return test, rows - test


# ----------------------------------------------------------------------------------------- torch dataset


Segment = tuple[Path, int, int]  # (cache folder, first row, end row) of one source file


class CriteoRows(Dataset):
    """Rows of one or more preprocessed files, read a whole batch per call.

    ``dataset[index_array]`` returns ``(dense float32 [B, 13], cats int64 [B, 26], label float32 [B])``
    with one fancy-index per memory map; ``dataset[i]`` returns one unbatched row (so a stock
    ``DataLoader(batch_size=...)`` also works, just slower). Categoricals are reduced modulo
    ``table_size`` here. Memory maps are opened lazily and not pickled, so worker processes started with
    ``spawn`` or ``forkserver`` reopen them instead of copying the data.
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
        label, dense, cats = _empty_arrays(len(idx))
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


class CriteoBatchSampler(DistributedSampler):
    """Yields one int64 index array per batch; rank-aware; reshuffles per epoch from ``(seed, epoch)``.

    Use with ``DataLoader(dataset, batch_size=None, sampler=...)``. It subclasses
    :class:`~torch.utils.data.DistributedSampler` so Lightning calls ``set_epoch`` on it and never wraps
    or replaces it. The rows are permuted (or kept in order), cut into global batches, and rank ``r`` of
    ``R`` takes batches ``r, r + R, ...``: every rank sees disjoint rows of the same permutation. When the
    batch count is not a multiple of ``R``, ``shuffle=True`` (training) drops the few extra batches
    (different rows each epoch), ``shuffle=False`` (evaluation) pads with repeats of the first batches,
    like DistributedSampler, so all ranks run the same number of steps. Indices within a batch are sorted
    so the memory maps are read in file order.

    Example:
        >>> sampler = CriteoBatchSampler(10, batch_size=4, shuffle=False)
        >>> [b.tolist() for b in sampler]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """

    def __init__(
        self, num_rows: int, batch_size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        # DistributedSampler.__init__ would query torch.distributed; set its attributes directly.
        self.num_rows, self.batch_size, self.shuffle, self.seed = num_rows, batch_size, shuffle, seed
        self.num_replicas, self.rank, self.epoch, self.drop_last = num_replicas, rank, 0, shuffle
        self.global_batches = math.ceil(num_rows / batch_size)
        per_rank = self.global_batches / num_replicas
        self.num_samples = math.floor(per_rank) if shuffle else math.ceil(per_rank)  # batches on this rank
        self.total_size = self.num_samples * num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def _permutation(self) -> np.ndarray:
        # int32 when it fits: the permutation is the one per-row array held in memory (0.13 GB for 33M rows).
        order = np.arange(self.num_rows, dtype=np.int32 if self.num_rows < 2**31 else np.int64)
        np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        return order

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self._permutation() if self.shuffle else None
        for k in range(self.num_samples):
            b = (self.rank + k * self.num_replicas) % self.global_batches
            start, stop = b * self.batch_size, min((b + 1) * self.batch_size, self.num_rows)
            yield np.arange(start, stop) if order is None else np.sort(order[start:stop]).astype(np.int64)


# ---------------------------------------------------------------------------------------------- datamodule


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


_KAGGLE_EXPECTED = "the Kaggle train.txt file, or a folder holding it"
_TERABYTE_EXPECTED = "a folder holding the Criteo 1TB day_0 ... day_23 files"


def _resolve_sources(path: Path, layout: str, days: Sequence[int] | None) -> tuple[str, list[Path]]:
    """Find the source files for a layout (``auto`` decides from what is there); explain what is missing."""
    if not path.exists():
        expected = {"kaggle": _KAGGLE_EXPECTED, "terabyte": _TERABYTE_EXPECTED}.get(
            layout, f"{_KAGGLE_EXPECTED}, or {_TERABYTE_EXPECTED}"
        )
        raise FileNotFoundError(f"Criteo data not found: no such file or folder {path} (expected {expected})")
    if layout == "auto":
        if path.is_file():
            layout = "kaggle"
        else:
            has_kaggle, has_days = (path / "train.txt").is_file(), any(path.glob("day_[0-9]*"))
            if has_kaggle and has_days:
                raise ValueError(f"{path} holds both train.txt and day_N files: pass layout='kaggle' or 'terabyte'")
            if not (has_kaggle or has_days):
                raise FileNotFoundError(
                    f"Criteo data not found: {path} holds neither train.txt nor day_N files "
                    f"(expected {_KAGGLE_EXPECTED}, or {_TERABYTE_EXPECTED})"
                )
            layout = "kaggle" if has_kaggle else "terabyte"
    if days is not None and layout != "terabyte":
        raise ValueError(f"days selects terabyte day files; the {layout} layout has a single file")
    if layout == "kaggle":
        source = path if path.is_file() else path / "train.txt"
        if not source.is_file():
            raise FileNotFoundError(
                f"Criteo data not found: folder {path} holds no train.txt (expected {_KAGGLE_EXPECTED})"
            )
        return layout, [source]
    if not path.is_dir():
        raise ValueError(f"the terabyte layout expects a folder holding day_0 ... day_23, got the file {path}")
    sources = [path / f"day_{d}" for d in (range(TERABYTE_DAYS) if days is None else days)]
    missing = [s.name for s in sources if not s.is_file()]
    if missing:
        zipped = " (only .gz versions found: decompress them first)" if (path / f"{missing[0]}.gz").exists() else ""
        raise FileNotFoundError(f"Criteo terabyte data in {path} is missing {', '.join(missing)}{zipped}")
    return layout, sources


def _check_days(days: Sequence[int] | None) -> list[int] | None:
    if days is None:
        return None
    days = list(days)
    if len(days) < 2 or sorted(set(days)) != days or not all(0 <= d < TERABYTE_DAYS for d in days):
        raise ValueError(f"days must be at least 2 increasing day numbers in 0..{TERABYTE_DAYS - 1}, got {days!r}")
    return days


class CriteoDataModule(pl.LightningDataModule):
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

    Splits follow DLRM (module docstring): Kaggle days 0-5 train, day 6 halved into test (first half)
    and val (second half); terabyte days 0-22 train, day 23 halved the same way.

    **Distributed training**: the loaders use :class:`CriteoBatchSampler`, which takes its rank and world
    size from the attached trainer and gives each rank disjoint batches. Because it is a
    ``DistributedSampler``, Lightning neither replaces nor wraps it, whatever ``use_distributed_sampler``
    says: the sharding is always this module's own. Preprocessing runs in ``prepare_data`` (once per
    node); ``setup`` only opens the memory maps.

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
        self.layout, self.sources = _resolve_sources(self.path, layout, _check_days(days))
        data_folder = self.path.parent if self.path.is_file() else self.path
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir(data_folder)
        self.batch_size, self.num_workers, self.max_rows, self.seed = batch_size, num_workers, max_rows, seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.progress = progress
        self.train_set: CriteoRows | None = None
        self.val_set: CriteoRows | None = None
        self.test_set: CriteoRows | None = None

    def prepare_data(self) -> None:
        """Build (or validate) the cache of every source file; Lightning runs it once per node."""
        for source in self.sources:
            preprocess(source, self.cache_dir, self.max_rows, self.progress)

    def setup(self, stage: str | None = None) -> None:
        """Open the caches (building any that are missing) and cut the DLRM train/val/test split."""
        entries = [preprocess(source, self.cache_dir, self.max_rows, self.progress) for source in self.sources]
        rows = [json.loads((entry / "manifest.json").read_text())["rows"] for entry in entries]
        if self.layout == "kaggle":
            train_rows = sum(kaggle_day_sizes(rows[0])[:-1])
            train: list[Segment] = [(entries[0], 0, train_rows)]
            last, first, last_rows = entries[0], train_rows, rows[0] - train_rows
        else:
            train = [(entry, 0, n) for entry, n in zip(entries[:-1], rows[:-1])]
            last, first, last_rows = entries[-1], 0, rows[-1]
        n_test, _ = halve(last_rows)
        test, val = [(last, first, first + n_test)], [(last, first + n_test, first + last_rows)]
        splits = {
            name: CriteoRows(s, self.cardinalities) for name, s in (("train", train), ("val", val), ("test", test))
        }
        for name, dataset in splits.items():
            if len(dataset) == 0:
                raise ValueError(f"the Criteo {name} split is empty: {sum(rows)} rows are too few")
        self.train_set, self.val_set, self.test_set = splits["train"], splits["val"], splits["test"]

    def _loader(self, dataset: CriteoRows | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = CriteoBatchSampler(len(dataset), self.batch_size, shuffle, seed, num_replicas=world, rank=rank)
        return DataLoader(
            dataset,
            batch_size=None,  # the sampler yields whole batches of indices
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
