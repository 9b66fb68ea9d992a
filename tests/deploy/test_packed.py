"""The deployed layers (native kernels via the ``winoprune::`` ops) against plain PyTorch: dense / structured / CSR
Winograd and pruned depthwise, fused activations, bad input, thread safety."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from lightning_winoprune.deploy import PackedDepthwiseConv, PackedWinogradConv, SparseForm
from lightning_winoprune.kernels import native_available, native_isa
from lightning_winoprune.pruning._methods import method_pattern, winograd_mask
from lightning_winoprune.winograd import WinogradConv2d

needs_ext = pytest.mark.skipif(not native_available(), reason="the native extension is not loaded")
if native_available():
    from lightning_winoprune.kernels import _C

    ISAS = list(_C.supported_isas())
else:  # pragma: no cover
    _C, ISAS = None, []

MASK_KINDS = ["dense", "rows", "rows_unbalanced", "cols", "segments", "elements", "empty_position", "none"]


def make_mask(kind: str, p2: int, k: int, c: int, gen: torch.Generator, keep: float = 0.3) -> torch.Tensor:
    """A random keep-mask (p2, K, C) with the structure of one pruning method."""
    if kind == "dense":
        return torch.ones(p2, k, c, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(p2, k, c, dtype=torch.bool)
    if kind == "rows":  # BWSP: the same number of kept rows at every position
        n = max(1, round(k * keep))
        rows = torch.stack([torch.randperm(k, generator=gen)[:n] for _ in range(p2)])
        return torch.zeros(p2, k, dtype=torch.bool).scatter_(1, rows, True).unsqueeze(2).expand(p2, k, c).clone()
    if kind == "rows_unbalanced":  # WSP-R: whole rows, a different count per position
        return (torch.rand(p2, k, 1, generator=gen) < keep).expand(p2, k, c).clone()
    if kind == "cols":  # WSP-C
        return (torch.rand(p2, 1, c, generator=gen) < keep).expand(p2, k, c).clone()
    if kind == "segments":  # ABWSP's row segments of 4
        seg = torch.rand(p2, k, -(-c // 4), generator=gen) < keep
        return seg.repeat_interleave(4, dim=2)[:, :, :c].clone()
    if kind == "elements":  # WWP
        return torch.rand(p2, k, c, generator=gen) < keep
    if kind == "empty_position":  # one position fully pruned, the others dense
        mask = torch.ones(p2, k, c, dtype=torch.bool)
        mask[p2 // 2] = False
        return mask
    raise AssertionError(kind)


def reference(layer: WinogradConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's own pure-torch Winograd forward (tested against F.conv2d elsewhere)."""
    layer.backend = layer.backend.parse("torch")
    with torch.no_grad():
        return layer(x)


def layer_with_mask(c: int, k: int, m: int, pad: int, mask_kind: str, bias: bool, gen: torch.Generator
                    ) -> WinogradConv2d:
    layer = WinogradConv2d(c, k, m=m, padding=pad, bias=bias)
    p2 = (m + 2) ** 2
    view = make_mask(mask_kind, p2, k, c, gen)
    layer.set_mask(view.reshape(m + 2, m + 2, k, c).permute(2, 3, 0, 1))
    return layer


def close(a: torch.Tensor, b: torch.Tensor, m: int) -> None:
    tol = 1e-5 if m == 2 else 1e-4
    scale = max(float(b.abs().max()), 1.0)
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max()) / scale


