"""The one masking engine: a pruning pattern is data, applied to any ``(P, R, C)`` weight view.

A *weight view* is a stack of ``P`` matrices of shape ``R x C``: the ``p*p`` BGEMM matrices ``U[xi]`` (K x C) of a
Winograd layer, the DR sub-GEMMs of a depthwise conv, or one ``K x C`` matrix of pointwise filters. A
:class:`Pattern` says how those matrices are cut into blocks, how blocks are scored and ranked, and how the pruned
count is rounded. :func:`compute_mask` turns a view, a pattern and a target amount into a boolean keep-mask.

Blocks (every element belongs to exactly one block):

====================  =========================================================  ==================
block                 one block is                                               position-local
====================  =========================================================  ==================
``element``           one entry ``W[p, r, c]``                                   yes
``row``               ``W[p, r, :]``                                             yes
``column``            ``W[p, :, c]``                                             yes
``row_segment``       ``W[p, r, s*unit:(s+1)*unit]`` (the last one may be short)  yes
``column_segment``    ``W[p, s*unit:(s+1)*unit, c]``                             yes
``filter``            ``W[:, r, :]``: row ``r`` in every matrix                  no
``kernel``            ``W[:, r, c]``: entry ``(r, c)`` in every matrix            no
====================  =========================================================  ==================

Scores (:class:`Score`): ``l2`` (group lasso), ``l1``, ``importance`` (the sum of a given per-element saliency), and
two *scaled* L2 scores that rank the view multiplied per matrix by a given ``scale`` of shape ``(P,)``: the
Winograd methods supply it from the transform matrices (``l2-scaled``: each position's output energy,
``l2-factor``: the inverse square root of the importance factor, see ``lightning_winoprune.pruning._methods``).
The score is part of the :class:`Pattern`, so every consumer of a pattern ranks the same blocks.

Selection: blocks are ranked by score (lowest pruned first; ties broken by block index, so the result is
deterministic). With ``scope="layer"`` the ranking is global and the number of pruned blocks is the one whose
pruned-element count is closest to ``amount * numel``. With ``scope="position"`` (balanced) every matrix prunes the
same number of its own blocks. With ``align > 1`` the pruned-block count of every matrix is then rounded to a
multiple of ``align`` (``rounding="down"`` keeps more weights, ``"up"`` prunes more), never beyond the largest
multiple of ``align`` the matrix holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from lightning_winoprune._enum import ParsableEnum

__all__ = ["Block", "MaskResult", "Pattern", "Rounding", "Scope", "Score", "block_layout", "compute_mask"]


class Block(ParsableEnum):
    """The pruning unit on one ``R x C`` matrix of the view (see the module docstring)."""

    ELEMENT = "element"
    ROW = "row"
    COLUMN = "column"
    ROW_SEGMENT = "row_segment"
    COLUMN_SEGMENT = "column_segment"
    FILTER = "filter"
    KERNEL = "kernel"


class Scope(ParsableEnum):
    """Where blocks compete: the whole layer, or each matrix of the view separately (balanced)."""

    LAYER = "layer"
    POSITION = "position"


class Score(ParsableEnum):
    """Block score: ``l2`` (group lasso, the default), ``l1``, ``importance`` (sum of a given saliency), or scaled L2.

    The scaled scores ``l2-scaled`` (per-position output energy) and ``l2-factor`` (importance-factor adjusted) are
    the L2 norm of the view multiplied per matrix by a scale the caller supplies (see :attr:`scaled`).
    """

    L2 = "l2"
    L1 = "l1"
    IMPORTANCE = "importance"
    L2_SCALED = "l2-scaled"
    L2_FACTOR = "l2-factor"

    @property
    def scaled(self) -> bool:
        """Whether the score ranks the view multiplied per matrix by a ``scale`` (``(P,)``) given to the engine."""
        return self in (Score.L2_SCALED, Score.L2_FACTOR)


class Rounding(ParsableEnum):
    """How a per-matrix pruned-block count is rounded to a multiple of ``align``."""

    DOWN = "down"
    UP = "up"


#: Blocks that span every matrix of the view (not position-local).
_SPANNING = (Block.FILTER, Block.KERNEL)


@dataclass(frozen=True)
class Pattern:
    """A pruning pattern, as data.

    Attributes:
        block: The pruning unit.
        scope: Global ranking (``layer``) or equal counts per matrix (``position``, balanced).
        unit: Segment length for ``row_segment``/``column_segment`` (a segment longer than the row or column is the
            whole row or column).
        align: Pruned-block count of every matrix rounded to a multiple of this (1: no rounding).
        rounding: Direction of that rounding.
        score: How blocks are scored.
    """

    block: Block = Block.ROW
    scope: Scope = Scope.LAYER
    unit: int = 1
    align: int = 1
    rounding: Rounding = Rounding.DOWN
    score: Score = Score.L2

    def __post_init__(self) -> None:
        object.__setattr__(self, "block", Block.parse(self.block, "block"))
        object.__setattr__(self, "scope", Scope.parse(self.scope, "scope"))
        object.__setattr__(self, "rounding", Rounding.parse(self.rounding, "rounding"))
        object.__setattr__(self, "score", Score.parse(self.score, "score"))
        for name in ("unit", "align"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if self.block in _SPANNING and (self.scope is Scope.POSITION or self.align > 1):
            raise ValueError(f"block={self.block.value!r} spans every matrix: it supports neither scope='position' "
                             "nor align > 1")

    def with_(self, **changes: object) -> Pattern:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass
class MaskResult:
    """What :func:`compute_mask` decided for one weight view.

    Attributes:
        mask: Boolean keep-mask of the view's shape (``True`` keeps).
        requested: The requested amount.
        sparsity: The achieved fraction of zeroed elements.
        pruned_blocks: Pruned-block count per matrix (``(P,)``; for ``filter`` and ``kernel`` blocks, the pruned
            blocks repeated).
        blocks_per_matrix: Blocks in one matrix (filters or kernels in the layer for ``filter`` and ``kernel``).
        pattern: The pattern used.
        notes: Human-readable remarks on rounding.
    """

    mask: torch.Tensor
    requested: float
    sparsity: float
    pruned_blocks: torch.Tensor
    blocks_per_matrix: int
    pattern: Pattern
    notes: list[str] = field(default_factory=list)


def block_layout(shape: tuple[int, int, int], pattern: Pattern, device: torch.device | None = None) -> torch.Tensor:
    """Block id of every element of a ``(P, R, C)`` view; ids of matrix ``p`` are ``p * B + [0, B)``.

    For ``filter`` blocks the id is the row ``r``, for ``kernel`` blocks ``r * C + c`` (the same in every matrix).
    """
    p_, r_, c_ = shape
    p = torch.arange(p_, device=device).view(p_, 1, 1)
    r = torch.arange(r_, device=device).view(1, r_, 1)
    c = torch.arange(c_, device=device).view(1, 1, c_)
    b = pattern.block
    if b is Block.ELEMENT:
        ids = (p * r_ + r) * c_ + c
    elif b is Block.ROW or (b is Block.ROW_SEGMENT and pattern.unit >= c_):
        ids = p * r_ + r + 0 * c
    elif b is Block.COLUMN or (b is Block.COLUMN_SEGMENT and pattern.unit >= r_):
        ids = p * c_ + c + 0 * r
    elif b is Block.ROW_SEGMENT:
        segs = math.ceil(c_ / pattern.unit)
        ids = (p * r_ + r) * segs + c // pattern.unit
    elif b is Block.COLUMN_SEGMENT:
        segs = math.ceil(r_ / pattern.unit)
        ids = (p * c_ + c) * segs + r // pattern.unit
    elif b is Block.KERNEL:
        ids = r * c_ + c + 0 * p
    else:  # FILTER
        ids = r + 0 * p + 0 * c
    return ids.expand(p_, r_, c_)


def _block_scores(view: torch.Tensor, ids: torch.Tensor, n_blocks: int, pattern: Pattern,
                  importance: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    if pattern.score is Score.IMPORTANCE:
        if importance is None:
            raise ValueError("score='importance' needs an importance tensor of the view's shape")
        contrib = importance.abs()
    elif pattern.score is Score.L1:
        contrib = view.abs()
    elif pattern.score.scaled:
        if scale is None:
            raise ValueError(f"score={pattern.score.value!r} needs a per-matrix scale of shape ({view.shape[0]},); "
                             "winograd_mask supplies it for Winograd weights")
        contrib = (view.to(torch.float64) * scale.to(device=view.device, dtype=torch.float64).view(-1, 1, 1)).square()
    else:
        contrib = view.square()
    scores = torch.zeros(n_blocks, dtype=torch.float64, device=view.device)
    scores.index_add_(0, ids.reshape(-1), contrib.reshape(-1).to(torch.float64))
    return scores if pattern.score in (Score.L1, Score.IMPORTANCE) else scores.sqrt()


def _closest_prefix(sizes_sorted: torch.Tensor, target: float) -> int:
    """Number of leading blocks whose total size is closest to ``target`` (ties: fewer blocks)."""
    cum = torch.cat([sizes_sorted.new_zeros(1), sizes_sorted.cumsum(0)]).to(torch.float64)
    return int(torch.argmin((cum - target).abs()).item())


def _align(count: torch.Tensor, align: int, rounding: Rounding, limit: int) -> torch.Tensor:
    top = (limit // align) * align
    rounded = (count // align) * align if rounding is Rounding.DOWN else -((-count) // align) * align
    return rounded.clamp(max=top)


def compute_mask(
    view: torch.Tensor, amount: float, pattern: Pattern, importance: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> MaskResult:
    """Keep-mask of ``view`` (``(P, R, C)``) that prunes ``amount`` of its elements in ``pattern``'s blocks.

    Args:
        view: The weight view.
        amount: Fraction of elements to prune, in ``[0, 1]``.
        pattern: Block shape, scope, score and rounding.
        importance: Per-element saliency of the view's shape, for ``score="importance"``.
        scale: Per-matrix multipliers of shape ``(P,)``, for the scaled scores (``l2-scaled``, ``l2-factor``).

    Raises:
        ValueError: On a bad amount, view, importance or scale shape, or a missing importance or scale.
    """
    _check_inputs(view, amount, importance, scale)
    view = view.detach()
    p_, r_, c_ = view.shape
    if view.numel() == 0:
        return MaskResult(torch.ones_like(view, dtype=torch.bool), float(amount), 0.0,
                          torch.zeros(p_, dtype=torch.long), 0, pattern, ["empty view: nothing to prune"])
    ids = block_layout((p_, r_, c_), pattern, view.device)
    flat_ids = ids.reshape(-1)
    n_blocks = int(flat_ids.max().item()) + 1
    sizes = torch.bincount(flat_ids, minlength=n_blocks)
    scores = _block_scores(view, ids, n_blocks, pattern, importance, scale)
    notes: list[str] = []
    if pattern.block in _SPANNING:
        pruned, per_matrix = _prune_spanning(scores, sizes, amount * view.numel(), p_)
        blocks_per_matrix = n_blocks
    else:
        blocks_per_matrix = n_blocks // p_
        pruned, per_matrix = _prune_per_matrix(scores.view(p_, blocks_per_matrix), sizes.view(p_, blocks_per_matrix),
                                               amount * view.numel(), pattern, notes)
    mask = ~pruned[flat_ids].view(p_, r_, c_)
    sparsity = 1.0 - mask.float().mean().item() if mask.numel() else 0.0
    if amount > 0 and abs(sparsity - amount) > 1.0 / max(mask.numel(), 1):
        notes.append(f"achieved sparsity {sparsity:.4f} for the requested {amount:.4f} (block granularity)")
    return MaskResult(mask, float(amount), sparsity, per_matrix, blocks_per_matrix, pattern, notes)


def _check_inputs(view: torch.Tensor, amount: float, importance: torch.Tensor | None,
                  scale: torch.Tensor | None) -> None:
    if not isinstance(view, torch.Tensor) or view.dim() != 3:
        raise ValueError(f"view must be a 3-D (P, R, C) tensor, got {getattr(view, 'shape', type(view).__name__)}")
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be a number in [0, 1], got {amount!r}")
    if importance is not None and importance.shape != view.shape:
        raise ValueError(f"importance must have the view's shape {tuple(view.shape)}, got {tuple(importance.shape)}")
    if scale is not None and tuple(scale.shape) != (view.shape[0],):
        raise ValueError(f"scale must have shape ({view.shape[0]},), got {tuple(scale.shape)}")


def _prune_spanning(scores: torch.Tensor, sizes: torch.Tensor, target: float,
                    p_: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks that span every matrix: one global ranking; the pruned blocks and their count, once per matrix."""
    order = torch.argsort(scores, stable=True)
    n = _closest_prefix(sizes[order], target)
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    pruned[order[:n]] = True
    return pruned, torch.full((p_,), n, dtype=torch.long)


