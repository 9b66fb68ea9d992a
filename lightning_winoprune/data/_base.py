"""What every datamodule here shares: named splits, built once in ``setup()``, served by the same loaders."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochShuffle", "SplitDataModule"]


class EpochShuffle(Sampler[int]):
    """A shuffling sampler whose order depends only on a seed and the epoch, so a resumed run sees the same batches.

    ``RandomSampler`` draws from the process's global generator, whose state a checkpoint does not hold: a run
    resumed at epoch ``e`` would see other batches than the uninterrupted run, and (for a schedule that prunes after
    ``e``) other masks. Here epoch ``e`` is the permutation of a generator seeded with ``seed + e``; the Trainer calls
    :meth:`set_epoch` before every epoch (as it does for a ``DistributedSampler``). Iterated again without a
    :meth:`set_epoch` in between (inside Lightning's distributed wrapper), it moves on to the next epoch by itself.

    Args:
        data: The dataset (its length is what is shuffled).
        seed: The base seed; ``None`` takes ``torch.initial_seed()``, which ``seed_everything`` sets.
    """

    def __init__(self, data: Sized, seed: int | None = None) -> None:
        self._n = len(data)
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self.epoch = 0
        self._fresh = True  # no iteration since the epoch was set

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for ``epoch`` from now on."""
        self.epoch, self._fresh = int(epoch), True

    def __iter__(self) -> Iterator[int]:
        if not self._fresh:
            self.epoch += 1
        self._fresh = False
        gen = torch.Generator().manual_seed((self.seed + self.epoch) % 2**63)
        return iter(torch.randperm(self._n, generator=gen).tolist())

    def __len__(self) -> int:
        return self._n


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
        data = self.split(name)
        sampler = EpochShuffle(data) if shuffle and isinstance(data, Sized) else None
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle if sampler is None else None,
                          sampler=sampler, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (:class:`EpochShuffle`: the order depends on the seed and the epoch only)."""
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
