import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_winoprune.data import CIFARDataModule, ImageFolderDataModule


def _make_tree(root, splits=("train", "val"), classes=("cat", "dog", "emu"), per_class=3):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_image_folder_loads_with_timm_transforms(tmp_path):
    _make_tree(tmp_path)
    dm = ImageFolderDataModule(tmp_path, image_size=16, batch_size=4, num_workers=0)
    dm.setup()
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "emu"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.max() < 3
    xs = torch.cat([b[0] for b in dm.val_dataloader()])
    assert xs.shape == (9, 3, 16, 16)
    # the evaluation transform is deterministic, the training one augments
    assert torch.equal(xs, torch.cat([b[0] for b in dm.test_dataloader()]))
    assert abs(xs.mean().item()) < 1.0  # normalised by timm's ImageNet mean/std


def test_image_folder_missing_split_names_the_expected_layout(tmp_path):
    _make_tree(tmp_path, splits=("train",))
    with pytest.raises(FileNotFoundError, match=r"no class folders in .*val; expected the ImageNet layout"):
        ImageFolderDataModule(tmp_path, image_size=16).setup()


def test_image_folder_mismatched_classes(tmp_path):
    _make_tree(tmp_path, splits=("train",))
    _make_tree(tmp_path, splits=("val",), classes=("cat", "dog"))
    with pytest.raises(ValueError, match="classes"):
        ImageFolderDataModule(tmp_path, image_size=16).setup()


@pytest.mark.parametrize(("variant", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_files_fail_fast_without_network(tmp_path, monkeypatch, variant, folder):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network with download=False")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    dm = CIFARDataModule(tmp_path, variant=variant)
    dm.prepare_data()  # download=False: nothing to do, nothing fetched
    with pytest.raises(FileNotFoundError, match=f"{variant} is not in .*{folder}.*download=True"):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"variant": "svhn"}, r"variant='svhn' is not valid; valid values are \['cifar10', 'cifar100'\]"),
     ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"), ({"batch_size": 0}, "batch_size must be >= 1")],
)
def test_cifar_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFARDataModule(tmp_path, **kwargs)


def test_image_folder_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size must be >= 8"):
        ImageFolderDataModule(tmp_path, image_size=4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ImageFolderDataModule(tmp_path, batch_size=0)


def test_cifar_split_is_fixed_disjoint_and_uses_the_test_set(tmp_path, monkeypatch):
    from torch.utils.data import TensorDataset

    def fake(self, train, transform):  # torchvision checks md5s of the real archives, so stand in for them
        n = 50 if train else 20
        return TensorDataset(torch.arange(n).float().view(n, 1), torch.full((n,), int(train)))

    monkeypatch.setattr(CIFARDataModule, "_dataset", fake)
    a, b = CIFARDataModule(tmp_path, val_fraction=0.2, batch_size=64), CIFARDataModule(tmp_path, val_fraction=0.2)
    a.setup(), b.setup()
    train = torch.cat([x for x, _ in a.train_dataloader()]).flatten().tolist()
    val = torch.cat([x for x, _ in a.val_dataloader()]).flatten().tolist()
    assert len(train) == 40 and len(val) == 10 and not set(train) & set(val) and set(train) | set(val) == set(range(50))
    assert val == torch.cat([x for x, _ in b.val_dataloader()]).flatten().tolist()
    assert torch.cat([y for _, y in a.test_dataloader()]).eq(0).all()  # the official test split
    assert a.num_classes == 10 and CIFARDataModule(tmp_path, variant="cifar100").num_classes == 100
