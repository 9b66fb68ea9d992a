import pytest
import torch

from lightning_winoprune.data import DigitsDataModule


def test_split_is_fixed_disjoint_and_complete():
    a, b = DigitsDataModule(image_size=16), DigitsDataModule(image_size=16)
    a.setup(), b.setup()
    sizes = {k: len(a.split(k)) for k in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    assert sizes["train"] == int(0.7 * 1797) and sizes["val"] == int(0.15 * 1797)
    for k in sizes:
        assert torch.equal(a.split(k).tensors[0], b.split(k).tensors[0])
    # the three splits partition the dataset: together they hold every original image exactly once
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = map(tuple, digits.images.reshape(len(digits.target), -1).tolist())
    ref = sorted(zip(digits.target.tolist(), images, strict=True))
    small = DigitsDataModule(image_size=8)
    got = []
    for k in sizes:
        x, y = small.split(k).tensors
        got += zip(y.tolist(), [tuple(r) for r in x.flatten(1).tolist()], strict=False)
    assert len(got) == len(ref)
    assert sorted(lbl for lbl, _ in got) == [lbl for lbl, _ in ref]
    assert len({img for _, img in got}) == len({img for _, img in ref})


def test_images_are_upsampled_normalised_and_balanced():
    dm = DigitsDataModule(image_size=24, in_chans=3, batch_size=32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 24, 24) and y.dtype == torch.long
    assert torch.equal(x[:, 0], x[:, 1])
    full = dm.split("train").tensors
    assert abs(full[0].mean().item()) < 0.1 and 0.8 < full[0].std().item() < 1.2
    assert set(full[1].unique().tolist()) == set(range(10))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"image_size": 4}, "image_size must be >= 8"), ({"in_chans": 2}, "in_chans must be 1 or 3"),
     ({"batch_size": 0}, "batch_size must be >= 1")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_unknown_split():
    with pytest.raises(KeyError, match="unknown split"):
        DigitsDataModule(image_size=8).split("holdout")
