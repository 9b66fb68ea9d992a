"""Datasets as LightningDataModules; the embedded default is scikit-learn's bundled digits."""

from lightning_winoprune.data._digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
