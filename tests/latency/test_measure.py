"""``measure_latency`` and its ``LatencyReport``: rows, speedups, whole-model row, JSON / PNG / rich views, argument
errors, and the output check that refuses to time a kernel computing the wrong thing.

Models are tiny (a narrow timm ``resnet18`` at 16x16, ``mobilenetv2_050`` at 32x32) and every median is of 2 runs
without warmup: these tests check the bookkeeping, not the speed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from rich.console import Console
from torch import nn

from lightning_winoprune import WinogradConv2d, measure_latency, winogradize
from lightning_winoprune.deploy import PackedDepthwiseConv, PackedWinogradConv, deploy
from lightning_winoprune.deploy._packed_bf16 import bf16_refusal
from lightning_winoprune.kernels import _backend, native_available, native_isa
from lightning_winoprune.latency import (
    LatencyMismatchError,
    LatencyReport,
    LayerLatency,
    ModelLatency,
    pruned_layers,
)
from lightning_winoprune.latency._measure import _gpu_rows
from lightning_winoprune.pruning import depthwise_mask
from lightning_winoprune.pruning._methods import method_pattern, winograd_mask

needs_ext = pytest.mark.skipif(not native_available(), reason="the native extension is not loaded")
FAST = {"repeats": 2, "warmup": 0, "progress": False}
TINY = {"channels": (16, 32, 64, 128)}
REPORT_KEYS = {"batch_size", "input_size", "threads", "isa", "repeats", "layer_speedup", "layers", "model", "gpu",
               "environment"}
ROW_KEYS = {f.name for f in dataclasses.fields(LayerLatency)} | {"speedup", "dense_winograd_speedup", "fp_speedup",
                                                                 "csr_speedup"}


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny tensors on shared cores: one intra-op thread is faster and far more repeatable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------ models
def bwsp_resnet(amount: float = 0.7) -> nn.Module:
    """timm resnet18 (narrow), Winograd-converted, every converted layer with a BWSP mask.

    ``zero_init_last=False``: timm zeroes every block's last BN scale by default, and then no Winograd layer
    changes the logits, so the whole-model output check could not see a wrong kernel.
    """
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=10, in_chans=1, zero_init_last=False, **TINY)
    winogradize(net)
    for layer in net.modules():
        if isinstance(layer, WinogradConv2d):
            layer.set_mask(winograd_mask(layer.weight.detach(), amount, method_pattern("bwsp"))[0])
    return net


def deprune_mobilenet(amount: float = 0.5) -> nn.Module:
    """timm mobilenetv2_050 with a DEPrune ``weight_mask`` (and zeroed pruned weights) on every depthwise conv."""
    torch.manual_seed(0)
    net = timm.create_model("mobilenetv2_050", num_classes=10, in_chans=1)
    for conv in net.modules():
        if isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
            mask = depthwise_mask(conv.weight.detach(), amount, "dcp").mask
            conv.register_buffer("weight_mask", mask)
            with torch.no_grad():
                conv.weight.mul_(mask)
    return net


class Mixed(nn.Module):
    """An unmasked F(4,3) layer, a masked and an unmasked depthwise conv, and a masked layer never called."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.wino = WinogradConv2d(8, 8, m=4)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.dw.register_buffer("weight_mask", torch.rand(8, 1, 3, 3, generator=torch.Generator().manual_seed(3)) < 0.5)
        with torch.no_grad():
            self.dw.weight.mul_(self.dw.weight_mask)
        self.dw_dense = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # no weight_mask: not a pruned layer
        self.unused = WinogradConv2d(8, 8)
        self.unused.set_mask(torch.zeros_like(self.unused.weight, dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw_dense(self.dw(self.wino(self.stem(x)))).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return bwsp_resnet()


@pytest.fixture(scope="module")
def resnet_report(resnet) -> LatencyReport:
    if not native_available():
        pytest.skip("the native extension is not loaded")
    return measure_latency(resnet, torch.randn(2, 1, 16, 16), **FAST)


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    return deprune_mobilenet()


def positive_finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) and v > 0 for v in values)


