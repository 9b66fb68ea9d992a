"""The bfloat16 Winograd kernels (AMX and AVX512-BF16) and :class:`PackedWinogradConvBf16`, against float32 refs."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_packed import MASK_KINDS, layer_with_mask, reference

from lightning_winoprune.deploy import PackedWinogradConvBf16
from lightning_winoprune.deploy import _packed_bf16 as packed_bf16
from lightning_winoprune.kernels import native_available, native_bf16_path
from lightning_winoprune.winograd import WinogradConv2d

PATHS: list[str] = []  # the bfloat16 paths this CPU runs
if native_available():
    from lightning_winoprune.kernels import _C

    PATHS = list(_C.supported_bf16_paths())
NO_BF16 = ("this CPU has no bfloat16 kernels (it needs AVX512-BF16 or AMX-BF16, and the native extension); "
           "the refusal is tested instead")
needs_bf16 = pytest.mark.skipif(not PATHS, reason=NO_BF16)
#: The documented bound (docs/deploy.md): relative max error of a layer against its float32 output. bfloat16 keeps 8
#: significant bits, so each product carries up to 2^-8 relative error; the F(4,3) output transform multiplies the
#: errors by up to 8. Measured over 300 random layers: F(2,3) median 2.9e-3, max 6.8e-3; F(4,3) median 2.9e-3,
#: max 3.1e-2.
BOUND = {2: 2e-2, 4: 5e-2}


def path_params() -> list:
    """Both paths; the AMX one skipped with the reason where the CPU (or Linux) does not grant it."""
    amx_reason = "this CPU has no AMX-BF16 (or Linux refused the AMX tile state); the AVX512-BF16 path runs instead"
    return [pytest.param("avx512bf16", marks=pytest.mark.skipif("avx512bf16" not in PATHS, reason=NO_BF16)),
            pytest.param("amx", marks=pytest.mark.skipif("amx" not in PATHS, reason=amx_reason))]


def run_path(packed: PackedWinogradConvBf16, x: torch.Tensor, path: str, threads: int = -1) -> torch.Tensor:
    """The layer's kernel on one path (the op always takes the best one)."""
    n, _, h, w = x.shape
    ho, wo = packed.output_size(h, w)
    out = np.zeros((n, packed.out_channels, ho, wo), np.float32)
    _C.winograd_bf16_run(x.numpy(), packed.plan_meta.numpy(), packed.plan_chunks.numpy(),
                         packed.plan_A.numpy().view("uint16"),
                         None if packed.bias is None else packed.bias.numpy(), packed.act_code, packed.padding[0],
                         packed.padding[1], out, threads, path)
    return torch.from_numpy(out)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1.0)


# ------------------------------------------------------------------------------------------------ kernels
@needs_bf16
@pytest.mark.parametrize("path", path_params())
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3), c=st.integers(1, 70), k=st.integers(1, 40), h=st.integers(1, 19), w=st.integers(1, 19),
    pad=st.integers(0, 2), m=st.sampled_from([2, 4]), kind=st.sampled_from(MASK_KINDS), bias=st.booleans(),
    threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16),
)
def test_each_path_matches_the_float32_layer(path, n, c, k, h, w, pad, m, kind, bias, threads, seed):
    assume(h + 2 * pad >= 3 and w + 2 * pad >= 3)
    gen = torch.Generator().manual_seed(seed)
    layer = layer_with_mask(c, k, m, pad, kind, bias, gen)
    x = torch.randn(n, c, h, w, generator=gen)
    packed = PackedWinogradConvBf16.from_layer(layer)
    assert rel(run_path(packed, x, path, threads), reference(layer, x)) <= BOUND[m]


@needs_bf16
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 3), c=st.integers(1, 70), k=st.integers(1, 40), h=st.integers(1, 19), w=st.integers(1, 19),
    pad=st.integers(0, 2), m=st.sampled_from([2, 4]), kind=st.sampled_from(MASK_KINDS), bias=st.booleans(),
    layout=st.sampled_from(["nchw", "channels_last", "slice"]), seed=st.integers(0, 2**16),
)
def test_bfloat16_activations_in_any_layout_come_out_channels_last(n, c, k, h, w, pad, m, kind, bias, layout, seed):
    """What a bfloat16 model passes between layers: NHWC bfloat16 in (read as channel-pair words), NHWC out."""
    assume(h + 2 * pad >= 3 and w + 2 * pad >= 3)
    gen = torch.Generator().manual_seed(seed)
    layer = layer_with_mask(c, k, m, pad, kind, bias, gen)
    x = torch.randn(n, c + 2, h, w, generator=gen).to(torch.bfloat16)
    x = x[:, 1:1 + c] if layout == "slice" else x[:, :c].contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    out = PackedWinogradConvBf16.from_layer(layer)(x)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert out.shape == (n, k, *layer_output(h, w, pad))
    if n:  # the output is rounded to bfloat16 too: 2^-9 more
        assert rel(out.float(), reference(layer, x.float())) <= BOUND[m] + 4e-3


