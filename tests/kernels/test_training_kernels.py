"""The vector training transforms on every ISA this CPU runs: equal to the torch reference, thread-safe, validated."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_winoprune.kernels import native_available
from lightning_winoprune.winograd._tiles import (
    input_transform,
    input_transform_adjoint,
    output_transform,
    output_transform_adjoint,
    tile_geometry,
)
from lightning_winoprune.winograd._transforms import get_transforms

pytestmark = pytest.mark.skipif(not native_available(), reason="the native extension is not loaded")


def _native():
    from lightning_winoprune.kernels._backend import native_module

    return native_module()


def _isas() -> list[str]:
    return list(_native().supported_isas()) if native_available() else []


def _run_all(isa: str | None, m: int, x: torch.Tensor, pad: tuple[int, int], dv: torch.Tensor, mm: torch.Tensor,
             bias: torch.Tensor | None, dy: torch.Tensor) -> list[torch.Tensor]:
    """The four native transforms with ``isa`` (None: the detected one), outputs freshly allocated."""
    c_ = _native()
    t = get_transforms(m, torch.float32)
    n, c, h, w = x.shape
    geom = tile_geometry(h, w, pad, m)
    th, tw = geom.tiles
    v = torch.full((t.p * t.p, c, n * th * tw), float("nan"))
    c_.input_transform(x.numpy(), t.BT.numpy(), pad[0], pad[1], th, tw, v.numpy(), isa=isa)
    dx = torch.full_like(x, float("nan"))
    c_.input_transform_adjoint(dv.numpy(), t.BT.numpy(), pad[0], pad[1], th, tw, dx.numpy(), isa=isa)
    y = torch.full((n, mm.shape[1], *geom.out_size), float("nan"))
    c_.output_transform(mm.numpy(), t.AT.numpy(), None if bias is None else bias.numpy(), th, tw, y.numpy(), isa=isa)
    dm = torch.full_like(mm, float("nan"))
    c_.output_transform_adjoint(dy.numpy(), t.AT.numpy(), th, tw, dm.numpy(), isa=isa)
    return [v, dx, y, dm]


def _case(m: int, n: int, c: int, k: int, h: int, w: int, pad: tuple[int, int], seed: int, bias: bool):
    gen = torch.Generator().manual_seed(seed)
    geom = tile_geometry(h, w, pad, m)
    th, tw = geom.tiles
    p2, t = (m + 2) ** 2, n * th * tw
    x = torch.randn(n, c, h, w, generator=gen)
    dv = torch.randn(p2, c, t, generator=gen)
    mm = torch.randn(p2, k, t, generator=gen)
    b = torch.randn(k, generator=gen) if bias else None
    dy = torch.randn(n, k, *geom.out_size, generator=gen)
    expected = [
        input_transform(x.double(), m, geom, "torch"),
        input_transform_adjoint(dv.double(), m, geom, (n, c, h, w), "torch"),
        output_transform(mm.double(), m, geom, n, None if b is None else b.double(), "torch"),
        output_transform_adjoint(dy.double(), m, geom, "torch"),
    ]
    return (x, pad, dv, mm, b, dy), expected


def _check_one(name: str, a: torch.Tensor, e: torch.Tensor) -> None:
    assert a.shape == e.shape, (name, a.shape, e.shape)
    if e.numel():
        scale = max(1.0, e.abs().max().item())
        err = (a.double() - e).abs().max().item()
        assert err <= 2e-5 * scale, f"{name}: max abs error {err:.3e} (scale {scale:.2e})"


def _check(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for name, a, e in zip(("V", "dx", "y", "dM"), actual, expected, strict=True):
        _check_one(name, a, e)


@st.composite
def training_shapes(draw):
    """Narrow maps (lane groups span tile rows and images) and wide rows (contiguous runs), with odd borders."""
    m = draw(st.sampled_from([2, 4]))
    wide = draw(st.booleans())
    w = draw(st.integers(34, 150)) if wide else draw(st.integers(1, 12))
    h = draw(st.integers(1, 10))
    ph = draw(st.integers(max(0, (3 - h + 1) // 2), 1))
    pw = draw(st.integers(max(0, (3 - w + 1) // 2), 1))
    return (m, draw(st.integers(0, 3)), draw(st.integers(1, 20)), draw(st.integers(1, 20)), h, w, (ph, pw),
            draw(st.integers(0, 2**31 - 1)), draw(st.booleans()))


@pytest.mark.parametrize("isa", _isas())
@settings(max_examples=40, deadline=None)
@given(training_shapes())
def test_vector_transforms_equal_torch_reference(isa: str, case) -> None:
    args, expected = _case(*case)
    _check(_run_all(isa, case[0], *args), expected)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("m", [2, 4, 6])
def test_every_tile_size_and_border(isa: str, m: int) -> None:
    """F(6,3) has no vector kernel and takes the scalar reference; F(2,3)/F(4,3) at sizes around the lane width."""
    for w in (1, 15, 16, 17, 33, 34, 35, 66, 67):
        args, expected = _case(m, 2, 3, 5, 5, w, (1, 1), seed=w, bias=True)
        _check(_run_all(isa, m, *args), expected)


def test_other_matrices_take_the_scalar_reference() -> None:
    """A BT that is not the compiled one must still be applied exactly (the vector path bakes in its own)."""
    c_ = _native()
    bt = torch.randn(4, 4)
    x = torch.randn(2, 3, 9, 40)
    geom = tile_geometry(9, 40, (1, 1), 2)
    out = torch.empty(16, 3, 2 * geom.tiles[0] * geom.tiles[1])
    c_.input_transform(x.numpy(), bt.numpy(), 1, 1, *geom.tiles, out.numpy())
    xp = torch.nn.functional.pad(x.double(), (1, geom.tiles[1] * 2 + 2 - 40 - 1, 1, geom.tiles[0] * 2 + 2 - 9 - 1))
    tiles = xp.unfold(2, 4, 2).unfold(3, 4, 2)
    ref = torch.einsum("iu,nctwuv,jv->ijcntw", bt.double(), tiles, bt.double()).reshape(16, 3, -1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_concurrent_calls_from_threads() -> None:
    """The kernels keep no shared state: 8 Python threads (the GIL is released) get exactly the serial results."""
    cases = [_case(2 if i % 2 else 4, 3, 7 + i, 5, 9, 20 + 7 * i, (1, 1), seed=i, bias=True) for i in range(8)]
    serial = [_run_all(None, 2 if i % 2 else 4, *args) for i, (args, _) in enumerate(cases)]
    results: dict[int, list[list[torch.Tensor]]] = {i: [] for i in range(8)}

    def work(i: int) -> None:
        for _ in range(10):
            results[i].append(_run_all(None, 2 if i % 2 else 4, *cases[i][0]))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))  # re-raises a worker's exception
    for i in range(8):
        assert len(results[i]) == 10
        for got in results[i]:
            for a, b in zip(got, serial[i], strict=True):
                assert torch.equal(a, b)


def test_bad_isa_and_shapes_raise() -> None:
    c_ = _native()
    t = get_transforms(2, torch.float32)
    x = np.zeros((1, 1, 4, 4), np.float32)
    out = np.zeros((16, 1, 4), np.float32)
    with pytest.raises(ValueError, match="valid values"):
        c_.input_transform(x, t.BT.numpy(), 1, 1, 2, 2, out, isa="sse9")
    with pytest.raises(ValueError, match="out must have shape"):
        c_.input_transform(x, t.BT.numpy(), 1, 1, 2, 2, np.zeros((16, 1, 5), np.float32))
    with pytest.raises(ValueError, match="tile counts"):
        c_.output_transform_adjoint(np.zeros((1, 1, 4, 4), np.float32), t.AT.numpy(), 0, 2, out)


def _row_map(p2: int, k: int, extra: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """A random row map: about half the (position, channel) pairs mapped to distinct rows, plus ``extra`` unused."""
    kept = torch.rand(p2 * k, generator=gen) < 0.5
    n_rows = int(kept.sum()) + extra
    rows = torch.full((p2 * k,), -1, dtype=torch.int64)
    rows[kept] = torch.randperm(n_rows, generator=gen)[: int(kept.sum())]
    return rows.view(p2, k), n_rows


@pytest.mark.parametrize("isa", _isas())
@settings(max_examples=25, deadline=None)
@given(training_shapes(), st.integers(0, 3))
def test_row_map_equals_the_dense_layout(isa: str, case, extra: int) -> None:
    """With a row map, M / dM hold only the mapped rows: the result equals the dense layout's with zeros elsewhere."""
    m, n, _, k, h, w, pad, seed, with_bias = case
    gen = torch.Generator().manual_seed(seed)
    geom = tile_geometry(h, w, pad, m)
    th, tw = geom.tiles
    p2, t = (m + 2) ** 2, n * th * tw
    rows, n_rows = _row_map(p2, k, extra, gen)
    flat = rows.reshape(-1)
    mapped = (flat >= 0).nonzero().flatten()
    mg = torch.randn(n_rows, t, generator=gen)
    dense = torch.zeros(p2 * k, t, dtype=torch.float64)
    dense[mapped] = mg.double()[flat[mapped]]
    bias = torch.randn(k, generator=gen) if with_bias else None
    tr = get_transforms(m, torch.float32)
    y = torch.full((n, k, *geom.out_size), float("nan"))
    _native().output_transform(mg.numpy(), tr.AT.numpy(), None if bias is None else bias.numpy(), th, tw, y.numpy(),
                               isa=isa, rows=rows.numpy())
    ref = output_transform(dense.view(p2, k, t), m, geom, n, None if bias is None else bias.double(), "torch")
    _check_one("y", y, ref)
    dy = torch.randn(n, k, *geom.out_size, generator=gen)
    dmg = torch.full((n_rows, t), float("nan"))
    _native().output_transform_adjoint(dy.numpy(), tr.AT.numpy(), th, tw, dmg.numpy(), isa=isa, rows=rows.numpy())
    full = output_transform_adjoint(dy.double(), m, geom, "torch").reshape(p2 * k, t)
    expected = torch.zeros(n_rows, t, dtype=torch.float64)
    expected[flat[mapped]] = full[mapped]
    _check_one("dM", dmg, expected)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_row_map_through_the_python_api(backend: str) -> None:
    """``output_transform(..., rows=)`` and its adjoint agree between backends, F(6,3) (scalar reference) included."""
    gen = torch.Generator().manual_seed(3)
    for m in (2, 4, 6):
        geom = tile_geometry(7, 9, (1, 1), m)
        p2, t, k = (m + 2) ** 2, 2 * geom.tiles[0] * geom.tiles[1], 5
        rows, n_rows = _row_map(p2, k, 2, gen)
        mg, dy = torch.randn(n_rows, t, generator=gen), torch.randn(2, k, *geom.out_size, generator=gen)
        flat = rows.reshape(-1)
        mapped = (flat >= 0).nonzero().flatten()
        dense = torch.zeros(p2 * k, t)
        dense[mapped] = mg[flat[mapped]]
        y = output_transform(mg, m, geom, 2, None, backend, rows=rows)
        torch.testing.assert_close(y, output_transform(dense.view(p2, k, t), m, geom, 2, None, "torch"))
        dmg = output_transform_adjoint(dy, m, geom, backend, rows=rows, num_rows=n_rows)
        expected = torch.zeros(n_rows, t)
        expected[flat[mapped]] = output_transform_adjoint(dy, m, geom, "torch").reshape(p2 * k, t)[mapped]
        torch.testing.assert_close(dmg, expected)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_bad_row_maps_raise(backend: str) -> None:
    geom = tile_geometry(4, 4, (1, 1), 2)
    mg, dy = torch.randn(3, 8), torch.randn(2, 2, 4, 4)
    good = torch.tensor([[0, -1]] * 16)
    good[1, 1], good[2, 0] = 1, 2
    with pytest.raises(TypeError, match="int64"):
        output_transform(mg, 2, geom, 2, None, backend, rows=good.int())
    with pytest.raises(ValueError, match=r"rows must have shape \(16, 2\)"):
        output_transform_adjoint(dy, 2, geom, backend, rows=good[:4], num_rows=3)
    with pytest.raises(ValueError, match=r"M must have shape \(R, 8\)"):
        output_transform(torch.randn(3, 9), 2, geom, 2, None, backend, rows=good)
    with pytest.raises(ValueError, match="num_rows"):
        output_transform_adjoint(dy, 2, geom, backend, rows=good)
    bad = good.clone()
    bad[5, 0] = 3
    with pytest.raises(ValueError, match=r"outside \[-1, 3\)|lie in \[-1, 3\)"):
        output_transform(mg, 2, geom, 2, None, backend, rows=bad)
    dup = good.clone()
    dup[6, 1] = 1
    output_transform(mg, 2, geom, 2, None, backend, rows=dup)  # reading a row twice is fine
    with pytest.raises(ValueError, match="twice"):
        output_transform_adjoint(dy, 2, geom, backend, rows=dup, num_rows=3)
