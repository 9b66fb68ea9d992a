"""Tile transforms: native vs torch, independent loop references, and exact adjoint identities."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from lightning_winoprune.kernels import native_available
from lightning_winoprune.winograd import (
    SUPPORTED_M,
    filter_transform,
    get_transforms,
    input_transform,
    input_transform_adjoint,
    output_transform,
    output_transform_adjoint,
    tile_geometry,
)

needs_native = pytest.mark.skipif(not native_available(), reason="the native extension is not loaded")
BACKENDS = ["torch", pytest.param("native", marks=needs_native)]


# ----------------------------------------------------------------------------------------------- helpers
def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """max|a - e| <= rel * max(1, max|e|)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.1e} * {scale:.3e}"


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


def _ref_input_transform(x: torch.Tensor, m: int, geom) -> torch.Tensor:
    """Explicit per-tile loop in float64: V[i*p+j, c, (n, ty, tx)] = (B^T d B)[i, j]."""
    t = get_transforms(m, torch.float64)
    p = m + 2
    n, c, h, w = x.shape
    ph, pw = geom.pad
    th, tw = geom.tiles
    xp = torch.zeros(n, c, th * m + 2 + ph, tw * m + 2 + pw, dtype=torch.float64)
    xp[:, :, ph : ph + h, pw : pw + w] = x.double()
    out = torch.empty(p * p, c, n * th * tw, dtype=torch.float64)
    for ni in range(n):
        for ty in range(th):
            for tx in range(tw):
                d = xp[ni, :, ty * m : ty * m + p, tx * m : tx * m + p]  # (C, p, p)
                v = t.BT @ d @ t.BT.T
                out[:, :, (ni * th + ty) * tw + tx] = v.permute(1, 2, 0).reshape(p * p, c)
    return out


def _ref_output_transform(mm: torch.Tensor, m: int, geom, batch: int, bias=None) -> torch.Tensor:
    t = get_transforms(m, torch.float64)
    p = m + 2
    k = mm.shape[1]
    ho, wo = geom.out_size
    th, tw = geom.tiles
    y = torch.zeros(batch, k, th * m, tw * m, dtype=torch.float64)
    for ni in range(batch):
        for ty in range(th):
            for tx in range(tw):
                tile = mm[:, :, (ni * th + ty) * tw + tx].double().reshape(p, p, k).permute(2, 0, 1)
                y[ni, :, ty * m : ty * m + m, tx * m : tx * m + m] = t.AT @ tile @ t.AT.T
    y = y[:, :, :ho, :wo]
    return y if bias is None else y + bias.double().view(1, k, 1, 1)


