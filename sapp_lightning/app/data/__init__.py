"""LightningDataModules for the recipes: Fashion-MNIST, ImageNet, Criteo and MovieLens-100k as CTR data.

Each data module is imported on first use, so the image ones load neither pandas nor pyarrow (only the CTR
readers need them). All of them serve :class:`~sapp_lightning.app.data.base.ResumableDataLoader` loaders.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "CriteoDataModule": ".criteo",
    "FashionMNISTDataModule": ".fashion_mnist",
    "ImageNetDataModule": ".imagenet",
    "MovieLensCTRDataModule": ".movielens",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
