"""Regenerate the pictures of the documentation site into ``docs/assets/``.

    python docs/gen_figures.py

Every Winograd picture is drawn by the package's own ``plot_bgemm_masks`` on masks computed by
``lightning_winoprune.pruning`` for one small layer (``K=16`` outputs, ``C=32`` inputs, F(2,3): ``p*p = 16`` BGEMM
matrices of ``16 x 32``), converted from a seeded random 3x3 conv. The DEPrune picture draws the DR sub-GEMMs of one
small depthwise layer. The spatial-Winograd picture shows which 3x3 kernel entries zero which Winograd positions of
F(2,3) and F(4,3), from the support of ``G``. The floors picture is drawn from the package's own import statements.
The output is deterministic for a given torch/matplotlib version.
"""

from __future__ import annotations

import argparse
import ast
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from PIL import Image
from torch import nn

from lightning_winoprune.pruning import (
    SPATIAL_GROUPS,
    depthwise_mask,
    dr_column_masks,
    dr_matrices,
    method_pattern,
    winograd_mask,
    zero_positions,
)
from lightning_winoprune.pruning._plot import plot_bgemm_masks
from lightning_winoprune.winograd import WinogradConv2d

ASSETS = Path(__file__).resolve().parent / "assets"
DPI = 90
AMOUNT = 0.5
# (file stem, method, ABWSP policy, title)
WINOGRAD_FIGURES = [
    ("pattern_wwp", "wwp", None, "WWP: single elements, ranked over the layer"),
    ("pattern_fp", "fp", None, "FP: whole filters k (the same row in every xi)"),
    ("pattern_wsp-r", "wsp-r", None, "WSP-R: rows U[xi, k, :], ranked over the layer"),
    ("pattern_wsp-c", "wsp-c", None, "WSP-C: columns U[xi, :, c], ranked over the layer"),
    ("pattern_bwsp", "bwsp", None, "BWSP: rows, the same count in every xi"),
    ("pattern_abwsp-wsp", "abwsp", "wsp", "ABWSP, WSP layer: 16-element row segments, ranked over the layer"),
    ("pattern_abwsp-bwsp", "abwsp", "bwsp", "ABWSP, BWSP layer: 16-element row segments, balanced"),
]