def layer_output(h: int, w: int, pad: int) -> tuple[int, int]:
    return h + 2 * pad - 2, w + 2 * pad - 2


@needs_bf16
@pytest.mark.parametrize("path", path_params())
@pytest.mark.parametrize(("stride_like", "pad"), [((1, 64, 64, 14, 14), 1), ((2, 33, 17, 9, 12), 0)])
def test_a_dense_layer_matches_conv2d(path, stride_like, pad):
    n, c, k, h, w = stride_like
    gen = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(c, k, 3, padding=pad)
    layer = WinogradConv2d.from_conv(conv, m=2)
    x = torch.randn(n, c, h, w, generator=gen)
    with torch.no_grad():
        ref = F.conv2d(x, conv.weight, conv.bias, padding=pad)
    assert rel(run_path(PackedWinogradConvBf16.from_layer(layer), x, path), ref) <= BOUND[2]


@pytest.mark.skipif(len(PATHS) < 2, reason="needs both bfloat16 paths (AMX and AVX512-BF16) on this CPU")
@pytest.mark.parametrize("kind", ["rows", "segments", "cols"])
def test_the_two_paths_round_alike(kind):
    gen = torch.Generator().manual_seed(5)
    layer = layer_with_mask(96, 48, 2, 1, kind, True, gen)
    x = torch.randn(2, 96, 23, 17, generator=gen)
    packed = PackedWinogradConvBf16.from_layer(layer)
    amx, dp = run_path(packed, x, "amx"), run_path(packed, x, "avx512bf16")
    assert rel(amx, dp) <= 1e-5  # the same bfloat16 inputs; only the order of the float32 sums differs


@needs_bf16
@pytest.mark.parametrize("act", ["relu", "relu6", "silu", "hardswish"])
def test_the_fused_activation(act):
    gen = torch.Generator().manual_seed(6)
    layer = layer_with_mask(16, 24, 2, 1, "rows", True, gen)
    x = torch.randn(1, 16, 10, 10, generator=gen)
    packed = PackedWinogradConvBf16.from_layer(layer, act=act)
    fn = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish}[act]
    assert rel(packed(x), fn(reference(layer, x))) <= BOUND[2]


@needs_bf16
def test_rows_pruned_in_whole_tiles_are_never_run():
    """BWSP with the kept rows a multiple of 16 fills whole panels: the work is exactly the kept share."""
    gen = torch.Generator().manual_seed(7)
    k, c = 64, 64
    keep = torch.zeros(16, k, dtype=torch.bool)
    for xi in range(16):
        keep[xi, torch.randperm(k, generator=gen)[:16]] = True
    view = keep.unsqueeze(2).expand(16, k, c).contiguous()
    packed = PackedWinogradConvBf16(torch.randn(16, k, c), view, m=2)
    assert packed.kept_fraction == pytest.approx(0.25)
    assert packed.work_fraction == pytest.approx(0.25)
    # a 32-channel chunk pruned by every row of a panel is skipped too
    view2 = view.clone()
    view2[:, :, 32:] = False
    assert PackedWinogradConvBf16(torch.randn(16, k, c), view2, m=2).work_fraction == pytest.approx(0.125)


@needs_bf16
def test_a_fully_pruned_layer_outputs_its_bias():
    bias = torch.randn(8)
    packed = PackedWinogradConvBf16(torch.randn(16, 8, 5), torch.zeros(16, 8, 5, dtype=torch.bool), m=2, bias=bias)
    out = packed(torch.randn(2, 5, 6, 6))
    assert torch.equal(out, bias.view(1, 8, 1, 1).expand_as(out))


