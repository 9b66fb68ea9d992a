"""The named Winograd pruning methods (design page §2) on Winograd weights ``U`` of shape ``(K, C, p, p)``.

The invariants of the issue are checked for every method (``abwsp`` under both policies) on layers whose ``K`` and
``C`` are mostly not multiples of the ABWSP unit (16) or align (8), recomputing what is expected from the block
definitions rather than from the engine's bookkeeping.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pruning_helpers import random_weights

from lightning_winoprune.pruning import (
    DEFAULT_ABWSP_ALIGN,
    DEFAULT_ABWSP_UNIT,
    METHODS,
    POLICIES,
    Block,
    Pattern,
    Rounding,
    Scope,
    Score,
    block_layout,
    compute_mask,
    method_pattern,
    score_scale,
    winograd_mask,
    winograd_mask_from_view,
    winograd_view,
)

CONFIGS = [(m, None) for m in METHODS if m != "abwsp"] + [("abwsp", policy) for policy in POLICIES]
CONFIG_IDS = [m if p is None else f"{m}-{p}" for m, p in CONFIGS]


# ----------------------------------------------------------------------------------------------- helpers
def _scores(view: torch.Tensor, ids: np.ndarray, n: int, score: Score, importance: torch.Tensor | None) -> np.ndarray:
    """Block scores in float64: l2 = sqrt(sum of squares), l1 = sum |w|, importance = sum |importance|."""
    if score is Score.IMPORTANCE:
        assert importance is not None
        return np.bincount(ids, weights=np.abs(importance.double().numpy().reshape(-1)), minlength=n)
    if score.scaled:  # the L2 of the view scaled per position (the scales are tested in test_scores.py)
        m = round(view.shape[0] ** 0.5) - 2
        view = view.double() * score_scale(score, m, torch.float64).view(-1, 1, 1)
    w = view.double().numpy().reshape(-1)
    if score is Score.L1:
        return np.bincount(ids, weights=np.abs(w), minlength=n)
    return np.sqrt(np.bincount(ids, weights=w * w, minlength=n))


def _stable_order(scores: np.ndarray) -> np.ndarray:
    return np.lexsort((np.arange(len(scores)), scores))


def _analyse(mask: torch.Tensor, pattern: Pattern) -> dict:
    """Per-block decisions read back from a view mask through ``block_layout``."""
    ids = block_layout(tuple(mask.shape), pattern).reshape(-1).numpy()
    n = int(ids.max()) + 1
    sizes = np.bincount(ids, minlength=n)
    pruned_elems = np.bincount(ids[~mask.reshape(-1).numpy()], minlength=n)
    pruned = pruned_elems == sizes
    if pattern.block is Block.FILTER:
        bpm, per_matrix = n, np.full(mask.shape[0], int(pruned.sum()))
    else:
        bpm = n // mask.shape[0]
        per_matrix = pruned.reshape(mask.shape[0], bpm).sum(axis=1)
    return {"ids": ids, "n": n, "sizes": sizes, "pruned": pruned, "bpm": bpm, "per_matrix": per_matrix,
            "partial": (pruned_elems != 0) & (pruned_elems != sizes)}


def _layer_counts(view: torch.Tensor, amount: float, pattern: Pattern, importance: torch.Tensor | None) -> list:
    """Per-matrix counts of a global (layer-scope) ranking whose pruned element count is closest to the target."""
    info = _analyse(torch.ones(view.shape, dtype=torch.bool), pattern)
    order = _stable_order(_scores(view, info["ids"], info["n"], pattern.score, importance))
    cum = np.concatenate([[0], np.cumsum(info["sizes"][order])]).astype(np.float64)
    n = int(np.argmin(np.abs(cum - amount * view.numel())))
    if pattern.block is Block.FILTER:
        return [n] * view.shape[0]
    return np.bincount(order[:n] // info["bpm"], minlength=view.shape[0]).tolist()


def _align_ref(count: int, align: int, rounding: Rounding, limit: int) -> int:
    rounded = (count // align) * align if rounding is Rounding.DOWN else math.ceil(count / align) * align
    return min(rounded, (limit // align) * align)


def _check_method(u: torch.Tensor, amount: float, pattern: Pattern, importance: torch.Tensor | None = None,
                  exact: bool = False) -> tuple[torch.Tensor, dict]:
    """Run ``winograd_mask`` and check the issue's invariants 1-8; returns the U-shaped mask and the analysis."""
    mask_u, res = winograd_mask(u, amount, pattern, importance)
    view = winograd_view(u)
    view_imp = None if importance is None else winograd_view(importance)
    k, c, p, _ = u.shape
    numel = u.numel()
    assert mask_u.shape == u.shape and mask_u.dtype == torch.bool
    assert res.mask.shape == (p * p, k, c)
    assert torch.equal(mask_u, winograd_mask_from_view(res.mask, u.shape))
    info = _analyse(res.mask, pattern)
    per = info["per_matrix"]

    # sparsity is the achieved fraction of zeros
    assert res.sparsity == pytest.approx(1.0 - res.mask.float().mean().item(), abs=1e-6)
    assert res.sparsity == pytest.approx(float((~mask_u).sum()) / numel, abs=1e-6)
    # (2) every pruned block is wholly pruned
    assert not info["partial"].any(), "a block is partially pruned"
    assert res.pruned_blocks.tolist() == per.tolist() and res.blocks_per_matrix == info["bpm"]
    # (3) balanced: the same count in every matrix, read from the mask
    if pattern.scope is Scope.POSITION:
        assert (per == per[0]).all(), f"unbalanced counts {per.tolist()}"
    # (4) aligned: multiples of align, read from the mask
    if pattern.align > 1:
        assert (per % pattern.align == 0).all(), f"counts {per.tolist()} not multiples of {pattern.align}"
    # (6) / (7)
    if amount == 0:
        assert mask_u.all()
    if amount == 1 and pattern.align == 1:
        assert not mask_u.any()

    # (1) the amount, up to the method's rounding
    maxblock = int(info["sizes"].max())
    if pattern.align == 1:
        if pattern.scope is Scope.LAYER:
            assert abs(res.sparsity - amount) <= maxblock / (2 * numel) + 1e-6, (res.sparsity, amount)
            assert per.tolist() == _layer_counts(view, amount, pattern, view_imp)
        else:  # balanced rows: half a row per matrix
            assert abs(res.sparsity - amount) <= p * p * maxblock / (2 * numel) + 1e-6, (res.sparsity, amount)
    else:
        base = _analyse(compute_mask(view, amount, pattern.with_(align=1), view_imp).mask, pattern)["per_matrix"]
        if pattern.scope is Scope.LAYER:
            assert base.tolist() == _layer_counts(view, amount, pattern, view_imp)
        else:
            # one count for all matrices: the one whose pruned elements total closest to the target
            blk = _scores(view, info["ids"], info["n"], pattern.score, view_imp).reshape(-1, info["bpm"])
            sizes = np.asarray(info["sizes"]).reshape(-1, info["bpm"])
            totals = np.zeros(info["bpm"] + 1)
            for s_row, z_row in zip(blk, sizes, strict=True):
                totals[1:] += np.cumsum(z_row[np.lexsort((np.arange(len(s_row)), s_row))])
            assert (base == int(np.argmin(np.abs(totals - amount * numel)))).all(), base.tolist()
        expected = [_align_ref(int(b), pattern.align, pattern.rounding, info["bpm"]) for b in base]
        assert per.tolist() == expected, (per.tolist(), base.tolist())
        assert any("rounded" in note for note in res.notes) == (expected != base.tolist()), res.notes
        if amount == 1:
            assert per.tolist() == [(info["bpm"] // pattern.align) * pattern.align] * (p * p)

    # (8) ranking: pruned scores <= kept scores inside every ranking group; exact scores: (score, index) prefix
    scores = _scores(view, info["ids"], info["n"], pattern.score, view_imp)
    global_rank = pattern.block is Block.FILTER or (pattern.scope is Scope.LAYER and pattern.align == 1)
    groups = [np.arange(info["n"])] if global_rank else list(np.arange(info["n"]).reshape(-1, info["bpm"]))
    for g in groups:
        s, pr = scores[g], info["pruned"][g]
        if pr.any() and (~pr).any():
            assert s[pr].max() <= s[~pr].min() + 1e-6 * max(1.0, float(s.max())), "a kept block scores lower"
        if exact:
            flags = pr[_stable_order(s)]
            assert flags[: int(flags.sum())].all(), "ties not broken by block index"

    return mask_u, info


def _check_method_geometry(method: str, u: torch.Tensor, mask_u: torch.Tensor) -> None:
    """Method-specific shape of the zeros on ``U`` (K, C, p, p)."""
    pruned = ~mask_u
    if method == "fp":
        # (5) whole output channels: all c, i, j of a filter k or none of them
        per_k = pruned.reshape(u.shape[0], -1)
        assert (per_k.all(dim=1) | ~per_k.any(dim=1)).all()
    elif method in ("wsp-r", "bwsp"):
        # (10) a pruned row (xi = i * p + j, k) is U[k, :, i, j]
        per_row = pruned.permute(0, 2, 3, 1)  # (K, p, p, C)
        assert (per_row.all(dim=3) | ~per_row.any(dim=3)).all()
    elif method == "wsp-c":
        per_col = pruned.permute(1, 2, 3, 0)  # column (xi, c) is U[:, c, i, j]
        assert (per_col.all(dim=3) | ~per_col.any(dim=3)).all()
    elif method == "abwsp":
        # row segments of U[k, :, i, j] along C in units of 16
        c = u.shape[1]
        for s in range(0, c, DEFAULT_ABWSP_UNIT):
            seg = pruned[:, s : s + DEFAULT_ABWSP_UNIT]
            assert (seg.all(dim=1) | ~seg.any(dim=1)).all()


# ----------------------------------------------------------------------------------------------- strategies
@st.composite
def layers(draw, max_kc: int = 70):
    k = draw(st.integers(1, max_kc))
    c = draw(st.integers(1, max_kc))
    p = draw(st.sampled_from([4, 6]))
    kind = draw(st.sampled_from(["randn", "randn", "int", "const"]))
    return random_weights((k, c, p, p), draw(st.integers(0, 2**16)), kind), kind


amounts = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.3, 0.75, 0.9]), st.floats(0.0, 1.0))