# ------------------------------------------------------------------------------------------------ Winograd
@needs_ext
@given(
    n=st.integers(1, 3), c=st.integers(1, 37), k=st.integers(1, 37), h=st.integers(1, 19), w=st.integers(1, 19),
    pad=st.integers(0, 2), m=st.sampled_from([2, 4]), kind=st.sampled_from(MASK_KINDS),
    form=st.sampled_from(["structured", "csr"]), bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_native_winograd_matches_torch(n, c, k, h, w, pad, m, kind, form, bias, seed):
    assume(h + 2 * pad >= 3 and w + 2 * pad >= 3)  # a too-small input is an error, tested on its own
    gen = torch.Generator().manual_seed(seed)
    layer = layer_with_mask(c, k, m, pad, kind, bias, gen)
    x = torch.randn(n, c, h, w, generator=gen)
    packed = PackedWinogradConv.from_layer(layer, form=form, backend="native")
    close(packed(x), reference(layer, x), m)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("kind", ["dense", "rows", "cols", "segments"])
def test_every_isa_agrees(isa, m, kind, monkeypatch):
    """Each compiled ISA variant (generic, AVX2, AVX-512) on sizes that are not multiples of 16 or 32."""
    gen = torch.Generator().manual_seed(1)
    layer = layer_with_mask(19, 45, m, 1, kind, True, gen)
    x = torch.randn(2, 19, 23, 17, generator=gen)
    monkeypatch.setenv("WINOPRUNE_ISA", isa)
    packed = PackedWinogradConv.from_layer(layer, backend="native")
    assert packed.isa == isa
    close(packed(x), reference(layer, x), m)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize(("n", "h", "w", "pad"), [(1, 5, 150, 1), (2, 7, 131, 0), (1, 4, 137, 2)])
def test_wide_rows_use_vector_runs(isa, m, n, h, w, pad, monkeypatch):
    """Rows of >= 16 tiles: the contiguous-load / interleaved-store paths, with their edges on the gather path."""
    gen = torch.Generator().manual_seed(6)
    layer = layer_with_mask(7, 13, m, pad, "rows", True, gen)
    x = torch.randn(n, 7, h, w, generator=gen)
    monkeypatch.setenv("WINOPRUNE_ISA", isa)
    close(PackedWinogradConv.from_layer(layer, backend="native")(x), reference(layer, x), m)


@needs_ext
@pytest.mark.parametrize("m", [2, 4])
def test_dense_equals_conv2d_and_threads_agree(m):
    conv = nn.Conv2d(24, 40, 3, padding=1)
    layer = WinogradConv2d.from_conv(conv, m)
    x = torch.randn(3, 24, 30, 29)
    outs = []
    for threads in (1, 2):
        packed = PackedWinogradConv.from_layer(layer, backend="native", threads=threads)
        outs.append(packed(x).clone())
        close(outs[-1], F.conv2d(x, conv.weight, conv.bias, padding=1).detach(), m)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)


@needs_ext
def test_few_and_many_blocks_and_batch_one():
    """Tiny maps (threads share one tile block) and large ones (a block per thread) both match."""
    gen = torch.Generator().manual_seed(2)
    for h, n in ((3, 1), (7, 1), (40, 2)):
        layer = layer_with_mask(33, 70, 2, 1, "rows", True, gen)
        x = torch.randn(n, 33, h, h, generator=gen)
        close(PackedWinogradConv.from_layer(layer, backend="native", threads=2)(x), reference(layer, x), 2)


@needs_ext
def test_fully_pruned_layer_outputs_bias():
    layer = WinogradConv2d(5, 6, m=2)
    layer.set_mask(torch.zeros_like(layer.weight, dtype=torch.bool))
    x = torch.randn(1, 5, 8, 8)
    for form in SparseForm:
        out = PackedWinogradConv.from_layer(layer, form=form, backend="native")(x)
        assert layer.bias is not None
        torch.testing.assert_close(out, layer.bias.detach().view(1, 6, 1, 1).expand_as(out))


@needs_ext
def test_structured_work_follows_the_mask():
    gen = torch.Generator().manual_seed(3)
    layer = layer_with_mask(64, 96, 2, 1, "rows", False, gen)  # 29 of 96 rows per position, panels of 12 or 6
    packed = PackedWinogradConv.from_layer(layer, backend="native")
    assert packed.balanced
    assert packed.kept_fraction == pytest.approx(29 / 96)
    assert packed.kept_fraction <= packed.work_fraction < packed.kept_fraction + 12 / 96
    dense = PackedWinogradConv.from_layer(layer, backend="native", dense=True)
    assert dense.work_fraction == 1.0


