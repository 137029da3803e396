"""Mid-epoch resumable loaders (sapp_lightning/app/data/base.py) for all four data modules, alone and under
Trainer.fit.

The property checked everywhere: consume k batches, take ``state_dict()``, build a fresh data module and loader (as
a new process would), ``load_state_dict``, and the remaining batches, through the next epoch, equal those of an
uninterrupted run exactly.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import TinyCTR, make_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from sapp_lightning.app.data import CriteoDataModule, FashionMNISTDataModule, ImageNetDataModule, MovieLensCTRDataModule
from sapp_lightning.app.data.base import ResumableDataLoader, SeededItems, ShardedBatchSampler
from sapp_lightning.app.synthetic import make_criteo_tsv, make_fashion_dir, make_imagefolder, make_ml100k_dir

# ------------------------------------------------------------------------------------------ the four modules


def criteo(root: Path, **kwargs) -> CriteoDataModule:
    if not (root / "train.txt").exists():
        root.mkdir(parents=True, exist_ok=True)
        make_criteo_tsv(root / "train.txt", rows=400)  # 343 train rows: 11 batches of 32, the last one 23
    options = dict(cache_dir=root / "cache", table_size=50, batch_size=32, progress=False, seed=5)
    return CriteoDataModule(root / "train.txt", **{**options, **kwargs})


def movielens(root: Path, **kwargs) -> MovieLensCTRDataModule:
    if not (root / "u.data").exists():
        make_ml100k_dir(root)  # 320 train ratings: 10 batches of 32
    return MovieLensCTRDataModule(str(root), **{**dict(batch_size=32, download=False, seed=5), **kwargs})


def fashion(root: Path, **kwargs) -> FashionMNISTDataModule:
    if not root.exists():
        make_fashion_dir(root, n_train=220, n_test=20)  # 200 train images: 7 batches of 32, the last one 8
    options = dict(batch_size=32, val_size=20, seed=5, download=False)
    return FashionMNISTDataModule(data_dir=str(root), **{**options, **kwargs})


def imagenet(root: Path, **kwargs) -> ImageNetDataModule:
    if not root.exists():
        make_imagefolder(root, classes=3, per_class=9, size=20)  # 27 train images: 4 batches of 8, the last one 3
    options = dict(batch_size=8, num_workers=0, image_size=16, val_resize=18, seed=5)
    return ImageNetDataModule(str(root), **{**options, **kwargs})


MODULES = {"criteo": criteo, "movielens": movielens, "fashion": fashion, "imagenet": imagenet}


def train_loader(make, root: Path, rank: int = 0, world: int = 1, **kwargs) -> ResumableDataLoader:
    dm = make(root, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    return dm.train_dataloader()


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for k, (a, b) in enumerate(zip(got, expected)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"batch {k} differs"


# ------------------------------------------------------------------------------------ loaders, per module


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2)])
@pytest.mark.parametrize("name", list(MODULES))
def test_resumed_loader_continues_with_the_same_batches(tmp_path, name, rank, world):
    make = MODULES[name]
    reference = train_loader(make, tmp_path / "data", rank, world)
    n = len(reference)
    uninterrupted = list(reference) + list(reference)  # epochs 0 and 1
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(uninterrupted[:n], uninterrupted[n:]))  # reshuffled

    for k in (n // 2, n):  # inside the epoch, and at its end (the next epoch starts at its first batch)
        interrupted = train_loader(make, tmp_path / "data", rank, world)
        batches = iter(interrupted)
        seen = [next(batches) for _ in range(k)]
        state = interrupted.state_dict()
        assert state == {"epoch": 0, "batch": k, "batches": n}

        resumed = train_loader(make, tmp_path / "data", rank, world)  # a fresh data module, as after a restart
        resumed.load_state_dict(state)
        rest = [batch for _ in range(2 if k < n else 1) for batch in resumed]  # through the end of epoch 1
        assert_same_batches(seen + rest, uninterrupted)


def test_ranks_take_disjoint_rows_and_resume_separately(tmp_path):
    loaders = [train_loader(fashion, tmp_path / "data", rank, 2) for rank in range(2)]
    labels = [torch.cat([y for _, y in loader]) for loader in loaders]
    assert [len(x) for x in labels] == [96, 96]  # 7 global batches of 32: 3 per rank, the 7th dropped
    images = [torch.cat([x for x, _ in loader]).flatten(1) for loader in loaders]
    both = torch.cat(images)
    assert len(torch.unique(both, dim=0)) == len(both)  # no image on both ranks (random pixels: all distinct)


@pytest.mark.parametrize("name", ["imagenet", "criteo"])
def test_resume_with_worker_processes(tmp_path, name):
    """Workers prefetch ahead of training; the position saved is the batches yielded, and augmentation is
    seeded per image, so which worker builds a batch does not matter."""
    make = MODULES[name]
    uninterrupted = list(train_loader(make, tmp_path / "data", num_workers=2))
    interrupted = train_loader(make, tmp_path / "data", num_workers=2)
    batches = iter(interrupted)
    seen = [next(batches) for _ in range(2)]
    state = interrupted.state_dict()
    assert state["batch"] == 2
    resumed = train_loader(make, tmp_path / "data", num_workers=0)
    resumed.load_state_dict(state)
    assert_same_batches(seen + list(resumed), uninterrupted)


def test_imagenet_augmentation_is_random_per_epoch_but_fixed_per_image(tmp_path):
    loader = train_loader(imagenet, tmp_path / "data")
    assert isinstance(loader.dataset, SeededItems)
    dataset = loader.dataset
    first, again, next_epoch = dataset[(0, 4)][0], dataset[(0, 4)][0], dataset[(1, 4)][0]
    assert torch.equal(first, again) and not torch.equal(first, next_epoch)


# ------------------------------------------------------------------------------------- the shared pieces


class Recording(torch.utils.data.Dataset):
    """Records every index read."""

    def __init__(self, n: int) -> None:
        self.n, self.read = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        self.read.append(int(index))
        return torch.tensor(index)


def test_restored_batches_are_skipped_without_loading():
    sampler = ShardedBatchSampler(50, 5, shuffle=True, seed=2)
    expected = [b.tolist() for b in sampler.batches(epoch=0)]
    dataset = Recording(50)
    loader = ResumableDataLoader(dataset, ShardedBatchSampler(50, 5, shuffle=True, seed=2))
    loader.load_state_dict({"epoch": 0, "batch": 7, "batches": 10})
    rest = [b.tolist() for b in loader]
    assert rest == expected[7:]
    assert dataset.read == [i for b in expected[7:] for i in b]  # batches 0-6 never read


def test_order_is_a_pure_function_of_seed_and_epoch():
    a, b = ShardedBatchSampler(97, 8, True, seed=3), ShardedBatchSampler(97, 8, True, seed=3)
    b.set_epoch(4)
    assert [x.tolist() for x in b] == [x.tolist() for x in a.batches(4)]
    assert [x.tolist() for x in a.batches(4, start=5)] == [x.tolist() for x in a.batches(4)][5:]
    assert [x.tolist() for x in a.batches(0)] != [x.tolist() for x in a.batches(1)]
    other_seed = ShardedBatchSampler(97, 8, True, seed=4)
    assert [x.tolist() for x in other_seed.batches(4)] != [x.tolist() for x in a.batches(4)]


def test_lightning_call_order_on_resume():
    """Lightning: load_state_dict, then iter() (lazy), then set_epoch(current epoch), then the first batch."""
    data = torch.arange(12)
    uninterrupted = ResumableDataLoader(data, ShardedBatchSampler(12, 3, True, seed=1))
    epochs = [[b.tolist() for b in uninterrupted] for _ in range(3)]

    resumed = ResumableDataLoader(data, ShardedBatchSampler(12, 3, True, seed=1))
    resumed.load_state_dict({"epoch": 1, "batch": 1, "batches": 4})
    batches = iter(resumed)
    resumed.sampler.set_epoch(1)  # the same epoch: the restored position stands
    assert [b.tolist() for b in batches] == epochs[1][1:]
    resumed.sampler.set_epoch(2)
    assert [b.tolist() for b in resumed] == epochs[2]

    # A checkpoint written after the epoch ended is not loaded by Lightning: set_epoch alone picks the epoch.
    fresh = ResumableDataLoader(data, ShardedBatchSampler(12, 3, True, seed=1))
    batches = iter(fresh)
    fresh.sampler.set_epoch(2)
    assert [b.tolist() for b in batches] == epochs[2]


def test_an_abandoned_pass_is_followed_by_the_next_epoch():
    """limit_train_batches stops a pass early; the next pass (no set_epoch) is the next epoch from its start."""
    loader = ResumableDataLoader(torch.arange(12), ShardedBatchSampler(12, 3, True, seed=1))
    batches = iter(loader)
    next(batches)
    assert loader.state_dict() == {"epoch": 0, "batch": 1, "batches": 4}
    rest = [b.tolist() for b in loader]
    assert rest == [b.tolist() for b in loader.sampler.batches(1)]
    assert loader.state_dict() == {"epoch": 1, "batch": 4, "batches": 4}


def test_state_for_another_batch_count():
    loader = ResumableDataLoader(torch.arange(12), ShardedBatchSampler(12, 3, True))
    with pytest.raises(ValueError, match=r"cannot resume inside an epoch of 6 batches with a loader of 4 batches"):
        loader.load_state_dict({"epoch": 0, "batch": 2, "batches": 6})
    loader.load_state_dict({"epoch": 0, "batch": 6, "batches": 6})  # an epoch end is a valid start anywhere
    assert loader.state_dict() == {"epoch": 1, "batch": 0, "batches": 4}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_rows=10, batch_size=0, shuffle=True), r"need batch_size >= 1"),
        (dict(num_rows=10, batch_size=2, shuffle=True, num_replicas=2, rank=2), r"rank must be in \[0, 2\)"),
    ],
)
def test_sampler_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShardedBatchSampler(**kwargs)


def test_empty_and_tiny_samplers():
    assert list(ShardedBatchSampler(0, 4, True)) == [] and len(ShardedBatchSampler(0, 4, False)) == 0
    assert len(ShardedBatchSampler(3, 4, True, num_replicas=2, rank=1)) == 0  # one batch, two ranks: training drops
    assert [b.tolist() for b in ShardedBatchSampler(3, 4, False, num_replicas=2, rank=1)] == [[0, 1, 2]]  # eval pads


# ------------------------------------------------------------------------------------------- Trainer.fit


class TinyImages(pl.LightningModule):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(int(np.prod(input_shape)), num_classes)

    def training_step(self, batch, _):
        images, labels = batch
        return nn.functional.cross_entropy(self.fc(images.flatten(1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit(make, root: Path, ckpt_dir: Path, ckpt_path: Path | None = None, **data) -> tuple[torch.Tensor, pl.Trainer]:
    pl.seed_everything(7, verbose=False)
    dm = make(root / "data", **data)
    if isinstance(dm, CriteoDataModule):
        model: pl.LightningModule = TinyCTR(dm.cardinalities, dm.num_dense, momentum=0.9)
    else:
        model = TinyImages(dm.input_shape, dm.num_classes)
    checkpoints = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1),
        ModelCheckpoint(dirpath=ckpt_dir, filename="end-{epoch}", save_top_k=-1),  # at each epoch's end
    ]
    trainer = make_trainer(root, checkpoints, max_epochs=2, enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), trainer


def loader_state(ckpt: Path) -> list:
    return torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"].get("combined_loader")


def check_resumes(make, tmp_path: Path, resume_from: list[str], **data) -> None:
    final, trainer = fit(make, tmp_path, tmp_path / "ckpt", **data)
    n = trainer.num_training_batches
    for i, name in enumerate(resume_from):
        ckpt = tmp_path / "ckpt" / name.format(n=n, mid=n // 2, later=n + 2)
        resumed, _ = fit(make, tmp_path, tmp_path / f"resumed{i}", ckpt_path=ckpt, **data)
        assert torch.equal(resumed, final), f"resumed from {ckpt.name}: weights differ"


# Lightning notes that the val loader goes unused and that a resumed run checkpoints into another folder.
quiet_fit = pytest.mark.filterwarnings(
    "ignore:You passed in a `val_dataloader`", "ignore:The dirpath has changed", "ignore:.*LeafSpec"
)


@quiet_fit
def test_fit_resumed_mid_epoch_is_bit_identical(tmp_path):
    """Killed after step k (ModelCheckpoint(every_n_train_steps=1)), resumed with ckpt_path: the same weights."""
    check_resumes(criteo, tmp_path, ["step={mid}.ckpt", "step={n}.ckpt", "step={later}.ckpt", "end-epoch=0.ckpt"])
    state = loader_state(tmp_path / "ckpt" / "step=5.ckpt")
    assert state == [{"epoch": 0, "batch": 5, "batches": 11}]  # the position is in the checkpoint


@quiet_fit
@pytest.mark.slow
@pytest.mark.parametrize("name", ["imagenet", "fashion"])
def test_fit_resumed_mid_epoch_is_bit_identical_with_workers(tmp_path, name):
    check_resumes(MODULES[name], tmp_path, ["step={mid}.ckpt", "step={later}.ckpt", "end-epoch=0.ckpt"], num_workers=2)


class RowRecorder(TinyCTR):
    """Saves, per rank, the Criteo row ids (I1, I2 written by ``row_tsv``) of every training batch and the loader."""

    def __init__(self, cardinalities: list[int], out: Path) -> None:
        super().__init__(cardinalities, momentum=0.9)
        self.out, self.rows = out, []

    def training_step(self, batch, index):
        self.rows.append(np.rint(np.expm1(batch[0][:, :2].double().numpy())).astype(int) @ [1000, 1])
        return super().training_step(batch, index)

    def on_train_end(self) -> None:
        loader = self.trainer.train_dataloader
        sampler = (type(loader).__name__, loader.sampler.rank, loader.sampler.num_replicas)
        torch.save({"rows": np.concatenate(self.rows), "loader": sampler}, self.out / f"rank{self.global_rank}.pt")


@quiet_fit
def test_ddp_ranks_train_on_disjoint_rows_from_the_modules_own_sampler(tmp_path, monkeypatch):
    """Under DDP with use_distributed_sampler=True (the default) Lightning keeps the loader: no second sharding."""
    from lightning_fabric.plugins.environments.lightning import find_free_network_port

    monkeypatch.setenv("MASTER_PORT", str(find_free_network_port()))
    lines = ["\t".join(["0", str(r // 1000), str(r % 1000)] + [""] * 11 + ["0000000a"] * 26) for r in range(300)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")  # 258 train rows: 17 batches of 16
    dm = CriteoDataModule(tmp_path / "train.txt", cache_dir=tmp_path / "cache", table_size=50, batch_size=16)
    model = RowRecorder(dm.cardinalities, tmp_path)
    strategy = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"  # a process that touched CUDA cannot fork
    trainer = make_trainer(tmp_path, [], max_epochs=1, devices=2, strategy=strategy, limit_val_batches=0)
    trainer.fit(model, dm)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["loader"] for r in ranks] == [("ResumableDataLoader", 0, 2), ("ResumableDataLoader", 1, 2)]
    rows = np.concatenate([r["rows"] for r in ranks])
    assert [len(r["rows"]) for r in ranks] == [128, 128]  # 8 batches each; the 17th global batch is dropped
    assert len(np.unique(rows)) == 256 and rows.max() < 258
