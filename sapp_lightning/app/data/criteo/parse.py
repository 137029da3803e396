"""Criteo text lines -> arrays: pyarrow's multithreaded CSV reader, hashes decoded by ``binascii``.

A line is 40 tab-separated fields: ``label`` (0/1), ``I1..I13`` (integers, possibly negative), ``C1..C26``
(8 hex digits); an empty field is missing. Malformed lines raise :class:`CriteoFormatError` naming the file and
line: the fast path only notices that a block is bad, then a per-line check finds and names the line.
"""

from __future__ import annotations

import binascii
import io
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

__all__ = ["NUM_CATEGORICAL", "NUM_DENSE", "CriteoArrays", "CriteoFormatError", "iter_blocks", "parse_block"]

NUM_DENSE = 13
NUM_CATEGORICAL = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_CATEGORICAL

_DENSE_NAMES = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
_CAT_NAMES = [f"C{i}" for i in range(1, NUM_CATEGORICAL + 1)]
_READ = pacsv.ReadOptions(column_names=["label", *_DENSE_NAMES, *_CAT_NAMES], use_threads=True, block_size=4 << 20)
# No quoting or escaping: Criteo fields never hold quotes, and a stray one must not swallow lines.
_PARSE = pacsv.ParseOptions(
    delimiter="\t", quote_char=False, double_quote=False, escape_char=False, ignore_empty_lines=False
)
# Only "" is missing (the default null list would also accept "NA", "null", ...). Hashes are read as
# binary so no UTF-8 check runs and their bytes can be decoded in one call.
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


def empty_arrays(rows: int = 0) -> CriteoArrays:
    """Zero-filled arrays for ``rows`` rows."""
    return CriteoArrays(
        np.zeros(rows, np.uint8), np.zeros((rows, NUM_DENSE), np.float32), np.zeros((rows, NUM_CATEGORICAL), np.uint32)
    )


class _BadBlock(Exception):
    """Raised inside the fast path; the slow path then finds and names the offending line."""


def _decode_hex(chunk: pa.BinaryArray) -> np.ndarray:
    """8-hex-digit binary values -> uint32, empty -> 0.

    ``binascii.a2b_hex`` decodes and validates the whole column in one C call (3x faster than the numpy nibble
    arithmetic it replaced, measured on 130k values); unlike ``bytes.fromhex`` it accepts no whitespace.
    """
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
    # Every value is 8 bytes or empty, so the present values lie back to back.
    try:
        raw = binascii.a2b_hex(memoryview(data_buf)[offsets[0] : offsets[-1]])
    except binascii.Error as error:
        raise _BadBlock("non-hex categorical") from error
    out[present] = np.frombuffer(raw, ">u4")
    return out


def _parse_fast(data: bytes) -> CriteoArrays:
    table = pacsv.read_csv(io.BytesIO(data), _READ, _PARSE, _CONVERT)
    expected_rows = data.count(b"\n") + (not data.endswith(b"\n"))
    if table.num_rows != expected_rows:  # pyarrow drops some empty lines; those are malformed here
        raise _BadBlock("row count")
    label = table.column("label")
    if label.null_count or not pc.all(pc.is_in(label, pa.array([0, 1]))).as_py():
        raise _BadBlock("label")
    out = empty_arrays(table.num_rows)
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
        return empty_arrays()
    try:
        return _parse_fast(data)
    except (pa.ArrowInvalid, _BadBlock) as error:
        raise _locate_error(data, source, first_line, error) from None


def iter_blocks(path: Path, max_rows: int | None, block_bytes: int) -> Iterator[bytes]:
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
