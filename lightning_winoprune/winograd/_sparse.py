"""The structured-sparse BGEMM route of :class:`~lightning_winoprune.WinogradConv2d` (``Route.SPARSE``).

With a mask, the GEMM of Winograd position ``xi`` only needs the rows ``R_xi`` of ``U[xi]`` (``K x C``) that keep an
entry and the columns ``C_xi`` that keep one: every other row of ``M[xi] = U[xi] @ V[xi]`` is zero, and every other
row of ``V[xi]`` is multiplied by zeros. The route gathers those rows and columns, runs one batched GEMM of shape
``(P2, Rmax, Cmax) @ (P2, Cmax, T)`` and hands the result to the output transform with a row map (which row of the
result holds each position of each channel; every other row of ``M`` is zero), so no dense ``M`` is ever built.
Positions with fewer kept rows
(columns) than ``Rmax`` (``Cmax``) are padded with distinct pruned rows (columns) of that position: their gathered
weights are masked to zero, so they write zeros into rows that are zero anyway, and no two gathered rows collide.

The backward pass is built the same way: the output transform's adjoint writes only the gathered rows ``dM_g``
through the same row map, ``dV = U_g^T dM_g`` (scattered into zero rows
where columns were gathered) and ``dU_g = dM_g V_g^T`` masked with the gathered mask and scattered into a zero
``dU``. A pruned entry of ``dU`` is therefore exactly zero by construction (never computed, never multiplied), even
when a NaN or an inf is stored in the pruned weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_winoprune.kernels._backend import Backend
from lightning_winoprune.winograd._mask import keep_bits, masked, masked_
from lightning_winoprune.winograd._tiles import (
    TileGeometry,
    input_transform,
    input_transform_adjoint,
    output_transform,
    output_transform_adjoint,
)

__all__ = ["SparsePlan", "build_plan", "positions_view", "sparse_conv"]


def positions_view(t: torch.Tensor) -> torch.Tensor:
    """``(K, C, p, p) -> (P2, K, C)`` (a view for position-major tensors, see ``winograd_layout``)."""
    k, c, p, _ = t.shape
    return t.permute(2, 3, 0, 1).reshape(p * p, k, c)


@dataclass(frozen=True)
class SparsePlan:
    """The gather/scatter indices of one mask (see the module docstring); built by :func:`build_plan`.

    Attributes:
        p2: Winograd positions ``p * p``.
        k: Output channels (rows of every ``U[xi]``).
        c: Input channels (columns of every ``U[xi]``).
        rmax: Rows gathered per position, ``max |R_xi|``.
        cmax: Columns gathered per position, ``max |C_xi|``.
        rows: Flat indices into ``(P2 * K)`` of the gathered rows, ``(P2 * rmax,)``; ``None`` when ``rmax == k``.
        cols: Flat indices into ``(P2 * C)`` of the gathered columns, ``(P2 * cmax,)``; ``None`` when ``cmax == c``.
        elems: Flat indices into ``(P2 * K * C)`` of the gathered weights, ``(P2 * rmax * cmax,)``; ``None`` when
            columns are not gathered (then ``rows`` alone addresses them).
        mask: The mask gathered like the weights, ``(P2, rmax, cmax)`` bool.
        rowmap: ``(P2, K)`` int64, the row of the gathered GEMM result ``(P2 * rmax, T)`` holding each position of
            each output channel, ``-1`` for the rows not gathered; ``None`` when ``rows`` is.

    """

    p2: int
    k: int
    c: int
    rmax: int
    cmax: int
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    elems: torch.Tensor | None
    mask: torch.Tensor
    rowmap: torch.Tensor | None
    _bits: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def bits(self, dtype: torch.dtype) -> torch.Tensor:
        """The gathered mask's bit pattern for floats of ``dtype`` (see :func:`keep_bits`), cached."""
        if dtype not in self._bits:
            self._bits[dtype] = keep_bits(self.mask, dtype)
        return self._bits[dtype]

    @property
    def work_fraction(self) -> float:
        """The share of the dense BGEMM's multiply-adds this plan runs, ``rmax * cmax / (k * c)``."""
        return self.rmax * self.cmax / (self.k * self.c)

    def gather_weight(self, u: torch.Tensor) -> torch.Tensor:
        """``where(mask_g, U gathered, 0)`` of shape ``(P2, rmax, cmax)`` for a ``(K, C, p, p)`` weight."""
        uv = positions_view(u)
        if self.elems is not None:
            g = uv.reshape(-1).index_select(0, self.elems).view(self.p2, self.rmax, self.cmax)
        elif self.rows is not None:
            g = uv.reshape(self.p2 * self.k, self.c).index_select(0, self.rows).view(self.p2, self.rmax, self.c)
        else:
            g = uv
        return masked(g, self.mask, self.bits(g.dtype))


def _keep_order(kept: torch.Tensor, count: int) -> torch.Tensor:
    """Per row of ``kept`` (``(P2, L)`` bool), the first ``count`` indices: kept ones first, then pruned ones."""
    order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)
    return order[:, :count]