@pytest.mark.parametrize("kind", ["rows", "rows_unbalanced", "cols", "elements", "dense"])
@pytest.mark.parametrize("form", ["structured", "csr"])
def test_torch_path_matches(kind, form):
    """The torch path (also the GPU path: compacted bmm) gives the layer's output."""
    gen = torch.Generator().manual_seed(4)
    layer = layer_with_mask(12, 20, 2, 1, kind, True, gen)
    x = torch.randn(2, 12, 9, 10, generator=gen)
    packed = PackedWinogradConv.from_layer(layer, form=form, backend="torch")
    assert packed.backend.value == "torch"
    close(packed(x), reference(layer, x), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_torch_path_on_cuda():  # pragma: no cover - runs on GPU machines only
    gen = torch.Generator().manual_seed(5)
    layer = layer_with_mask(32, 64, 2, 1, "rows", True, gen)
    x = torch.randn(2, 32, 14, 14, generator=gen)
    packed = PackedWinogradConv.from_layer(layer, backend="torch")
    close(packed(x.cuda()).cpu(), reference(layer, x), 2)


# ------------------------------------------------------------------------------------------------ depthwise
@needs_ext
@given(
    n=st.integers(1, 2), c=st.integers(1, 37), h=st.integers(1, 21), w=st.integers(1, 21),
    ksize=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]), pad=st.integers(0, 2),
    keep=st.sampled_from([0.0, 0.3, 0.7, 1.0]), bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_native_depthwise_matches_conv2d(n, c, h, w, ksize, stride, pad, keep, bias, seed):
    assume(h + 2 * pad >= ksize and w + 2 * pad >= ksize)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c, 1, ksize, ksize, generator=gen)
    mask = torch.rand(c, 1, ksize, ksize, generator=gen) < keep
    b = torch.randn(c, generator=gen) if bias else None
    x = torch.randn(n, c, h, w, generator=gen)
    packed = PackedDepthwiseConv(weight, mask, stride, pad, b, backend="native")
    ref = F.conv2d(x, weight * mask, b, stride, pad, groups=c)
    torch.testing.assert_close(packed(x), ref, rtol=1e-5, atol=1e-5)


@needs_ext
def test_depthwise_from_conv_uses_weight_mask():
    conv = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
    conv.register_buffer("weight_mask", torch.rand_like(conv.weight) < 0.3)
    x = torch.randn(2, 16, 15, 15)
    packed = PackedDepthwiseConv.from_conv(conv, backend="native")
    assert packed.kept_fraction == pytest.approx(float(conv.weight_mask.float().mean()))
    ref = F.conv2d(x, conv.weight * conv.weight_mask, conv.bias, 2, 1, groups=16)
    torch.testing.assert_close(packed(x), ref.detach(), rtol=1e-5, atol=1e-5)


def test_depthwise_dr_metadata_follows_the_mask():
    from lightning_winoprune.pruning._depthwise import depthwise_mask

    w = torch.randn(70, 1, 3, 3)
    mask = depthwise_mask(w, 0.7, "dcp-bh").mask
    meta = PackedDepthwiseConv(w, mask, backend="torch").dr_metadata(32)
    assert [m["channels"] for m in meta] == [(0, 32), (32, 32), (64, 6)]
    assert sum(len(m["kept_columns"]) for m in meta) == int(mask.sum())
    assert meta[0]["aligned"] and meta[1]["aligned"]  # HSR: kept columns a multiple of the tile in full sub-GEMMs


@needs_ext
def test_outputs_are_fresh_tensors():
    layer = layer_with_mask(6, 10, 2, 1, "rows", True, torch.Generator().manual_seed(7))
    packed = PackedWinogradConv.from_layer(layer, backend="native")
    x = torch.randn(2, 6, 9, 9)
    first, second = packed(x), packed(x)
    assert first is not second and first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first, second)
    close(first, reference(layer, x), 2)