@st.composite
def geometries(draw):
    m = draw(st.sampled_from(SUPPORTED_M))
    h = draw(st.integers(1, 9))
    w = draw(st.integers(1, 9))
    ph = draw(st.integers(max(0, (3 - h + 1) // 2), 2))
    pw = draw(st.integers(max(0, (3 - w + 1) // 2), 2))
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    k = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    return m, n, c, k, h, w, (ph, pw), seed


# ----------------------------------------------------------------------------------------------- geometry
def test_tile_geometry_values() -> None:
    g = tile_geometry(7, 5, (1, 0), 2)
    assert tuple(g) == (1, 0, 7, 3, 4, 2)
    assert g.pad == (1, 0) and g.out_size == (7, 3) and g.tiles == (4, 2)
    g4 = tile_geometry(8, 8, (1, 1), 4)
    assert g4.out_size == (8, 8) and g4.tiles == (2, 2)
    g6 = tile_geometry(1, 1, (1, 1), 6)
    assert g6.out_size == (1, 1) and g6.tiles == (1, 1)


@pytest.mark.parametrize(("h", "w", "pad"), [(2, 5, (0, 0)), (5, 1, (0, 0)), (1, 1, (0, 1)), (0, 4, (1, 1))])
def test_tile_geometry_too_small(h: int, w: int, pad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        tile_geometry(h, w, pad, 2)


# ----------------------------------------------------------------------------------------------- filter transform
@pytest.mark.parametrize("m", SUPPORTED_M)
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_filter_transform_native_torch_and_reference(m: int, lead: tuple[int, ...]) -> None:
    g = torch.randn(*lead, 3, 3)
    t = get_transforms(m, torch.float64)
    ref = (t.G @ g.double() @ t.G.T).float()
    out_t = filter_transform(g, m, "torch")
    assert out_t.shape == (*lead, m + 2, m + 2) and out_t.dtype == torch.float32
    torch.testing.assert_close(out_t, ref, rtol=1e-6, atol=1e-7)
    if native_available():
        out_n = filter_transform(g, m, "native")
        assert out_n.shape == ref.shape and out_n.dtype == torch.float32
        torch.testing.assert_close(out_n, ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(filter_transform(g, m, "auto"), out_n, rtol=0, atol=0)


def test_filter_transform_float64_stays_float64() -> None:
    g = torch.randn(2, 3, 3, dtype=torch.float64)
    out = filter_transform(g, 2)  # auto -> torch for float64
    assert out.dtype == torch.float64
    t = get_transforms(2, torch.float64)
    torch.testing.assert_close(out, t.G @ g @ t.G.T, rtol=0, atol=1e-15)


def test_filter_transform_noncontiguous_input() -> None:
    g = torch.randn(3, 3, 4).permute(2, 0, 1)  # (4, 3, 3) non-contiguous
    assert not g.is_contiguous()
    for b in ("torch", *(("native",) if native_available() else ())):
        torch.testing.assert_close(filter_transform(g, 4, b), filter_transform(g.contiguous(), 4, "torch"))


def test_filter_transform_errors() -> None:
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        filter_transform([[0.0] * 3] * 3, 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        filter_transform(torch.ones(3, 3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\)"):
        filter_transform(torch.ones(2, 5, 5), 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\)"):
        filter_transform(torch.ones(3), 2)
    with pytest.raises(ValueError, match="not supported"):
        filter_transform(torch.ones(3, 3), 3)
    if native_available():
        with pytest.raises(ValueError, match="CPU float32"):
            filter_transform(torch.ones(3, 3, dtype=torch.float64), 2, "native")


# ----------------------------------------------------------------------------------------------- forward agreement
@given(geometries())
def test_input_transform_native_vs_torch_vs_reference(case) -> None:
    m, n, c, _, h, w, pad, seed = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    geom = tile_geometry(h, w, pad, m)
    th, tw = geom.tiles
    ref = _ref_input_transform(x, m, geom)
    v_t = input_transform(x, m, geom, "torch")
    assert v_t.shape == ((m + 2) ** 2, c, n * th * tw)
    _close(v_t, ref, 1e-5)
    # float64 torch path is (almost) exactly the reference
    _close(input_transform(x.double(), m, geom, "torch"), ref, 1e-12)
    if native_available():
        v_n = input_transform(x, m, geom, "native")
        assert v_n.dtype == torch.float32
        _close(v_n, v_t, 1e-5)
        _close(v_n, ref, 1e-5)


@given(geometries(), st.booleans())
def test_output_transform_native_vs_torch_vs_reference(case, with_bias: bool) -> None:
    m, n, _, k, h, w, pad, seed = case
    gen = torch.Generator().manual_seed(seed)
    geom = tile_geometry(h, w, pad, m)
    th, tw = geom.tiles
    mm = torch.randn((m + 2) ** 2, k, n * th * tw, generator=gen)
    bias = torch.randn(k, generator=gen) if with_bias else None
    ref = _ref_output_transform(mm, m, geom, n, bias)
    y_t = output_transform(mm, m, geom, n, bias, "torch")
    assert y_t.shape == (n, k, *geom.out_size)
    _close(y_t, ref, 1e-5)
    if native_available():
        y_n = output_transform(mm, m, geom, n, bias, "native")
        _close(y_n, y_t, 1e-5)
        _close(y_n, ref, 1e-5)


@given(geometries())
def test_full_pipeline_is_conv2d(case) -> None:
    """OTrans(U[xi] @ ITrans(x)[xi]) equals F.conv2d with the same padding, on both backends."""
    m, n, c, k, h, w, pad, seed = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    g = torch.randn(k, c, 3, 3, generator=gen)
    b = torch.randn(k, generator=gen)
    geom = tile_geometry(h, w, pad, m)
    ref = F.conv2d(x.double(), g.double(), b.double(), padding=pad)
    p = m + 2
    backends = ["torch", *(["native"] if native_available() else [])]
    tol = {2: 1e-5, 4: 1e-4, 6: 2e-3}[m]
    for be in backends:
        u = filter_transform(g, m, be)
        v = input_transform(x, m, geom, be)
        mm = torch.bmm(u.permute(2, 3, 0, 1).reshape(p * p, k, c), v)
        y = output_transform(mm, m, geom, n, b, be)
        _close(y, ref, tol)


# ----------------------------------------------------------------------------------------------- adjoints
@given(geometries())
def test_input_transform_adjoint_identity(case) -> None:
    m, n, c, _, h, w, pad, seed = case
    gen = torch.Generator().manual_seed(seed)
    geom = tile_geometry(h, w, pad, m)
    th, tw = geom.tiles
    x = torch.randn(n, c, h, w, generator=gen)
    dv = torch.randn((m + 2) ** 2, c, n * th * tw, generator=gen)
    # torch, float64: exact up to float64 rounding
    lhs = _dot(input_transform(x.double(), m, geom, "torch"), dv.double())
    dx64 = input_transform_adjoint(dv.double(), m, geom, tuple(x.shape), "torch")
    assert dx64.shape == x.shape
    rhs = _dot(x.double(), dx64)
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs), float(x.norm() * dv.norm()))
    # float32 on every available backend
    for be in ["torch", *(["native"] if native_available() else [])]:
        vx = input_transform(x, m, geom, be)
        dx = input_transform_adjoint(dv, m, geom, tuple(x.shape), be)
        assert dx.dtype == torch.float32 and dx.shape == x.shape
        scale = float(vx.double().norm() * dv.double().norm() + x.double().norm() * dx.double().norm())
        assert abs(_dot(vx, dv) - _dot(x, dx)) <= 1e-5 * max(1.0, scale)
        _close(dx, dx64, 1e-4)


@given(geometries())
def test_output_transform_adjoint_identity(case) -> None:
    m, n, _, k, h, w, pad, seed = case
    gen = torch.Generator().manual_seed(seed)
    geom = tile_geometry(h, w, pad, m)
    th, tw = geom.tiles
    mm = torch.randn((m + 2) ** 2, k, n * th * tw, generator=gen)
    dy = torch.randn(n, k, *geom.out_size, generator=gen)
    lhs = _dot(output_transform(mm.double(), m, geom, n, None, "torch"), dy.double())
    dm64 = output_transform_adjoint(dy.double(), m, geom, "torch")
    assert dm64.shape == mm.shape
    rhs = _dot(mm.double(), dm64)
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs), float(mm.norm() * dy.norm()))
    for be in ["torch", *(["native"] if native_available() else [])]:
        y = output_transform(mm, m, geom, n, None, be)
        dm = output_transform_adjoint(dy, m, geom, be)
        assert dm.dtype == torch.float32 and dm.shape == mm.shape
        scale = float(y.double().norm() * dy.double().norm() + mm.double().norm() * dm.double().norm())
        assert abs(_dot(y, dy) - _dot(mm, dm)) <= 1e-5 * max(1.0, scale)
        _close(dm, dm64, 1e-4)


@given(geometries())
def test_torch_adjoints_equal_autograd_vjp(case) -> None:
    m, n, c, k, h, w, pad, seed = case
    gen = torch.Generator().manual_seed(seed)
    geom = tile_geometry(h, w, pad, m)
    th, tw = geom.tiles
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    dv = torch.randn((m + 2) ** 2, c, n * th * tw, generator=gen, dtype=torch.float64)
    _, vjp_x = torch.autograd.functional.vjp(lambda t: input_transform(t, m, geom, "torch"), x, dv)
    torch.testing.assert_close(input_transform_adjoint(dv, m, geom, tuple(x.shape), "torch"), vjp_x,
                               rtol=1e-10, atol=1e-10)
    mm = torch.randn((m + 2) ** 2, k, n * th * tw, generator=gen, dtype=torch.float64)
    dy = torch.randn(n, k, *geom.out_size, generator=gen, dtype=torch.float64)
    _, vjp_m = torch.autograd.functional.vjp(lambda t: output_transform(t, m, geom, n, None, "torch"), mm, dy)
    torch.testing.assert_close(output_transform_adjoint(dy, m, geom, "torch"), vjp_m, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------- edge cases / errors
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", SUPPORTED_M)
def test_one_pixel_image(backend: str, m: int) -> None:
    x = torch.randn(1, 1, 1, 1)
    geom = tile_geometry(1, 1, (1, 1), m)
    assert geom.out_size == (1, 1) and geom.tiles == (1, 1)
    v = input_transform(x, m, geom, backend)
    _close(v, _ref_input_transform(x, m, geom), 1e-6)
    g = torch.randn(1, 1, 3, 3)
    u = filter_transform(g, m, backend)
    p = m + 2
    y = output_transform(torch.bmm(u.permute(2, 3, 0, 1).reshape(p * p, 1, 1), v), m, geom, 1, None, backend)
    _close(y, F.conv2d(x, g, padding=1), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_errors(backend: str) -> None:
    m = 2
    geom = tile_geometry(4, 4, (1, 1), m)  # 2x2 tiles
    with pytest.raises(ValueError, match="dV must have shape"):
        input_transform_adjoint(torch.zeros(16, 3, 7), m, geom, (2, 3, 4, 4), backend)
    with pytest.raises(ValueError, match="M must have shape"):
        output_transform(torch.zeros(16, 3, 7), m, geom, 2, None, backend)
    with pytest.raises(ValueError, match="bias must have shape"):
        output_transform(torch.zeros(16, 3, 8), m, geom, 2, torch.zeros(4), backend)
    with pytest.raises(ValueError, match="spatial size"):
        output_transform_adjoint(torch.zeros(2, 3, 5, 4), m, geom, backend)
    with pytest.raises(ValueError, match="4-D"):
        input_transform(torch.zeros(3, 4, 4), m, geom, backend)
    with pytest.raises(TypeError, match="floating-point"):
        input_transform(torch.zeros(1, 1, 4, 4, dtype=torch.int32), m, geom, backend)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        output_transform_adjoint([[1.0]], m, geom, backend)  # type: ignore[arg-type]


@needs_native
def test_native_rejects_float64() -> None:
    geom = tile_geometry(4, 4, (1, 1), 2)
    with pytest.raises(ValueError, match="CPU float32"):
        input_transform(torch.zeros(1, 1, 4, 4, dtype=torch.float64), 2, geom, "native")
    with pytest.raises(ValueError, match="CPU float32"):
        output_transform(torch.zeros(16, 1, 4), 2, geom, 1, torch.zeros(1, dtype=torch.float64), "native")


def test_bad_backend_name() -> None:
    geom = tile_geometry(4, 4, (1, 1), 2)
    with pytest.raises(ValueError, match="valid values"):
        input_transform(torch.zeros(1, 1, 4, 4), 2, geom, "cuda")
