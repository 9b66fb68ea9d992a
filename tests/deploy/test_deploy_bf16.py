"""``deploy(..., precision="bf16")``: bfloat16 routes, the error check, the report and the ``.pt2``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F
from deploy_helpers import prune, randomize_bn, rel_error

from lightning_winoprune import winogradize
from lightning_winoprune.deploy import (
    DenseConv,
    DeployMismatchError,
    DeployRoute,
    deploy,
    load_deployed,
    save_deployed,
)
from lightning_winoprune.deploy._ops import onednn_bf16_available
from lightning_winoprune.deploy._packed_bf16 import Bf16Model, bf16_refusal

needs_bf16 = pytest.mark.skipif(bf16_refusal() is not None, reason=f"no bfloat16 kernels here: {bf16_refusal()}")
needs_onednn_bf16 = pytest.mark.skipif(not onednn_bf16_available(), reason="oneDNN has no bfloat16 convs on this CPU")
FAST = {"tune": False, "verbose": False, "time_model": False}


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    winogradize(model, m=2)
    return randomize_bn(prune(model), 1).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(2))


@needs_bf16
def test_every_layer_takes_a_bfloat16_route_and_the_output_stays_close(resnet, x):
    deployed = deploy(resnet, x, precision="bf16", **FAST)
    report = deployed.deploy_report
    routes = {r.kind: set() for r in report.layers}
    for r in report.layers:
        routes[r.kind].add(r.route)
    assert routes["winograd"] == {DeployRoute.WINOGRAD_BF16}
    if onednn_bf16_available():
        assert routes["conv"] == {DeployRoute.ONEDNN_BF16}
    assert "pool" not in routes  # the native pooling kernel is float32 NCHW: a bfloat16 model pools in torch
    assert isinstance(deployed, Bf16Model)
    assert all(p.dtype == torch.bfloat16 for n, p in deployed.named_parameters() if "fc" in n)
    assert report.precision == "bf16"
    assert report.max_error <= report.tolerance == 5e-2
    assert report.top1_agreement is not None and report.top1_agreement >= 0.75  # random weights: near-ties flip
    with torch.no_grad():
        assert rel_error(deployed(x), resnet(x)) == pytest.approx(report.max_error, rel=1e-6)
    assert "precision bf16" in str(report) and "top-1" in str(report)


@needs_bf16
def test_tuned_routes_are_all_bfloat16_and_timed_against_dense_bfloat16(resnet, x):
    deployed = deploy(resnet, x[:1], precision="bf16", verbose=False, time_model=False, repeats=2, warmup=1)
    for row in deployed.deploy_report.layers:
        assert row.route in (DeployRoute.WINOGRAD_BF16, DeployRoute.ONEDNN_BF16, DeployRoute.EAGER), row
        if row.kind == "winograd":
            assert row.route is DeployRoute.WINOGRAD_BF16 and row.dense_ms is not None and row.ms is not None
        elif len(row.times_ms) > 1:
            assert row.route == min(row.times_ms, key=row.times_ms.__getitem__)


@needs_bf16
def test_the_pt2_round_trip_in_a_fresh_process(resnet, x, tmp_path):
    deployed = deploy(resnet, x, precision="bf16", **FAST)
    path = save_deployed(deployed, tmp_path / "bf16.pt2")
    loaded = load_deployed(path)
    with torch.no_grad():
        want = deployed(x)
        assert torch.equal(loaded(x), want)
    torch.save({"x": x, "y": want}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        from lightning_winoprune.deploy import load_deployed
        model = load_deployed({str(path)!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        assert torch.equal(model(io["x"]), io["y"]), "outputs differ"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


@needs_bf16
def test_the_bfloat16_model_compiles(resnet, x):
    deployed = deploy(resnet, x, precision="bf16", **FAST)
    compiled = torch.compile(deployed, fullgraph=True)
    with torch.no_grad():  # inductor fuses the bfloat16 adds and ReLUs (rounding once): close, not bit-equal
        assert rel_error(compiled(x), deployed(x)) <= 2e-2


@needs_bf16
def test_a_bfloat16_model_beyond_the_tolerance_is_refused_with_its_agreement(resnet, x):
    with pytest.raises(DeployMismatchError, match=r"bfloat16 model's output differs .* top-1 agreement .* tolerance="):
        deploy(resnet, x, precision="bf16", tolerance=1e-6, **FAST)


@needs_bf16
def test_a_layer_is_checked_on_its_rounded_input(resnet, x):
    """Each bfloat16 route answers for its own rounding: the layers' errors stay small even where rounding the
    input alone moves a layer's output a lot."""
    report = deploy(resnet, x, precision="bf16", **FAST).deploy_report
    assert all(err <= 2e-2 for row in report.layers for err in row.errors.values())


