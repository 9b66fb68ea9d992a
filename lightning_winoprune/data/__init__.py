"""Datasets as LightningDataModules: the embedded digits (default), ImageFolder trees and CIFAR from local roots."""

from lightning_winoprune.data._base import EpochShuffle
from lightning_winoprune.data._digits import DigitsDataModule
from lightning_winoprune.data._folders import CIFARDataModule, ImageFolderDataModule

__all__ = ["CIFARDataModule", "DigitsDataModule", "EpochShuffle", "ImageFolderDataModule"]
