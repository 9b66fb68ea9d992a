"""Winograd F(m x m, 3 x 3) transform matrices from one Toom-Cook generator.

All matrices are generated in exact rational arithmetic (:class:`fractions.Fraction`) from a table of
interpolation points, then cast once to float64/float32 tensors and cached. The point sets are those that keep
float32 error lowest among the small-integer / power-of-two sets (Lavin & Gray 2016; Barabasz et al. 2020):
``0, ±1`` for F(2,3), ``0, ±1, ±2`` ... plus the point at infinity.

Conventions (stated in ``docs/winograd.md``), with ``p = m + 2``:

* ``G``   is ``(p, 3)``:  ``U = G g G^T``   filter transform,
* ``BT``  is ``(p, p)``:  ``V = B^T d B``   input-tile transform,
* ``AT``  is ``(m, p)``:  ``Y = A^T M A``   output-tile transform.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import torch

__all__ = ["SUPPORTED_M", "INTERPOLATION_POINTS", "WinogradTransforms", "get_transforms", "toom_cook"]

R = 3  # kernel size handled everywhere in this package

#: Finite interpolation points per output tile size ``m`` (the point at infinity is always added).
#: Keys of this table are the tile sizes the package supports.
INTERPOLATION_POINTS: dict[int, tuple[Fraction, ...]] = {
    2: (Fraction(0), Fraction(1), Fraction(-1)),
    4: (Fraction(0), Fraction(1), Fraction(-1), Fraction(1, 2), Fraction(-2)),
    6: (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2)),
}
SUPPORTED_M: tuple[int, ...] = tuple(sorted(INTERPOLATION_POINTS))

_Matrix = list[list[Fraction]]


def _inverse(mat: _Matrix) -> _Matrix:
    n = len(mat)
    aug = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(mat)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if aug[r][col] != 0)
        aug[col], aug[pivot] = aug[pivot], aug[col]
        pv = aug[col][col]
        aug[col] = [x / pv for x in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0:
                f = aug[r][col]
                aug[r] = [x - f * y for x, y in zip(aug[r], aug[col], strict=True)]
    return [row[n:] for row in aug]


def _vandermonde(points: tuple[Fraction, ...], cols: int) -> _Matrix:
    """Evaluation matrix of polynomials with ``cols`` coefficients at ``points`` and at infinity."""
    rows = [[pt**j for j in range(cols)] for pt in points]
    rows.append([Fraction(int(j == cols - 1)) for j in range(cols)])
    return rows


def toom_cook(m: int, points: tuple[Fraction, ...], r: int = R) -> tuple[_Matrix, _Matrix, _Matrix]:
    """Exact ``(AT, G, BT)`` of the Winograd algorithm F(m, r) for the given finite interpolation points.

    The correlation ``y = AT [(G g) * (BT d)]`` is the transpose (by the transposition principle) of the
    polynomial product evaluated at ``points`` and infinity. Row ``j`` of ``BT`` is scaled by
    ``f_j = prod_{l != j}(a_j - a_l)`` and the matching row of ``G`` by ``1 / f_j`` so that ``BT`` stays integral
    for integer points; each pair is then signed so that ``G``'s first non-zero entry is positive.

    Args:
        m: Output tile size.
        points: ``m + r - 2`` distinct finite interpolation points.
        r: Filter size.

    Returns:
        ``(AT, G, BT)`` as lists of rows of :class:`~fractions.Fraction`.

    """
    n = m + r - 1
    if len(points) != n - 1 or len(set(points)) != len(points):
        raise ValueError(f"F({m},{r}) needs {n - 1} distinct finite points, got {points!r}")
    at = [list(c) for c in zip(*_vandermonde(points, m), strict=True)]
    g = _vandermonde(points, r)
    bt = [list(c) for c in zip(*_inverse(_vandermonde(points, n)), strict=True)]
    for j in range(n):
        f = Fraction(1)
        if j < n - 1:
            for k in range(n - 1):
                if k != j:
                    f *= points[j] - points[k]
        lead = next(x for x in g[j] if x != 0)
        if lead * f < 0:
            f = -f
        bt[j] = [x * f for x in bt[j]]
        g[j] = [x / f for x in g[j]]
    return at, g, bt


@dataclass(frozen=True)
class WinogradTransforms:
    """The three transform matrices of F(m x m, 3 x 3) in one dtype.

    Attributes:
        m: Output tile size.
        AT: ``(m, p)`` output transform.
        G: ``(p, 3)`` filter transform.
        BT: ``(p, p)`` input transform.

    """

    m: int
    AT: torch.Tensor
    G: torch.Tensor
    BT: torch.Tensor

    @property
    def p(self) -> int:
        """Input tile size ``m + 2``."""
        return self.m + R - 1


def check_m(m: object) -> int:
    """Validate a tile size and return it as ``int``.

    Raises:
        ValueError: If ``m`` is not one of :data:`SUPPORTED_M`.

    """
    if isinstance(m, bool) or not isinstance(m, int) or m not in INTERPOLATION_POINTS:
        raise ValueError(f"Winograd tile size m={m!r} is not supported; valid values are {list(SUPPORTED_M)}")
    return m


@functools.cache
def _exact(m: int) -> tuple[_Matrix, _Matrix, _Matrix]:
    return toom_cook(m, INTERPOLATION_POINTS[m])


@functools.cache
def _cached(m: int, dtype: torch.dtype) -> WinogradTransforms:
    at, g, bt = _exact(m)

    def cast(mat: _Matrix) -> torch.Tensor:
        # Fractions -> float64 first (exact for these points), then to the requested dtype.
        return torch.tensor([[float(x) for x in row] for row in mat], dtype=torch.float64).to(dtype)

    with untraced():  # filled during a torch.jit.trace, the cache is a constant there, as it is when already warm
        return WinogradTransforms(m=m, AT=cast(at), G=cast(g), BT=cast(bt))


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """Suspend ``torch.jit.trace``'s recording (for filling caches whose tensors the trace must see as constants)."""
    state = torch._C._get_tracing_state()
    if state is None:
        yield
        return
    set_state = getattr(torch._C, "_set_tracing_state")  # noqa: B009 (private, untyped in torch's stubs)
    set_state(None)
    try:
        yield
    finally:
        set_state(state)


def get_transforms(
    m: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> WinogradTransforms:
    """Return the cached transform matrices of F(m x m, 3 x 3).

    Args:
        m: Output tile size, one of :data:`SUPPORTED_M`.
        dtype: Floating dtype of the returned tensors.
        device: Device of the returned tensors (CPU when ``None``).

    """
    t = _cached(check_m(m), dtype)
    if device is None or torch.device(device) == t.AT.device:
        return t
    return WinogradTransforms(m=m, AT=t.AT.to(device), G=t.G.to(device), BT=t.BT.to(device))
