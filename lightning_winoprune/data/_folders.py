"""Real datasets from local folders: ImageNet-style ImageFolder trees and CIFAR-10/100.

Nothing here downloads unless asked (``CIFARDataModule(download=True)``); missing files raise a
:class:`FileNotFoundError` that names the expected path and layout instead of hanging on a network that may not
exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from lightning_winoprune.data._base import SplitDataModule

__all__ = ["CIFARDataModule", "ImageFolderDataModule"]

_CIFAR = {"cifar10": ("CIFAR10", "cifar-10-batches-py", 10), "cifar100": ("CIFAR100", "cifar-100-python", 100)}
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_SPLIT_SEED = 20240601


class ImageFolderDataModule(SplitDataModule):
    """An ImageNet-layout folder (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``) with timm's transforms.

    Args:
        root: The dataset folder.
        image_size: Side of the training crops and of the evaluation images.
        batch_size: Batch size of every loader.
        num_workers: DataLoader workers.
        train_dir: Sub-folder with the training images.
        val_dir: Sub-folder with the validation images (also used for ``test`` unless ``test_dir`` is given).
        test_dir: Optional sub-folder with test images.
        augment: timm's training augmentation (random resized crop, flip, colour jitter); off gives the evaluation
            transform for training too.
    """

    def __init__(self, root: str | Path, image_size: int = 224, batch_size: int = 64, num_workers: int = 4,
                 train_dir: str = "train", val_dir: str = "val", test_dir: str | None = None,
                 augment: bool = True) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.root, self.image_size, self.batch_size, self.num_workers = Path(root), image_size, batch_size, num_workers
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir or val_dir}
        self.augment = augment
        self.classes: list[str] = []

    def _folder(self, split: str) -> Path:
        path = self.root / self.dirs[split]
        if not path.is_dir() or not any(p.is_dir() for p in path.iterdir()):
            raise FileNotFoundError(
                f"{type(self).__name__}: no class folders in {path}; expected the ImageNet layout "
                f"{self.root}/{self.dirs[split]}/<class name>/<image files>"
            )
        return path

    def setup(self, stage: str | None = None) -> None:
        """Index the folders (once) and build timm's train and evaluation transforms."""
        if self._splits:
            return
        from timm.data import create_transform
        from torchvision.datasets import ImageFolder

        train_tf = create_transform(self.image_size, is_training=self.augment)
        eval_tf = create_transform(self.image_size, is_training=False)
        for split in ("train", "val", "test"):
            transform = train_tf if split == "train" else eval_tf
            self._splits[split] = ImageFolder(str(self._folder(split)), transform=transform)
        train = self._splits["train"]
        assert isinstance(train, ImageFolder)
        self.classes = list(train.classes)
        for split in ("val", "test"):
            other = self._splits[split]
            assert isinstance(other, ImageFolder)
            if other.classes != self.classes:
                raise ValueError(f"the {split} folder's classes {other.classes[:5]}... differ from train's "
                                 f"{self.classes[:5]}...")

    @property
    def num_classes(self) -> int:
        """Number of classes (after :meth:`setup`)."""
        if not self.classes:
            self.setup()
        return len(self.classes)



class CIFARDataModule(SplitDataModule):
    """CIFAR-10 or CIFAR-100 from a local root, with a fixed train/val split of the training set.

    Args:
        root: Folder holding ``cifar-10-batches-py`` or ``cifar-100-python`` (torchvision's layout).
        variant: ``"cifar10"`` or ``"cifar100"``.
        download: Fetch the archive into ``root`` if it is missing (needs a network); off by default.
        image_size: Side of the images fed to the model (32 keeps the originals).
        batch_size: Batch size of every loader.
        num_workers: DataLoader workers.
        val_fraction: Share of the training set held out for validation (fixed seed); the official test set is
            ``test``.
        augment: Random crop with padding 4 and horizontal flips for training.
    """

    def __init__(self, root: str | Path, variant: str = "cifar10", download: bool = False, image_size: int = 32,
                 batch_size: int = 128, num_workers: int = 2, val_fraction: float = 0.1, augment: bool = True) -> None:
        super().__init__()
        if variant not in _CIFAR:
            raise ValueError(f"variant={variant!r} is not valid; valid values are {sorted(_CIFAR)}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.root, self.variant, self.download = Path(root), variant, download
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.val_fraction, self.augment = val_fraction, augment
        self.num_classes = _CIFAR[variant][2]

    def _dataset(self, train: bool, transform: Any) -> Dataset:
        import torchvision.datasets as tvd

        cls_name, folder, _ = _CIFAR[self.variant]
        try:
            return getattr(tvd, cls_name)(str(self.root), train=train, transform=transform, download=self.download)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"{self.variant} is not in {self.root / folder} ({err}). Put torchvision's extracted "
                f"'{folder}' folder there, or pass download=True on a machine with network access."
            ) from None

    def prepare_data(self) -> None:
        """Download once, on one process, when asked to."""
        if self.download:
            self._dataset(True, None)
            self._dataset(False, None)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits (once)."""
        if self._splits:
            return
        import torchvision.transforms as T

        norm = [T.ToTensor(), T.Normalize(_CIFAR_MEAN, _CIFAR_STD)]
        size = [T.Resize(self.image_size)] if self.image_size != 32 else []
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        train_full = self._dataset(True, T.Compose(aug + size + norm))
        eval_train = self._dataset(True, T.Compose(size + norm))
        n = len(train_full)  # type: ignore[arg-type]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED)).tolist()
        n_val = int(self.val_fraction * n)
        self._splits = {"train": Subset(train_full, perm[n_val:]),
                      "val": Subset(eval_train, perm[:n_val]),
                      "test": self._dataset(False, T.Compose(size + norm))}