# ------------------------------------------------------------------------------------------------- 1. the rows
@needs_ext
def test_one_winograd_row_per_pruned_layer_with_positive_medians(resnet, resnet_report):
    report = resnet_report
    layers = {n: m for n, m in resnet.named_modules() if isinstance(m, WinogradConv2d)}
    assert len(layers) == 12 and list(pruned_layers(resnet)) == list(layers)
    assert [r.name for r in report.layers] == list(layers)
    for row in report.layers:
        layer = layers[row.name]
        assert row.kind == "winograd"
        assert row.shape.startswith(f"{layer.in_channels}->{layer.out_channels} ") and row.shape.endswith("F(2,3)")
        assert positive_finite(row.torch_ms, row.dense_winograd_ms, row.pruned_ms, row.fp_equivalent_ms, row.csr_ms)
        assert row.kept == pytest.approx(layer.mask.float().mean().item())
        assert 0.25 < row.kept < 0.35  # BWSP at 0.7 keeps ~30% of U
        assert row.balanced is True and row.work is not None and 0 < row.work <= 1
        assert 0 <= row.max_error < 1e-4
        # the speedup properties are the ratios of the medians
        assert row.speedup == pytest.approx(row.torch_ms / row.pruned_ms)
        assert row.dense_winograd_speedup == pytest.approx(row.torch_ms / row.dense_winograd_ms)
        assert row.fp_speedup == pytest.approx(row.torch_ms / row.fp_equivalent_ms)
        assert row.csr_speedup == pytest.approx(row.torch_ms / row.csr_ms)
    assert report.layer_speedup == pytest.approx(sum(r.torch_ms for r in report.layers)
                                                 / sum(r.pruned_ms for r in report.layers))
    assert report.latencies() == pytest.approx({r.name: r.pruned_ms / 1e3 for r in report.layers})
    assert (report.batch_size, report.input_size, report.threads, report.repeats) == (2, (16, 16), 1, 2)
    assert report.isa == native_isa() and bool(report.gpu) == torch.cuda.is_available()
    assert report.environment["native_extension"] is True and report.environment["torch"] == torch.__version__


@needs_ext
def test_whole_model_row(resnet_report):
    mdl = resnet_report.model
    assert isinstance(mdl, ModelLatency)
    assert mdl.dense_deployed_ms is not None
    assert positive_finite(mdl.torch_dense_ms, mdl.torch_pruned_ms, mdl.native_ms, mdl.dense_deployed_ms)
    # the headline compares with the best dense deployment, not torch eager alone
    assert mdl.best_dense_ms == min(mdl.torch_dense_ms, mdl.dense_deployed_ms)
    assert mdl.speedup == pytest.approx(mdl.best_dense_ms / mdl.native_ms)
    assert mdl.eager_speedup == pytest.approx(mdl.torch_dense_ms / mdl.native_ms)
    assert 0 <= mdl.max_error < 1e-4


@needs_ext
def test_a_bfloat16_row_where_the_cpu_has_bfloat16_kernels(resnet_report):
    mdl = resnet_report.model
    console = Console(record=True, width=250)
    console.print(resnet_report)
    if bf16_refusal() is not None:  # this CPU: no bfloat16 kernels, no row
        assert mdl.dense_bf16_ms is None and mdl.bf16_speedup is None
        assert "bfloat16" not in console.export_text()
        return
    assert positive_finite(mdl.dense_bf16_ms, mdl.native_bf16_ms)
    assert mdl.bf16_speedup == pytest.approx(mdl.dense_bf16_ms / mdl.native_bf16_ms)
    assert mdl.bf16_max_error is not None and 0 <= mdl.bf16_max_error <= 5e-2
    assert "bfloat16: dense / pruned" in console.export_text()


@needs_ext
def test_no_bfloat16_row_without_bfloat16_kernels(resnet, monkeypatch):
    from lightning_winoprune.latency import _measure

    monkeypatch.setattr(_measure, "bf16_refusal", lambda: "precision='bf16' needs a CPU with AVX512-BF16")
    report = measure_latency(resnet, torch.randn(1, 1, 16, 16), **FAST)
    assert report.model is not None and report.model.native_bf16_ms is None and report.model.bf16_max_error is None


