"""Which files a Criteo folder holds (Kaggle ``train.txt`` or the 1TB ``day_N``) and DLRM's train/val/test split.

**Splits follow facebookresearch/dlrm.** ``data_utils.getCriteoAdData`` cuts Kaggle's ``train.txt`` into 7
consecutive "days" with ``divmod(N, 7)``, the first ``N % 7`` days one row longer;
``data_utils.transformCriteoAdData`` takes days 0-5 as train and halves day 6 with ``np.array_split(day6, 2)``: the
first half (``ceil(n/2)`` rows) is **test**, the second **val** (``dlrm_data_pytorch.CriteoDataset`` agrees:
``test_size = ceil(n / 2)``). The 1TB layout uses days 0-22 as train and halves day 23 the same way. Rows are not
shuffled before the split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..base import DatasetNotFoundError

__all__ = ["LAYOUTS", "Segment", "check_days", "dlrm_split", "halve", "kaggle_day_sizes", "resolve_sources"]

KAGGLE_DAYS = 7
TERABYTE_DAYS = 24
LAYOUTS = ("kaggle", "terabyte", "auto")

Segment = tuple[Path, int, int]  # (cache folder, first row, end row) of one source file

_KAGGLE_EXPECTED = "the Kaggle train.txt file, or a folder holding it"
_TERABYTE_EXPECTED = "a folder holding the Criteo 1TB day_0 ... day_23 files"


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


def dlrm_split(layout: str, entries: Sequence[Path], rows: Sequence[int]) -> dict[str, list[Segment]]:
    """The DLRM split of preprocessed files (one cache folder and row count per source) into segments.

    Example:
        >>> {k: [(str(e), a, b) for e, a, b in v] for k, v in dlrm_split("kaggle", [Path("c")], [1000]).items()}
        {'train': [('c', 0, 858)], 'test': [('c', 858, 929)], 'val': [('c', 929, 1000)]}
    """
    if layout == "kaggle":
        train_rows = sum(kaggle_day_sizes(rows[0])[:-1])
        train: list[Segment] = [(entries[0], 0, train_rows)]
        last, first, last_rows = entries[0], train_rows, rows[0] - train_rows
    else:
        train = [(entry, 0, n) for entry, n in zip(entries[:-1], rows[:-1])]
        last, first, last_rows = entries[-1], 0, rows[-1]
    n_test, _ = halve(last_rows)
    return {
        "train": train,
        "test": [(last, first, first + n_test)],
        "val": [(last, first + n_test, first + last_rows)],
    }


def resolve_sources(path: Path, layout: str, days: Sequence[int] | None) -> tuple[str, list[Path]]:
    """Find the source files for a layout (``auto`` decides from what is there); explain what is missing."""
    if not path.exists():
        expected = {"kaggle": _KAGGLE_EXPECTED, "terabyte": _TERABYTE_EXPECTED}.get(
            layout, f"{_KAGGLE_EXPECTED}, or {_TERABYTE_EXPECTED}"
        )
        raise DatasetNotFoundError(f"Criteo data not found: no such file or folder {path} (expected {expected})")
    if layout == "auto":
        if path.is_file():
            layout = "kaggle"
        else:
            has_kaggle, has_days = (path / "train.txt").is_file(), any(path.glob("day_[0-9]*"))
            if has_kaggle and has_days:
                raise ValueError(f"{path} holds both train.txt and day_N files: pass layout='kaggle' or 'terabyte'")
            if not (has_kaggle or has_days):
                raise DatasetNotFoundError(
                    f"Criteo data not found: {path} holds neither train.txt nor day_N files "
                    f"(expected {_KAGGLE_EXPECTED}, or {_TERABYTE_EXPECTED})"
                )
            layout = "kaggle" if has_kaggle else "terabyte"
    if days is not None and layout != "terabyte":
        raise ValueError(f"days selects terabyte day files; the {layout} layout has a single file")
    if layout == "kaggle":
        source = path if path.is_file() else path / "train.txt"
        if not source.is_file():
            raise DatasetNotFoundError(
                f"Criteo data not found: folder {path} holds no train.txt (expected {_KAGGLE_EXPECTED})"
            )
        return layout, [source]
    if not path.is_dir():
        raise ValueError(f"the terabyte layout expects a folder holding day_0 ... day_23, got the file {path}")
    sources = [path / f"day_{d}" for d in (range(TERABYTE_DAYS) if days is None else days)]
    missing = [s.name for s in sources if not s.is_file()]
    if missing:
        zipped = " (only .gz versions found: decompress them first)" if (path / f"{missing[0]}.gz").exists() else ""
        raise DatasetNotFoundError(f"Criteo terabyte data in {path} is missing {', '.join(missing)}{zipped}")
    return layout, sources


def check_days(days: Sequence[int] | None) -> list[int] | None:
    """``days`` as a list after checking it: at least 2 increasing day numbers in 0..23 (None: all days)."""
    if days is None:
        return None
    days = list(days)
    if len(days) < 2 or sorted(set(days)) != days or not all(0 <= d < TERABYTE_DAYS for d in days):
        raise ValueError(f"days must be at least 2 increasing day numbers in 0..{TERABYTE_DAYS - 1}, got {days!r}")
    return days