# ----------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("method, policy", CONFIGS, ids=CONFIG_IDS)
@given(layer=layers(), amount=amounts)
@settings(max_examples=30)
@example(layer=(random_weights((37, 29, 6, 6), 1, "randn"), "randn"), amount=0.37)
@example(layer=(random_weights((29, 37, 4, 4), 2, "int"), "int"), amount=0.61)
@example(layer=(random_weights((70, 17, 4, 4), 3, "randn"), "randn"), amount=0.9)
@example(layer=(random_weights((5, 70, 6, 6), 4, "const"), "const"), amount=0.5)
@example(layer=(random_weights((1, 1, 4, 4), 5, "randn"), "randn"), amount=1.0)
@example(layer=(random_weights((37, 29, 4, 4), 6, "randn"), "randn"), amount=0.0)
def test_method_invariants(method, policy, layer, amount):
    u, kind = layer
    pattern = method_pattern(method, policy)
    mask_u, _ = _check_method(u, amount, pattern, exact=kind != "randn")
    _check_method_geometry(method, u, mask_u)


@pytest.mark.parametrize("score", ["l1", "importance"])
@pytest.mark.parametrize("method, policy", CONFIGS, ids=CONFIG_IDS)
@given(layer=layers(max_kc=40), amount=amounts, imp_seed=st.integers(0, 2**16))
@settings(max_examples=10)
@example(layer=(random_weights((37, 29, 4, 4), 7, "randn"), "randn"), amount=0.45, imp_seed=1)
def test_method_invariants_other_scores(method, policy, score, layer, amount, imp_seed):
    u, kind = layer
    pattern = method_pattern(method, policy, score=score)
    importance = random_weights(tuple(u.shape), imp_seed, kind) if score == "importance" else None
    mask_u, _ = _check_method(u, amount, pattern, importance, exact=kind != "randn")
    _check_method_geometry(method, u, mask_u)


