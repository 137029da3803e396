"""The Fashion-MNIST data module (sapp_lightning/app/data/fashion_mnist.py): the real files where installed (Debian's
package, a download), generated tiny files otherwise; corrupt files and missing data named."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import make_trainer
from torch.utils.data import DataLoader, DistributedSampler

from sapp_lightning.app.data import fashion_mnist
from sapp_lightning.app.data.fashion_mnist import MEAN, STD, FashionMNISTDataModule, collate_batch
from sapp_lightning.app.synthetic import make_fashion_dir, write_idx


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Hide the Debian package and the user's download cache."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.skipif(
    not all((fashion_mnist.DEBIAN_DIR / f).is_file() for f in fashion_mnist.FILES.values()),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_from_debian_package():
    dm = FashionMNISTDataModule(batch_size=512, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.source_dir == fashion_mnist.DEBIAN_DIR
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 55000, "val": 5000, "test": 10000}
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (512, *dm.input_shape) and images.dtype == torch.float32
    assert labels.shape == (512,) and labels.dtype == torch.int64
    assert abs(images.mean().item()) < 0.1 and abs(images.std().item() - 1) < 0.1  # normalized
    test_labels = dm.datasets["test"].labels
    assert torch.equal(torch.bincount(test_labels), torch.full((10,), 1000))  # the official balanced test set
    assert dm.num_classes == 10


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_configured_data_dir_wins_and_values_round_trip(tmp_path, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    arrays = make_fashion_dir(folder, n_train=40, n_test=10)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), batch_size=8, val_size=10, download=False)
    dm.setup()
    assert dm.source_dir == folder  # before the Debian package
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [30, 10, 10]
    images, labels = next(iter(dm.test_dataloader()))
    expected = (torch.tensor(arrays["test_images"][:8], dtype=torch.float32) / 255 - MEAN) / STD
    torch.testing.assert_close(images, expected.unsqueeze(1))
    assert labels.tolist() == arrays["test_labels"][:8].tolist()
    # val + train are a partition of the 60k (here 40) training images
    all_labels = torch.cat([dm.datasets["train"].labels, dm.datasets["val"].labels]).sort().values
    assert all_labels.tolist() == sorted(arrays["train_labels"].tolist())


def test_val_split_is_deterministic_per_seed(tmp_path):
    make_fashion_dir(tmp_path, n_train=100)

    def val_images(seed: int) -> torch.Tensor:
        dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_size=20, seed=seed, download=False)
        dm.setup()
        return dm.datasets["val"].images

    assert torch.equal(val_images(0), val_images(0))
    assert not torch.equal(val_images(0), val_images(1))


@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # raised inside Lightning
def test_loader_works_with_a_distributed_sampler_and_trainer(tmp_path):
    """Lightning swaps in a DistributedSampler under DDP: batched fetching must not depend on the sampler."""
    make_fashion_dir(tmp_path, n_train=40)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), batch_size=8, val_size=8, download=False)
    dm.setup()
    dataset = dm.datasets["train"]
    loader = DataLoader(dataset, batch_size=8, sampler=DistributedSampler(dataset, 2, 1), collate_fn=collate_batch)
    assert sum(len(labels) for _, labels in loader) == 16

    class Linear(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(28 * 28, 10)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = make_trainer(tmp_path, max_epochs=None, max_steps=3, limit_val_batches=1)
    trainer.fit(Linear(), dm)
    assert trainer.global_step == 3


@pytest.mark.parametrize(
    ("key", "array", "magic", "gzipped", "match"),
    [
        ("train_images", np.zeros((40, 28, 28)), None, False, "not a complete gzip file"),
        ("train_labels", np.zeros((40,)), 0x00000803, True, "bad IDX magic number"),
        ("test_labels", np.zeros((10, 1)), None, True, "bad IDX magic number"),
        ("train_images", np.zeros((40, 28, 27)), None, True, r"expected \(28, 28\)"),
        ("test_labels", np.zeros((9,)), None, True, "10 images but 9 labels"),
        ("train_labels", np.full((40,), 10), None, True, "labels .* go up to 10"),
    ],
)
def test_corrupt_fashion_mnist_file(tmp_path, key, array, magic, gzipped, match):
    make_fashion_dir(tmp_path, n_train=40, n_test=10)
    write_idx(tmp_path / fashion_mnist.FILES[key], array, magic=magic, gzipped=gzipped)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_size=10, download=False)
    with pytest.raises(ValueError, match=match):
        dm.setup()


def test_truncated_idx_file(tmp_path):
    make_fashion_dir(tmp_path)
    path = tmp_path / fashion_mnist.FILES["test_images"]
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    with pytest.raises(ValueError, match="header says .* file holds"):
        fashion_mnist.read_idx(path, ndim=3)


def test_nothing_found_names_the_three_options(tmp_path, no_system_fashion):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "empty"), download=False)
    dm.prepare_data()  # download=False: nothing to do
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        dm.setup()


def test_prepare_data_downloads_into_the_cache(tmp_path, no_system_fashion, monkeypatch):
    calls = []

    def fake_fashion_mnist(root, train, download):
        calls.append((root, train, download))
        make_fashion_dir(Path(root) / "FashionMNIST" / "raw", n_train=30)

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", fake_fashion_mnist)
    dm = FashionMNISTDataModule(val_size=5)
    dm.prepare_data()
    dm.setup()
    cache = tmp_path / "cache" / "sapp_lightning" / "fashion-mnist"
    assert dm.source_dir == cache / "FashionMNIST" / "raw"
    assert {root for root, _, _ in calls} == {str(cache)} and len(dm.datasets["train"]) == 25
    calls.clear()
    dm.prepare_data()  # found now: no second download
    assert calls == []


def test_download_failure_gives_the_options(no_system_fashion, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", offline)
    with pytest.raises(RuntimeError, match="Downloading Fashion-MNIST .* failed .*network unreachable"):
        FashionMNISTDataModule().prepare_data()


def test_fashion_mnist_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="val_size must be >= 1"):
        FashionMNISTDataModule(val_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        FashionMNISTDataModule(batch_size=0)
    make_fashion_dir(tmp_path, n_train=40)
    with pytest.raises(ValueError, match="leaves no training images"):
        FashionMNISTDataModule(data_dir=str(tmp_path), val_size=40, download=False).setup()
    with pytest.raises(RuntimeError, match="call setup"):
        FashionMNISTDataModule(data_dir=str(tmp_path)).train_dataloader()
