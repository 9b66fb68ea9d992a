"""Exactness of the Toom-Cook generated Winograd transform matrices."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from lightning_winoprune.winograd import INTERPOLATION_POINTS, SUPPORTED_M, get_transforms, toom_cook
from lightning_winoprune.winograd._transforms import check_m


def _matvec(mat: list[list[Fraction]], vec: list[Fraction]) -> list[Fraction]:
    return [sum((a * b for a, b in zip(row, vec, strict=True)), Fraction(0)) for row in mat]


def _correlate_1d(d: list[Fraction], g: list[Fraction], m: int) -> list[Fraction]:
    return [sum((g[r] * d[i + r] for r in range(3)), Fraction(0)) for i in range(m)]


def _winograd_1d(at, g_mat, bt, d, g):
    gg = _matvec(g_mat, g)
    bd = _matvec(bt, d)
    return _matvec(at, [a * b for a, b in zip(gg, bd, strict=True)])


def test_supported_m_matches_table() -> None:
    assert SUPPORTED_M == (2, 4, 6)
    assert set(INTERPOLATION_POINTS) == set(SUPPORTED_M)


@pytest.mark.parametrize("m", SUPPORTED_M)
def test_exact_shapes(m: int) -> None:
    at, g, bt = toom_cook(m, INTERPOLATION_POINTS[m])
    p = m + 2
    assert (len(at), len(at[0])) == (m, p)
    assert (len(g), len(g[0])) == (p, 3)
    assert (len(bt), len(bt[0])) == (p, p)
    assert all(isinstance(x, Fraction) for mat in (at, g, bt) for row in mat for x in row)


@pytest.mark.parametrize("m", SUPPORTED_M)
def test_exact_fraction_identity_1d(m: int) -> None:
    """A^T[(G g) * (B^T d)] is exactly the 1-D correlation, for random integer data."""
    at, g_mat, bt = toom_cook(m, INTERPOLATION_POINTS[m])
    rng = random.Random(1234 + m)
    for _ in range(50):
        d = [Fraction(rng.randint(-50, 50)) for _ in range(m + 2)]
        g = [Fraction(rng.randint(-50, 50)) for _ in range(3)]
        assert _winograd_1d(at, g_mat, bt, d, g) == _correlate_1d(d, g, m)
    # Also on the unit vectors, i.e. the identity holds as a bilinear map, not only on samples.
    for i in range(m + 2):
        for j in range(3):
            d = [Fraction(int(k == i)) for k in range(m + 2)]
            g = [Fraction(int(k == j)) for k in range(3)]
            assert _winograd_1d(at, g_mat, bt, d, g) == _correlate_1d(d, g, m)


@given(
    points=st.lists(
        st.fractions(min_value=-4, max_value=4, max_denominator=4), min_size=2, max_size=6, unique=True
    ),
    seed=st.integers(0, 2**16),
)
def test_toom_cook_any_distinct_points(points: list[Fraction], seed: int) -> None:
    """The generator is correct for any set of distinct finite points, not only the tabulated ones."""
    m = len(points) - 1  # F(m, 3) needs m + 1 finite points
    at, g_mat, bt = toom_cook(m, tuple(points))
    rng = random.Random(seed)
    d = [Fraction(rng.randint(-9, 9)) for _ in range(m + 2)]
    g = [Fraction(rng.randint(-9, 9)) for _ in range(3)]
    assert _winograd_1d(at, g_mat, bt, d, g) == _correlate_1d(d, g, m)
    # Sign convention: the first non-zero entry of every row of G is positive.
    for row in g_mat:
        assert next(x for x in row if x != 0) > 0


def test_bt_is_integral_for_integer_points() -> None:
    _, _, bt = toom_cook(2, INTERPOLATION_POINTS[2])
    assert all(x.denominator == 1 for row in bt for x in row)


@pytest.mark.parametrize(
    "points", [(Fraction(0), Fraction(1)), (Fraction(0), Fraction(1), Fraction(1)), (Fraction(0),) * 3]
)
def test_toom_cook_rejects_bad_points(points: tuple[Fraction, ...]) -> None:
    with pytest.raises(ValueError, match="distinct finite points"):
        toom_cook(2, points)


@pytest.mark.parametrize("m", SUPPORTED_M)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_float_matrices_match_fractions(m: int, dtype: torch.dtype) -> None:
    at, g, bt = toom_cook(m, INTERPOLATION_POINTS[m])
    t = get_transforms(m, dtype)
    assert t.m == m and t.p == m + 2
    for exact, mat in ((at, t.AT), (g, t.G), (bt, t.BT)):
        assert mat.dtype == dtype
        assert mat.device.type == "cpu"
        expected = torch.tensor([[float(x) for x in row] for row in exact], dtype=torch.float64).to(dtype)
        assert torch.equal(mat, expected)
        if dtype == torch.float64:
            # Every float64 entry is the correctly rounded value of its fraction.
            for row, trow in zip(exact, mat.tolist(), strict=True):
                for x, y in zip(row, trow, strict=True):
                    assert abs(Fraction(y) - x) <= abs(x) * Fraction(1, 2**53)


def test_get_transforms_is_cached_and_device_aware() -> None:
    a = get_transforms(4, torch.float32)
    assert get_transforms(4, torch.float32) is a
    assert get_transforms(4, torch.float32, "cpu") is a
    assert get_transforms(4, torch.float64) is not a


@pytest.mark.parametrize("m", SUPPORTED_M)
def test_2d_single_tile_matches_conv2d_float64(m: int) -> None:
    t = get_transforms(m, torch.float64)
    p = m + 2
    gen = torch.Generator().manual_seed(m)
    for _ in range(10):
        d = torch.randn(p, p, dtype=torch.float64, generator=gen)
        g = torch.randn(3, 3, dtype=torch.float64, generator=gen)
        u = t.G @ g @ t.G.T
        v = t.BT @ d @ t.BT.T
        y = t.AT @ (u * v) @ t.AT.T
        ref = F.conv2d(d.view(1, 1, p, p), g.view(1, 1, 3, 3)).view(m, m)
        assert y.shape == (m, m)
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [0, 1, 3, 5, 8, -2, 2.0, "2", True, None])
def test_bad_m_raises(bad: object) -> None:
    with pytest.raises(ValueError, match=r"m=.* is not supported; valid values are \[2, 4, 6\]"):
        check_m(bad)
    with pytest.raises(ValueError, match="is not supported"):
        get_transforms(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("m", SUPPORTED_M)
def test_check_m_accepts_supported(m: int) -> None:
    assert check_m(m) == m
