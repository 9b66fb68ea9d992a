"""Winograd transform ops with a native (``_C``) and a torch implementation.

Shapes follow the BGEMM view of the Winograd convolution (see ``docs/winograd.md``): for each of the ``p * p``
Winograd positions ``xi`` one GEMM ``M[xi] (K x T) = U[xi] (K x C) @ V[xi] (C x T)``, with ``p = m + 2``,
``P2 = p * p`` and ``T = N * th * tw`` tiles ordered ``(n, ty, tx)``:

* :func:`filter_transform`: ``g (..., 3, 3) -> U (..., p, p)``
* :func:`input_transform`: ``x (N, C, H, W) -> V (P2, C, T)``
* :func:`input_transform_adjoint`: ``dV (P2, C, T) -> dx (N, C, H, W)``
* :func:`output_transform`: ``M (P2, K, T) -> y (N, K, Ho, Wo)`` (+ bias)
* :func:`output_transform_adjoint`: ``dy (N, K, Ho, Wo) -> dM (P2, K, T)``

Both output-side maps also take a *row map* ``rows`` (int64 ``(P2, K)``): then ``M`` / ``dM`` are ``(R, T)`` and hold
only the rows that ``rows`` names, ``rows[xi, k]`` being the row of position ``xi`` of channel ``k``, or ``-1`` for a
row that is all zero. The sparse training route uses it to read its gathered GEMM result, and to write the gathered
``dM`` directly, without a dense ``(P2, K, T)`` tensor in between.

The adjoints are the exact transposes of the forward maps; the Winograd layer's backward pass is built from them.

While ``torch.jit.trace``, ``torch.compile`` or ``torch.export`` records the ops (:func:`capturing`), every op takes
its torch implementation: the native kernels write through numpy views that a tracer cannot see, so a traced native
call would replay stale buffers. Both implementations compute the same exact map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lightning_winoprune.kernels._backend import Backend, native_module, resolve_backend
from lightning_winoprune.winograd._transforms import get_transforms

__all__ = [
    "TileGeometry",
    "capturing",
    "filter_transform",
    "input_transform",
    "input_transform_adjoint",
    "output_transform",
    "output_transform_adjoint",
    "tile_geometry",
]


class TileGeometry(tuple[int, int, int, int, int, int]):
    """``(pad_h, pad_w, Ho, Wo, th, tw)`` of a 3x3 stride-1 conv on an ``H x W`` input, tiled by ``m``."""

    __slots__ = ()

    @property
    def pad(self) -> tuple[int, int]:
        """Zero padding ``(pad_h, pad_w)``."""
        return self[0], self[1]

    @property
    def out_size(self) -> tuple[int, int]:
        """Output size ``(Ho, Wo)``."""
        return self[2], self[3]

    @property
    def tiles(self) -> tuple[int, int]:
        """Tile counts ``(th, tw)``."""
        return self[4], self[5]


def tile_geometry(height: int, width: int, padding: tuple[int, int], m: int) -> TileGeometry:
    """Output size and tile counts of a 3x3 stride-1 conv.

    Raises:
        ValueError: If the padded input is smaller than the 3x3 kernel.

    """
    ph, pw = padding
    ho, wo = height + 2 * ph - 2, width + 2 * pw - 2
    if ho < 1 or wo < 1:
        raise ValueError(
            f"input of spatial size {height}x{width} with padding {padding} is smaller than the 3x3 kernel"
        )
    return TileGeometry((ph, pw, ho, wo, -(-ho // m), -(-wo // m)))


def capturing() -> bool:
    """Whether ops are being recorded by ``torch.jit.trace``, ``torch.compile`` or ``torch.export``."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling())


def _resolve(backend: Backend | str, *tensors: torch.Tensor) -> Backend:
    """:func:`resolve_backend`, but the torch implementation while ops are being captured (see :func:`capturing`)."""
    backend = Backend.parse(backend)
    if capturing():
        return Backend.TORCH
    return resolve_backend(backend, *tensors)


