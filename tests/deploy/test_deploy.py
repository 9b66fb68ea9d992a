"""``deploy``: the deployed model computes the pruned model's function, folds and fuses, routes, and ships."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import timm
import torch
from deploy_helpers import prune_depthwise, prune_winograd, randomize_bn, rel_error
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from lightning_winoprune import WinogradConv2d, winogradize
from lightning_winoprune.deploy import (
    DenseConv,
    DeployMismatchError,
    DeployReport,
    PackedDepthwiseConv,
    PackedWinogradConv,
    deploy,
)
from lightning_winoprune.kernels import native_available

needs_ext = pytest.mark.skipif(not native_available(), reason="the native extension is not loaded")
FAST = {"repeats": 2, "warmup": 1, "verbose": False, "time_model": False}


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    winogradize(model, m=2)
    return randomize_bn(prune_winograd(model), torch.Generator().manual_seed(0)).eval()


# --------------------------------------------------------------------------------------------- same function
class Block(nn.Module):
    def __init__(self, c: int, k: int, m: int, pad: int, bias: bool, bn: bool, act: str | None) -> None:
        super().__init__()
        self.conv = WinogradConv2d(c, k, m=m, padding=pad, bias=bias)
        self.bn = nn.BatchNorm2d(k) if bn else nn.Identity()
        self.act = {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "silu": nn.SiLU(), "hardswish": nn.Hardswish(),
                    None: nn.Identity()}[act]
        self.head = nn.Conv2d(k, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.bn(self.conv(x))))


@needs_ext
@given(c=st.integers(1, 9), k=st.integers(1, 13), h=st.integers(3, 15), w=st.integers(3, 15), n=st.integers(1, 3),
       m=st.sampled_from([2, 4]), pad=st.integers(0, 2), bias=st.booleans(), bn=st.booleans(),
       act=st.sampled_from([None, "relu", "relu6", "silu", "hardswish"]), amount=st.sampled_from([0.0, 0.5, 0.9]),
       seed=st.integers(0, 2**16))
def test_deployed_model_matches_the_pruned_model(c, k, h, w, n, m, pad, bias, bn, act, amount, seed):
    assume(h + 2 * pad >= 3 and w + 2 * pad >= 3)
    gen = torch.Generator().manual_seed(seed)
    model = randomize_bn(Block(c, k, m, pad, bias, bn, act), gen)
    if amount:
        prune_winograd(model, amount)
    model.eval()
    x = torch.randn(n, c, h, w, generator=gen)
    deployed = deploy(model, x, **FAST)
    tol = 1e-4 if m == 2 else 1e-3
    assert rel_error(deployed(x), model(x)) <= tol
    # BN folded, activation fused: the conv is the one layer left of the three
    assert isinstance(deployed.conv, (PackedWinogradConv, DenseConv))
    assert isinstance(deployed.bn, nn.Identity) and isinstance(deployed.act, nn.Identity)
    row = deployed.deploy_report.layers[0]
    assert row.folded == ("bn" if bn else "") and row.act == (act or "none")


@needs_ext
def test_resnet_folds_every_bn_and_fuses_only_the_activations_a_conv_feeds(resnet):
    x = torch.randn(2, 1, 20, 20)
    deployed = deploy(resnet, x, **FAST)
    assert rel_error(deployed(x), resnet(x)) <= 1e-4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    block = deployed.layer1[0]
    # layer1.0.conv1 stays dense (winogradize's skip_first), so its route is timed: any route fuses the ReLU
    assert block.conv1.act.value == "relu"
    assert isinstance(deployed.layer1[1].conv1, PackedWinogradConv) and deployed.layer1[1].conv1.act.value == "relu"
    assert isinstance(block.act1, nn.Identity)
    # act2 follows the residual add (an in-place add on bn2's output): it must stay
    assert isinstance(block.act2, nn.ReLU) and block.conv2.act.value == "none"
    assert deployed.deploy_report.max_error <= 1e-4


@needs_ext
@pytest.mark.parametrize("name", ["mobilenetv2_100", "efficientnet_b0"])
def test_deprune_models_run_the_depthwise_kernel(name):
    model = timm.create_model(name, num_classes=10, in_chans=1)
    model = randomize_bn(prune_depthwise(model), torch.Generator().manual_seed(1)).eval()
    x = torch.randn(1, 1, 32, 32)
    deployed = deploy(model, x, tune=False, **{k: v for k, v in FAST.items() if k not in ("repeats", "warmup")})
    assert rel_error(deployed(x), model(x)) <= 1e-4
    depthwise = [m for m in deployed.modules() if isinstance(m, PackedDepthwiseConv)]
    assert len(depthwise) == sum(1 for m in model.modules() if getattr(m, "weight_mask", None) is not None)
    assert {m.act.value for m in depthwise} == ({"relu6"} if name == "mobilenetv2_100" else {"silu"})
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())


@needs_ext
def test_mixed_winograd_and_depthwise_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                          WinogradConv2d(8, 8, m=4), nn.BatchNorm2d(8), nn.SiLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Hardswish(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    randomize_bn(prune_depthwise(prune_winograd(model, 0.5), 0.5), torch.Generator().manual_seed(2)).eval()
    x = torch.randn(2, 3, 17, 13)
    deployed = deploy(model, x, **FAST)
    assert rel_error(deployed(x), model(x)) <= 1e-3
    kinds = [r.kind for r in deployed.deploy_report.layers]
    assert kinds == ["conv", "winograd", "depthwise"]


@needs_ext
def test_tuning_times_every_candidate_and_picks_the_fastest(resnet):
    x = torch.randn(1, 1, 20, 20)
    report: DeployReport = deploy(resnet, x, **FAST).deploy_report
    for row in report.layers:
        assert row.route in row.errors
        if len(row.times_ms) > 1:
            assert row.route == min(row.times_ms, key=row.times_ms.__getitem__)
            assert row.dense_ms is not None and row.dense_ms > 0
    wino = [r for r in report.layers if r.kind == "winograd"]
    assert wino and all(r.route in ("winograd", "csr") for r in wino)  # pruned: no dense equivalent exists
    assert "whole model" in str(report)
    assert report.to_dict()["layers"][0]["name"] == report.layers[0].name


# ------------------------------------------------------------------------------------------------ shipping
@needs_ext
def test_deepcopy_state_dict_and_threads(resnet):
    x = torch.randn(2, 1, 20, 20)
    deployed = deploy(resnet, x, tune=False, verbose=False, time_model=False)
    expected = deployed(x)
    torch.testing.assert_close(copy.deepcopy(deployed)(x), expected, rtol=0, atol=0)
    fresh = deploy(resnet, x, tune=False, verbose=False, time_model=False)
    for buf in fresh.buffers():
        buf.zero_() if buf.is_floating_point() else None
    fresh.load_state_dict(deployed.state_dict())
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    with torch.enable_grad():  # runs without no_grad too
        torch.testing.assert_close(deployed(x), expected, rtol=0, atol=0)


@needs_ext
def test_compile_export_and_a_fresh_process_round_trip(resnet, tmp_path):
    x = torch.randn(2, 1, 20, 20)
    deployed = deploy(resnet, x, verbose=False, time_model=False, repeats=1, warmup=0)
    compiled = torch.compile(deployed, fullgraph=True)
    torch.testing.assert_close(compiled(x), deployed(x))
    traced = torch.jit.trace(deployed, (x,))  # the ops are traced, not their outputs: new inputs give new outputs
    x_new = torch.randn(2, 1, 20, 20)
    torch.testing.assert_close(traced(x_new), deployed(x_new), rtol=0, atol=0)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(deployed, (x,), dynamic_shapes={"x": {0: batch}})
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    x3 = torch.randn(3, 1, 20, 20)
    torch.save({"x": x3, "y": deployed(x3)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        import lightning_winoprune  # registers the winoprune:: ops
        model = torch.export.load({str(path)!r}).module()
        io = torch.load({str(tmp_path / 'io.pt')!r})
        assert torch.equal(model(io["x"]), io["y"]), "outputs differ"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


@needs_ext
def test_backward_is_a_clear_error(resnet):
    x = torch.randn(1, 1, 20, 20)
    deployed = deploy(resnet, x, tune=False, verbose=False, time_model=False)
    y = deployed(x.requires_grad_())
    with pytest.raises(RuntimeError, match="inference only"):
        y.sum().backward()


# ------------------------------------------------------------------------------------------------ bad input
def test_a_model_in_training_mode_is_refused(resnet):
    with pytest.raises(ValueError, match=r"eval mode.*model\.eval\(\)"):
        deploy(copy.deepcopy(resnet).train(), torch.randn(1, 1, 20, 20), **FAST)


@pytest.mark.parametrize("bad", [torch.randn(1, 20, 20), torch.zeros(1, 1, 20, 20, dtype=torch.long), "x",
                                 torch.randn(0, 1, 20, 20)])
def test_a_bad_example_input_is_refused(resnet, bad):
    with pytest.raises(ValueError, match="example_input"):
        deploy(resnet, bad, **FAST)


def test_bad_options_are_refused(resnet):
    x = torch.randn(1, 1, 20, 20)
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 0"):
        deploy(resnet, x, repeats=0, verbose=False)
    with pytest.raises(ValueError, match="threads must be a positive int or None, got -2"):
        deploy(resnet, x, threads=-2, **FAST)
    with pytest.raises(ValueError, match=r"backend.*'cuda'.*auto"):
        deploy(resnet, x, backend="cuda", **FAST)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        deploy("resnet", x, **FAST)  # type: ignore[arg-type]


def test_an_unsupported_layer_falls_back_with_a_warning():
    model = prune_winograd(nn.Sequential(WinogradConv2d(4, 4, m=6), nn.BatchNorm2d(4), nn.ReLU())).eval()
    x = torch.randn(1, 4, 12, 12)
    with pytest.warns(RuntimeWarning, match=r"0 no native kernel for F\(6,3\); kept on its own \(torch\) path"):
        deployed = deploy(model, x, **FAST)
    assert isinstance(deployed[0], WinogradConv2d)
    torch.testing.assert_close(deployed(x), model(x))


def test_a_wrong_route_is_caught_by_the_output_check(resnet, monkeypatch):
    from lightning_winoprune.deploy import _passes

    monkeypatch.setattr(_passes, "rel_error", lambda out, ref: 0.0 if out.shape != ref.shape or out.dim() != 2
                        else 1.0)
    with pytest.raises(DeployMismatchError, match="deployed model's output differs"):
        deploy(resnet, torch.randn(1, 1, 20, 20), **FAST)


def test_torch_backend_works_without_the_extension(resnet):
    x = torch.randn(1, 1, 20, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        deployed = deploy(resnet, x, backend="torch", **FAST)
    assert rel_error(deployed(x), resnet(x)) <= 1e-4
    assert all(not m.native for m in deployed.modules() if isinstance(m, PackedWinogradConv))
