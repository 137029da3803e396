"""Criteo reader, cache, DLRM split, sampler and DataModule (the sapp_lightning/app/data/criteo package)."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import TinyCTR, make_trainer
from torch.utils.data import DistributedSampler

from sapp_lightning.app.data import criteo
from sapp_lightning.app.data.base import ResumableDataLoader, ShardedBatchSampler
from sapp_lightning.app.data.criteo import (
    CriteoBatchSampler,
    CriteoDataModule,
    CriteoFormatError,
    CriteoRows,
    halve,
    kaggle_day_sizes,
    load_cache,
    parse_block,
    preprocess,
)
from sapp_lightning.app.data.criteo import cache as criteo_cache

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CANDIDATES = [
    Path(os.environ.get("SAPP_CRITEO_SAMPLE", "/nonexistent")),
    REPO / "shared" / "data" / "criteo_kaggle_sample.tsv",
    Path("/work/shared/data/criteo_kaggle_sample.tsv"),
]
SAMPLE = next((p for p in SAMPLE_CANDIDATES if p.is_file()), None)
needs_sample = pytest.mark.skipif(
    SAMPLE is None, reason="criteo_kaggle_sample.tsv (200 real rows) not found; set SAPP_CRITEO_SAMPLE to its path"
)


# --------------------------------------------------------------------------------------------- helpers


def make_line(label: int = 0, ints=(), cats=()) -> str:
    """One line: ``ints``/``cats`` fill I1.. and C1.. in order (None or missing entries are empty fields)."""
    ints = [("" if v is None else str(v)) for v in ints] + [""] * (13 - len(ints))
    cats = [("" if v is None else v) for v in cats] + [""] * (26 - len(cats))
    return "\t".join([str(label), *ints, *cats]) + "\n"


def random_lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        ints = [None if rng.random() < 0.2 else int(rng.integers(-3, 5000)) for _ in range(13)]
        cats = [None if rng.random() < 0.2 else f"{int(rng.integers(0, 2**32)):08x}" for _ in range(26)]
        lines.append(make_line(int(rng.random() < 0.25), ints, cats))
    return lines


def reference(line: str) -> tuple[int, list[float], list[int]]:
    """Plain-Python parse of one line: the behaviour the vectorized reader must reproduce."""
    fields = line.rstrip("\n").split("\t")
    assert len(fields) == 40
    dense = [math.log(max(int(x), 0) + 1) if x else 0.0 for x in fields[1:14]]
    return int(fields[0]), dense, [int(x, 16) if x else 0 for x in fields[14:]]


def assert_matches_reference(arrays: criteo.CriteoArrays, lines: list[str]) -> None:
    assert len(arrays.label) == len(lines)
    for k, line in enumerate(lines):
        label, dense, cats = reference(line)
        assert arrays.label[k] == label
        np.testing.assert_allclose(arrays.dense[k], dense, rtol=1e-6)
        assert arrays.cats[k].tolist() == cats


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


def make_terabyte(folder: Path, rows_per_day: dict[int, int]) -> Path:
    """day_N files whose rows carry I1 = day and I2 = row number, to check where batch rows come from."""
    for day, rows in rows_per_day.items():
        write(folder / f"day_{day}", [make_line(r % 2, [day, r], ["0000000a"]) for r in range(rows)])
    return folder


def dm_for(path, tmp_path, **kwargs) -> CriteoDataModule:
    kwargs = {"cache_dir": tmp_path / "cache", "batch_size": 8, "progress": False, **kwargs}
    return CriteoDataModule(path, **kwargs)


def row_ids(dataset: CriteoRows) -> np.ndarray:
    """(I1, I2) of every row in dataset order, undoing log(x + 1)."""
    dense, _, _ = dataset[np.arange(len(dataset))]
    return np.rint(np.expm1(dense[:, :2].double().numpy())).astype(int)


# ------------------------------------------------------------------------------------------ real rows


@needs_sample
def test_sample_rows_match_reference_parser():
    text = SAMPLE.read_text()
    lines = text.splitlines(keepends=True)
    arrays = parse_block(text.encode(), str(SAMPLE))
    assert len(arrays.label) == 200 and int(arrays.label.sum()) == 49
    assert_matches_reference(arrays, lines)
    # Spot checks against the raw text.
    first, second = lines[0].split("\t"), lines[1].split("\t")
    assert first[1] == "" and arrays.dense[0, 0] == 0  # I1 missing
    assert first[2] == "3" and arrays.dense[0, 1] == np.float32(math.log(4))  # I2
    assert first[14] == "05db9164" and arrays.cats[0, 0] == int("05db9164", 16)  # C1
    assert first[-1] == "\n" and arrays.cats[0, 25] == 0  # C26 missing: the line ends in a tab
    assert second[2] == "-1" and arrays.dense[1, 1] == 0  # negative -> 0


@needs_sample
def test_sample_datamodule_split_and_batches(tmp_path):
    dm = dm_for(SAMPLE, tmp_path, table_size=1000, batch_size=32)
    assert dm.layout == "kaggle" and dm.num_dense == 13 and dm.cardinalities == [1000] * 26
    dm.prepare_data()
    dm.setup("fit")
    # 200 = 7 * 28 + 4 -> days [29, 29, 29, 29, 28, 28, 28]; day 6 (28 rows) -> test 14, val 14.
    assert (len(dm.train_set), len(dm.test_set), len(dm.val_set)) == (172, 14, 14)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        dense, cats, label = next(iter(loader))
        batch = min(32, len(loader.dataset))
        assert dense.shape == (batch, 13) and dense.dtype == torch.float32
        assert cats.shape == (batch, 26) and cats.dtype == torch.int64
        assert label.shape == (batch,) and label.dtype == torch.float32
        assert 0 <= cats.min() and cats.max() < 1000 and set(label.tolist()) <= {0.0, 1.0}
    labels = torch.cat([b[2] for b in dm.train_dataloader()])
    assert len(labels) == 172 and int(load_cache(dm.train_set.segments[0][0]).label.sum()) == 49


# ------------------------------------------------------------------------------------------- parsing


def test_edge_cases_parse_exactly():
    lines = [
        make_line(0, [None, 2, None, 4], ["0000000f"]),  # missing ints
        make_line(1, [1] * 13, [None, "ffffffff", None]),  # label 1, missing categoricals, max hash
        make_line(0, [-1, -2, 0, -2147483648], ["00000001"] * 26),  # negative ints -> 0
        make_line(0, [7], ["abcdef01"] + ["12345678"] * 24 + [None]),  # trailing tab: C26 empty
        make_line(1),  # every feature empty
    ]
    assert lines[3].endswith("\t\n") and lines[4] == "1" + "\t" * 39 + "\n"
    arrays = parse_block("".join(lines).encode())
    assert_matches_reference(arrays, lines)
    assert arrays.label.tolist() == [0, 1, 0, 0, 1]
    assert arrays.dense[0, :4].tolist() == [0, np.float32(math.log(3)), 0, np.float32(math.log(5))]
    assert arrays.cats[1, :3].tolist() == [0, 2**32 - 1, 0]
    assert not arrays.dense[2].any() and not arrays.dense[4].any() and not arrays.cats[4].any()
    assert arrays.dense.dtype == np.float32 and arrays.cats.dtype == np.uint32 and arrays.label.dtype == np.uint8


def test_random_rows_and_uppercase_hex_match_reference():
    lines = random_lines(300) + [make_line(0, [], ["ABCDEF09"])]
    assert_matches_reference(parse_block("".join(lines).encode()), lines)


def test_blocks_split_at_any_byte_give_the_same_rows(tmp_path):
    lines = random_lines(57)
    source = write(tmp_path / "train.txt", lines[:-1] + [lines[-1].rstrip("\n")])  # no final newline
    whole = load_cache(preprocess(source, tmp_path / "a", progress=False))
    tiny = load_cache(preprocess(source, tmp_path / "b", progress=False, block_bytes=97))
    assert_matches_reference(whole, lines)
    for a, b in zip(whole, tiny):
        np.testing.assert_array_equal(a, b)


MALFORMED = [
    ("1\t2\t3\n", r"line 3: expected 40 tab-separated fields, found 3"),
    ("\n", r"line 3: expected 40 tab-separated fields, found 1"),
    (make_line(2), r"line 3: label must be 0 or 1, found '2'"),
    (make_line(0, [1, "x7"]), r"line 3: I2 is not an integer: 'x7'"),
    (make_line(0, [1.5]), r"line 3: I1 is not an integer: '1.5'"),
    (make_line(0, [], ["0000000g"]), r"line 3: C1 is not 8 hex digits: '0000000g'"),
    (make_line(0, [], [None, "abc"]), r"line 3: C2 is not 8 hex digits: 'abc'"),
]


@pytest.mark.parametrize(("bad", "message"), MALFORMED)
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    source = write(tmp_path / "train.txt", random_lines(2) + [bad] + random_lines(2, seed=1))
    with pytest.raises(CriteoFormatError, match=r"train\.txt, " + message):
        preprocess(source, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing half-written


def test_malformed_line_number_in_a_later_block(tmp_path):
    source = write(tmp_path / "train.txt", random_lines(40) + [make_line(0, ["1e3"])] + random_lines(5))
    with pytest.raises(CriteoFormatError, match=r"line 41: I1 is not an integer") as info:
        preprocess(source, tmp_path / "cache", progress=False, block_bytes=500)
    assert info.value.line == 41 and info.value.source == str(source)


def test_integer_beyond_int64_is_reported_with_its_lines():
    with pytest.raises(CriteoFormatError, match=r"line 1: could not parse lines 1-1"):
        parse_block(make_line(0, [2**70]).encode())


# ------------------------------------------------------------------------------------------ the split


def test_kaggle_day_sizes_and_halves_follow_dlrm():
    assert kaggle_day_sizes(1000) == [143] * 6 + [142]
    assert kaggle_day_sizes(1001) == [143] * 7
    assert kaggle_day_sizes(6) == [1] * 6 + [0]
    # np.array_split(day, 2): the first (test) half takes the odd row.
    for n in (0, 1, 142, 143):
        assert halve(n) == tuple(len(p) for p in np.array_split(np.arange(n), 2))


@pytest.mark.parametrize(("rows", "sizes"), [(1000, (858, 71, 71)), (1001, (858, 72, 71))])
def test_kaggle_split_is_consecutive_days(tmp_path, rows, sizes):
    lines = [make_line(0, [r // 1000, r % 1000]) for r in range(rows)]  # I1, I2 encode the row number
    dm = dm_for(write(tmp_path / "data" / "train.txt", lines), tmp_path)
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set), len(dm.val_set)) == sizes
    train, test, val = (row_ids(s) @ [1000, 1] for s in (dm.train_set, dm.test_set, dm.val_set))
    np.testing.assert_array_equal(np.concatenate([train, test, val]), np.arange(rows))


def test_terabyte_days_split_and_cross_day_batches(tmp_path):
    folder = make_terabyte(tmp_path / "tb", {d: 3 for d in range(23)} | {23: 5})
    dm = dm_for(folder, tmp_path, table_size=7)
    assert dm.layout == "terabyte" and len(dm.sources) == 24
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set), len(dm.val_set)) == (69, 3, 2)
    assert row_ids(dm.train_set).tolist() == [[d, r] for d in range(23) for r in range(3)]
    assert row_ids(dm.test_set).tolist() == [[23, 0], [23, 1], [23, 2]]
    assert row_ids(dm.val_set).tolist() == [[23, 3], [23, 4]]
    # One batch mixing days, in the order asked for.
    dense, cats, label = dm.train_set[np.array([68, 0, 5, 4])]
    assert np.rint(np.expm1(dense[:, 0].double().numpy())).tolist() == [22, 0, 1, 1]
    assert label.tolist() == [0, 0, 0, 1] and cats[:, 0].tolist() == [10 % 7] * 4


def test_terabyte_day_subset(tmp_path):
    folder = make_terabyte(tmp_path / "tb", {0: 3, 1: 4, 5: 6})
    dm = dm_for(folder, tmp_path, layout="terabyte", days=[0, 1, 5])
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set), len(dm.val_set)) == (7, 3, 3)
    assert sorted({d for d, _ in row_ids(dm.train_set)}) == [0, 1] and set(row_ids(dm.val_set)[:, 0]) == {5}


def test_too_few_rows_for_a_split(tmp_path):
    dm = dm_for(write(tmp_path / "train.txt", random_lines(6)), tmp_path)
    with pytest.raises(ValueError, match=r"the Criteo val split is empty: 6 rows are too few"):
        dm.setup()


# ----------------------------------------------------------------------------------------------- cache


def test_cache_is_reused_without_parsing(tmp_path, monkeypatch):
    source = write(tmp_path / "train.txt", random_lines(50))
    entry = preprocess(source, tmp_path / "cache", progress=False)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["format_version"] == criteo_cache.FORMAT_VERSION == criteo.FORMAT_VERSION and manifest["rows"] == 50
    assert manifest["source"]["name"] == "train.txt" and manifest["source"]["size"] == source.stat().st_size
    stamp = (entry / "manifest.json").stat().st_mtime_ns

    def no_parsing(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(criteo_cache, "parse_block", no_parsing)
    assert preprocess(source, tmp_path / "cache", progress=False) == entry
    dm = dm_for(source, tmp_path)
    dm.prepare_data()
    dm.setup()
    assert (entry / "manifest.json").stat().st_mtime_ns == stamp


def test_cache_is_rebuilt_when_the_source_or_format_changes(tmp_path, monkeypatch):
    source = write(tmp_path / "train.txt", random_lines(50))
    entry = preprocess(source, tmp_path / "cache", progress=False)
    write(source, random_lines(60, seed=3))
    assert preprocess(source, tmp_path / "cache", progress=False) == entry
    assert_matches_reference(load_cache(entry), random_lines(60, seed=3))
    monkeypatch.setattr(criteo_cache, "FORMAT_VERSION", criteo_cache.FORMAT_VERSION + 1)
    preprocess(source, tmp_path / "cache", progress=False)
    assert json.loads((entry / "manifest.json").read_text())["format_version"] == criteo_cache.FORMAT_VERSION
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [entry.name]  # no leftovers


def test_cache_is_rebuilt_when_a_file_is_truncated(tmp_path):
    source = write(tmp_path / "train.txt", random_lines(20))
    entry = preprocess(source, tmp_path / "cache", progress=False)
    with open(entry / "cats.bin", "r+b") as fh:
        fh.truncate(100)
    assert_matches_reference(load_cache(preprocess(source, tmp_path / "cache", progress=False)), random_lines(20))


def test_interrupted_preprocessing_leaves_no_cache(tmp_path, monkeypatch):
    source = write(tmp_path / "train.txt", random_lines(30))
    real, calls = criteo_cache.parse_block, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(criteo_cache, "parse_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess(source, tmp_path / "cache", progress=False, block_bytes=300)
    assert list((tmp_path / "cache").iterdir()) == []


def test_default_cache_dir_is_next_to_the_data(tmp_path):
    source = write(tmp_path / "data" / "train.txt", random_lines(10))
    assert CriteoDataModule(source, progress=False).cache_dir == tmp_path / "data" / "sapp_cache"


# --------------------------------------------------------------------------------- table size, max_rows


@pytest.mark.parametrize("table_size", [1000, list(range(2, 28))])
def test_table_size_is_applied_when_batches_are_built(tmp_path, table_size):
    lines = random_lines(100)
    dm = dm_for(write(tmp_path / "train.txt", lines), tmp_path, table_size=table_size)
    dm.setup()
    modulus = np.array(dm.cardinalities)
    _, cats, _ = dm.train_set[np.arange(10)]
    raw = np.array([reference(line)[2] for line in lines[:10]])
    np.testing.assert_array_equal(cats.numpy(), raw % modulus)
    # The cache holds raw hashes: another table size reuses it.
    other = dm_for(tmp_path / "train.txt", tmp_path, table_size=5)
    other.setup()
    assert other.train_set.segments == dm.train_set.segments
    assert other.train_set[np.arange(10)][1].max() < 5


def test_max_rows_kaggle_and_terabyte(tmp_path):
    dm = dm_for(write(tmp_path / "k" / "train.txt", random_lines(100)), tmp_path, max_rows=70)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 70 and len(dm.train_set) == 60
    assert_matches_reference(load_cache(dm.train_set.segments[0][0]), random_lines(70))
    tb = dm_for(make_terabyte(tmp_path / "tb", {0: 10, 1: 10, 2: 10}), tmp_path, days=[0, 1, 2], max_rows=4)
    tb.setup()
    assert (len(tb.train_set), len(tb.test_set), len(tb.val_set)) == (8, 2, 2)


# --------------------------------------------------------------------------------- errors on arguments


def test_missing_path_kaggle(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file or folder .*expected the Kaggle train\.txt file"):
        CriteoDataModule(tmp_path / "nope" / "train.txt", layout="kaggle")


def test_missing_path_terabyte(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file or folder .*day_0 \.\.\. day_23"):
        CriteoDataModule(tmp_path / "nope", layout="terabyte")


def test_missing_path_auto(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected the Kaggle train\.txt .*, or a folder .*day_0"):
        CriteoDataModule(tmp_path / "nope")


def test_folder_without_train_txt(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"folder .* holds no train\.txt"):
        CriteoDataModule(tmp_path, layout="kaggle")


def test_folder_with_neither_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds neither train\.txt nor day_N files"):
        CriteoDataModule(tmp_path)


def test_missing_terabyte_days(tmp_path):
    make_terabyte(tmp_path, {d: 1 for d in range(24) if d not in (5, 23)})
    (tmp_path / "day_23.gz").touch()
    with pytest.raises(FileNotFoundError, match=r"is missing day_5, day_23$"):
        CriteoDataModule(tmp_path)


def test_only_gzipped_terabyte_days(tmp_path):
    (tmp_path / "day_0.gz").touch()
    with pytest.raises(FileNotFoundError, match=r"is missing day_0, .* \(only \.gz versions found"):
        CriteoDataModule(tmp_path, layout="terabyte")


def test_terabyte_layout_needs_a_folder(tmp_path):
    with pytest.raises(ValueError, match=r"terabyte layout expects a folder"):
        CriteoDataModule(write(tmp_path / "day_0", random_lines(2)), layout="terabyte")


def test_folder_with_both_layouts(tmp_path):
    write(tmp_path / "train.txt", random_lines(2))
    write(tmp_path / "day_0", random_lines(2))
    with pytest.raises(ValueError, match=r"holds both train\.txt and day_N files"):
        CriteoDataModule(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "criteo"}, r"layout must be one of kaggle, terabyte, auto, got 'criteo'"),
        ({"table_size": [10] * 25}, r"table_size must be an int or a list of 26 ints"),
        ({"table_size": 0}, r"table_size values must be >= 1"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1"),
        ({"num_workers": -1}, r"num_workers must be an int >= 0"),
        ({"max_rows": 0}, r"max_rows must be None or an int >= 1"),
        ({"days": [0, 1]}, r"days selects terabyte day files; the kaggle layout has a single file"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CriteoDataModule(write(tmp_path / "train.txt", random_lines(2)), **kwargs)


@pytest.mark.parametrize("days", [[3], [1, 0], [0, 24], [2, 2]])
def test_invalid_days(tmp_path, days):
    make_terabyte(tmp_path, {d: 1 for d in range(24)})
    with pytest.raises(ValueError, match=r"days must be at least 2 increasing day numbers in 0\.\.23"):
        CriteoDataModule(tmp_path, days=days)


def test_dataloader_before_setup(tmp_path):
    with pytest.raises(RuntimeError, match=r"call setup\(\) before asking for a dataloader"):
        dm_for(write(tmp_path / "train.txt", random_lines(10)), tmp_path).train_dataloader()


# ------------------------------------------------------------------------------- sampler and dataset


def test_sampler_shuffles_reproducibly_per_epoch():
    sampler = CriteoBatchSampler(103, batch_size=10, shuffle=True, seed=7)
    first = [b.copy() for b in sampler]
    assert len(first) == len(sampler) == 11 and [len(b) for b in first] == [10] * 10 + [3]
    assert np.array_equal(np.sort(np.concatenate(first)), np.arange(103))
    assert all(np.all(np.diff(b) > 0) for b in first)  # sorted within a batch: memory-map friendly
    assert all(np.array_equal(a, b) for a, b in zip(first, CriteoBatchSampler(103, 10, True, seed=7)))
    sampler.set_epoch(1)
    assert not all(np.array_equal(a, b) for a, b in zip(first, sampler))


def test_sampler_shards_ranks():
    train = [list(CriteoBatchSampler(95, 10, True, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(t) for t in train] == [3, 3, 3]  # 10 batches over 3 ranks: the 10th is dropped
    rows = np.concatenate([b for t in train for b in t])
    assert len(np.unique(rows)) == len(rows)  # disjoint
    evaluation = [list(CriteoBatchSampler(95, 10, False, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(e) for e in evaluation] == [4, 4, 4]  # padded with repeats so every rank steps alike
    assert np.array_equal(np.unique(np.concatenate([b for e in evaluation for b in e])), np.arange(95))


def test_dataloaders_take_rank_and_world_size_from_the_trainer(tmp_path):
    lines = [make_line(0, [r // 1000, r % 1000]) for r in range(300)]  # 258 train, 21 test, 21 val rows
    dm = dm_for(write(tmp_path / "train.txt", lines), tmp_path, batch_size=16)
    dm.setup()
    seen = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = dm.train_dataloader()
        # A plain Sampler with the trainer's rank and world size: Lightning leaves a non-DataLoader alone.
        assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, ShardedBatchSampler)
        assert not isinstance(loader.sampler, DistributedSampler)
        assert (loader.sampler.rank, loader.sampler.num_replicas) == (rank, 2)
        assert len(loader) == 8  # 17 global batches: 8 per rank, the 17th (2 rows) dropped this epoch
        ids = [np.rint(np.expm1(d[:, :2].double().numpy())).astype(int) @ [1000, 1] for d, _, _ in loader]
        seen.append(np.concatenate(ids))
        assert len(dm.val_dataloader()) == 1  # 2 global batches: 1 per rank
    both = np.concatenate(seen)
    assert len(both) == 256 and len(np.unique(both)) == 256 and both.max() < 258


def test_rows_dataset_single_item_and_pickling(tmp_path):
    source = write(tmp_path / "train.txt", random_lines(20))
    rows = CriteoRows([(preprocess(source, tmp_path / "c", progress=False), 5, 15)], [100] * 26)
    dense, cats, label = rows[0]
    assert dense.shape == (13,) and cats.shape == (26,) and label.shape == ()
    assert cats.tolist() == [c % 100 for c in reference(random_lines(20)[5])[2]]
    with pytest.raises(IndexError, match=r"row index out of range for 10 rows"):
        rows[np.array([3, 10])]
    clone = pickle.loads(pickle.dumps(rows))
    assert len(pickle.dumps(rows)) < 2000  # the memory maps are reopened, not copied
    assert torch.equal(clone[np.arange(10)][0], rows[np.arange(10)][0])


# ------------------------------------------------------------------------------------------- Trainer


def fit_once(tmp_path, num_workers: int = 0) -> torch.Tensor:
    pl.seed_everything(3, verbose=False)
    dm = dm_for(tmp_path / "train.txt", tmp_path, table_size=50, batch_size=64, num_workers=num_workers)
    model = TinyCTR(dm.cardinalities)
    trainer = make_trainer(tmp_path, max_epochs=2, devices=1)
    trainer.fit(model, dm)
    assert trainer.num_training_batches == 5  # 300 train rows / 64
    assert "val_loss" in trainer.callback_metrics
    return torch.cat(model.seen)


def test_trainer_fit_is_reproducible_and_reshuffles(tmp_path):
    write(tmp_path / "train.txt", random_lines(350))
    first, second = fit_once(tmp_path), fit_once(tmp_path, num_workers=1)
    assert torch.equal(first, second)  # same seed, same batches, with or without workers
    assert not torch.equal(first[:300], first[300:])  # epoch 2 sees another order
    assert torch.equal(first[:300].sort().values, first[300:].sort().values)
