"""What every datamodule here shares: named splits, built once in ``setup()``, served by the same loaders."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["SplitDataModule"]


class SplitDataModule(L.LightningDataModule):
    """A datamodule whose ``setup()`` fills ``self._splits`` with ``train``, ``val`` and ``test`` datasets.

    Subclasses set ``batch_size`` and ``num_workers`` and implement ``setup()`` (idempotent: return early when the
    splits exist); the loaders call it on demand, so a module also works outside a Trainer.
    """

    batch_size: int
    num_workers: int

    def __init__(self) -> None:
        super().__init__()
        self._splits: dict[str, Dataset] = {}

    def split(self, name: str) -> Dataset:
        """The ``train``, ``val`` or ``test`` split (sets the module up if needed)."""
        if not self._splits:
            self.setup("fit")
        if name not in self._splits:
            raise KeyError(f"unknown split {name!r}; valid splits are {sorted(self._splits)}")
        return self._splits[name]

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.split(name), batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        """Test batches, for ``predict``."""
        return self._loader("test", False)