def _check_tensor(t: object, name: str, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _np(t: torch.Tensor) -> np.ndarray:
    """Numpy view (shared memory) of a CPU float tensor, made contiguous first if needed."""
    return t.detach().contiguous().numpy()


def filter_transform(g: torch.Tensor, m: int, backend: Backend | str = Backend.AUTO) -> torch.Tensor:
    """``U = G g G^T`` for every 3x3 kernel of ``g``.

    Args:
        g: Spatial kernels of shape ``(..., 3, 3)``.
        m: Output tile size.
        backend: Implementation to use.

    Returns:
        Winograd-domain kernels ``(..., p, p)`` in ``g``'s dtype, on ``g``'s device. Both paths accumulate in float64.

    """
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"g must be a torch.Tensor, got {type(g).__name__}")
    if not g.is_floating_point():
        raise TypeError(f"g must be a floating-point tensor, got {g.dtype}")
    if g.dim() < 2 or tuple(g.shape[-2:]) != (3, 3):
        raise ValueError(f"g must have shape (..., 3, 3), got {tuple(g.shape)}")
    t64 = get_transforms(m, torch.float64)
    if _resolve(backend, g) is Backend.NATIVE:
        out = torch.empty((*g.shape[:-2], t64.p, t64.p), dtype=torch.float32)
        native_module().filter_transform(_np(g), t64.G.numpy(), out.numpy())
        return out
    G = t64.G.to(g.device)
    return (G @ g.to(torch.float64) @ G.T).to(g.dtype)


def input_transform(
    x: torch.Tensor, m: int, geom: TileGeometry, backend: Backend | str = Backend.AUTO
) -> torch.Tensor:
    """Winograd-domain input tiles ``V[xi] = B^T d B`` as ``(P2, C, T)``."""
    _check_tensor(x, "x", 4)
    t = get_transforms(m, x.dtype, x.device)
    n, c, h, w = x.shape
    ph, pw = geom.pad
    th, tw = geom.tiles
    if _resolve(backend, x) is Backend.NATIVE:
        out = torch.empty((t.p * t.p, c, n * th * tw), dtype=torch.float32)
        native_module().input_transform(_np(x), _np(t.BT), ph, pw, th, tw, out.numpy())
        return out
    xp = F.pad(x, (pw, tw * m + 2 - w - pw, ph, th * m + 2 - h - ph))
    tiles = xp.unfold(2, t.p, m).unfold(3, t.p, m)  # (N, C, th, tw, p, p)
    v = torch.einsum("iu,nctwuv,jv->ijcntw", t.BT, tiles, t.BT)
    return v.reshape(t.p * t.p, c, n * th * tw)


def input_transform_adjoint(
    dv: torch.Tensor, m: int, geom: TileGeometry, input_shape: tuple[int, int, int, int],
    backend: Backend | str = Backend.AUTO,
) -> torch.Tensor:
    """Transpose of :func:`input_transform`: ``dV (P2, C, T) -> dx`` of ``input_shape``."""
    _check_tensor(dv, "dV", 3)
    t = get_transforms(m, dv.dtype, dv.device)
    n, c, h, w = input_shape
    ph, pw = geom.pad
    th, tw = geom.tiles
    if tuple(dv.shape) != (t.p * t.p, c, n * th * tw):
        raise ValueError(f"dV must have shape {(t.p * t.p, c, n * th * tw)}, got {tuple(dv.shape)}")
    if _resolve(backend, dv) is Backend.NATIVE:
        out = torch.empty(input_shape, dtype=torch.float32)
        native_module().input_transform_adjoint(_np(dv), _np(t.BT), ph, pw, th, tw, out.numpy())
        return out
    d = torch.einsum("iu,ijcntw,jv->ncuvtw", t.BT, dv.reshape(t.p, t.p, c, n, th, tw), t.BT)
    full = F.fold(d.reshape(n, c * t.p * t.p, th * tw), (th * m + 2, tw * m + 2), kernel_size=t.p, stride=m)
    return full[:, :, ph : ph + h, pw : pw + w]


def _check_rows(rows: object, p2: int, k: int | None) -> torch.Tensor:
    """Validate a row map's type and shape (see the module docstring): int64 ``(P2, K)``."""
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows must be a torch.Tensor, got {type(rows).__name__}")
    if rows.dtype != torch.int64:
        raise TypeError(f"rows must be an int64 tensor, got {rows.dtype}")
    if rows.dim() != 2 or rows.shape[0] != p2 or (k is not None and rows.shape[1] != k):
        want = f"({p2}, {'K' if k is None else k})"
        raise ValueError(f"rows must have shape {want}, got {tuple(rows.shape)}")
    return rows


def _check_row_values(rows: torch.Tensor, num_rows: int, distinct: bool) -> None:
    """Entries in ``[-1, num_rows)``, with ``distinct`` none named twice (the native kernels check the same)."""
    if rows.numel() and (int(rows.min()) < -1 or int(rows.max()) >= num_rows):
        raise ValueError(f"rows must lie in [-1, {num_rows}), got [{int(rows.min())}, {int(rows.max())}]")
    if distinct:
        used = rows[rows >= 0]
        if used.numel() != used.unique().numel():
            raise ValueError("rows must not name a row twice (each row of dM is written once)")


