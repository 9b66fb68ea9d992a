"""scikit-learn's bundled handwritten digits as a LightningDataModule: the embedded default dataset.

1,797 real 8x8 grey-scale digits ship inside scikit-learn, so every recipe runs anywhere with no download. Images are
upsampled (bilinear) to ``image_size``, normalised, and split with a fixed seed into train/val/test = 70/15/15.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lightning_winoprune.data._base import SplitDataModule

__all__ = ["DigitsDataModule"]

_SPLIT_SEED = 20240601  # fixed: the split never changes between runs or machines
_FRACTIONS = (0.70, 0.15)  # train, val; test is the rest


class DigitsDataModule(SplitDataModule):
    """scikit-learn's ``load_digits``, upsampled, with a fixed train/val/test split.

    Args:
        image_size: Side of the square images fed to the model (the originals are 8x8).
        in_chans: 1 for grey-scale, 3 to repeat the channel (for models with RGB stems or pretrained weights).
        batch_size: Batch size of every loader.
        num_workers: DataLoader workers (the whole dataset is a small in-memory tensor; 0 is fastest).

    """

    num_classes = 10

    def __init__(self, image_size: int = 32, in_chans: int = 1, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.image_size, self.in_chans = image_size, in_chans
        self.batch_size, self.num_workers = batch_size, num_workers

    def setup(self, stage: str | None = None) -> None:
        """Load, upsample, normalise and split the digits (once)."""
        if self._splits:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (x - x.mean()) / x.std()
        if self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()
        y = torch.tensor(digits.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(_SPLIT_SEED))
        n_train, n_val = int(_FRACTIONS[0] * len(y)), int(_FRACTIONS[1] * len(y))
        idx = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
        self._splits = {k: TensorDataset(x[v], y[v]) for k, v in idx.items()}

    def split(self, name: str) -> TensorDataset:
        """The ``train``, ``val`` or ``test`` split as tensors (sets the module up if needed)."""
        ds = super().split(name)
        assert isinstance(ds, TensorDataset)
        return ds
