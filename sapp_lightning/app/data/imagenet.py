"""ImageNet (ILSVRC-2012) from the standard ImageFolder layout as a LightningDataModule.

Expected layout (the one the usual ``valprep.sh`` produces)::

    root/train/n01440764/*.JPEG  ...  (one sub-folder per class)
    root/val/n01440764/*.JPEG    ...  (the same class sub-folders)

ImageNet publishes no test labels, so ``test_dataloader()`` returns the validation set: "test" numbers from
this module are validation numbers, as in the papers that report ImageNet accuracy.

The train order is a function of ``(seed, epoch)`` and each image's random crop and flip of ``(seed, epoch,
index)`` (:class:`~sapp_lightning.app.data.base.SeededItems`), so a run resumed from a mid-epoch checkpoint sees the
same augmented batches as an uninterrupted one, with any number of workers.

Example (needs the data)::

    from sapp_lightning.app.data.imagenet import ImageNetDataModule

    dm = ImageNetDataModule("/datasets/imagenet", batch_size=256, num_workers=8)
    print(dm.num_classes)      # 1000, read from root/train at construction
    trainer.fit(model, dm)     # under DDP each rank takes its own batches (rank and world size from the trainer)
"""

from __future__ import annotations

from pathlib import Path

from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from .base import DatasetNotFoundError, SplitDataModule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUT = "root/train/<class>/<image> and root/val/<class>/<image> (the same class folders in both)"


def train_transform(image_size: int = 224) -> transforms.Compose:
    """RandomResizedCrop + horizontal flip + ToTensor + ImageNet normalization."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def val_transform(image_size: int = 224, val_resize: int = 256) -> transforms.Compose:
    """Resize (shorter side) + CenterCrop + ToTensor + ImageNet normalization."""
    return transforms.Compose(
        [
            transforms.Resize(val_resize),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _check_layout(root: Path) -> list[str]:
    """The class names of ``root/train``, after checking that ``root/val`` has the same ones."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"ImageNet folder {root} does not exist; expected layout: {LAYOUT}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetNotFoundError(f"ImageNet folder {root} has no '{split}' sub-folder; expected layout: {LAYOUT}")
    # find_classes only lists sub-folders: cheap even for ImageNet, so num_classes is known at construction.
    train_classes, _ = find_classes(str(root / "train"))
    val_classes, _ = find_classes(str(root / "val"))
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise ValueError(
            f"ImageNet class folders differ between {root / 'train'} ({len(train_classes)} classes) and "
            f"{root / 'val'} ({len(val_classes)} classes): only in train {only_train[:5]}, "
            f"only in val {only_val[:5]}"
        )
    return train_classes


class ImageNetDataModule(SplitDataModule):
    """ImageFolder over ``root/train`` and ``root/val`` with the standard ResNet transforms.

    ``classes`` and ``num_classes`` come from ``root/train`` at construction (``val`` must hold the same class
    folders). ``test_dataloader()`` is the validation set: ImageNet has no public test labels. ``seed`` (default:
    ``PL_GLOBAL_SEED``, else 0) fixes the train order and the augmentation. ``pin_memory`` is on when CUDA is
    available and workers persist across epochs when ``num_workers > 0``.
    """

    test_split = "val"  # ImageNet's test labels are not public
    seeded_augmentation = True  # random crops and flips drawn per (seed, epoch, image): resumable

    input_channels: int = 3

    def __init__(
        self,
        root: str,
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        val_resize: int = 256,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if val_resize < image_size:
            raise ValueError(f"val_resize ({val_resize}) must be >= image_size ({image_size}) for the center crop")
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.image_size, self.val_resize = image_size, val_resize
        self.classes: list[str] = _check_layout(self.root)
        self.num_classes: int = len(self.classes)
        self.input_shape: tuple[int, int, int] = (3, image_size, image_size)
        self.datasets: dict[str, ImageFolder] = {}

    def setup(self, stage: str | None = None) -> None:
        """Scan the image files (the slow part for the real data set: done once per process)."""
        if "train" not in self.datasets and stage in (None, "fit"):
            self.datasets["train"] = ImageFolder(str(self.root / "train"), transform=train_transform(self.image_size))
        if "val" not in self.datasets:
            self.datasets["val"] = ImageFolder(
                str(self.root / "val"), transform=val_transform(self.image_size, self.val_resize)
            )
