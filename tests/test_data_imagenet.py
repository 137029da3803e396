"""The ImageNet data module (sapp_lightning/app/data/imagenet.py) on generated ImageFolder trees of JPEG and PNG
images of varying sizes (sapp_lightning.app.synthetic.make_imagefolder): batches, class folders, missing folders
and sizes named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sapp_lightning.app.data.imagenet import ImageNetDataModule
from sapp_lightning.app.synthetic import make_imagefolder

CLASSES = ("n01", "n02", "n03")


@pytest.fixture
def imagenet_root(tmp_path) -> Path:
    make_imagefolder(tmp_path / "imagenet", CLASSES, per_class=4, size=32, splits=["train"], mixed=True)
    make_imagefolder(tmp_path / "imagenet", CLASSES, per_class=2, size=32, splits=["val"], mixed=True)
    return tmp_path / "imagenet"


def test_imagenet_batches(imagenet_root):
    dm = ImageNetDataModule(str(imagenet_root), batch_size=4, num_workers=0, image_size=16, val_resize=20)
    assert dm.num_classes == 3 and dm.classes == list(CLASSES)  # known before setup
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (12, 6)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.max() < 3
    val_images, val_labels = next(iter(dm.val_dataloader()))
    assert val_images.shape == (4, 3, 16, 16) and val_labels.tolist() == [0, 0, 1, 1]  # unshuffled
    assert dm.test_dataloader().dataset is dm.datasets["val"]  # no public test labels


def test_imagenet_missing_folders(tmp_path, imagenet_root):
    with pytest.raises(FileNotFoundError, match=r"does not exist; expected layout: root/train/<class>"):
        ImageNetDataModule(str(tmp_path / "nowhere"))
    (imagenet_root / "val").rename(imagenet_root / "validation")
    with pytest.raises(FileNotFoundError, match="has no 'val' sub-folder"):
        ImageNetDataModule(str(imagenet_root))


def test_imagenet_class_mismatch(tmp_path):
    make_imagefolder(tmp_path, CLASSES, per_class=1, size=32, splits=["train"], mixed=True)
    make_imagefolder(tmp_path, ("n01", "n02", "n04"), per_class=1, size=32, splits=["val"], mixed=True)
    with pytest.raises(ValueError, match=r"class folders differ .* only in train \['n03'\], only in val \['n04'\]"):
        ImageNetDataModule(str(tmp_path))


def test_imagenet_crop_larger_than_resize(imagenet_root):
    with pytest.raises(ValueError, match="val_resize .* must be >= image_size"):
        ImageNetDataModule(str(imagenet_root), image_size=224, val_resize=128)
