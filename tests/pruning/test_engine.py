"""The masking engine on raw ``(P, R, C)`` views: block layout, selection, rounding, scores and argument checks.

Every check recomputes what it expects from the documented semantics (block definitions, "lowest score pruned first,
ties by block index", "pruned element count closest to amount * numel", "round per-matrix counts to a multiple of
align") instead of trusting the engine's own bookkeeping (``pruned_blocks``, ``notes``).
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
    Block,
    MaskResult,
    Pattern,
    Rounding,
    Scope,
    Score,
    block_layout,
    compute_mask,
    method_pattern,
)

BLOCKS = [b.value for b in Block]
SEGMENTS = ("row_segment", "column_segment")
SPANNING = (Block.FILTER, Block.KERNEL)  # blocks that span every matrix


# ----------------------------------------------------------------------------------------------- helpers
def _ref_block_key(pattern: Pattern, shape: tuple[int, int, int], p: int, r: int, c: int) -> tuple:
    """The block of element ``(p, r, c)`` straight from the definitions (loop reference for ``block_layout``)."""
    _, rows, cols = shape
    b, u = pattern.block.value, pattern.unit
    if b == "element":
        return (p, r, c)
    if b == "row" or (b == "row_segment" and u >= cols):
        return (p, r)
    if b == "column" or (b == "column_segment" and u >= rows):
        return (p, "c", c)
    if b == "row_segment":
        return (p, r, "s", c // u)
    if b == "column_segment":
        return (p, "c", c, "s", r // u)
    if b == "kernel":
        return ("k", r, c)
    return (r,)  # filter


def _block_scores(view: torch.Tensor, ids: np.ndarray, n: int, pattern: Pattern,
                  importance: torch.Tensor | None = None) -> np.ndarray:
    """Per-block score in float64 from the documented definitions (l2 = sqrt(sum sq), l1, sum |importance|)."""
    w = view.detach().double().numpy().reshape(-1)
    if pattern.score is Score.IMPORTANCE:
        assert importance is not None
        return np.bincount(ids, weights=np.abs(importance.double().numpy().reshape(-1)), minlength=n)
    if pattern.score is Score.L1:
        return np.bincount(ids, weights=np.abs(w), minlength=n)
    return np.sqrt(np.bincount(ids, weights=w * w, minlength=n))


def _analyse(mask: torch.Tensor, pattern: Pattern) -> dict:
    """Read the block decisions back from a mask, using only ``block_layout``."""
    shape = tuple(mask.shape)
    ids = block_layout(shape, pattern).reshape(-1).numpy()
    n = int(ids.max()) + 1
    sizes = np.bincount(ids, minlength=n)
    pruned_elems = np.bincount(ids[~mask.reshape(-1).numpy()], minlength=n)
    partial = (pruned_elems != 0) & (pruned_elems != sizes)
    pruned = pruned_elems == sizes
    if pattern.block in SPANNING:
        per_matrix = np.full(shape[0], int(pruned.sum()))
        bpm = n
    else:
        bpm = n // shape[0]
        per_matrix = pruned.reshape(shape[0], bpm).sum(axis=1)
    return {"ids": ids, "n": n, "sizes": sizes, "pruned": pruned, "partial": partial,
            "per_matrix": per_matrix, "bpm": bpm}


def _closest_prefix(sizes_sorted: np.ndarray, target: float) -> int:
    cum = np.concatenate([[0], np.cumsum(sizes_sorted)]).astype(np.float64)
    return int(np.argmin(np.abs(cum - target)))  # first minimum: fewer blocks on a tie


def _stable_order(scores: np.ndarray) -> np.ndarray:
    """Block indices by (score, index): lowest score first, ties by block index."""
    return np.lexsort((np.arange(len(scores)), scores))


def _align_ref(count: int, align: int, rounding: str, limit: int) -> int:
    rounded = (count // align) * align if rounding == "down" else math.ceil(count / align) * align
    return min(rounded, (limit // align) * align)


def _ref_unaligned_counts(view: torch.Tensor, amount: float, pattern: Pattern,
                          importance: torch.Tensor | None = None) -> np.ndarray:
    """Layer scope: per-matrix pruned-block counts of the global ranking before ``align`` rounding."""
    assert pattern.scope is Scope.LAYER
    a = _analyse(torch.ones(view.shape, dtype=torch.bool), pattern)
    p_ = view.shape[0]
    scores = _block_scores(view, a["ids"], a["n"], pattern, importance)
    order = _stable_order(scores)
    n = _closest_prefix(a["sizes"][order], amount * view.numel())
    if pattern.block in SPANNING:
        return np.full(p_, n)
    return np.bincount(order[:n] // a["bpm"], minlength=p_)


def _ref_balanced_count(view: torch.Tensor, amount: float, pattern: Pattern,
                        importance: torch.Tensor | None = None) -> int:
    """Position scope: the one per-matrix count whose pruned elements (each matrix its own lowest blocks) total
    closest to ``amount * numel`` (ties: fewer blocks)."""
    a = _analyse(torch.ones(view.shape, dtype=torch.bool), pattern)
    scores = _block_scores(view, a["ids"], a["n"], pattern, importance).reshape(-1, a["bpm"])
    sizes = np.asarray(a["sizes"]).reshape(-1, a["bpm"])
    totals = np.zeros(a["bpm"] + 1)
    for s_row, z_row in zip(scores, sizes, strict=True):
        totals[1:] += np.cumsum(z_row[_stable_order(s_row)])
    return int(np.argmin(np.abs(totals - amount * view.numel())))


def _assert_ranking(view: torch.Tensor, pattern: Pattern, info: dict, importance: torch.Tensor | None,
                    exact: bool) -> None:
    """Within each ranking group, every pruned block scores <= every kept one; ``exact``: prefix in (score, idx)."""
    scores = _block_scores(view, info["ids"], info["n"], pattern, importance)
    global_rank = pattern.block in SPANNING or (pattern.scope is Scope.LAYER and pattern.align == 1)
    groups = [np.arange(info["n"])] if global_rank else list(np.arange(info["n"]).reshape(-1, info["bpm"]))
    for g in groups:
        s, pr = scores[g], info["pruned"][g]
        if pr.any() and (~pr).any():
            tol = 1e-6 * max(1.0, float(np.abs(s).max()))
            assert s[pr].max() <= s[~pr].min() + tol, (s[pr].max(), s[~pr].min())
        if exact:
            flags = pr[_stable_order(s)]
            k = int(flags.sum())
            assert flags[:k].all() and not flags[k:].any(), "pruned blocks are not the lowest (score, index) prefix"


def _check_invariants(view: torch.Tensor, amount: float, pattern: Pattern, res: MaskResult,
                      importance: torch.Tensor | None = None, exact: bool = False) -> dict:
    """Everything that must hold for any pattern; returns the analysis for further checks."""
    mask = res.mask
    assert mask.dtype == torch.bool and mask.shape == view.shape
    info = _analyse(mask, pattern)
    numel = view.numel()
    n_pruned = int((~mask).sum())
    # sparsity is the achieved fraction of zeros
    assert res.sparsity == pytest.approx(1.0 - mask.float().mean().item(), abs=1e-6)
    assert res.sparsity == pytest.approx(n_pruned / numel, abs=1e-6)
    assert res.requested == amount
    # no partially pruned block
    assert not info["partial"].any(), "a block is partially pruned"
    # reported counts match the mask
    assert res.blocks_per_matrix == info["bpm"]
    assert res.pruned_blocks.tolist() == info["per_matrix"].tolist()
    per = info["per_matrix"]
    if pattern.scope is Scope.POSITION:
        assert (per == per[0]).all(), f"unbalanced pruned-block counts {per.tolist()}"
    if pattern.align > 1:
        assert (per % pattern.align == 0).all(), f"counts {per.tolist()} not multiples of {pattern.align}"
    if amount == 0:
        assert mask.all()
    if amount == 1 and pattern.align == 1:
        assert not mask.any()
    _assert_ranking(view, pattern, info, importance, exact)

    # the amount: closest pruned element count (layer scope), round(amount * blocks) per matrix (balanced),
    # then the align rounding of those counts
    maxblock = int(info["sizes"].max())
    if pattern.align == 1:
        if pattern.scope is Scope.LAYER:
            assert abs(res.sparsity - amount) <= maxblock / (2 * numel) + 1e-6
            assert per.tolist() == _ref_unaligned_counts(view, amount, pattern, importance).tolist()
        else:
            assert (per == _ref_balanced_count(view, amount, pattern, importance)).all()
            if (info["sizes"] == info["sizes"][0]).all():
                assert abs(per[0] - amount * info["bpm"]) <= 0.5 + 1e-9  # equal blocks: half a block per matrix
                assert abs(res.sparsity - amount) <= view.shape[0] * maxblock / (2 * numel) + 1e-6
    else:
        unaligned = compute_mask(view, amount, pattern.with_(align=1), importance)
        base = _analyse(unaligned.mask, pattern)["per_matrix"]
        if pattern.scope is Scope.POSITION:
            assert (base == _ref_balanced_count(view, amount, pattern, importance)).all()
        else:
            assert base.tolist() == _ref_unaligned_counts(view, amount, pattern, importance).tolist()
        expected = [_align_ref(int(c), pattern.align, pattern.rounding.value, info["bpm"]) for c in base]
        assert per.tolist() == expected
        rounded_note = any("rounded" in note for note in res.notes)
        assert rounded_note == (expected != base.tolist()), res.notes
    return info


# ----------------------------------------------------------------------------------------------- strategies
@st.composite
def views(draw, max_p: int = 9, max_rc: int = 40):
    p = draw(st.integers(1, max_p))
    r = draw(st.integers(1, max_rc))
    c = draw(st.integers(1, max_rc))
    kind = draw(st.sampled_from(["randn", "int", "const"]))
    seed = draw(st.integers(0, 2**16))
    return random_weights((p, r, c), seed, kind), kind


@st.composite
def patterns(draw):
    block = draw(st.sampled_from(BLOCKS))
    if block in ("filter", "kernel"):
        scope, align = "layer", 1
    else:
        scope = draw(st.sampled_from(["layer", "position"]))
        align = draw(st.sampled_from([1, 1, 2, 3, 8]))
    return Pattern(
        block=block,
        scope=scope,
        unit=draw(st.sampled_from([1, 2, 3, 5, 8, 16, 64])),
        align=align,
        rounding=draw(st.sampled_from(["down", "up"])),
        score=draw(st.sampled_from(["l2", "l1", "importance"])),
    )


amounts = st.one_of(st.sampled_from([0.0, 1.0, 0, 1, 0.5, 0.25, 1 / 3, 0.999]), st.floats(0.0, 1.0))


# ----------------------------------------------------------------------------------------------- block layout
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 7), (3, 7, 5), (2, 16, 16), (1, 9, 3)])
@pytest.mark.parametrize("unit", [1, 2, 3, 4, 7, 16])
def test_block_layout_matches_definitions(block, shape, unit):
    pattern = Pattern(block=block, unit=unit)
    ids = block_layout(shape, pattern)
    assert ids.shape == shape and not ids.dtype.is_floating_point
    key_to_id: dict = {}
    id_to_key: dict = {}
    p_, r_, c_ = shape
    for p in range(p_):
        for r in range(r_):
            for c in range(c_):
                key = _ref_block_key(pattern, shape, p, r, c)
                i = int(ids[p, r, c])
                assert key_to_id.setdefault(key, i) == i, f"element {(p, r, c)} split from its block"
                assert id_to_key.setdefault(i, key) == key, f"element {(p, r, c)} merged into another block"
    n = len(id_to_key)
    assert sorted(id_to_key) == list(range(n)), "block ids are not 0..n-1"
    if block not in ("filter", "kernel"):
        # ids of matrix p are p * B + [0, B)
        b = n // p_
        assert n == b * p_
        for p in range(p_):
            assert set(ids[p].unique().tolist()) == set(range(p * b, (p + 1) * b))


def test_block_layout_segment_sizes_last_short():
    ids = block_layout((2, 3, 37), Pattern("row_segment", unit=16))
    sizes = torch.bincount(ids.reshape(-1))
    assert sizes.tolist() == [16, 16, 5] * 6
    ids = block_layout((1, 29, 2), Pattern("column_segment", unit=8))
    assert torch.bincount(ids.reshape(-1)).tolist() == [8, 8, 8, 5] * 2
    # unit >= length: the whole row / column
    assert torch.equal(block_layout((2, 3, 5), Pattern("row_segment", unit=5)), block_layout((2, 3, 5), Pattern()))
    assert torch.equal(block_layout((2, 3, 5), Pattern("column_segment", unit=3)),
                       block_layout((2, 3, 5), Pattern("column")))


# ----------------------------------------------------------------------------------------------- invariants
@given(vw=views(), amount=amounts, pattern=patterns(), imp_seed=st.integers(0, 2**16))
@settings(max_examples=50)
@example(vw=(random_weights((4, 37, 29), 1, "randn"), "randn"), amount=0.37,
         pattern=Pattern("row_segment", "layer", unit=16, align=8), imp_seed=0)
@example(vw=(random_weights((4, 29, 37), 2, "int"), "int"), amount=0.6,
         pattern=Pattern("column_segment", "position", unit=8, align=3, rounding="up"), imp_seed=0)
def test_engine_invariants(vw, amount, pattern, imp_seed):
    view, kind = vw
    importance = None
    if pattern.score is Score.IMPORTANCE:
        importance = random_weights(tuple(view.shape), imp_seed, "int" if kind != "randn" else "randn")
    before = view.clone()
    res = compute_mask(view, amount, pattern, importance)
    assert torch.equal(view, before), "compute_mask modified its input"
    assert res.pattern == pattern
    # integer / constant weights give exact (tied) scores: the pruned set must be the exact (score, index) prefix
    _check_invariants(view, amount, pattern, res, importance, exact=kind != "randn")
    again = compute_mask(view.clone(), amount, pattern, None if importance is None else importance.clone())
    assert torch.equal(again.mask, res.mask), "not deterministic"


@given(vw=views(max_p=6, max_rc=30), amount=st.floats(0.0, 1.0), unit=st.integers(1, 20),
       block=st.sampled_from(SEGMENTS), align=st.integers(2, 9))
@settings(max_examples=40)
def test_rounding_up_prunes_at_least_down(vw, amount, unit, block, align):
    view, _ = vw
    down = compute_mask(view, amount, Pattern(block, "position", unit=unit, align=align, rounding="down"))
    up = compute_mask(view, amount, Pattern(block, "position", unit=unit, align=align, rounding="up"))
    # rounding up prunes a superset: the same ranking, more blocks
    assert not (~down.mask & up.mask).any()
    assert (up.pruned_blocks >= down.pruned_blocks).all()
    assert (up.pruned_blocks - down.pruned_blocks <= align).all()


def test_align_clamped_to_largest_multiple_that_fits():
    view = torch.randn(3, 5, 4)  # 5 rows per matrix
    res = compute_mask(view, 1.0, Pattern("row", "position", align=2, rounding="up"))
    assert res.pruned_blocks.tolist() == [4, 4, 4]  # never 6 > 5
    assert (~res.mask).reshape(3, 5, 4).all(dim=2).sum(dim=1).tolist() == [4, 4, 4]
    assert any("rounded" in n for n in res.notes)
    res = compute_mask(view, 0.9, Pattern("row", "position", align=8, rounding="up"))
    assert res.mask.all()  # no multiple of 8 but 0 fits in 5 rows


def test_align_rounding_exact_values():
    view = torch.arange(1, 1 + 10 * 3, dtype=torch.float32).view(1, 10, 3)  # row r has a larger norm than r-1
    for amount, down, up in [(0.0, 0, 0), (0.1, 0, 4), (0.4, 4, 4), (0.5, 4, 8), (0.7, 4, 8), (1.0, 8, 8)]:
        d = compute_mask(view, amount, Pattern("row", align=4, rounding="down"))
        u = compute_mask(view, amount, Pattern("row", align=4, rounding="up"))
        pruned_d = (~d.mask[0]).all(dim=1)
        pruned_u = (~u.mask[0]).all(dim=1)
        assert pruned_d.tolist() == [i < down for i in range(10)], amount
        assert pruned_u.tolist() == [i < up for i in range(10)], amount


# ----------------------------------------------------------------------------------------------- amount
@pytest.mark.parametrize("block", ["element", "row", "column", "row_segment", "column_segment", "filter"])
def test_layer_scope_closest_count(block):
    # 7 x 13 with unit 4: segments of 4, 4, 4, 1 along C and 4, 3 along R
    view = torch.randn(3, 7, 13)
    pattern = Pattern(block, unit=4)
    sizes = torch.bincount(block_layout((3, 7, 13), pattern).reshape(-1))
    for amount in np.linspace(0, 1, 23):
        res = compute_mask(view, float(amount), pattern)
        assert abs(res.sparsity - amount) <= int(sizes.max()) / (2 * view.numel()) + 1e-6


def test_closest_count_ties_prefer_fewer_blocks():
    view = torch.ones(1, 4, 2)  # 4 rows of 2, target 0.375 * 8 = 3 is half-way between 2 and 4 pruned elements
    res = compute_mask(view, 0.375, Pattern("row"))
    assert res.pruned_blocks.tolist() == [1]


@pytest.mark.parametrize("amount, expected", [(0.5, 2), (0.25, 1), (0.3, 1), (0.4, 2), (0.6, 2), (0.9, 4), (1.0, 4)])
def test_position_scope_counts_per_matrix(amount, expected):
    view = torch.randn(5, 4, 3)
    res = compute_mask(view, amount, Pattern("row", "position"))
    rows_pruned = (~res.mask).all(dim=2).sum(dim=1)
    # the count closest to amount * 4 rows, the same in every matrix
    assert rows_pruned.tolist() == [expected] * 5
    assert abs(expected - amount * 4) <= 0.5


def test_position_scope_differs_from_layer_scope_on_unbalancedrandom_weights():
    # matrix 0 is tiny, matrix 1 is large: the layer ranking prunes only matrix 0, the balanced one both equally
    view = torch.cat([torch.full((1, 4, 3), 0.01), torch.full((1, 4, 3), 10.0)])
    layer = compute_mask(view, 0.5, Pattern("row", "layer"))
    pos = compute_mask(view, 0.5, Pattern("row", "position"))
    assert (~layer.mask).all(dim=2).sum(dim=1).tolist() == [4, 0]
    assert (~pos.mask).all(dim=2).sum(dim=1).tolist() == [2, 2]


def test_position_scope_segments_reach_amount():
    view = torch.randn(4, 8, 17)  # row segments of 16 and 1 element
    pattern = method_pattern("abwsp", "bwsp", align=1)
    res = compute_mask(view, 0.5, pattern)
    half_block_per_matrix = view.shape[0] * 16 / (2 * view.numel())
    assert abs(res.sparsity - 0.5) <= half_block_per_matrix, res.sparsity  # was 0.059 before the fix


def test_empty_view():
    res = compute_mask(torch.zeros(4, 0, 3), 0.5, Pattern())
    assert res.mask.shape == (4, 0, 3) and res.sparsity == 0.0


# ----------------------------------------------------------------------------------------------- ranking and ties
def test_ties_broken_by_block_index():
    view = torch.ones(2, 3, 4)
    res = compute_mask(view, 0.5, Pattern("row"))  # 12 of 24 elements = 3 rows: the 3 lowest ids = matrix 0
    assert (~res.mask).all(dim=2).tolist() == [[True, True, True], [False, False, False]]
    res = compute_mask(view, 1 / 3, Pattern("row", "position"))  # one row per matrix, the first
    assert (~res.mask).all(dim=2).tolist() == [[True, False, False], [True, False, False]]
    res = compute_mask(view, 0.25, Pattern("column"))  # 6 elements = 2 columns of 3: columns 0, 1 of matrix 0
    assert (~res.mask).all(dim=1).tolist() == [[True, True, False, False], [False] * 4]
    res = compute_mask(view, 0.5, Pattern("filter"))  # rows 0 and 1 ... closest to 12 of 24 is 1.5 filters -> 1
    assert (~res.mask).all(dim=2).all(dim=0).tolist() == [True, False, False]
    res = compute_mask(view, 5 / 24, Pattern("element"))
    assert (~res.mask).reshape(-1).tolist() == [True] * 5 + [False] * 19


@pytest.mark.parametrize("score", ["l2", "l1"])
def test_l1_and_l2_rank_differently(score):
    view = torch.tensor([[[4.0, 0, 0, 0], [1.5, 1.5, 1.5, 1.5]]])  # l2: 4 vs 3; l1: 4 vs 6
    res = compute_mask(view, 0.5, Pattern("row", score=score))
    pruned_row = int((~res.mask[0]).all(dim=1).nonzero()[0, 0])
    assert pruned_row == (1 if score == "l2" else 0)


def test_importance_score_ignoresrandom_weights():
    view = torch.randn(2, 6, 5)
    importance = torch.zeros(2, 6, 5)
    importance[:, 3] = 1.0  # row 3 is important everywhere, signs do not matter
    importance[:, 4] = -2.0
    res = compute_mask(view, 4 / 6, Pattern("row", "position", score="importance"), importance)
    assert (~res.mask).all(dim=2).tolist() == [[True, True, True, False, False, True]] * 2


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("amount", [-0.1, 1.5, True, False, "0.5", None, float("nan"), 1.0000001])
def test_bad_amount(amount):
    with pytest.raises(ValueError, match="amount must be"):
        compute_mask(torch.randn(2, 3, 4), amount, Pattern())


@pytest.mark.parametrize("amount", [0, 1, 0.0, 1.0])
def test_int_and_float_bounds_accepted(amount):
    res = compute_mask(torch.randn(2, 3, 4), amount, Pattern())
    assert res.mask.all() if amount == 0 else not res.mask.any()


@pytest.mark.parametrize("view", [torch.randn(3, 4), torch.randn(2, 3, 4, 5), torch.randn(5), [[[1.0]]]])
def test_bad_view(view):
    with pytest.raises(ValueError, match="3-D"):
        compute_mask(view, 0.5, Pattern())


def test_importance_errors():
    view = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="importance"):
        compute_mask(view, 0.5, Pattern(score="importance"))
    with pytest.raises(ValueError, match="importance must have"):
        compute_mask(view, 0.5, Pattern(score="importance"), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="importance must have"):
        compute_mask(view, 0.5, Pattern(), torch.randn(3, 4))


@pytest.mark.parametrize("field", ["unit", "align"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5, "2", None])
def test_pattern_bad_unit_align(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a positive int"):
        Pattern(**{field: value})


def test_pattern_filter_restrictions():
    with pytest.raises(ValueError, match="filter"):
        Pattern(block="filter", scope="position")
    with pytest.raises(ValueError, match="filter"):
        Pattern(block="filter", align=2)
    Pattern(block="filter", unit=7)  # unit is irrelevant, not an error
    with pytest.raises(ValueError, match="block='kernel' spans every matrix"):
        Pattern(block="kernel", scope="position")
    with pytest.raises(ValueError, match="block='kernel' spans every matrix"):
        Pattern(block="kernel", align=2)


@pytest.mark.parametrize("field, enum", [("block", Block), ("scope", Scope), ("rounding", Rounding),
                                         ("score", Score)])
def test_pattern_bad_choice_lists_valid_values(field, enum):
    with pytest.raises(ValueError, match="valid values are") as err:
        Pattern(**{field: "bad"})
    msg = str(err.value)
    assert f"{field}='bad'" in msg
    for member in enum:
        assert repr(member.value) in msg


def test_pattern_parses_strings_and_with_():
    p = Pattern("row_segment", "position", unit=4, align=2, rounding="up", score="l1")
    assert (p.block, p.scope, p.rounding, p.score) == (Block.ROW_SEGMENT, Scope.POSITION, Rounding.UP, Score.L1)
    assert p == Pattern(Block.ROW_SEGMENT, Scope.POSITION, 4, 2, Rounding.UP, Score.L1)
    q = p.with_(scope="layer")
    assert q.scope is Scope.LAYER and p.scope is Scope.POSITION and q.unit == 4
    with pytest.raises(ValueError):
        p.with_(align=0)
    with pytest.raises(ValueError):
        Pattern("filter").with_(scope="position")
    assert Pattern() == Pattern(Block.ROW, Scope.LAYER, 1, 1, Rounding.DOWN, Score.L2)