def build_plan(mask: torch.Tensor) -> SparsePlan:
    """The :class:`SparsePlan` of a ``(K, C, p, p)`` boolean keep-mask (``True`` keeps)."""
    if mask.dtype != torch.bool or mask.dim() != 4:
        raise ValueError(f"mask must be a 4-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    mv = positions_view(mask)
    p2, k, c = mv.shape
    kept_rows, kept_cols = mv.any(dim=2), mv.any(dim=1)  # (P2, K), (P2, C)
    rmax = int(kept_rows.sum(dim=1).max()) if p2 else 0
    cmax = int(kept_cols.sum(dim=1).max()) if p2 else 0
    dev = mask.device
    rows = cols = elems = None
    row_idx = torch.arange(k, device=dev).expand(p2, k) if rmax == k else _keep_order(kept_rows, rmax)
    col_idx = torch.arange(c, device=dev).expand(p2, c) if cmax == c else _keep_order(kept_cols, cmax)
    pos = torch.arange(p2, device=dev)
    if rmax < k:
        rows = (pos[:, None] * k + row_idx).reshape(-1).contiguous()
    if cmax < c:
        cols = (pos[:, None] * c + col_idx).reshape(-1).contiguous()
        elems = ((pos[:, None, None] * k + row_idx[:, :, None]) * c + col_idx[:, None, :]).reshape(-1).contiguous()
    gathered = mv[pos[:, None, None], row_idx[:, :, None], col_idx[:, None, :]]
    rowmap = None
    if rows is not None:
        rowmap = torch.full((p2 * k,), -1, dtype=torch.int64, device=dev)
        rowmap[rows] = torch.arange(rows.numel(), device=dev)
        rowmap = rowmap.view(p2, k)
    return SparsePlan(p2, k, c, rmax, cmax, rows, cols, elems, gathered.contiguous(), rowmap)


def _scatter_rows(src: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """A zero ``(rows, T)`` tensor with ``src`` (``(len(index), T)``) copied into the rows ``index``."""
    out = src.new_zeros(rows, src.shape[-1])
    return out.index_copy_(0, index, src)


class _SparseBGEMMConv(torch.autograd.Function):
    """ITrans -> gathered bmm -> scatter -> OTrans, with the backward pass built from the same gathers."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        u: torch.Tensor,
        bias: torch.Tensor | None,
        plan: SparsePlan,
        m: int,
        geom: TileGeometry,
        backend: Backend,
    ) -> torch.Tensor:
        v = input_transform(x, m, geom, backend)
        t = v.shape[-1]
        vg = v if plan.cols is None else v.view(plan.p2 * plan.c, t).index_select(0, plan.cols).view(
            plan.p2, plan.cmax, t)
        ug = plan.gather_weight(u)
        mg = torch.bmm(ug, vg)
        if plan.rowmap is None:
            y = output_transform(mg, m, geom, x.shape[0], bias, backend)
        else:
            y = output_transform(mg.view(-1, t), m, geom, x.shape[0], bias, backend, rows=plan.rowmap)
        ctx.save_for_backward(ug, vg)
        ctx.plan, ctx.m, ctx.geom, ctx.backend = plan, m, geom, backend
        ctx.x_shape, ctx.has_bias, ctx.u_dtype = tuple(x.shape), bias is not None, u.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ug, vg = ctx.saved_tensors
        plan: SparsePlan = ctx.plan
        t = vg.shape[-1]
        if plan.rowmap is None:
            dmg = output_transform_adjoint(dy.contiguous(), ctx.m, ctx.geom, ctx.backend)
        else:
            dmg = output_transform_adjoint(dy.contiguous(), ctx.m, ctx.geom, ctx.backend, rows=plan.rowmap,
                                           num_rows=plan.p2 * plan.rmax).view(plan.p2, plan.rmax, t)
        dx = du = dbias = None
        if ctx.needs_input_grad[0]:
            dvg = torch.bmm(ug.transpose(1, 2), dmg)
            dv = dvg if plan.cols is None else _scatter_rows(dvg.view(-1, t), plan.cols, plan.p2 * plan.c).view(
                plan.p2, plan.c, t)
            dx = input_transform_adjoint(dv, ctx.m, ctx.geom, ctx.x_shape, ctx.backend)
        if ctx.needs_input_grad[1]:
            dug = masked_(torch.bmm(dmg, vg.transpose(1, 2)), plan.bits(vg.dtype))  # pruned: exactly +0
            p = round(plan.p2**0.5)
            if plan.elems is not None:
                flat = dug.new_zeros(plan.p2 * plan.k * plan.c).index_copy_(0, plan.elems, dug.reshape(-1))
            elif plan.rows is not None:
                flat = _scatter_rows(dug.reshape(-1, plan.c), plan.rows, plan.p2 * plan.k)
            else:
                flat = dug
            du = flat.view(p, p, plan.k, plan.c).permute(2, 3, 0, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum(dim=(0, 2, 3))
        return dx, du, dbias, None, None, None, None


def sparse_conv(
    x: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None,
    plan: SparsePlan,
    m: int,
    geom: TileGeometry,
    backend: Backend,
) -> torch.Tensor:
    """The Winograd convolution of ``x`` with the weights of ``u`` that ``plan``'s mask keeps.

    Args:
        x: Input ``(N, C, H, W)`` with ``N > 0``.
        u: Winograd-domain weight ``(K, C, p, p)``, best stored position-major (``winograd_layout``); pruned entries
            are never read into the GEMM, whatever they store.
        bias: Optional bias ``(K,)``.
        plan: The plan of the mask (:func:`build_plan`).
        m: Output tile size.
        geom: Tile geometry of the input.
        backend: Backend of the tile transforms.

    Returns:
        The output ``(N, K, Ho, Wo)``; its gradient with respect to ``u`` is exactly zero at every pruned entry.

    """
    out: torch.Tensor = _SparseBGEMMConv.apply(x, u, bias, plan, m, geom, backend)
    return out