@needs_ext
def test_a_refused_bfloat16_model_is_said_in_the_report_not_raised(resnet, monkeypatch):
    from lightning_winoprune.deploy import DeployMismatchError
    from lightning_winoprune.latency import _measure

    real = _measure.deploy

    def deploy(model, x, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("precision") == "bf16":
            raise DeployMismatchError("the bfloat16 model's output differs from the float32 model's by 1.3e-01")
        return real(model, x, **kwargs)

    monkeypatch.setattr(_measure, "bf16_refusal", lambda: None)
    monkeypatch.setattr(_measure, "deploy", deploy)
    report = measure_latency(resnet, torch.randn(1, 1, 16, 16), **FAST)
    assert report.model is not None and report.model.native_bf16_ms is None
    assert report.model.bf16_note.startswith("the bfloat16 model's output differs")
    console = Console(record=True, width=250)
    console.print(report)
    text = console.export_text()
    assert "bfloat16: not deployed" in text and "bfloat16 row: the bfloat16 model's output differs" in text


def test_whole_model_false_leaves_the_model_row_out(resnet):
    report = measure_latency(resnet, torch.randn(1, 1, 16, 16), whole_model=False, backend="torch", **FAST)
    assert report.model is None and report.to_dict()["model"] is None
    assert len(report.layers) == 12
    console = Console(record=True, width=250)
    console.print(report)
    assert "whole model" not in console.export_text()


def test_model_mode_and_thread_count_are_restored(resnet):
    x = torch.randn(1, 1, 16, 16)
    resnet.train()
    measure_latency(resnet, x, whole_model=False, backend="torch", **FAST)
    assert resnet.training
    resnet.eval()
    torch.set_num_threads(2)
    try:
        report = measure_latency(resnet, x, whole_model=False, backend="torch", threads=1, **FAST)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert not resnet.training and report.threads == 1


@needs_ext
def test_depthwise_rows_on_a_deprune_mobilenet(mobilenet):
    report = measure_latency(mobilenet, torch.randn(2, 1, 32, 32), gpu=False, **FAST)
    convs = {n: m for n, m in mobilenet.named_modules() if isinstance(getattr(m, "weight_mask", None), torch.Tensor)}
    assert len(convs) == 17 and [r.name for r in report.layers] == list(convs)
    for row in report.layers:
        conv = convs[row.name]
        assert row.kind == "depthwise"
        assert row.shape.startswith(f"{conv.in_channels} dw ") and row.shape.endswith(f"k3 s{conv.stride[0]}")
        assert row.kept == pytest.approx(conv.weight_mask.float().mean().item())
        assert positive_finite(row.torch_ms, row.pruned_ms, row.fp_equivalent_ms)
        assert row.dense_winograd_ms is None and row.csr_ms is None and row.work is None and row.balanced is None
        assert row.dense_winograd_speedup is None and row.csr_speedup is None
        assert row.speedup == pytest.approx(row.torch_ms / row.pruned_ms)
        assert row.fp_speedup == pytest.approx(row.torch_ms / row.fp_equivalent_ms)
        assert 0 <= row.max_error < 1e-4
    assert any(r.shape.endswith("s2") for r in report.layers)
    assert report.model is not None and report.model.max_error < 1e-4


@needs_ext
def test_mixed_model_skips_unmasked_depthwise_and_layers_off_the_forward_path():
    net = Mixed()
    assert list(pruned_layers(net)) == ["wino", "dw", "unused"]
    report = measure_latency(net, torch.randn(1, 1, 12, 12), **FAST)
    assert [(r.name, r.kind) for r in report.layers] == [("wino", "winograd"), ("dw", "depthwise")]
    wino, dw = report.layers
    assert wino.kept == 1.0 and wino.shape == "8->8 12x12 F(4,3)" and wino.max_error < 1e-3
    assert dw.shape == "8 dw 12x12 k3 s2" and dw.kept == pytest.approx(net.dw.weight_mask.float().mean().item())
    assert report.model is not None and report.model.max_error < 1e-3


def test_gpu_rows_skip_layers_off_the_forward_path():
    # a Winograd layer that the example input never reaches has no captured input: no row, not a KeyError
    assert _gpu_rows({"unused": WinogradConv2d(4, 4)}, {}, repeats=1, warmup=0) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rows_with_cuda(resnet):
    report = measure_latency(resnet, torch.randn(1, 1, 16, 16), whole_model=False, backend="torch", gpu=True,
                             **FAST)
    assert [g.name for g in report.gpu] == [r.name for r in report.layers]
    assert all(positive_finite(g.cudnn_ms, g.compacted_ms) for g in report.gpu)
    assert report.environment["cuda"]


# ------------------------------------------------------------------------------------------ 2. the torch backend
@pytest.mark.filterwarnings("ignore:.*native kernels are unavailable.*:RuntimeWarning")
def test_torch_backend_and_a_missing_extension(resnet, monkeypatch):
    x = torch.randn(1, 1, 16, 16)
    report = measure_latency(resnet, x, backend="torch", **FAST)
    assert len(report.layers) == 12 and report.isa is None  # no native kernel ran
    assert all(positive_finite(r.torch_ms, r.pruned_ms, r.dense_winograd_ms, r.csr_ms) for r in report.layers)
    assert all(r.max_error < 1e-4 for r in report.layers)
    assert report.model is not None and report.model.max_error < 1e-4
    # without the extension, "auto" falls back to torch
    monkeypatch.setattr(_backend, "_probe", lambda: (None, "disabled by the test"))
    assert not native_available()
    report = measure_latency(resnet, x, whole_model=False, **FAST)
    assert len(report.layers) == 12 and report.isa is None and report.environment["native_extension"] is False
    with pytest.raises(RuntimeError, match="disabled by the test"):
        measure_latency(resnet, x, backend="native", **FAST)


# -------------------------------------------------------------------------------------------------- 3. views
@needs_ext
def test_to_json_writes_the_documented_keys(resnet_report, tmp_path):
    path = resnet_report.to_json(tmp_path / "sub" / "latency.json")
    assert path == tmp_path / "sub" / "latency.json" and resnet_report.json_path == path
    data = json.loads(path.read_text())
    assert set(data) == REPORT_KEYS
    assert data["input_size"] == [16, 16] and data["batch_size"] == 2 and data["repeats"] == 2
    assert data["isa"] == native_isa() and data["layer_speedup"] == pytest.approx(resnet_report.layer_speedup)
    assert [row["name"] for row in data["layers"]] == [r.name for r in resnet_report.layers]
    for row, r in zip(data["layers"], resnet_report.layers, strict=True):
        assert set(row) == ROW_KEYS
        assert row["speedup"] == pytest.approx(r.speedup) and row["pruned_ms"] == pytest.approx(r.pruned_ms)
    assert set(data["model"]) == {"torch_dense_ms", "torch_pruned_ms", "native_ms", "max_error", "speedup",
                                  "dense_deployed_ms", "best_dense_ms", "eager_speedup", "dense_bf16_ms",
                                  "native_bf16_ms", "bf16_max_error", "bf16_note", "bf16_speedup"}
    assert data["model"]["speedup"] == pytest.approx(resnet_report.model.speedup)
    assert isinstance(data["gpu"], list) and "torch" in data["environment"]


@needs_ext
def test_plot_writes_a_png(resnet_report, tmp_path):
    path = resnet_report.plot(tmp_path / "plots" / "latency.png")
    assert resnet_report.png_path == path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_empty_report_renders_writes_and_plots(tmp_path):
    report = LatencyReport([], None, 1, (8, 8), 1, None, 2)
    assert report.layer_speedup is None and report.latencies() == {}
    assert json.loads(report.to_json(tmp_path / "e.json").read_text())["layers"] == []
    assert report.plot(tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    console = Console(record=True, width=200)
    console.print(report)
    assert "torch fallback" in console.export_text()


@needs_ext
def test_rich_table_lists_every_layer(resnet_report):
    console = Console(record=True, width=250)
    console.print(resnet_report)
    text = console.export_text()
    assert all(r.name in text for r in resnet_report.layers)
    assert "pruned layers" in text and "whole model" in text and f"ISA {native_isa()}" in text
    assert f"{resnet_report.layers[0].speedup:.2f}x" in text


# ------------------------------------------------------------------------------------------------- 4. errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"example_input": torch.zeros(1, 16, 16)}, r"example_input must be an \(N, C, H, W\) tensor"),
        ({"example_input": [[1.0]]}, r"example_input must be an \(N, C, H, W\) tensor, got None"),
        ({"repeats": 0}, "repeats must be an int >= 1, got 0"),
        ({"repeats": 2.0}, "repeats must be an int >= 1, got 2.0"),
        ({"repeats": True}, "repeats must be an int >= 1, got True"),
        ({"warmup": -1}, "warmup must be an int >= 0, got -1"),
        ({"threads": 0}, "threads must be a positive int or None, got 0"),
        ({"tolerance": 0}, "tolerance must be > 0, got 0"),
        ({"tolerance": float("nan")}, "tolerance must be > 0, got nan"),
        ({"backend": "gpu"}, r"backend='gpu' is not valid; valid values are \['auto', 'native', 'torch'\]"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = {"model": WinogradConv2d(1, 2), "example_input": torch.zeros(1, 1, 4, 4), **FAST, **kwargs}
    with pytest.raises(ValueError, match=match):
        measure_latency(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_gpu_true_without_cuda_raises():
    with pytest.raises(ValueError, match="gpu=True but CUDA is not available"):
        measure_latency(WinogradConv2d(1, 2), torch.zeros(1, 1, 4, 4), gpu=True, **FAST)


@needs_ext
def test_wrong_winograd_kernel_output_is_refused(resnet, monkeypatch):
    original = PackedWinogradConv.__call__
    monkeypatch.setattr(PackedWinogradConv, "__call__", lambda self, x: original(self, x) * 0)
    with pytest.raises(LatencyMismatchError, match=r"layer1\.0\.conv2: the pruned kernel's output differs"):
        measure_latency(resnet, torch.randn(1, 1, 16, 16), **FAST)
    # without the check it times anyway (and reports no error)
    report = measure_latency(resnet, torch.randn(1, 1, 16, 16), check_output=False, whole_model=False, **FAST)
    assert all(r.max_error == 0.0 for r in report.layers)


@needs_ext
def test_slightly_wrong_output_is_refused_by_a_tight_tolerance(resnet, monkeypatch):
    original = PackedWinogradConv.__call__
    monkeypatch.setattr(PackedWinogradConv, "__call__", lambda self, x: original(self, x) * (1 + 1e-3))
    with pytest.raises(LatencyMismatchError, match=r"layer1\.0\.conv2.*tolerance 1e-04"):
        measure_latency(resnet, torch.randn(1, 1, 16, 16), **FAST)
    report = measure_latency(resnet, torch.randn(1, 1, 16, 16), tolerance=1e-2, whole_model=False, **FAST)
    assert all(5e-4 < r.max_error < 2e-3 for r in report.layers)


@needs_ext
def test_wrong_depthwise_kernel_output_is_refused(mobilenet, monkeypatch):
    original = PackedDepthwiseConv.__call__
    monkeypatch.setattr(PackedDepthwiseConv, "__call__", lambda self, x: original(self, x) * 2)
    with pytest.raises(LatencyMismatchError, match=r"blocks\.0\.0\.conv_dw: the pruned depthwise kernel"):
        measure_latency(mobilenet, torch.randn(1, 1, 32, 32), **FAST)


@needs_ext
def test_wrong_whole_model_output_is_refused(resnet, monkeypatch):
    x = torch.randn(1, 1, 16, 16)
    wrong = nn.Sequential(deploy(resnet.eval(), x, tune=False, verbose=False, time_model=False), _Double())
    with pytest.raises(LatencyMismatchError, match="the deployed model differs from the model as trained"):
        measure_latency(resnet, x, deployed=wrong, **FAST)


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_report_path_attributes_are_paths(tmp_path):
    report = LatencyReport([LayerLatency("a", "depthwise", "4 dw 4x4 k3 s1", 0.5, 2.0, None, 1.0, 1.5, None, 0.0)],
                           ModelLatency(4.0, 5.0, 2.0, 0.0), 1, (4, 4), 1, None, 2)
    assert report.layer_speedup == 2.0 and report.model is not None and report.model.speedup == 2.0
    assert isinstance(report.to_json(str(tmp_path / "r.json")), Path)
    assert isinstance(report.plot(str(tmp_path / "r.png")), Path)
