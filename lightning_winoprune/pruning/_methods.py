"""Named pruning methods for Winograd layers, as patterns of the one engine (defined in ``docs/pruning.md``).

Besides the method table this module holds what the Winograd methods derive from the transform matrices: the
per-position scales of the scaled scores (:func:`position_scale`, :func:`importance_factor`, :func:`score_scale`),
which spatial kernel entries make which Winograd positions exactly zero (:func:`zero_positions`,
:data:`SPATIAL_GROUPS`), spatial-Winograd's stage-1 mask (:func:`spatial_stage_mask`) and the spatial-domain step
expressed on Winograd weights (:func:`spatial_gradient`, :func:`project_spatial`, :func:`spatial_weight`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from lightning_winoprune.pruning._engine import Block, MaskResult, Pattern, Scope, Score, compute_mask
from lightning_winoprune.winograd._transforms import get_transforms

__all__ = [
    "DEFAULT_ABWSP_ALIGN",
    "DEFAULT_ABWSP_UNIT",
    "METHODS",
    "POLICIES",
    "SPATIAL_GROUPS",
    "SPATIAL_STAGE",
    "filter_support",
    "importance_factor",
    "method_pattern",
    "position_scale",
    "project_spatial",
    "score_scale",
    "spatial_gradient",
    "spatial_stage_mask",
    "spatial_weight",
    "winograd_mask",
    "winograd_mask_from_view",
    "winograd_view",
    "zero_positions",
]

#: ABWSP's hardware unit on a CPU: 16 float32 lanes (one AVX-512 register, two AVX2 ones); 32 is the GPU tile.
DEFAULT_ABWSP_UNIT = 16
#: ABWSP's per-position rounding of pruned units: the row count of the kernels' GEMM micro-tile.
DEFAULT_ABWSP_ALIGN = 8

#: Method name -> pattern. ``abwsp`` is completed per layer by its policy (``wsp`` or ``bwsp``, see :data:`POLICIES`).
METHODS: dict[str, Pattern] = {
    "wwp": Pattern(Block.ELEMENT, Scope.LAYER),
    "fp": Pattern(Block.FILTER, Scope.LAYER),
    "wsp-r": Pattern(Block.ROW, Scope.LAYER),
    "wsp-c": Pattern(Block.COLUMN, Scope.LAYER),
    "bwsp": Pattern(Block.ROW, Scope.POSITION),
    "abwsp": Pattern(Block.ROW_SEGMENT, Scope.LAYER, unit=DEFAULT_ABWSP_UNIT, align=DEFAULT_ABWSP_ALIGN),
    # stage 2 of spatial-Winograd pruning: elements, importance-factor adjusted; stage 1 is SPATIAL_STAGE
    "spatial-winograd": Pattern(Block.ELEMENT, Scope.LAYER, score=Score.L2_FACTOR),
}

#: Stage 1 of ``spatial-winograd``: whole kernels ``(k, c)`` of the Winograd border positions (the positions the
#: kernel's eight outer spatial weights feed alone, see :func:`spatial_stage_mask`), ranked over the layer.
SPATIAL_STAGE = Pattern(Block.KERNEL, Scope.LAYER, score=Score.L2_FACTOR)

#: ABWSP's per-layer toggle: important layers keep the unbalanced ``wsp`` ranking, the rest are balanced.
POLICIES: dict[str, Scope] = {"wsp": Scope.LAYER, "bwsp": Scope.POSITION}


def method_pattern(method: str, policy: str | None = None, **overrides: object) -> Pattern:
    """The pattern of a named method, with an ABWSP ``policy`` and field overrides (``unit``, ``align``, ...).

    Raises:
        ValueError: On an unknown method or policy.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not valid; valid values are {sorted(METHODS)}")
    pattern = METHODS[method]
    if policy is not None:
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is not valid; valid values are {sorted(POLICIES)}")
        pattern = pattern.with_(scope=POLICIES[policy])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return pattern.with_(**overrides) if overrides else pattern


def winograd_view(u: torch.Tensor) -> torch.Tensor:
    """The BGEMM view ``(p*p, K, C)`` of Winograd weights ``(K, C, p, p)``: one ``K x C`` matrix per position."""
    k, c, p, _ = u.shape
    return u.permute(2, 3, 0, 1).reshape(p * p, k, c)


