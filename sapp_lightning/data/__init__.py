"""LightningDataModules for the recipes: Fashion-MNIST, ImageNet, Criteo and MovieLens-100k as CTR data."""

from .criteo import CriteoDataModule
from .fashion_mnist import FashionMNISTDataModule
from .imagenet import ImageNetDataModule
from .movielens import MovieLensCTRDataModule

__all__ = ["CriteoDataModule", "FashionMNISTDataModule", "ImageNetDataModule", "MovieLensCTRDataModule"]
