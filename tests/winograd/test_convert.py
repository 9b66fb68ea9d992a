"""``winogradize`` on timm models and toy models: equivalence, report contents, include/exclude, errors."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from lightning_winoprune import WinogradConv2d, WinogradizeReport, winogradize
from lightning_winoprune.winograd import iter_winograd_layers


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    timm's default init (and zero_init_last) leaves BN close to identity or zeroes a block's last gamma, which would
    hide a wrong conversion of the conv in front of it.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def _timm(name: str) -> nn.Module:
    kwargs = {"zero_init_last": False} if name.startswith("resnet") else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    _randomize_batchnorm(model)
    return model.eval()


def _check_equivalent_and_sensitive(name: str, x: torch.Tensor, n_perturb: int) -> WinogradizeReport:
    model = _timm(name)
    reference = copy.deepcopy(model)
    report = winogradize(model, m=2)
    assert len(report.converted) > 0
    for layer_name in report.converted:
        assert isinstance(model.get_submodule(layer_name), WinogradConv2d)
    assert [n for n, _ in iter_winograd_layers(model)] == report.converted
    with torch.no_grad():
        ref = reference(x)
        y = model(x)
        assert y.shape == ref.shape == (x.shape[0], 10)
        err = rel_err(y, ref)
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"
        # The comparison must be able to fail: perturbing a converted layer changes the output well beyond 1e-4.
        # Spread the probes over the network: first, last and evenly in between (the first converted layer of a
        # timm resnet is a block's last conv, the one zero_init_last would hide).
        conv_names = report.converted
        idx = sorted({round(i * (len(conv_names) - 1) / max(1, n_perturb - 1)) for i in range(n_perturb)})
        targets = [conv_names[i] for i in idx]
        for layer_name in targets:
            layer = model.get_submodule(layer_name)
            saved = layer.weight.detach().clone()
            layer.weight.add_(torch.randn_like(saved) * 0.05 * saved.abs().mean())
            changed = rel_err(model(x), ref)
            layer.weight.copy_(saved)
            assert changed > 1e-3, f"{name}: perturbing {layer_name} changed the output by only {changed:.2e}"
    return report


def test_resnet18_equivalent_and_report() -> None:
    x = torch.randn(2, 3, 32, 32)
    report = _check_equivalent_and_sensitive("resnet18", x, n_perturb=3)
    assert len(report.converted) == 12 and len(report) == 12
    assert len(report.decisions) == 20
    skipped = report.skipped
    assert "skip_first" in skipped["layer1.0.conv1"]
    assert "layer1.0.conv1" not in report.converted
    assert "kernel_size is (7, 7)" in skipped["conv1"]
    assert "stride is (2, 2)" in skipped["layer2.0.conv1"]
    assert "kernel_size is (1, 1)" in skipped["layer2.0.downsample.0"]
    assert "layer4.1.conv2" in report.converted
    text = str(report)
    assert text.startswith("winogradize(m=2): converted 12 of 20 convolutions")
    assert "layer1.0.conv1" in text and "skip_first=True" in text and "converted" in text
    shapes = {d.name: d.shape for d in report.decisions}
    assert shapes["layer2.0.downsample.0"] == (128, 64, 1, 1)


@pytest.mark.slow
def test_resnet50_equivalent() -> None:
    report = _check_equivalent_and_sensitive("resnet50", torch.randn(2, 3, 32, 32), n_perturb=3)
    assert len(report.converted) == 12  # 13 stride-1 3x3 convs, the first kept dense
    assert "skip_first" in report.skipped["layer1.0.conv2"]
    assert "stride is (2, 2)" in report.skipped["layer2.0.conv2"]
    assert "kernel_size is (1, 1)" in report.skipped["layer1.0.conv1"]


@pytest.mark.slow
def test_vgg16_equivalent() -> None:
    report = _check_equivalent_and_sensitive("vgg16", torch.randn(1, 3, 32, 32), n_perturb=1)
    assert len(report.converted) == 12
    assert "skip_first" in report.skipped["features.0"]
    assert "kernel_size is (7, 7)" in report.skipped["pre_logits.fc1"]


def test_skip_first_false_converts_first_conv() -> None:
    model = _timm("resnet18")
    reference = copy.deepcopy(model)
    report = winogradize(model, m=2, skip_first=False)
    assert "layer1.0.conv1" in report.converted
    assert isinstance(model.layer1[0].conv1, WinogradConv2d)
    assert len(report.converted) == 13
    assert not any("skip_first" in r for r in report.skipped.values())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(model(x), reference(x)) <= 1e-4


@pytest.mark.parametrize("m", [4, 6])
def test_larger_tiles_on_resnet18(m: int) -> None:
    model = _timm("resnet18")
    reference = copy.deepcopy(model)
    report = winogradize(model, m=m, route="auto")
    assert report.m == m
    assert all(lay.m == m for _, lay in iter_winograd_layers(model))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(model(x), reference(x)) <= {4: 1e-4, 6: 5e-4}[m]


def _toy() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)),  # 2.0, 2.2
        nn.Conv2d(8, 8, 3, stride=2, padding=1),  # 3
        nn.Conv2d(8, 8, 1),  # 4
        nn.Conv2d(8, 8, 3, padding=1, groups=2),  # 5
        nn.Conv2d(8, 4, 3, padding=1),  # 6
    )


def test_include_exclude_regex() -> None:
    model = _toy()
    rep = winogradize(model, skip_first=False, include=r"2\..*")
    assert rep.converted == ["2.0", "2.2"]
    assert rep.skipped["0"] == "not matched by include"
    assert rep.skipped["6"] == "not matched by include"
    assert "stride" in rep.skipped["3"] and "kernel_size" in rep.skipped["4"] and "groups is 2" in rep.skipped["5"]
    assert isinstance(model[2][0], WinogradConv2d) and type(model[0]) is nn.Conv2d

    model = _toy()
    rep = winogradize(model, skip_first=False, exclude=[r"2\.0", r"6"])
    assert rep.converted == ["0", "2.2"]
    assert rep.skipped["2.0"] == "matched by exclude" and rep.skipped["6"] == "matched by exclude"

    # patterns are full matches, and skip_first applies to the first conv that survives include/exclude
    model = _toy()
    rep = winogradize(model, include=["2", "6"])
    assert rep.converted == []
    assert rep.skipped["2.0"] == "not matched by include"
    assert "skip_first" in rep.skipped["6"]

    model = _toy()
    rep = winogradize(model, include=[r"2\.\d", "6"], exclude=r"2\.2")
    assert "skip_first" in rep.skipped["2.0"]
    assert rep.converted == ["6"]


def test_toy_model_equivalent_and_idempotent() -> None:
    model = _toy()
    reference = copy.deepcopy(model)
    rep = winogradize(model, m=2, skip_first=False, route="bgemm")
    assert rep.converted == ["0", "2.0", "2.2", "6"]
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert rel_err(model(x), reference(x)) <= 1e-5
    again = winogradize(model, m=2, skip_first=False)
    assert again.converted == []
    assert all(again.skipped[n] == "already a WinogradConv2d" for n in rep.converted)


def test_no_eligible_conv_leaves_model_unchanged() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    before = copy.deepcopy(model.state_dict())
    rep = winogradize(model, skip_first=False)
    assert rep.converted == [] and len(rep) == 0
    assert list(rep.skipped) == ["0"]
    assert type(model[0]) is nn.Conv2d
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    text = str(rep)
    assert "converted 0 of 1" in text and "the model is unchanged" in text

    empty = winogradize(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    assert str(empty) == "winogradize(m=2): the model has no nn.Conv2d; nothing converted."


def test_conv2d_subclass_is_skipped() -> None:
    from timm.layers import Conv2dSame

    model = nn.Sequential(Conv2dSame(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1))
    rep = winogradize(model, skip_first=False)
    assert "overrides nn.Conv2d's forward" in rep.skipped["0"]
    assert rep.converted == ["1"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"include": "layer(1"}, r"include pattern 'layer\(1' is not a valid regular expression"),
        ({"exclude": ["ok", "[bad"]}, r"exclude pattern '\[bad' is not a valid regular expression"),
        ({"m": 3}, "not supported"),
        ({"route": "nope"}, "route='nope' is not valid"),
        ({"backend": "nope"}, "backend='nope' is not valid"),
    ],
)
def test_invalid_arguments_raise_before_touching_model(kwargs: dict, match: str) -> None:
    model = _toy()
    with pytest.raises(ValueError, match=match):
        winogradize(model, skip_first=False, **kwargs)
    assert not any(isinstance(mod, WinogradConv2d) for mod in model.modules())


def test_root_conv_report_matches_model() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    rep = winogradize(conv, skip_first=False)
    # Every name the report calls converted must now be a WinogradConv2d, and nothing bogus may be registered.
    assert all(isinstance(conv.get_submodule(n), WinogradConv2d) for n in rep.converted)
    assert "" not in conv._modules
    assert rep.converted == [] and "from_conv" in rep.skipped[""]