def winograd_mask_from_view(mask_view: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Map a ``(p*p, K, C)`` view mask back to the weight's ``(K, C, p, p)`` shape."""
    k, c, p, _ = shape
    return mask_view.reshape(p, p, k, c).permute(2, 3, 0, 1)


def position_scale(m: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """How strongly each Winograd position ``xi = (i, j)`` weighs in the output, shape ``(p*p,)``.

    ``s[i*p + j] = |BT[i]| |BT[j]| |AT[:, i]| |AT[:, j]|`` (row and column 2-norms). The Toom-Cook matrices are
    only defined up to a diagonal rescaling (``G -> D^-1 G``, ``B^T -> D B^T``) that changes ``U`` but not the
    convolution; multiplying ``U[xi]`` by ``s[xi]`` cancels it, so scores of the scaled view rank blocks of different
    positions by their effect on the output rather than by an arbitrary normalisation.
    """
    t = get_transforms(m, torch.float64)
    s = t.BT.norm(dim=1) * t.AT.norm(dim=0)
    return torch.outer(s, s).reshape(-1).to(dtype=dtype, device=device)


def importance_factor(m: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | None = None) -> torch.Tensor:
    """The importance factor of each Winograd position ``xi = (i, j)``, shape ``(p*p,)``.

    ``F[i*p + j] = |G[i]|^2 |G[j]|^2`` (squared row 2-norms of the filter transform). A spatial-domain gradient step
    ``g -= lr * dL/dg`` moves ``U = G g G^T`` by ``-lr * (G G^T) dL/dU (G G^T)``; ``F`` is the diagonal of that
    operator, so multiplying ``dL/dU[xi]`` by ``F[xi]`` gives Winograd-domain training the per-position step sizes
    of spatial training (the ``gradient_scaling`` option of ``WinogradPruning``). ``|U[xi]| / sqrt(F[xi])`` is a
    weight on the spatial weights' scale: the ``l2-factor`` score. Under the Toom-Cook rescaling
    ``G -> D^-1 G``, ``B^T -> D B^T`` it changes by ``d_i^-2 d_j^-2`` while ``U`` changes by ``d_i^-1 d_j^-1``,
    so that score is invariant; ``F * position_scale(m)^2`` is the invariant per-position constant that relates it
    to ``l2-scaled`` (``docs/pruning.md``).
    """
    t = get_transforms(m, torch.float64)
    f = t.G.square().sum(dim=1)
    return torch.outer(f, f).reshape(-1).to(dtype=dtype, device=device)


def _factor_scale(m: int, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    return importance_factor(m, torch.float64, device).rsqrt().to(dtype)


#: Scaled score -> the per-position multiplier of the BGEMM view it ranks (see :func:`score_scale`).
_SCORE_SCALES: dict[Score, Callable[[int, torch.dtype, torch.device | None], torch.Tensor]] = {
    Score.L2_SCALED: position_scale,
    Score.L2_FACTOR: _factor_scale,
}


def score_scale(score: Score | str, m: int, dtype: torch.dtype = torch.float32,
                device: torch.device | None = None) -> torch.Tensor | None:
    """The ``(p*p,)`` multiplier a scaled score applies to the BGEMM view of F(m, 3) weights, or ``None``.

    ``l2-scaled``: :func:`position_scale` (output energy); ``l2-factor``: ``1 / sqrt(importance_factor(m))``
    (the spatial weights' scale); the other scores use the view as it is (``None``).
    """
    fn = _SCORE_SCALES.get(Score.parse(score, "score"))
    return None if fn is None else fn(m, dtype, device)


def winograd_mask(
    u: torch.Tensor, amount: float, pattern: Pattern, importance: torch.Tensor | None = None,
    position_scaled: bool = False,
) -> tuple[torch.Tensor, MaskResult]:
    """Keep-mask of Winograd weights ``u`` (``(K, C, p, p)``) for ``pattern`` at ``amount``.

    The pattern's score decides the ranking; for the scaled scores the per-position scale comes from
    :func:`score_scale` of the weights' tile size, so every caller of this function (the callback, the sensitivity
    estimator, the latency tables, the budget search) ranks the same blocks for the same pattern.

    Args:
        u: Winograd-domain weights.
        amount: Fraction of entries to prune.
        pattern: The pruning pattern (its ``score`` included).
        importance: Per-entry saliency of ``u``'s shape, for ``score="importance"``.
        position_scaled: Legacy spelling of ``score="l2-scaled"``: turns an ``l2`` pattern into ``l2-scaled``.

    Returns:
        The mask in ``u``'s shape and the engine's :class:`MaskResult` (whose ``mask`` is in the view's shape).

    Raises:
        ValueError: On ``position_scaled=True`` with a score other than ``l2``/``l2-scaled``, and on what
            :func:`~lightning_winoprune.pruning.compute_mask` refuses.
    """
    if position_scaled:
        if pattern.score not in (Score.L2, Score.L2_SCALED):
            raise ValueError(f"position_scaled=True is score='l2-scaled'; the pattern has "
                             f"score={pattern.score.value!r}")
        pattern = pattern.with_(score=Score.L2_SCALED)
    view = winograd_view(u.detach())
    view_imp = None if importance is None else winograd_view(importance)
    scale = score_scale(pattern.score, u.shape[-1] - 2, torch.float64, view.device)
    result = compute_mask(view, amount, pattern, view_imp, scale)
    return winograd_mask_from_view(result.mask, u.shape), result


# ---------------------------------------------------------------------------------------- spatial-Winograd pruning
def filter_support(m: int) -> list[frozenset[int]]:
    """For each row ``i`` of F(m, 3)'s filter transform ``G``, the kernel indices ``a`` with ``G[i, a] != 0``.

    With every supported point set, row 0 (the point 0) is ``{0}``, the last row (the point at infinity) ``{2}`` and
    every other row ``{0, 1, 2}``.
    """
    g = get_transforms(m, torch.float64).G
    return [frozenset(int(a) for a in torch.nonzero(row).flatten()) for row in g]


def zero_positions(m: int, spatial_zero: torch.Tensor) -> torch.Tensor:
    """Winograd positions ``(p, p)`` that are exactly zero whenever the kernel entries ``spatial_zero`` are zero.

    ``U[i, j] = sum_ab G[i, a] g[a, b] G[j, b]`` involves exactly the kernel entries ``S_i x S_j`` (``S`` from
    :func:`filter_support`), so ``U[i, j]`` is zero for every kernel with zeros on ``spatial_zero`` if and only if
    ``S_i x S_j`` lies inside it. The products by exact zeros are exact zeros in floating point too.

    Args:
        m: Output tile size of F(m, 3).
        spatial_zero: Boolean ``(3, 3)``: the kernel entries that are zero.
    """
    support = filter_support(m)
    z = spatial_zero.bool().cpu()
    p = len(support)
    out = torch.zeros(p, p, dtype=torch.bool)
    for i, si in enumerate(support):
        for j, sj in enumerate(support):
            out[i, j] = all(bool(z[a, b]) for a in si for b in sj)
    return out


def _group(*entries: tuple[int, int]) -> torch.Tensor:
    z = torch.zeros(3, 3, dtype=torch.bool)
    for a, b in entries:
        z[a, b] = True
    return z


#: Spatial groups of a 3x3 kernel whose zeros survive the filter transform (see :func:`zero_positions`): a corner
#: zeroes one corner position, an edge (row 0 here; any outer row or column) a whole outer row of ``U``, the ring of
#: eight outer weights every border position, the whole kernel every position.
SPATIAL_GROUPS: dict[str, torch.Tensor] = {
    "corner": _group((0, 0)),
    "edge": _group((0, 0), (0, 1), (0, 2)),
    "ring": _group(*[(a, b) for a in range(3) for b in range(3) if (a, b) != (1, 1)]),
    "kernel": _group(*[(a, b) for a in range(3) for b in range(3)]),
}


def spatial_stage_mask(
    u: torch.Tensor, amount: float, pattern: Pattern = SPATIAL_STAGE, importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MaskResult]:
    """Spatial-Winograd's stage-1 mask: the border positions of the lowest-scoring kernels, ``amount`` of ``u``.

    A kernel ``(k, c)`` whose ring (its eight outer spatial weights, :data:`SPATIAL_GROUPS`) is zero has exactly
    zero Winograd weights at every border position (``i`` or ``j`` in ``{0, p-1}``: 12 of 16 for F(2,3), 20 of 36
    for F(4,3)); a Winograd mask of whole border positions is therefore a spatial ring mask. The kernels are ranked
    with ``pattern`` (a ``kernel``-block pattern) on the border positions of the BGEMM view, and the count is chosen
    so that the layer's Winograd-domain sparsity is ``amount`` (at most the border share, reported in ``notes``).

    Returns:
        The mask in ``u``'s shape and a :class:`MaskResult` over the whole view.
    """
    if pattern.block is not Block.KERNEL:
        raise ValueError(f"the spatial stage prunes block='kernel', got block={pattern.block.value!r}")
    p = u.shape[-1]
    m = p - 2
    border = zero_positions(m, SPATIAL_GROUPS["ring"]).reshape(-1).to(u.device)
    share = float(border.float().mean())
    view = winograd_view(u.detach())
    sub_imp = None if importance is None else winograd_view(importance)[border]
    scale = score_scale(pattern.score, m, torch.float64, view.device)
    sub_amount = min(amount / share, 1.0)
    sub = compute_mask(view[border], sub_amount, pattern, sub_imp, None if scale is None else scale[border])
    full = torch.ones_like(view, dtype=torch.bool)
    full[border] = sub.mask
    pruned = torch.zeros(p * p, dtype=torch.long)
    pruned[border.cpu()] = sub.pruned_blocks
    sparsity = 1.0 - full.float().mean().item()
    notes = [n for n in sub.notes if not n.startswith("achieved")]
    if amount > share:
        notes.append(f"stage 1 reaches at most the border share {share:.4f} of the Winograd weights")
    if amount > 0 and abs(sparsity - min(amount, share)) > 1.0 / max(full.numel(), 1):
        notes.append(f"achieved sparsity {sparsity:.4f} for the requested {amount:.4f} (kernel granularity)")
    result = MaskResult(full, float(amount), sparsity, pruned, sub.blocks_per_matrix, pattern, notes)
    return winograd_mask_from_view(full, u.shape), result


@functools.cache
def _krons64(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = get_transforms(m, torch.float64).G
    gp = torch.linalg.pinv(g)
    return torch.kron(g, g), torch.kron(gp, gp)


def _krons(m: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``kron(G, G)`` (``(p*p, 9)``) and ``kron(G^+, G^+)`` (``(9, p*p)``).

    On row-major flattened matrices ``G X G^T`` is ``kron(G, G) x`` and ``G^T X G`` is ``kron(G, G)^T x``, so every
    step below is one GEMM over all kernels.
    """
    k, kp = _krons64(m)
    return k.to(dtype=dtype, device=device), kp.to(dtype=dtype, device=device)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-2] * t.shape[-1])


def spatial_weight(u: torch.Tensor) -> torch.Tensor:
    """The 3x3 kernels ``g`` (``(..., 3, 3)``) with ``G g G^T = u``: least squares, exact if ``u`` came from kernels."""
    _, kp = _krons(u.shape[-1] - 2, u.dtype, u.device)
    return (_flat(u) @ kp.T).reshape(*u.shape[:-2], 3, 3)


def spatial_gradient(grad: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The change of ``U`` that one spatial-domain gradient step makes, per unit learning rate.

    That is ``G (keep * G^T grad G) G^T`` for Winograd-domain gradients ``grad`` (``(K, C, p, p)``). Training ``U``
    with this gradient (SGD with momentum and weight decay) is exactly training the 3x3 kernels ``g``
    (``U = G g G^T``) with their gradient ``G^T dL/dU G``, the kernel entries ``~keep`` (``(K, C, 3, 3)``) held at
    zero.
    """
    k, _ = _krons(grad.shape[-1] - 2, grad.dtype, grad.device)
    h = _flat(grad) @ k
    if keep is not None:
        h = h * _flat(keep).to(h.dtype)
    return (h @ k.T).reshape(grad.shape)


def project_spatial(u: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``u`` (``(K, C, p, p)``) projected onto Winograd weights of 3x3 kernels with zeros at ``~keep``."""
    k, kp = _krons(u.shape[-1] - 2, u.dtype, u.device)
    g = _flat(u) @ kp.T
    if keep is not None:
        g = g * _flat(keep).to(g.dtype)
    return (g @ k.T).reshape(u.shape)