@needs_bf16
def test_threads_calling_at_once_get_their_own_results():
    gen = torch.Generator().manual_seed(8)
    layer = layer_with_mask(32, 32, 2, 1, "rows", True, gen)
    packed = PackedWinogradConvBf16.from_layer(layer)
    xs = [torch.randn(1 + i % 3, 32, 9 + i, 11, generator=gen) for i in range(8)]
    expected = [packed(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(pool.map(packed, xs), expected, strict=True))


@needs_bf16
def test_the_op_has_a_fake_kernel_and_passes_opcheck():
    gen = torch.Generator().manual_seed(9)
    packed = PackedWinogradConvBf16.from_layer(layer_with_mask(8, 12, 2, 1, "rows", True, gen))
    x = torch.randn(2, 8, 7, 9, generator=gen)
    args = (x, packed.plan_meta, packed.plan_chunks, packed.plan_A, packed.bias, 12, 1, 1, 0, -1)
    torch.library.opcheck(torch.ops.winoprune.winograd_conv_bf16.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    program = torch.export.export(packed, (x,))
    assert torch.equal(program.module()(x), packed(x))


# ------------------------------------------------------------------------------------------------ bad input
@needs_bf16
def test_bad_input_is_a_one_line_error():
    gen = torch.Generator().manual_seed(10)
    packed = PackedWinogradConvBf16.from_layer(layer_with_mask(8, 8, 2, 1, "rows", True, gen))
    with pytest.raises(ValueError, match=r"x must be \(N, 8, H, W\)"):
        packed(torch.randn(1, 7, 5, 5))
    with pytest.raises(TypeError, match="float32"):
        packed(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        PackedWinogradConvBf16.from_layer(layer_with_mask(8, 8, 2, 0, "rows", True, gen))(torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError, match=r"path='avx2' is not valid; valid values are \['avx512bf16', 'amx'\]"):
        run_path(packed, torch.randn(1, 8, 5, 5), "avx2")
    with pytest.raises(ValueError, match=r"m=3 is not valid; valid values are \[2, 4\]"):
        PackedWinogradConvBf16(torch.randn(16, 4, 4), m=3)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        PackedWinogradConvBf16(torch.randn(16, 4, 4), torch.ones(16, 4, 4), m=2)


@needs_bf16
@pytest.mark.parametrize(("field", "value", "message"), [
    ("row_map", 10**6, "row_map holds a row out of range"),
    ("chunk", 99, "a chunk index is out of range"),
    ("panel_rows", -3, "panel_rows holds an index out of range"),
    ("A", None, "A is shorter than its chunks need"),
])
def test_a_damaged_plan_is_refused_before_any_read(field, value, message):
    gen = torch.Generator().manual_seed(11)
    packed = PackedWinogradConvBf16.from_layer(layer_with_mask(40, 20, 2, 1, "rows", True, gen))
    meta, chunks, a = packed.plan_meta.clone(), packed.plan_chunks.clone(), packed.plan_A.clone()
    segments = 8  # the header field where the segment offsets start (csrc/bind_winograd_bf16.cpp)
    if field == "row_map":
        meta[int(meta[segments + 3])] = value
    elif field == "panel_rows":
        meta[int(meta[segments + 1])] = value
    elif field == "chunk":
        chunks[0] = value
    else:
        a = a[:100].clone()
    with pytest.raises(ValueError, match=message):
        torch.ops.winoprune.winograd_conv_bf16(torch.randn(1, 40, 6, 6), meta, chunks, a, packed.bias, 20, 1, 1, 0, 1)


# ------------------------------------------------------------------------------------------------ refusal
def test_a_cpu_without_bfloat16_kernels_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(packed_bf16, "native_bf16_path", lambda: None)
    monkeypatch.setattr(packed_bf16, "native_available", lambda: True)
    monkeypatch.setattr(packed_bf16, "native_module", lambda: type("M", (), {"isa": staticmethod(lambda: "avx2")}))
    with pytest.raises(ValueError, match=r"precision='bf16' needs a CPU with AVX512-BF16 .* or AMX-BF16"):
        PackedWinogradConvBf16(torch.randn(16, 4, 4), m=2)


@pytest.mark.skipif(not native_available(), reason="the native extension is not loaded")
def test_the_environment_caps_the_path():
    code = "from lightning_winoprune.kernels import _C, native_bf16_path; print(_C.bf16_path(), native_bf16_path())"
    for cap, want in (("none", "none None"), ("avx512bf16", None)):
        env = {**os.environ, "WINOPRUNE_BF16": cap}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        if want is not None:
            assert out.stdout.split() == want.split()
        else:
            assert out.stdout.split()[0] in ("avx512bf16", "none")
            assert out.stdout.split()[0] != "amx"
    assert native_bf16_path() in (None, "avx512bf16", "amx")
