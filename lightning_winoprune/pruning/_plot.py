"""Pictures of pruned weights in the BGEMM view (the WSP paper's Fig. 10 style)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_bgemm_masks"]

_KEPT_POS, _KEPT_NEG, _PRUNED = (0.20, 0.40, 0.85), (0.95, 0.80, 0.15), (0.30, 0.70, 0.30)  # blue, yellow, green


def plot_bgemm_masks(
    weight: torch.Tensor, mask: torch.Tensor | None, title: str = "", max_rows: int = 48, max_cols: int = 48
) -> Figure:
    """One panel per Winograd position ``xi``, showing the ``K x C`` matrix ``U[xi]``.

    Kept positive weights are blue, kept negative weights yellow and pruned weights green.

    Args:
        weight: Winograd weights ``(K, C, p, p)``.
        mask: Keep-mask of the same shape, or ``None`` (nothing pruned).
        title: Figure title.
        max_rows: Rows (output channels) shown per panel; larger layers show their top-left corner.
        max_cols: Columns (input channels) shown per panel.

    Returns:
        A matplotlib figure (the caller closes it).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"weight must be (K, C, p, p), got shape {tuple(weight.shape)}")
    if mask is not None and mask.shape != weight.shape:
        raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    k, c, p, _ = weight.shape
    rows, cols = min(k, max_rows), min(c, max_cols)
    w = weight.detach()[:rows, :cols].float().cpu()
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask[:rows, :cols].cpu()
    rgb = torch.empty(rows, cols, p, p, 3)
    rgb[...] = torch.tensor(_KEPT_NEG)
    rgb[w >= 0] = torch.tensor(_KEPT_POS)
    rgb[~keep] = torch.tensor(_PRUNED)
    fig, axes = plt.subplots(p, p, figsize=(1.6 * p, 1.6 * p * rows / max(cols, 1) + 0.6), squeeze=False)
    for i in range(p):
        for j in range(p):
            ax = axes[i][j]
            ax.imshow(rgb[:, :, i, j].numpy(), interpolation="nearest", aspect="auto")
            ax.set_xticks([]), ax.set_yticks([])
            pruned = 1.0 - keep[:, :, i, j].float().mean().item()
            ax.set_title(f"xi=({i},{j}) {pruned:.0%}", fontsize=7)
    shown = "" if (rows, cols) == (k, c) else f" (top-left {rows}x{cols} of {k}x{c})"
    fig.suptitle(f"{title}{shown}\nblue: kept > 0, yellow: kept < 0, green: pruned", fontsize=8)
    fig.tight_layout()
    return fig