def output_transform(
    mm: torch.Tensor, m: int, geom: TileGeometry, batch: int, bias: torch.Tensor | None = None,
    backend: Backend | str = Backend.AUTO, rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output tiles ``y = A^T M A`` (+ bias), cropped to ``(N, K, Ho, Wo)``.

    Args:
        mm: ``M`` of shape ``(P2, K, T)``; with ``rows``, its rows ``(R, T)``.
        m: Output tile size.
        geom: Tile geometry.
        batch: ``N``.
        bias: Optional ``(K,)`` bias.
        backend: Implementation to use.
        rows: Optional row map ``(P2, K)`` (see the module docstring).

    """
    t = get_transforms(m, mm.dtype, mm.device)
    ho, wo = geom.out_size
    th, tw = geom.tiles
    n_tiles = batch * th * tw
    if rows is None:
        _check_tensor(mm, "M", 3)
        k = mm.shape[1]
        if tuple(mm.shape) != (t.p * t.p, k, n_tiles):
            raise ValueError(f"M must have shape {(t.p * t.p, k, n_tiles)}, got {tuple(mm.shape)}")
    else:
        _check_tensor(mm, "M", 2)
        if mm.shape[1] != n_tiles:
            raise ValueError(f"M must have shape (R, {n_tiles}) with rows, got {tuple(mm.shape)}")
        k = _check_rows(rows, t.p * t.p, None).shape[1]
    if bias is not None and tuple(bias.shape) != (k,):
        raise ValueError(f"bias must have shape {(k,)}, got {tuple(bias.shape)}")
    if _resolve(backend, mm, *(() if bias is None else (bias,))) is Backend.NATIVE:
        out = torch.empty((batch, k, ho, wo), dtype=torch.float32)
        native_module().output_transform(
            _np(mm), _np(t.AT), None if bias is None else _np(bias), th, tw, out.numpy(),
            rows=None if rows is None else _np(rows),
        )
        return out
    if rows is not None:  # the dense M: the mapped rows, zeros elsewhere
        _check_row_values(rows, mm.shape[0], False)
        flat, kept = rows.reshape(-1), (rows.reshape(-1) >= 0).nonzero().flatten()
        mm = mm.new_zeros(t.p * t.p * k, n_tiles).index_copy(0, kept, mm.index_select(0, flat[kept]))
    y = torch.einsum("ai,ijkntw,bj->nktawb", t.AT, mm.reshape(t.p, t.p, k, batch, th, tw), t.AT)
    y = y.reshape(batch, k, th * m, tw * m)[:, :, :ho, :wo]
    return y if bias is None else y + bias.view(1, k, 1, 1)


def output_transform_adjoint(
    dy: torch.Tensor, m: int, geom: TileGeometry, backend: Backend | str = Backend.AUTO,
    rows: torch.Tensor | None = None, num_rows: int | None = None,
) -> torch.Tensor:
    """Transpose of :func:`output_transform` (bias excluded): ``dy (N, K, Ho, Wo) -> dM (P2, K, T)``.

    With a row map ``rows`` (see the module docstring; no row named twice), ``dM`` is ``(num_rows, T)``: row
    ``rows[xi, k]`` holds position ``xi`` of channel ``k``, entries ``-1`` are not computed into it, and rows that no
    entry names are zero.
    """
    _check_tensor(dy, "dy", 4)
    t = get_transforms(m, dy.dtype, dy.device)
    n, k, ho, wo = dy.shape
    th, tw = geom.tiles
    n_tiles = n * th * tw
    if (ho, wo) != geom.out_size:
        raise ValueError(f"dy must have spatial size {geom.out_size}, got {(ho, wo)}")
    shape: tuple[int, ...] = (t.p * t.p, k, n_tiles)
    if rows is not None:
        if not isinstance(num_rows, int) or num_rows < 0:
            raise ValueError(f"num_rows must be an int >= 0 with rows, got {num_rows!r}")
        _check_rows(rows, t.p * t.p, k)
        shape = (num_rows, n_tiles)
    if _resolve(backend, dy) is Backend.NATIVE:
        out = torch.empty(shape, dtype=torch.float32)
        native_module().output_transform_adjoint(
            _np(dy), _np(t.AT), th, tw, out.numpy(), rows=None if rows is None else _np(rows)
        )
        return out
    dyp = F.pad(dy, (0, tw * m - wo, 0, th * m - ho)).reshape(n, k, th, m, tw, m)
    dm = torch.einsum("ai,nktawb,bj->ijkntw", t.AT, dyp, t.AT).reshape(t.p * t.p, k, n_tiles)
    if rows is None:
        return dm
    _check_row_values(rows, shape[0], True)
    flat = rows.reshape(-1)
    kept = (flat >= 0).nonzero().flatten()
    return dm.new_zeros(shape).index_copy(0, flat[kept], dm.reshape(-1, n_tiles).index_select(0, kept))
