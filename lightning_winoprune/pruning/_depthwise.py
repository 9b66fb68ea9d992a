"""DEPrune (docs/deprune.md): depthwise convs pruned on their Diagonal-wise Refactorization, pointwise convs by filter.

Diagonal-wise Refactorization (DR) turns a depthwise conv (``C`` channels, ``kh x kw``, ``groups=C``) into
``G = ceil(C / tile)`` sub-GEMMs, one per block of ``tile`` channels (32, the GPU tile, by default)::

    out_g (tile_g x HW) = W_g (tile_g x tile_g*kh*kw) @ X_g (tile_g*kh*kw x HW)

where ``tile_g`` is the number of channels in block ``g`` (the last block may be partial). ``W_g`` is block-diagonal:
column ``c_local*kh*kw + t`` holds the single weight ``w[g*tile + c_local, 0, t // kw, t % kw]`` in row ``c_local``.
Pruning one depthwise weight therefore zeroes a whole column of ``W_g`` (and a whole row of ``X_g``): element-wise
pruning that is column-structured. In memory, block ``g``'s columns are exactly the flattened weights of its
channels, so the sub-GEMM views handed to the masking engine are plain reshapes of ``w``.

Methods (all expressed as element-block patterns of :func:`~lightning_winoprune.pruning.compute_mask`):

- ``dcp``: the layer's weights ranked together by magnitude (one view ``(1, 1, C*kh*kw)``, layer scope).
- ``dcp-b`` (BWT, balanced workload tuning): every sub-GEMM prunes the same fraction of its own columns, ranked
  inside the sub-GEMM (the full blocks as a ``(G_full, 1, tile*kh*kw)`` view with position scope, and the partial
  last block as its own view), so no sub-GEMM waits on a slower one.
- ``dcp-bh`` (+ HSR, hardware-aware sparsity recalibration): as ``dcp-b``, then every sub-GEMM's pruned-column
  count is rounded to a multiple of ``tile`` (engine ``align=tile``): ``down`` (the paper's ``u``, under-aligned,
  keeps accuracy) or ``up`` (``o``, over-aligned, more speed), never beyond the largest multiple of ``tile`` that the
  sub-GEMM holds. For a 3x3 kernel a full sub-GEMM has ``32 * 9 = 288`` columns, so its count is one of
  ``0, 32, ..., 288``; a partial last block of ``n`` channels has ``9n`` columns and, with fewer than 32 of them
  (``n <= 3``), cannot prune any.

Pointwise (1x1) convs are pruned by whole output filters (L2 norm), the pruning DEPrune-BH reports; the pruned filter
indices let a later pass shrink the conv physically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lightning_winoprune._utils import conv_output_size
from lightning_winoprune.pruning._engine import Block, Pattern, Rounding, Scope, Score, compute_mask

__all__ = [
    "DW_BASELINES",
    "DEFAULT_DR_TILE",
    "DW_METHODS",
    "DepthwiseMaskResult",
    "PointwiseMaskResult",
    "depthwise_mask",
    "dr_column_masks",
    "dr_conv2d",
    "dr_matrices",
    "from_dr_matrices",
    "pointwise_filter_mask",
]

#: The DEPrune depthwise methods: DCP, DCP + BWT, DCP + BWT + HSR.
DW_METHODS: tuple[str, ...] = ("dcp", "dcp-b", "dcp-bh")
#: Baselines for comparison: ``channel`` prunes whole depthwise channels (the paper's channel-pruning baseline).
DW_BASELINES: tuple[str, ...] = ("channel",)
#: The GPU tile of the paper: channels per DR sub-GEMM, and HSR's alignment of pruned columns.
DEFAULT_DR_TILE = 32

_ROUNDING_ALIASES = {"down": Rounding.DOWN, "u": Rounding.DOWN, "up": Rounding.UP, "o": Rounding.UP}
_PAPER_ROUNDING = {Rounding.DOWN: "u", Rounding.UP: "o"}


# ----------------------------------------------------------------------------------------------- validation
def _check_depthwise(w: object) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() != 4 or w.shape[1] != 1:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"a depthwise weight must have shape (C, 1, kh, kw), got {shape}")
    if w.numel() == 0:
        raise ValueError(f"a depthwise weight must not be empty, got shape {tuple(w.shape)}")
    return w


def _check_tile(tile: object) -> int:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    return tile


def _check_amount(amount: object) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be a number in [0, 1], got {amount!r}")
    return float(amount)


def _parse_rounding(rounding: object) -> Rounding:
    if isinstance(rounding, Rounding):
        return rounding
    if isinstance(rounding, str) and rounding in _ROUNDING_ALIASES:
        return _ROUNDING_ALIASES[rounding]
    raise ValueError(f"rounding={rounding!r} is not valid; valid values are {list(_ROUNDING_ALIASES)}")


def _parse_score(score: object, importance: torch.Tensor | None, shape: torch.Size) -> Score:
    parsed = Score.parse(score, "score")
    if importance is not None:
        if not isinstance(importance, torch.Tensor) or importance.shape != shape:
            got = tuple(importance.shape) if isinstance(importance, torch.Tensor) else type(importance).__name__
            raise ValueError(f"importance must have the weight's shape {tuple(shape)}, got {got}")
        return Score.IMPORTANCE
    if parsed is Score.IMPORTANCE:
        raise ValueError("score='importance' needs an importance tensor of the weight's shape")
    return parsed


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return pair[0], pair[1]


def _blocks(channels: int, tile: int) -> list[tuple[int, int]]:
    """``(start, size)`` of every DR channel block."""
    return [(s, min(tile, channels - s)) for s in range(0, channels, tile)]


# ----------------------------------------------------------------------------------------------- the DR view
def dr_matrices(w: torch.Tensor, tile: int = DEFAULT_DR_TILE) -> list[torch.Tensor]:
    """The explicit DR sub-GEMM matrices of a depthwise weight.

    Args:
        w: Depthwise conv weight of shape ``(C, 1, kh, kw)``.
        tile: Channels per sub-GEMM.

    Returns:
        ``G = ceil(C / tile)`` matrices; ``W_g`` has shape ``(tile_g, tile_g*kh*kw)`` and holds
        ``w[g*tile + c_local, 0, t // kw, t % kw]`` at ``[c_local, c_local*kh*kw + t]``, zeros elsewhere.

    Raises:
        ValueError: If ``w`` is not a non-empty ``(C, 1, kh, kw)`` tensor or ``tile`` is not a positive int.
    """
    w = _check_depthwise(w)
    tile = _check_tile(tile)
    flat = w.reshape(w.shape[0], -1)
    mats = []
    for start, n in _blocks(w.shape[0], tile):
        eye = torch.eye(n, dtype=w.dtype, device=w.device).unsqueeze(-1)  # (n, n, 1)
        mats.append((eye * flat[start : start + n].unsqueeze(0)).reshape(n, -1))  # [r, c, t] = delta_rc w[c, t]
    return mats


def from_dr_matrices(mats: Sequence[torch.Tensor], kh: int, kw: int) -> torch.Tensor:
    """The depthwise weight ``(C, 1, kh, kw)`` of DR sub-GEMM matrices (the inverse of :func:`dr_matrices`).

    Args:
        mats: The sub-GEMM matrices, in channel order.
        kh: Kernel height.
        kw: Kernel width.

    Raises:
        ValueError: If a matrix is not ``(n, n*kh*kw)``, holds a non-zero outside its diagonal blocks, or the block
            sizes are not those of one tile (all equal, the last one possibly smaller).
    """
    for name, v in (("kh", kh), ("kw", kw)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if len(mats) == 0:
        raise ValueError("mats must hold at least one DR matrix")
    k = kh * kw
    sizes = []
    rows = []
    for g, m in enumerate(mats):
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] < 1 or m.shape[1] != m.shape[0] * k:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"DR matrix {g} must have shape (n, n*{k}) for a {kh}x{kw} kernel, got {shape}")
        n = m.shape[0]
        cube = m.reshape(n, n, k)
        diag = torch.eye(n, dtype=torch.bool, device=m.device).unsqueeze(-1).expand(n, n, k)
        if bool((cube != 0).logical_and(~diag).any()):
            raise ValueError(f"DR matrix {g} is not block-diagonal: it has a non-zero outside row c's columns "
                             f"[c*{k}, (c+1)*{k})")
        idx = torch.arange(n, device=m.device)
        rows.append(cube[idx, idx])  # (n, k)
        sizes.append(n)
    if any(s != sizes[0] for s in sizes[:-1]) or sizes[-1] > sizes[0]:
        raise ValueError(f"DR block sizes {sizes} are not those of one tile (all equal, the last one possibly smaller)")
    return torch.cat(rows).reshape(-1, 1, kh, kw)


def dr_column_masks(mask: torch.Tensor, tile: int = DEFAULT_DR_TILE) -> list[torch.Tensor]:
    """The column keep-vectors of the DR sub-GEMMs for a depthwise mask.

    Args:
        mask: Boolean keep-mask of a depthwise weight, shape ``(C, 1, kh, kw)``.
        tile: Channels per sub-GEMM.

    Returns:
        One boolean vector per sub-GEMM of length ``tile_g*kh*kw``: ``True`` where column ``c_local*kh*kw + t`` of
        ``W_g`` is kept. ``W_g * keep`` (a column mask) equals ``dr_matrices(w * mask)[g]``.
    """
    mask = _check_depthwise(mask)
    tile = _check_tile(tile)
    flat = mask.reshape(mask.shape[0], -1)
    return [flat[start : start + n].reshape(-1) for start, n in _blocks(mask.shape[0], tile)]


def dr_conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    tile: int = DEFAULT_DR_TILE,
) -> torch.Tensor:
    """A depthwise conv computed as the DR sub-GEMMs (a reference that proves the view, not a fast kernel).

    For every channel block ``g`` and image, ``X_g`` (``tile_g*kh*kw x H_out*W_out``) is the im2col of the block's
    channels (``F.unfold``), and the block's output is ``W_g @ X_g``.

    Args:
        x: Input of shape ``(N, C, H, W)``.
        w: Depthwise weight of shape ``(C, 1, kh, kw)``.
        stride: Conv stride.
        padding: Zero padding.
        tile: Channels per sub-GEMM.

    Returns:
        ``F.conv2d(x, w, stride=stride, padding=padding, groups=C)``, up to float rounding.

    Raises:
        ValueError: On a bad weight, tile, stride, padding, or an input whose channels are not ``C``.
    """
    w = _check_depthwise(w)
    tile = _check_tile(tile)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != w.shape[0]:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (N, {w.shape[0]}, H, W) for a weight of {w.shape[0]} channels, "
                         f"got {shape}")
    st, pd = _pair(stride, "stride"), _pair(padding, "padding")
    if min(st) < 1 or min(pd) < 0:
        raise ValueError(f"stride must be positive and padding non-negative, got stride={stride!r}, "
                         f"padding={padding!r}")
    kh, kw = w.shape[-2:]
    h_out = conv_output_size(x.shape[2], kh, st[0], pd[0])
    w_out = conv_output_size(x.shape[3], kw, st[1], pd[1])
    if h_out < 1 or w_out < 1:
        raise ValueError(f"the {kh}x{kw} kernel does not fit the padded input {tuple(x.shape[2:])}")
    outs = []
    for (start, n), w_g in zip(_blocks(w.shape[0], tile), dr_matrices(w, tile), strict=True):
        x_g = F.unfold(x[:, start : start + n], (kh, kw), padding=pd, stride=st)  # (N, n*kh*kw, H_out*W_out)
        outs.append(w_g @ x_g)  # (N, n, H_out*W_out)
    return torch.cat(outs, dim=1).reshape(x.shape[0], w.shape[0], h_out, w_out)


# ----------------------------------------------------------------------------------------------- DEPrune masks
@dataclass
class DepthwiseMaskResult:
    """What :func:`depthwise_mask` decided for one depthwise layer.

    Attributes:
        mask: Boolean keep-mask of the weight's shape (``True`` keeps).
        requested: The requested amount.
        sparsity: The achieved fraction of pruned weights in the layer.
        subgemm_ratios: Fraction of pruned columns in every DR sub-GEMM.
        real_dw: The smallest of ``subgemm_ratios`` (the paper's "Real DW"): the slowest sub-GEMM bounds the speedup.
        pruned_columns: Pruned-column count of every sub-GEMM.
        subgemm_columns: Column count of every sub-GEMM (``tile_g*kh*kw``).
        method: The method used.
        tile: Channels per sub-GEMM.
        rounding: HSR's direction for ``dcp-bh`` in the paper's letters (``"u"`` under-, ``"o"`` over-aligned);
            ``None`` for the other methods.
        notes: Human-readable remarks on rounding.
    """

    mask: torch.Tensor
    requested: float
    sparsity: float
    subgemm_ratios: list[float]
    real_dw: float
    pruned_columns: list[int]
    subgemm_columns: list[int]
    method: str
    tile: int
    rounding: str | None = None
    notes: list[str] = field(default_factory=list)


def _position_scope_keep(flat: torch.Tensor, imp: torch.Tensor | None, amount: float, method: str, tile: int,
                         rnd: Rounding, score: Score, k: int, notes: list[str]) -> torch.Tensor:
    """The keep-mask of the DR-view methods (``dcp-b``, ``dcp-bh``): the same count pruned in every sub-GEMM.

    The full sub-GEMMs are one stacked view (position scope), the partial one on its own; ``notes`` gets what each
    view reported.
    """
    pattern = Pattern(Block.ELEMENT, Scope.POSITION, score=score)
    if method == "dcp-bh":
        pattern = pattern.with_(align=tile, rounding=rnd)
    n_full = (flat.numel() // (tile * k)) * tile * k
    views = [(0, n_full, tile * k, "full sub-GEMMs"), (n_full, flat.numel(), flat.numel() - n_full,
                                                         "partial sub-GEMM")]
    parts = []
    for lo, hi, cols, what in views:
        if hi == lo:
            continue
        view = flat[lo:hi].view(-1, 1, cols)
        res = compute_mask(view, amount, pattern, None if imp is None else imp[lo:hi].view(-1, 1, cols))
        parts.append(res.mask.reshape(-1))
        notes += [f"{what}: {note}" for note in res.notes]
        if method == "dcp-bh" and cols < tile and amount > 0:
            notes.append(f"{what} has {cols} columns, fewer than the tile {tile}: HSR cannot prune it")
    return torch.cat(parts)


def depthwise_mask(
    w: torch.Tensor,
    amount: float,
    method: str,
    tile: int = DEFAULT_DR_TILE,
    rounding: str = "down",
    score: str = "l1",
    importance: torch.Tensor | None = None,
) -> DepthwiseMaskResult:
    """DEPrune keep-mask of a depthwise weight: ``amount`` of its DR columns pruned by ``method``.

    Args:
        w: Depthwise conv weight of shape ``(C, 1, kh, kw)``.
        amount: Fraction of weights (DR columns) to prune, in ``[0, 1]``.
        method: ``"dcp"`` (layer ranking), ``"dcp-b"`` (the same ratio in every sub-GEMM), ``"dcp-bh"``
            (``dcp-b`` with every sub-GEMM's pruned-column count rounded to a multiple of ``tile``) or ``"channel"``
            (the baseline DEPrune compares against: whole depthwise channels ranked by the L2 norm of their kernel).
        tile: Channels per sub-GEMM (the GPU tile), also HSR's alignment.
        rounding: HSR's direction for ``dcp-bh``: ``"down"``/``"u"`` (under-aligned) or ``"up"``/``"o"``
            (over-aligned); validated but unused by the other methods.
        score: Magnitude score, ``"l1"`` or ``"l2"`` (the same ranking for single weights).
        importance: Per-weight saliency of ``w``'s shape; when given, weights are ranked by its absolute value instead
            of their magnitude.

    Raises:
        ValueError: On a weight that is not ``(C, 1, kh, kw)``, an amount outside ``[0, 1]``, an unknown method,
            rounding or score, a non-positive tile, or an importance of another shape.
    """
    w = _check_depthwise(w)
    amount = _check_amount(amount)
    if method not in DW_METHODS + DW_BASELINES:
        raise ValueError(f"method={method!r} is not valid; valid values are {list(DW_METHODS + DW_BASELINES)}")
    tile = _check_tile(tile)
    rnd = _parse_rounding(rounding)
    score_ = _parse_score(score, importance, w.shape)

    c = w.shape[0]
    k = w.shape[2] * w.shape[3]
    flat = w.detach().reshape(-1)
    imp = None if importance is None else importance.detach().reshape(-1)
    notes: list[str] = []
    blocks = _blocks(c, tile)
    columns = [n * k for _, n in blocks]

    if method in ("dcp", "channel"):
        # dcp: single weights over the layer; channel: a channel's whole kernel (a row of the (1, C, k) view)
        shape = (1, 1, flat.numel()) if method == "dcp" else (1, c, k)
        block = Block.ELEMENT if method == "dcp" else Block.ROW
        ch_score = Score.L2 if method == "channel" and importance is None else score_
        res = compute_mask(flat.view(shape), amount, Pattern(block, Scope.LAYER, score=ch_score),
                           None if imp is None else imp.view(shape))
        keep = res.mask.reshape(-1)
        notes += res.notes
    else:
        keep = _position_scope_keep(flat, imp, amount, method, tile, rnd, score_, k, notes)

    pruned_columns = [int((~keep[s * k : (s + n) * k]).sum()) for s, n in blocks]
    ratios = [p / cols for p, cols in zip(pruned_columns, columns, strict=True)]
    sparsity = sum(pruned_columns) / flat.numel()
    return DepthwiseMaskResult(
        mask=keep.view(w.shape),
        requested=amount,
        sparsity=sparsity,
        subgemm_ratios=ratios,
        real_dw=min(ratios),
        pruned_columns=pruned_columns,
        subgemm_columns=columns,
        method=method,
        tile=tile,
        rounding=_PAPER_ROUNDING[rnd] if method == "dcp-bh" else None,
        notes=notes,
    )


@dataclass
class PointwiseMaskResult:
    """What :func:`pointwise_filter_mask` decided for one pointwise (1x1) conv.

    Attributes:
        mask: Boolean keep-mask of the weight's shape (``True`` keeps); a pruned filter is ``False`` throughout.
        requested: The requested amount.
        sparsity: The achieved fraction of pruned weights (pruned filters / filters).
        pruned_filters: Indices of the pruned output filters, sorted ascending (for a physical shrink).
        notes: Human-readable remarks on rounding.
    """

    mask: torch.Tensor
    requested: float
    sparsity: float
    pruned_filters: list[int]
    notes: list[str] = field(default_factory=list)


def pointwise_filter_mask(
    w: torch.Tensor, amount: float, score: str = "l2", importance: torch.Tensor | None = None
) -> PointwiseMaskResult:
    """Filter-pruning keep-mask of a pointwise (1x1) conv weight: whole output filters with the lowest scores.

    The engine's ``filter`` block on the view ``(1, K, C)``: the pruned filter count is the one closest to
    ``amount * K``.

    Args:
        w: Pointwise conv weight of shape ``(K, C, 1, 1)``.
        amount: Fraction of filters (and weights) to prune, in ``[0, 1]``.
        score: Filter score, ``"l2"`` (the paper's) or ``"l1"`` norm.
        importance: Per-weight saliency of ``w``'s shape; when given, filters are ranked by its summed absolute value.

    Raises:
        ValueError: On a weight that is not ``(K, C, 1, 1)``, an amount outside ``[0, 1]``, an unknown score, or an
            importance of another shape.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 4 or tuple(w.shape[2:]) != (1, 1) or w.numel() == 0:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"a pointwise weight must be a non-empty (K, C, 1, 1) tensor, got {shape}")
    amount = _check_amount(amount)
    score_ = _parse_score(score, importance, w.shape)
    k, c = w.shape[:2]
    view = w.detach().reshape(1, k, c)
    res = compute_mask(view, amount, Pattern(Block.FILTER, Scope.LAYER, score=score_),
                       None if importance is None else importance.detach().reshape(1, k, c))
    keep = res.mask.reshape(k, c)
    pruned = torch.nonzero(~keep[:, 0]).reshape(-1).tolist()
    return PointwiseMaskResult(keep.view(w.shape), amount, len(pruned) / k, sorted(pruned), list(res.notes))