@pytest.mark.parametrize("method, policy", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("kind", ["randn", "int", "const"])
def test_deterministic(method, policy, kind):
    u = random_weights((37, 29, 6, 6), 11, kind)
    pattern = method_pattern(method, policy)
    first, res = winograd_mask(u, 0.43, pattern)
    for _ in range(2):
        again, res2 = winograd_mask(u.clone(), 0.43, pattern)
        assert torch.equal(again, first) and res2.pruned_blocks.tolist() == res.pruned_blocks.tolist()
    assert torch.equal(winograd_mask(u.contiguous(memory_format=torch.channels_last), 0.43, pattern)[0], first)


@pytest.mark.parametrize("method, policy", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shape", [(37, 29, 6, 6), (3, 1, 4, 4), (16, 16, 4, 4)])
def test_amount_zero_is_noop_and_one_prunes_everything(method, policy, shape):
    u = torch.randn(shape)
    pattern = method_pattern(method, policy)
    mask0, res0 = winograd_mask(u, 0.0, pattern)
    assert mask0.all() and res0.sparsity == 0.0 and res0.pruned_blocks.sum() == 0
    mask1, res1 = winograd_mask(u, 1.0, pattern)
    if pattern.align == 1:
        assert not mask1.any() and res1.sparsity == 1.0
    else:
        top = (res1.blocks_per_matrix // pattern.align) * pattern.align
        assert res1.pruned_blocks.tolist() == [top] * (shape[2] * shape[3])


# ----------------------------------------------------------------------------------------------- fp
@given(layer=layers(max_kc=40), amount=amounts)
@settings(max_examples=30)
def test_fp_equals_removing_output_channels(layer, amount):
    u, _ = layer
    mask_u, res = winograd_mask(u, amount, METHODS["fp"])
    pruned_k = (~mask_u).reshape(u.shape[0], -1).all(dim=1)
    kept_k = (~pruned_k).nonzero().flatten()
    assert torch.equal(mask_u, (~pruned_k).view(-1, 1, 1, 1).expand_as(u))
    masked = u * mask_u
    assert torch.equal(masked[kept_k], u[kept_k])  # the surviving layer is U with those channels removed
    assert not masked[pruned_k].any()
    assert res.pruned_blocks.tolist() == [int(pruned_k.sum())] * (u.shape[2] ** 2)
    assert res.blocks_per_matrix == u.shape[0]
    # the lowest-norm filters go
    norms = u.double().reshape(u.shape[0], -1).norm(dim=1)
    if pruned_k.any() and (~pruned_k).any():
        assert norms[pruned_k].max() <= norms[~pruned_k].min() + 1e-9


def test_fp_commutes_with_the_filter_transform():
    # pruning filter k of U = G g G^T is pruning output channel k of the spatial filters g
    torch.manual_seed(1)
    g = torch.randn(13, 7, 3, 3, dtype=torch.float64)
    gmat = torch.randn(6, 3, dtype=torch.float64)
    u = torch.einsum("ia,kcab,jb->kcij", gmat, g, gmat)
    mask_u, _ = winograd_mask(u, 0.4, METHODS["fp"])
    pruned_k = (~mask_u).reshape(13, -1).all(dim=1)
    assert pruned_k.sum() == 5  # 0.4 * 13 = 5.2 filters
    g_removed = g.clone()
    g_removed[pruned_k] = 0
    torch.testing.assert_close(u * mask_u, torch.einsum("ia,kcab,jb->kcij", gmat, g_removed, gmat))


# ----------------------------------------------------------------------------------------------- view and geometry
@given(k=st.integers(1, 40), c=st.integers(1, 40), p=st.sampled_from([4, 6]), seed=st.integers(0, 2**16))
@settings(max_examples=30)
def test_winograd_view_layout_and_round_trip(k, c, p, seed):
    u = random_weights((k, c, p, p), seed, "randn")
    view = winograd_view(u)
    assert view.shape == (p * p, k, c)
    for i in range(p):
        for j in range(p):
            assert torch.equal(view[i * p + j], u[:, :, i, j])
    assert torch.equal(winograd_mask_from_view(view, u.shape), u)
    assert torch.equal(winograd_mask_from_view(view, tuple(u.shape)), u)
    bool_view = view > 0
    assert torch.equal(winograd_mask_from_view(bool_view, u.shape), u > 0)


@given(layer=layers(max_kc=40), amount=st.floats(0.05, 0.95))
@settings(max_examples=30)
def test_wsp_r_row_is_u_k_i_j(layer, amount):
    u, _ = layer
    k, c, p, _ = u.shape
    mask_u, res = winograd_mask(u, amount, METHODS["wsp-r"])
    pruned_rows = (~res.mask).all(dim=2)  # (p*p, K)
    zero_rows = (u * mask_u).permute(2, 3, 0, 1).reshape(p * p, k, c).eq(0).all(dim=2)
    assert not (pruned_rows & ~zero_rows).any()  # a pruned row (xi, k) leaves U[k, :, i, j] all zero
    for xi, kk in pruned_rows.nonzero().tolist()[:50]:
        assert not mask_u[kk, :, xi // p, xi % p].any()
    # and the other way round: a row whose U[k, :, i, j] is fully masked was pruned
    assert torch.equal(pruned_rows, (~mask_u).permute(2, 3, 0, 1).reshape(p * p, k, c).all(dim=2))
    # ranked on U itself: every pruned U[k, :, i, j] has an l2 norm <= every kept one
    norms = u.double().norm(dim=1)  # (K, p, p)
    pruned_u = (~mask_u).all(dim=1)  # (K, p, p)
    if pruned_u.any() and (~pruned_u).any():
        assert norms[pruned_u].max() <= norms[~pruned_u].min() + 1e-9


def test_wsp_c_column_is_u_c_i_j():
    u = torch.randn(11, 9, 4, 4)
    mask_u, res = winograd_mask(u, 0.5, METHODS["wsp-c"])
    pruned_cols = (~res.mask).all(dim=1)  # (p*p, C)
    for xi in range(16):
        for cc in range(9):
            assert bool(pruned_cols[xi, cc]) == bool((~mask_u[:, cc, xi // 4, xi % 4]).all())
    norms = u.double().norm(dim=0)  # column U[:, c, i, j]: (C, p, p)
    pruned_u = (~mask_u).all(dim=0)
    assert int(pruned_u.sum()) == round(0.5 * 16 * 9)
    assert norms[pruned_u].max() <= norms[~pruned_u].min()


def test_importance_in_u_shape_is_used():
    u = torch.randn(6, 5, 4, 4)
    importance = torch.ones_like(u)
    importance[2] = 0.0  # filter 2 unimportant everywhere
    mask_u, _ = winograd_mask(u, 1 / 6, METHODS["fp"].with_(score="importance"), importance)
    assert (~mask_u).reshape(6, -1).all(dim=1).tolist() == [False, False, True, False, False, False]
    with pytest.raises(ValueError, match="importance must have"):
        winograd_mask(u, 0.5, METHODS["wsp-r"].with_(score="importance"), torch.ones(7, 5, 4, 4))
    with pytest.raises(ValueError, match="importance"):
        winograd_mask(u, 0.5, METHODS["wsp-r"].with_(score="importance"))


def test_bwsp_ranks_per_position():
    # position 0 is tiny everywhere: the layer ranking (wsp-r) prunes only there, bwsp one row in every position
    u = torch.randn(16, 5, 4, 4) + 10.0
    u[:, :, 0, 0] = 0.01 * torch.randn(16, 5)
    _, layer = winograd_mask(u, 1 / 16, METHODS["wsp-r"])
    _, bal = winograd_mask(u, 1 / 16, METHODS["bwsp"])
    assert layer.pruned_blocks.tolist() == [16] + [0] * 15
    assert bal.pruned_blocks.tolist() == [1] * 16


def test_ties_prune_lowest_index_blocks():
    u = torch.ones(4, 3, 4, 4)
    mask_u, _ = winograd_mask(u, 0.5, METHODS["bwsp"])  # 2 of 4 rows in every position: k = 0, 1
    assert (~mask_u).all(dim=(1, 2, 3)).tolist() == [True, True, False, False]
    assert mask_u[2:].all()
    mask_u, _ = winograd_mask(u, 0.25, METHODS["fp"])
    assert (~mask_u).reshape(4, -1).all(dim=1).tolist() == [True, False, False, False]
    mask_u, _ = winograd_mask(u, 0.125, METHODS["wsp-r"])  # 8 rows of the 64: positions xi = 0, 1 fully
    pruned_rows = (~mask_u).permute(2, 3, 0, 1).reshape(16, 4, 3).all(dim=2)
    assert pruned_rows.reshape(-1).tolist() == [True] * 8 + [False] * 56


def test_abwsp_short_last_segment_and_whole_row():
    u = torch.randn(24, 37, 4, 4)  # segments of 16, 16, 5 along C: 72 per matrix, 72 = 9 * 8
    _, res = winograd_mask(u, 1.0, method_pattern("abwsp", "bwsp"))
    assert res.blocks_per_matrix == 72 and res.pruned_blocks.tolist() == [72] * 16 and res.sparsity == 1.0
    u = torch.randn(9, 10, 4, 4)  # C = 10 < 16: a unit is the whole row; 9 rows -> at most 8 pruned
    mask_u, res = winograd_mask(u, 1.0, method_pattern("abwsp", "wsp"))
    assert res.blocks_per_matrix == 9 and res.pruned_blocks.tolist() == [8] * 16
    assert (~mask_u).all(dim=1).sum() == 8 * 16
    assert any("rounded" in n for n in res.notes)


# ----------------------------------------------------------------------------------------------- registry
def test_methods_table_matches_design():
    assert set(METHODS) == {"wwp", "fp", "wsp-r", "wsp-c", "bwsp", "abwsp", "spatial-winograd"}
    # spatial-Winograd's stage 2 row: elements, importance-factor scores (stage 1 is SPATIAL_STAGE)
    assert METHODS["spatial-winograd"] == Pattern(Block.ELEMENT, Scope.LAYER, score=Score.L2_FACTOR)
    expected = {
        "wwp": (Block.ELEMENT, Scope.LAYER),
        "fp": (Block.FILTER, Scope.LAYER),
        "wsp-r": (Block.ROW, Scope.LAYER),
        "wsp-c": (Block.COLUMN, Scope.LAYER),
        "bwsp": (Block.ROW, Scope.POSITION),
        "abwsp": (Block.ROW_SEGMENT, Scope.LAYER),
    }
    for name, (block, scope) in expected.items():
        assert (METHODS[name].block, METHODS[name].scope) == (block, scope), name
        assert METHODS[name].score is Score.L2
        assert METHODS[name].align == (DEFAULT_ABWSP_ALIGN if name == "abwsp" else 1)
    assert METHODS["abwsp"].unit == DEFAULT_ABWSP_UNIT
    assert POLICIES == {"wsp": Scope.LAYER, "bwsp": Scope.POSITION}


def test_method_pattern_policy_and_overrides():
    assert method_pattern("abwsp") == METHODS["abwsp"]
    assert method_pattern("abwsp", "wsp") == METHODS["abwsp"]
    assert method_pattern("abwsp", "bwsp") == METHODS["abwsp"].with_(scope="position")
    p = method_pattern("abwsp", "bwsp", unit=32, align=4)
    assert (p.unit, p.align, p.scope, p.block) == (32, 4, Scope.POSITION, Block.ROW_SEGMENT)
    # None overrides are ignored
    assert method_pattern("abwsp", None, unit=None, align=None, rounding=None) == METHODS["abwsp"]
    assert method_pattern("abwsp", unit=None, align=2).align == 2
    assert method_pattern("abwsp", unit=None, align=2).unit == DEFAULT_ABWSP_UNIT
    assert method_pattern("wsp-r", rounding="up", score="l1") == Pattern("row", score="l1", rounding="up")
    assert method_pattern("abwsp", rounding="up").rounding is Rounding.UP
    for name in METHODS:
        assert method_pattern(name) == METHODS[name]
    # the registry itself is not modified by an override
    method_pattern("abwsp", unit=4)
    assert METHODS["abwsp"].unit == DEFAULT_ABWSP_UNIT


def test_method_pattern_override_changes_the_mask():
    u = torch.randn(20, 40, 4, 4)
    _, r16 = winograd_mask(u, 0.5, method_pattern("abwsp", "bwsp"))
    _, r8 = winograd_mask(u, 0.5, method_pattern("abwsp", "bwsp", unit=8, align=2))
    assert r16.blocks_per_matrix == 20 * 3 and r8.blocks_per_matrix == 20 * 5
    assert (r8.pruned_blocks % 2 == 0).all() and (r16.pruned_blocks % 8 == 0).all()


@pytest.mark.parametrize("args", [("nope",), ("abwsp", "nope"), ("ABWSP",), ("wsp", None)])
def test_method_pattern_errors(args):
    with pytest.raises(ValueError, match="valid values are"):
        method_pattern(*args)


def test_method_pattern_bad_override_values():
    with pytest.raises(ValueError, match="unit must be"):
        method_pattern("abwsp", unit=0)
    with pytest.raises(ValueError, match="align must be"):
        method_pattern("abwsp", align=0)
    with pytest.raises(ValueError, match="filter"):
        method_pattern("fp", "bwsp")
    with pytest.raises(ValueError, match="valid values are"):
        method_pattern("wsp-r", block="bad")


@pytest.mark.parametrize("amount", [-0.1, 1.5, True, "0.5"])
@pytest.mark.parametrize("method, policy", CONFIGS, ids=CONFIG_IDS)
def test_winograd_mask_bad_amount(method, policy, amount):
    with pytest.raises(ValueError, match="amount must be"):
        winograd_mask(torch.randn(5, 3, 4, 4), amount, method_pattern(method, policy))