def test_depthwise_from_conv_refuses_non_depthwise():
    with pytest.raises(ValueError, match="depthwise"):
        PackedDepthwiseConv.from_conv(nn.Conv2d(4, 8, 3, groups=4))
    with pytest.raises(ValueError, match="dilation"):
        PackedDepthwiseConv.from_conv(nn.Conv2d(4, 4, 3, groups=4, dilation=2))


# ------------------------------------------------------------------------------------------------ bad input
@needs_ext
def test_python_api_rejects_bad_input():
    layer = WinogradConv2d(4, 6, m=2)
    packed = PackedWinogradConv.from_layer(layer, backend="native")
    with pytest.raises(ValueError, match=r"x must be \(N, 4, H, W\)"):
        packed(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="x must be a tensor"):
        packed(np.zeros((1, 4, 8, 8), np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        PackedWinogradConv(layer.weight, m=2, padding=0)(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"m=3 is not valid; valid values are \[2, 4\]"):
        PackedWinogradConv(layer.weight, m=3)
    with pytest.raises(ValueError, match=r"weight must be \(K, C, 6, 6\)"):
        PackedWinogradConv(layer.weight, m=4)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        PackedWinogradConv(layer.weight, torch.ones_like(layer.weight), m=2)
    with pytest.raises(ValueError, match="form"):
        PackedWinogradConv(layer.weight, m=2, form="coo")
    with pytest.raises(ValueError, match="threads must be a positive int or -1"):
        PackedWinogradConv(layer.weight, m=2, threads=0)
    with pytest.raises(ValueError, match=r"padding must be a non-negative int"):
        PackedWinogradConv(layer.weight, m=2, padding=-1)
    with pytest.raises(ValueError, match="backend='native' needs CPU float32"):
        PackedWinogradConv(layer.weight.double(), m=2, backend="native")
    with pytest.raises(ValueError, match=r"x must be \(N, 3, H, W\)"):
        PackedDepthwiseConv(torch.randn(3, 1, 3, 3))(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"depthwise \(C, 1, kh, kw\)"):
        PackedDepthwiseConv(torch.randn(3, 2, 3, 3))


@needs_ext
@pytest.mark.parametrize(("n", "h", "threads"), [(1, 7, 2), (4, 20, 2), (2, 9, 1)])  # shared block / per thread
@pytest.mark.parametrize("amount", [0.0, 0.7])
def test_winograd_profile_computes_what_run_computes_and_times_every_stage(n, h, threads, amount):
    gen = torch.Generator().manual_seed(n * h)
    u = torch.randn(12, 8, 4, 4, generator=gen)
    mask = None if amount == 0 else winograd_mask(u, amount, method_pattern("bwsp"))[0]
    pk = PackedWinogradConv(u, mask, 2, 1, backend="native", act="relu")
    x = torch.randn(n, 8, h, h, generator=gen)
    arrays = [t.numpy() for t in (pk.plan_meta, pk.plan_cols, pk.plan_vals, pk.plan_acc)]
    run_out, prof_out = torch.empty(n, 12, h, h), torch.empty(n, 12, h, h)
    _C.winograd_run(x.numpy(), *arrays, None, pk.act_code, 1, 1, run_out.numpy(), threads)
    stages = _C.winograd_profile(x.numpy(), *arrays, None, pk.act_code, 1, 1, prof_out.numpy(), threads)
    assert torch.equal(prof_out, run_out) and torch.equal(run_out, pk(x))
    assert set(stages) == {"input", "gemm", "output"} and all(v > 0 for v in stages.values())
    with pytest.raises(ValueError, match="threads must be >= 1 or -1"):
        _C.winograd_profile(x.numpy(), *arrays, None, 0, 1, 1, prof_out.numpy(), 0)


@needs_ext
def test_fma_peak_is_measured_and_checks_its_arguments():
    one = _C.fma_peak_gflops(1, 200_000)
    assert one > 0.5  # even the portable build does a multiply and an add per lane per cycle or so
    assert _C.fma_peak_gflops(threads=2, iters=200_000) > 0.5
    with pytest.raises(ValueError, match="iters must be a positive int, got 0"):
        _C.fma_peak_gflops(1, 0)
    with pytest.raises(ValueError, match="threads must be >= 1 or -1"):
        _C.fma_peak_gflops(0)


@needs_ext
def test_extension_rejects_bad_buffers():
    u = np.zeros((16, 4, 3), np.float32)
    mask = np.ones((16, 4, 3), bool)
    with pytest.raises(TypeError, match="U must have dtype float32"):
        _C.pack_winograd(u.astype(np.float64), mask, 2)
    with pytest.raises(TypeError, match="mask must have dtype bool"):
        _C.pack_winograd(u, mask.astype(np.float32), 2)
    with pytest.raises(ValueError, match=r"mask must have shape \(16, 4, 3\)"):
        _C.pack_winograd(u, np.ascontiguousarray(mask[:, :3]), 2)
    with pytest.raises(ValueError, match=r"U must be \(p\*p, K, C\)"):
        _C.pack_winograd(u[:9], mask[:9], 2)
    with pytest.raises(ValueError, match="m=6 is not valid"):
        _C.pack_winograd(u, mask, 6)
    arrays = _C.pack_winograd(u, mask, 2)
    info = _C.winograd_plan_info(arrays[0])
    assert (info.p, info.m, info.K, info.C, info.csr, info.kept, info.balanced) == (4, 2, 4, 3, False, 192, True)
    assert info.isa == _C.isa()
    x = np.zeros((1, 3, 6, 6), np.float32)
    out = np.zeros((1, 4, 6, 6), np.float32)

    def run(x_: object, out_: object, pad: int = 1, threads: int = -1) -> None:
        _C.winograd_run(x_, *arrays, None, 0, pad, 1, out_, threads)

    run(x, out)
    with pytest.raises(TypeError, match="x must be C-contiguous"):
        run(np.zeros((1, 3, 6, 12), np.float32)[..., ::2], out)
    with pytest.raises(TypeError, match="x must have dtype float32"):
        run(x.astype(np.float64), out)
    with pytest.raises(TypeError, match="out must be a numpy array"):
        run(x, [0.0])
    with pytest.raises(ValueError, match="x must have 3 channels"):
        run(np.zeros((1, 2, 6, 6), np.float32), out)
    with pytest.raises(ValueError, match=r"out must have shape \(1, 4, 6, 6\)"):
        run(x, np.zeros((2, 4, 6, 6), np.float32))
    with pytest.raises(ValueError, match="does not match the input"):
        run(x, np.zeros((1, 4, 12, 12), np.float32))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        run(x, out, pad=-1)
    with pytest.raises(ValueError, match="threads must be >= 1 or -1"):
        run(x, out, threads=0)
    with pytest.raises(ValueError, match=r"act must be in \[0, 5\)"):
        _C.winograd_run(x, *arrays, None, 5, 1, 1, out)
    with pytest.raises(ValueError, match="unknown format"):
        _C.winograd_plan_info(np.zeros(4, np.int64))
    dw = _C.pack_depthwise(np.zeros((3, 3, 3), np.float32), np.ones((3, 3, 3), bool))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        _C.pack_depthwise(np.zeros((3, 3, 3), np.float32), np.ones((3, 3, 3), bool), 0)
    with pytest.raises(ValueError, match=r"weight must be 3-D"):
        _C.pack_depthwise(np.zeros((3, 3), np.float32), np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="x must have 3 channels"):
        _C.depthwise_run(np.zeros((1, 4, 6, 6), np.float32), *dw, None, 0, 1, 1, np.zeros((1, 4, 6, 6), np.float32))
    with pytest.raises(ValueError, match=r"out must have shape \(1, 3, 6, 6\)"):
        _C.depthwise_run(x, *dw, None, 0, 1, 1, np.zeros((1, 4, 6, 6), np.float32))


@needs_ext
def test_native_isa_is_reported():
    assert native_isa() in ("generic", "avx2", "avx512")
    assert native_isa() in ISAS


# ------------------------------------------------------------------------------------------- fused activations
ACTS = {"none": lambda y: y, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish}


@needs_ext
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("m", [2, 4])
def test_winograd_fused_activation_matches_torch(act, m):
    layer = layer_with_mask(5, 7, m, 1, "rows_unbalanced", True, torch.Generator().manual_seed(3))
    x = torch.randn(2, 5, 11, 6)
    packed = PackedWinogradConv.from_layer(layer, backend="native", act=act)
    close(packed(x), ACTS[act](reference(layer, x)), m)
    torch_path = PackedWinogradConv.from_layer(layer, backend="torch", act=act)
    close(torch_path(x), ACTS[act](reference(layer, x)), m)


@needs_ext
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_depthwise_fused_activation_matches_torch(act, stride):
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(6, 1, 3, 3, generator=gen), torch.randn(6, generator=gen)
    mask = torch.rand(6, 1, 3, 3, generator=gen) < 0.5
    x = torch.randn(2, 6, 10, 9, generator=gen)
    ref = ACTS[act](F.conv2d(x, w * mask, b, stride, 1, groups=6))
    for backend in ("native", "torch"):
        out = PackedDepthwiseConv(w, mask, stride, 1, b, backend=backend, act=act)(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_activation_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"act.*gelu.*relu6"):
        PackedWinogradConv(torch.randn(4, 3, 4, 4), act="gelu")


# ------------------------------------------------------------------------------------------------ edge semantics
@needs_ext
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_empty_batch_returns_an_empty_tensor_like_conv2d(backend):
    layer = layer_with_mask(4, 6, 2, 1, "rows", True, torch.Generator().manual_seed(0))
    x = torch.randn(0, 4, 8, 8)
    out = PackedWinogradConv.from_layer(layer, backend=backend)(x)
    assert out.shape == F.conv2d(x, torch.randn(6, 4, 3, 3), padding=1).shape
    dw = PackedDepthwiseConv(torch.randn(4, 1, 3, 3), backend=backend, stride=2)(x)
    assert dw.shape == F.conv2d(x, torch.randn(4, 1, 3, 3), stride=2, padding=1, groups=4).shape


@needs_ext
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_nan_in_pruned_weights_never_reaches_the_output(backend):
    """The project's rule: pruned weights are absent, whatever value is stored under the mask."""
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(6, 4, 4, 4, generator=gen)
    mask = torch.rand(6, 4, 4, 4, generator=gen) < 0.5
    x = torch.randn(1, 4, 7, 7, generator=gen)
    clean = PackedWinogradConv(torch.where(mask, u, 0.0), mask, backend=backend)(x)
    dirty = PackedWinogradConv(torch.where(mask, u, float("nan")), mask, backend=backend)(x)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean)
    w = torch.randn(4, 1, 3, 3, generator=gen)
    dmask = torch.rand(4, 1, 3, 3, generator=gen) < 0.5
    dw = PackedDepthwiseConv(torch.where(dmask, w, float("nan")), dmask, backend=backend)(x)
    torch.testing.assert_close(dw, F.conv2d(x, torch.where(dmask, w, 0.0), padding=1, groups=4))


# ---------------------------------------------------------------------------------------------------- threads
@needs_ext
@pytest.mark.parametrize("omp", [1, 2])
def test_one_layer_hammered_from_four_threads_is_always_right(omp):
    """Before: one shared output/workspace buffer gave wrong outputs in up to 596 of 600 calls from 2 threads."""
    layer = layer_with_mask(32, 48, 2, 1, "rows", True, torch.Generator().manual_seed(2))
    packed = PackedWinogradConv.from_layer(layer, backend="native")
    dw = PackedDepthwiseConv(torch.randn(32, 1, 3, 3), torch.rand(32, 1, 3, 3) < 0.5, 1, 1, backend="native")
    from lightning_winoprune.deploy import NativeMaxPool2d

    pool = NativeMaxPool2d(3, 2, 1)
    inputs = [torch.randn(int(n), 32, int(h), int(h)) for n, h in zip([1, 2, 1, 3] * 3, [9, 14, 20, 7] * 3,
                                                                        strict=True)]
    expected = [(packed(x), dw(x), pool(x)) for x in inputs]
    errors: list[str] = []

    def worker(tid: int) -> None:
        torch.set_num_threads(1 + (tid + omp) % 2)  # threads with different OpenMP settings
        for rep in range(15):
            for i, x in enumerate(inputs):
                got = (packed(x), dw(x), pool(x))
                if not all(torch.equal(a, b) for a, b in zip(got, expected[i], strict=True)):
                    errors.append(f"thread {tid} rep {rep} input {i}")

    with ThreadPoolExecutor(4) as workers:
        list(workers.map(worker, range(4)))  # re-raises a worker's exception
    assert not errors, errors[:5]


# ----------------------------------------------------------------------------------------- packed plan arrays
@needs_ext
def test_damaged_plan_arrays_raise_instead_of_crashing():
    layer = layer_with_mask(6, 10, 2, 1, "segments", True, torch.Generator().manual_seed(9))
    packed = PackedWinogradConv.from_layer(layer, backend="native")
    x = torch.randn(1, 6, 8, 8)
    good = packed.state_dict()
    for key, damage in [("plan_meta", lambda t: t.__setitem__(1, 5)),          # p
                        ("plan_meta", lambda t: t.__setitem__(3, 7)),          # panel height
                        ("plan_meta", lambda t: t.__setitem__(int(t[16]) + 3, 10**9)),  # panel_begin
                        ("plan_cols", lambda t: t.fill_(10**6)),              # column index
                        ("plan_meta", lambda t: t.__setitem__(int(t[19]) + 1, 999))]:  # a panel row
        state = {k: v.clone() for k, v in good.items()}
        damage(state[key])
        broken = PackedWinogradConv.from_layer(layer, backend="native")
        broken.load_state_dict(state)
        with pytest.raises(ValueError, match="invalid packed plan"):
            broken(x)
    dw = PackedDepthwiseConv(torch.randn(4, 1, 3, 3), torch.rand(4, 1, 3, 3) < 0.5, backend="native")
    state = {k: v.clone() for k, v in dw.state_dict().items()}
    state["plan_taps"].fill_(7)
    dw.load_state_dict(state)
    with pytest.raises(ValueError, match="invalid packed plan: a tap lies outside the kernel"):
        dw(torch.randn(1, 4, 6, 6))


@needs_ext
def test_native_layers_need_cpu_float32_inputs():
    packed = PackedWinogradConv(torch.randn(4, 3, 4, 4), backend="native")
    with pytest.raises(TypeError, match="CPU float32"):
        packed(torch.randn(1, 3, 6, 6, dtype=torch.float64))


@needs_ext
def test_backward_through_a_deployed_layer_is_a_clear_error():
    packed = PackedWinogradConv(torch.randn(4, 3, 4, 4), backend="native")
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    y = packed(x)
    with pytest.raises(RuntimeError, match="inference only"):
        y.sum().backward()


# ----------------------------------------------------------------------------------------------------- pooling
@needs_ext
@given(n=st.integers(0, 2), c=st.integers(1, 5), h=st.integers(1, 17), w=st.integers(1, 17), k=st.integers(1, 5),
       stride=st.integers(1, 3), pad=st.integers(0, 2), nan=st.booleans(), seed=st.integers(0, 2**16))
def test_native_max_pool_matches_torch(n, c, h, w, k, stride, pad, nan, seed):
    from lightning_winoprune.deploy import NativeMaxPool2d

    assume(2 * pad <= k and h + 2 * pad >= k and w + 2 * pad >= k)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    if nan and x.numel():
        x.view(-1)[0] = float("nan")  # NaN propagates, as in PyTorch
    got = NativeMaxPool2d(k, stride, pad)(x)
    torch.testing.assert_close(got, F.max_pool2d(x, k, stride, pad), equal_nan=True, rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize(("h", "w"), [(2, 2), (7, 9), (16, 16), (33, 18)])
@pytest.mark.parametrize("nan_at", [None, (0, 0), (1, 1), (-1, -1)])
def test_native_2x2_stride_2_pool_matches_torch(h, w, nan_at):
    """VGG's pools take a direct path (no padded row copy): odd sizes drop the last row / column, NaN propagates."""
    from lightning_winoprune.deploy import NativeMaxPool2d

    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    if nan_at is not None:
        x[1, 2, nan_at[0], nan_at[1]] = float("nan")
    got = NativeMaxPool2d(2, 2, 0)(x)
    torch.testing.assert_close(got, F.max_pool2d(x, 2, 2, 0), equal_nan=True, rtol=0, atol=0)


def test_native_max_pool_refuses_what_it_cannot_run():
    from lightning_winoprune.deploy import NativeMaxPool2d

    with pytest.raises(ValueError, match="only dilation-1, floor-mode max pooling"):
        NativeMaxPool2d.from_module(nn.MaxPool2d(3, 2, ceil_mode=True))
    with pytest.raises(ValueError, match="padding must be at most half the kernel"):
        NativeMaxPool2d(2, 2, 2)


@pytest.mark.parametrize("route", ["eager", "gemm", "linear", "onednn"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_routes_match_conv2d(route, n, bias):
    from lightning_winoprune.deploy import DenseConv
    from lightning_winoprune.deploy._ops import onednn_available

    if route == "onednn" and not onednn_available():
        pytest.skip("no oneDNN in this torch build")
    gen = torch.Generator().manual_seed(4)
    k = 1 if route == "gemm" else 5
    w = torch.randn(7, 6, k, k, generator=gen)
    b = torch.randn(7, generator=gen) if bias else None
    x = torch.randn(n, 6, 5, 5, generator=gen)
    out = DenseConv(w, b, route=route, act="relu6")(x)
    torch.testing.assert_close(out, F.relu6(F.conv2d(x, w, b)), rtol=1e-5, atol=1e-5)


def test_dense_route_refuses_shapes_it_cannot_run():
    from lightning_winoprune.deploy import DenseConv

    with pytest.raises(ValueError, match="route='gemm' needs a 1x1 stride-1"):
        DenseConv(torch.randn(4, 3, 3, 3), None, route="gemm")
    with pytest.raises(ValueError, match="route='linear' needs an ungrouped conv without padding"):
        DenseConv(torch.randn(4, 3, 3, 3), None, padding=(1, 1), route="linear")
    with pytest.raises(ValueError, match=r"route.*'pooling'.*'gemm'"):
        DenseConv(torch.randn(4, 3, 3, 3), None, route="pooling")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_route_reduced_precision_channels_last_grouped_is_right(dtype):
    """Found by fuzzing: torch 2.14's own bfloat16 grouped conv of a channels-last input is wrong for some small
    shapes with one thread (relative error up to 1.2); the torch routes accumulate CPU float16/bfloat16 in float32."""
    from lightning_winoprune.deploy import DenseConv

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in range(5):
            gen = torch.Generator().manual_seed(seed)
            x, w = torch.randn(1, 2, 2, 2, generator=gen), torch.randn(4, 1, 3, 3, generator=gen)
            ref = F.conv2d(x.double(), w.double(), None, (1, 2), (1, 1), 1, 2)
            for route in ("eager", "onednn"):
                layer = DenseConv(w, None, stride=(1, 2), padding=(1, 1), groups=2, route=route)
                out = layer(x.to(dtype).to(memory_format=torch.channels_last))
                assert out.dtype == dtype
                err = float((out.double() - ref).abs().max() / ref.abs().max())
                assert err < 2e-2, f"{route} seed {seed}: relative error {err:.3f}"
    finally:
        torch.set_num_threads(before)