def _prune_per_matrix(s: torch.Tensor, sz: torch.Tensor, target: float, pattern: Pattern,
                      notes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Position-local blocks (scores ``s`` and sizes ``sz`` per matrix): the pruned blocks and the count per matrix.

    Appends a note to ``notes`` when ``align`` rounded the counts.
    """
    p_, blocks_per_matrix = s.shape
    order = torch.argsort(s, dim=1, stable=True)  # per matrix, lowest score first
    if pattern.scope is Scope.POSITION:
        # one count for every matrix: the one whose pruned elements (each matrix pruning its own lowest-score
        # blocks, short segments included) total closest to the target
        cum = torch.gather(sz, 1, order).cumsum(1).sum(0).to(torch.float64)
        cum = torch.cat([cum.new_zeros(1), cum])
        n = int(torch.argmin((cum - target).abs()).item())
        counts = torch.full((p_,), n, dtype=torch.long, device=s.device)
    else:
        glob = torch.argsort(s.reshape(-1), stable=True)
        n = _closest_prefix(sz.reshape(-1)[glob], target)
        counts = torch.bincount(glob[:n] // blocks_per_matrix, minlength=p_)
    if pattern.align > 1:
        aligned = _align(counts, pattern.align, pattern.rounding, blocks_per_matrix)
        if not torch.equal(aligned, counts):
            notes.append(f"per-matrix pruned-block counts rounded {pattern.rounding.value} to multiples of "
                         f"{pattern.align}")
        counts = aligned
    # prune the `counts[p]` lowest-score blocks of every matrix p (the same set a global ranking picks)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(blocks_per_matrix, device=s.device).expand(p_, -1))
    return (rank < counts.view(p_, 1)).reshape(-1), counts.cpu()