def test_a_bad_precision_names_the_valid_ones(resnet, x):
    with pytest.raises(ValueError, match=r"precision='fp16' is not valid; valid values are \['fp32', 'bf16'\]"):
        deploy(resnet, x, precision="fp16", **FAST)


def test_bfloat16_needs_the_native_backend(resnet, x):
    with pytest.raises(ValueError, match="precision='bf16' needs backend='native'"):
        deploy(resnet, x, precision="bf16", backend="torch", **FAST)


def test_a_cpu_without_bfloat16_kernels_is_refused(resnet, x, monkeypatch):
    from lightning_winoprune.deploy import _deploy as deploy_module

    monkeypatch.setattr(deploy_module, "bf16_refusal", lambda: "precision='bf16' needs a CPU with AVX512-BF16")
    with pytest.raises(ValueError, match="precision='bf16' needs a CPU with AVX512-BF16"):
        deploy(resnet, x, precision="bf16", **FAST)


@needs_bf16
def test_activations_stay_bfloat16_channels_last_between_layers(resnet, x):
    deployed = deploy(resnet, x, precision="bf16", **FAST)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((o.dtype, o.is_contiguous(
        memory_format=torch.channels_last)))) for m in deployed.inner.modules() if type(m).__name__ in
        ("PackedWinogradConvBf16", "DenseConv")]
    with torch.no_grad():
        out = deployed(x)
    for h in hooks:
        h.remove()
    assert out.dtype == torch.float32 and len(seen) == 20
    assert all(s == (torch.bfloat16, True) for s in seen)


def test_float32_deploys_never_take_a_bfloat16_route(resnet, x):
    report = deploy(resnet, x, **FAST).deploy_report
    assert report.precision == "fp32" and report.tolerance == 1e-4
    assert not any(r.route in (DeployRoute.WINOGRAD_BF16, DeployRoute.ONEDNN_BF16) for r in report.layers)


# ------------------------------------------------------------------------------------------------ DenseConv
@needs_onednn_bf16
@pytest.mark.parametrize(("kernel", "stride", "groups"), [(3, 1, 1), (7, 2, 1), (1, 2, 1)])
def test_the_dense_bfloat16_route_matches_conv2d(kernel, stride, groups):
    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(16, 16 // groups, kernel, kernel, generator=gen) * 0.1, torch.randn(16, generator=gen)
    conv = DenseConv(w, b, (stride, stride), (kernel // 2, kernel // 2), groups, "onednn-bf16", "relu")
    assert conv.weight.dtype == torch.bfloat16
    x = torch.randn(2, 16, 13, 11, generator=gen)
    ref = F.relu(F.conv2d(x, w, b, stride, kernel // 2, 1, groups))
    out = conv(x)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert rel_error(out, ref) <= 2e-2
    loaded = DenseConv(w, b, (stride, stride), (kernel // 2, kernel // 2), groups, "onednn-bf16", "relu")
    loaded.load_state_dict(conv.state_dict())
    assert torch.equal(loaded(x), out)
    torch.library.opcheck(torch.ops.winoprune.conv2d_act_bf16.default,
                          (x, conv.weight, conv.bias, stride, stride, kernel // 2, kernel // 2, groups, 1),
                          test_utils=("test_schema", "test_faketensor"))


@needs_onednn_bf16
def test_the_dense_bfloat16_route_refuses_grouped_convs():
    with pytest.raises(ValueError, match=r"route='onednn-bf16' takes ungrouped convs only, got groups=4"):
        DenseConv(torch.randn(16, 4, 3, 3), None, (1, 1), (1, 1), 4, "onednn-bf16")


def test_the_dense_bfloat16_route_is_refused_without_onednn_bfloat16(monkeypatch):
    from lightning_winoprune.deploy import _packed as packed

    monkeypatch.setattr(packed, "onednn_bf16_available", lambda: False)
    with pytest.raises(ValueError, match="route='onednn-bf16' needs oneDNN with bfloat16 convs"):
        DenseConv(torch.randn(4, 4, 3, 3), None, route="onednn-bf16")
