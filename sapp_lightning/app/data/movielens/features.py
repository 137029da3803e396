"""MovieLens-100k ratings -> click-through features: labels, chronological split, train-only statistics.

The label is ``rating >= 4``. Rows are sorted by timestamp and split chronologically, so the model is always
evaluated on the future. Vocabularies, count features and the dense scaling come from the train split only; ids
first seen in val/test map to index 0 (unknown). Nothing but the label reads ``rating``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .sources import GENRES, MovieLensTables

__all__ = [
    "CATEGORICAL_FEATURES",
    "DENSE_FEATURES",
    "GENRE_FEATURES",
    "CTRFeatures",
    "build_features",
    "build_vocabulary",
    "chronological_split",
    "encode",
    "join_tables",
    "raw_features",
]

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
_SECONDS_PER_YEAR = 365.2425 * 86400
# A genre flag's two values are known in advance: a fixed table keeps its size at 3 whatever the train split holds.
FIXED_VOCABULARIES = {name: pd.Index([0.0, 1.0]) for name in GENRE_FEATURES}


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
