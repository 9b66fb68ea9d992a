"""Named pruning methods for Winograd layers, as patterns of the one engine (defined in ``docs/pruning.md``)."""

from __future__ import annotations

import torch

from lightning_winoprune.pruning._engine import Block, MaskResult, Pattern, Scope, compute_mask
from lightning_winoprune.winograd._transforms import get_transforms

__all__ = [
    "DEFAULT_ABWSP_ALIGN",
    "DEFAULT_ABWSP_UNIT",
    "METHODS",
    "POLICIES",
    "method_pattern",
    "position_scale",
    "winograd_mask",
    "winograd_mask_from_view",
    "winograd_view",
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
}

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


def winograd_mask(
    u: torch.Tensor, amount: float, pattern: Pattern, importance: torch.Tensor | None = None,
    position_scaled: bool = False,
) -> tuple[torch.Tensor, MaskResult]:
    """Keep-mask of Winograd weights ``u`` (``(K, C, p, p)``) for ``pattern`` at ``amount``.

    Args:
        u: Winograd-domain weights.
        amount: Fraction of entries to prune.
        pattern: The pruning pattern.
        importance: Per-entry saliency of ``u``'s shape, for ``score="importance"``.
        position_scaled: Rank blocks of the view scaled by :func:`position_scale` (magnitude scores only).

    Returns:
        The mask in ``u``'s shape and the engine's :class:`MaskResult` (whose ``mask`` is in the view's shape).
    """
    view = winograd_view(u.detach())
    if position_scaled:
        view = view * position_scale(u.shape[-1] - 2, view.dtype, view.device).view(-1, 1, 1)
    view_imp = None if importance is None else winograd_view(importance)
    result = compute_mask(view, amount, pattern, view_imp)
    return winograd_mask_from_view(result.mask, u.shape), result
