"""The masking engine (a pattern is data) and the named Winograd pruning methods built on it."""

from lightning_winoprune.pruning._engine import (
    Block,
    MaskResult,
    Pattern,
    Rounding,
    Scope,
    Score,
    block_layout,
    compute_mask,
)
from lightning_winoprune.pruning._methods import (
    DEFAULT_ABWSP_ALIGN,
    DEFAULT_ABWSP_UNIT,
    METHODS,
    POLICIES,
    method_pattern,
    position_scale,
    winograd_mask,
    winograd_mask_from_view,
    winograd_view,
)

__all__ = [
    "DEFAULT_ABWSP_ALIGN",
    "DEFAULT_ABWSP_UNIT",
    "METHODS",
    "POLICIES",
    "Block",
    "MaskResult",
    "Pattern",
    "Rounding",
    "Scope",
    "Score",
    "block_layout",
    "compute_mask",
    "method_pattern",
    "position_scale",
    "winograd_mask",
    "winograd_mask_from_view",
    "winograd_view",
]