def _save(fig: plt.Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    plt.close(fig)
    buf.seek(0)
    # a 64-colour palette PNG: a third of the size, the same picture (flat colours and anti-aliased text)
    Image.open(buf).convert("RGB").quantize(colors=64, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"wrote {path.relative_to(ASSETS.parent.parent)} ({path.stat().st_size // 1024} KiB)")


def winograd_weight(k: int = 16, c: int = 32, seed: int = 0) -> torch.Tensor:
    """Winograd-domain weights ``U`` (K, C, 4, 4) of a seeded random 3x3 conv converted with F(2,3)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, k, 3, padding=1, bias=False)
    return WinogradConv2d.from_conv(conv, m=2).weight.detach()


def winograd_figures(out: Path) -> None:
    """One picture per Winograd method (``l2-scaled`` ranking), and WSP-R on raw L2 norms."""
    u = winograd_weight()
    for stem, method, policy, title in WINOGRAD_FIGURES:
        mask, _ = winograd_mask(u, AMOUNT, method_pattern(method, policy, score="l2-scaled"))
        _save(plot_bgemm_masks(u, mask, title=f"{title}, {AMOUNT:.0%}, score l2-scaled"), out / f"{stem}.png")
    # the same WSP-R ranking on raw L2 norms: the inner positions go first (see "Which score")
    mask, _ = winograd_mask(u, AMOUNT, method_pattern("wsp-r"))
    _save(plot_bgemm_masks(u, mask, title=f"WSP-R, {AMOUNT:.0%}, score l2 (raw norms)"), out / "pattern_wsp-r_l2.png")


def deprune_figure(out: Path, channels: int = 20, tile: int = 8, seed: int = 0) -> None:
    """The DR sub-GEMMs ``W_g`` of one depthwise 3x3 layer under each DEPrune method (tile 8 instead of 32 to fit)."""
    torch.manual_seed(seed)
    w = torch.randn(channels, 1, 3, 3)
    cases = [("dcp", "down", "DEPrune (dcp)"), ("dcp-b", "down", "DEPrune-B (dcp-b, BWT)"),
             ("dcp-bh", "down", "DEPrune-BH (dcp-bh), 'u' (down)"), ("dcp-bh", "up", "DEPrune-BH (dcp-bh), 'o' (up)"),
             ("channel", "down", "channel pruning (baseline)")]
    mats = dr_matrices(w, tile)
    widths = [m.shape[1] for m in mats]
    fig, axes = plt.subplots(len(cases), len(mats), figsize=(8.5, 1.25 * len(cases) + 0.5), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    pos, neg, pruned = (0.20, 0.40, 0.85), (0.95, 0.80, 0.15), (0.30, 0.70, 0.30)  # as plot_bgemm_masks
    for row, (method, rounding, title) in enumerate(cases):
        res = depthwise_mask(w, AMOUNT, method, tile=tile, rounding=rounding)
        for g, (w_g, keep) in enumerate(zip(mats, dr_column_masks(res.mask, tile), strict=True)):
            rgb = torch.ones(*w_g.shape, 3)  # white: the structural zeros of the block-diagonal W_g
            live = w_g != 0
            rgb[live & (w_g > 0)] = torch.tensor(pos)
            rgb[live & (w_g < 0)] = torch.tensor(neg)
            rgb[live & ~keep.unsqueeze(0)] = torch.tensor(pruned)
            ax = axes[row][g]
            ax.imshow(rgb.numpy(), interpolation="nearest", aspect="auto")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"W_{g}: {res.pruned_columns[g]}/{res.subgemm_columns[g]} pruned", fontsize=7)
        axes[row][0].set_ylabel(f"{title}\nreal DW {res.real_dw:.2f}", fontsize=7, rotation=0, ha="right",
                                va="center")
    fig.suptitle(f"DR sub-GEMMs of a {channels}-channel depthwise 3x3 conv, tile {tile}, {AMOUNT:.0%} pruned\n"
                 "blue: kept > 0, yellow: kept < 0, green: pruned, white: structural zero", fontsize=8)
    fig.tight_layout()
    _save(fig, out / "deprune_dr.png")


def spatial_figure(out: Path) -> None:
    """Spatial-Winograd's groups: the zeroed 3x3 kernel entries and the Winograd positions they make exactly zero."""
    groups = [("corner", "a corner"), ("edge", "an outer row"), ("ring", "the ring (stage 1)"),
              ("kernel", "the whole kernel")]
    fig, axes = plt.subplots(len(groups), 3, figsize=(6.2, 1.7 * len(groups) + 0.4), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 4, 6]})
    zero, kept = (0.30, 0.70, 0.30), (0.20, 0.40, 0.85)  # green pruned / zero, blue kept: as plot_bgemm_masks
    for row, (key, label) in enumerate(groups):
        pictures = [("3x3 kernel g", SPATIAL_GROUPS[key])]
        for m in (2, 4):
            z = zero_positions(m, SPATIAL_GROUPS[key])
            pictures.append((f"F({m},3): {int(z.sum())} of {z.numel()} zero", z))
        for col, (title, z) in enumerate(pictures):
            rgb = torch.ones(*z.shape, 3) * torch.tensor(kept)
            rgb[z] = torch.tensor(zero)
            ax = axes[row][col]
            ax.imshow(rgb.numpy(), interpolation="nearest")
            ax.set_xticks([i - 0.5 for i in range(z.shape[1])], minor=True)
            ax.set_yticks([i - 0.5 for i in range(z.shape[0])], minor=True)
            ax.grid(which="minor", color="white", linewidth=1)
            ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
            ax.set_title(title, fontsize=7)
        axes[row][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("Zeroed kernel entries (green, left) and the Winograd positions U[i, j] they make exactly zero",
                 fontsize=8)
    fig.tight_layout()
    _save(fig, out / "spatial_groups.png")


PACKAGE = Path(__file__).resolve().parent.parent / "lightning_winoprune"


def import_graph(root: Path = PACKAGE) -> tuple[dict[str, set[str]], dict[str, int]]:
    """Floor -> the floors it imports (every import statement, at any depth), and each floor's lines of code.

    A floor is a sub-package or a top-level ``_module.py``; the top-level ``__init__.py`` (which re-exports) is left
    out.
    """
    edges: dict[str, set[str]] = {}
    lines: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel == ("__init__.py",):
            continue
        floor = rel[0].removesuffix(".py")
        lines[floor] = lines.get(floor, 0) + len(path.read_text().splitlines())
        edges.setdefault(floor, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                parts = node.module.split(".")
                if parts[0] == "lightning_winoprune":
                    edges[floor].update(parts[1:2] or [a.name for a in node.names])
    for floor in edges:
        edges[floor] = {t for t in edges[floor] if t in edges and t != floor}
    return edges, lines


def floors_figure(out: Path) -> None:
    """The package's floors as its imports make them: each floor sits one above the highest floor it imports."""
    edges, lines = import_graph()
    level: dict[str, int] = {}

    def height(floor: str) -> int:
        if floor not in level:
            level[floor] = 1 + max((height(t) for t in edges[floor]), default=-1)
        return level[floor]

    for floor in edges:
        height(floor)
    rows: dict[int, list[str]] = {}
    for floor in sorted(edges):
        rows.setdefault(level[floor], []).append(floor)
    fig, ax = plt.subplots(figsize=(7.5, 0.75 * len(rows) + 0.6))
    pos = {}
    for y, names in rows.items():
        for i, name in enumerate(names):
            pos[name] = ((i + 1) / (len(names) + 1), y)
    for src, targets in edges.items():
        for dst in targets:
            (x0, y0), (x1, y1) = pos[src], pos[dst]
            ax.annotate("", (x1, y1 + 0.22), (x0, y0 - 0.22),
                        arrowprops={"arrowstyle": "->", "color": (0.6, 0.6, 0.6), "lw": 0.6})
    for name, (x, y) in pos.items():
        ax.text(x, y, f"{name}\n{lines[name]:,} lines", ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round", "fc": (0.86, 0.90, 0.98), "ec": (0.20, 0.40, 0.85)})
    ax.set_ylim(-0.6, max(rows) + 0.6)
    ax.set_xlim(0, 1)
    ax.set_yticks(sorted(rows), [f"floor {y}" for y in sorted(rows)], fontsize=7)
    ax.tick_params(length=0, labelbottom=False)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title("lightning_winoprune: each floor imports only floors below it (arrows: imports)", fontsize=8)
    fig.tight_layout()
    _save(fig, out / "architecture_floors.png")


def main() -> None:
    """Write every picture into ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ASSETS, help="output folder (default: docs/assets)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    winograd_figures(args.out)
    spatial_figure(args.out)
    deprune_figure(args.out)
    floors_figure(args.out)


if __name__ == "__main__":
    main()
