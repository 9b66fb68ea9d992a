"""DEPrune (design page §3): the DR view of depthwise convs, DCP / DCP-B / DCP-BH masks, pointwise filter pruning.

Expectations are recomputed from the definitions (the DR layout, magnitudes, per-sub-GEMM column counts read back
from the mask), never from the result's own bookkeeping, on channel counts that are mostly not multiples of the tile.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lightning_winoprune.pruning._depthwise import (
    DEFAULT_DR_TILE,
    DW_METHODS,
    depthwise_mask,
    dr_column_masks,
    dr_conv2d,
    dr_matrices,
    from_dr_matrices,
    pointwise_filter_mask,
)

CHANNELS = [31, 33, 70, 96, 100]
AMOUNTS = [0.1, 0.37, 0.5, 0.73, 0.9]


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids thread spin-waits on the shared cores (10x slowdowns seen)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _dw(c: int, k: int = 3, seed: int = 0) -> torch.Tensor:
    """A depthwise weight with distinct, non-zero entries (no ties in any ranking)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, 1, k, k, generator=g, dtype=torch.float64)


def _block_slices(c: int, tile: int) -> list[slice]:
    return [slice(s, min(s + tile, c)) for s in range(0, c, tile)]


def _pruned_per_block(mask: torch.Tensor, tile: int) -> list[int]:
    """Pruned DR columns of every sub-GEMM, read from the mask: block g's columns are its channels' weights."""
    flat = mask.reshape(mask.shape[0], -1)
    return [int((~flat[sl]).sum()) for sl in _block_slices(mask.shape[0], tile)]


def _cols_per_block(w: torch.Tensor, tile: int) -> list[int]:
    k = w.shape[2] * w.shape[3]
    return [(sl.stop - sl.start) * k for sl in _block_slices(w.shape[0], tile)]


def _closest(amount: float, n: int) -> int:
    """The count closest to ``amount * n`` (ties: the smaller), as the engine picks it."""
    return min(range(n + 1), key=lambda i: (abs(i - amount * n), i))


def _align_ref(count: int, tile: int, rounding: str, cols: int) -> int:
    rounded = (count // tile) * tile if rounding in ("down", "u") else math.ceil(count / tile) * tile
    return min(rounded, (cols // tile) * tile)


def _assert_smallest(values: torch.Tensor, keep: torch.Tensor) -> None:
    """Every pruned value is no larger than every kept one."""
    pruned, kept = values[~keep], values[keep]
    if pruned.numel() and kept.numel():
        assert pruned.max() <= kept.min(), (pruned.max().item(), kept.min().item())


# ----------------------------------------------------------------------------------------------- the DR view
@given(
    c=st.sampled_from([1, 31, 32, 33, 70]),
    k=st.sampled_from([3, 5]),
    stride=st.sampled_from([1, 2]),
    padding=st.integers(0, 2),
    batch=st.integers(1, 2),
    extra=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    tile=st.sampled_from([32, 32, 8]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40)
@example(c=70, k=5, stride=2, padding=2, batch=2, extra=(3, 0), tile=32, seed=1)
def test_dr_conv2d_matches_depthwise_conv(c, k, stride, padding, batch, extra, tile, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, k + extra[0], k + extra[1], generator=g, dtype=torch.float64)
    w = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64)
    ref = F.conv2d(x, w, stride=stride, padding=padding, groups=c)
    out = dr_conv2d(x, w, stride=stride, padding=padding, tile=tile)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_dr_conv2d_rectangular_kernel_and_float32():
    x = torch.randn(2, 33, 7, 6)
    w = torch.randn(33, 1, 3, 5)
    torch.testing.assert_close(dr_conv2d(x, w, stride=(2, 1), padding=(1, 2)),
                               F.conv2d(x, w, stride=(2, 1), padding=(1, 2), groups=33), rtol=1e-5, atol=1e-5)


@given(c=st.sampled_from([1, 31, 32, 33, 70, 100]), kh=st.sampled_from([1, 3, 5]), kw=st.sampled_from([3, 5]),
       tile=st.sampled_from([32, 7]))
@settings(max_examples=25)
def test_dr_matrices_layout_and_round_trip(c, kh, kw, tile):
    w = torch.randn(c, 1, kh, kw, dtype=torch.float64)
    mats = dr_matrices(w, tile)
    k = kh * kw
    assert len(mats) == math.ceil(c / tile)
    for g, m in enumerate(mats):
        n = min(tile, c - g * tile)
        assert m.shape == (n, n * k)
        assert ((m != 0).sum(dim=0) == 1).all(), "a DR column must hold exactly one weight"
        for col in range(n * k):
            c_local, t = divmod(col, k)
            assert m[c_local, col] == w[g * tile + c_local, 0, t // kw, t % kw]
    assert torch.equal(from_dr_matrices(mats, kh, kw), w)


def test_dr_matrices_default_tile_is_32():
    mats = dr_matrices(torch.randn(70, 1, 3, 3))
    assert DEFAULT_DR_TILE == 32
    assert [m.shape for m in mats] == [(32, 288), (32, 288), (6, 54)]


def test_from_dr_matrices_rejects_broken_structure():
    mats = dr_matrices(torch.randn(40, 1, 3, 3), tile=16)
    bad = [m.clone() for m in mats]
    bad[1][0, 9] = 1.0  # row 0 holds a weight in channel 1's columns
    with pytest.raises(ValueError, match="not block-diagonal"):
        from_dr_matrices(bad, 3, 3)
    with pytest.raises(ValueError, match=r"shape \(n, n\*9\)"):
        from_dr_matrices([mats[0][:, :-1]], 3, 3)
    with pytest.raises(ValueError, match=r"shape \(n, n\*25\)"):
        from_dr_matrices(mats, 5, 5)
    with pytest.raises(ValueError, match="one tile"):
        from_dr_matrices([mats[2], mats[0]], 3, 3)
    with pytest.raises(ValueError, match="at least one"):
        from_dr_matrices([], 3, 3)
    with pytest.raises(ValueError, match="kh must be a positive int"):
        from_dr_matrices(mats, 0, 3)


def test_dr_bad_arguments():
    w = torch.randn(8, 1, 3, 3)
    with pytest.raises(ValueError, match=r"\(C, 1, kh, kw\), got \(8, 2, 3, 3\)"):
        dr_matrices(torch.randn(8, 2, 3, 3))
    with pytest.raises(ValueError, match="tile must be a positive int"):
        dr_matrices(w, tile=0)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 8, H, W\)"):
        dr_conv2d(torch.randn(1, 7, 5, 5), w)
    with pytest.raises(ValueError, match="does not fit"):
        dr_conv2d(torch.randn(1, 8, 2, 2), w)
    with pytest.raises(ValueError, match="tile must be a positive int"):
        dr_conv2d(torch.randn(1, 8, 5, 5), w, tile=0)
    with pytest.raises(ValueError, match="stride must be positive"):
        dr_conv2d(torch.randn(1, 8, 5, 5), w, stride=0)


# ----------------------------------------------------------------------------------------------- DCP
@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("amount", AMOUNTS)
def test_dcp_exact_layer_ratio_and_smallest_pruned(c, amount):
    w = _dw(c, seed=c)
    res = depthwise_mask(w, amount, "dcp")
    numel = w.numel()
    assert res.mask.shape == w.shape and res.mask.dtype == torch.bool
    n_pruned = int((~res.mask).sum())
    assert abs(n_pruned / numel - amount) <= 0.5 / numel + 1e-12
    assert n_pruned == _closest(amount, numel)
    assert res.sparsity == pytest.approx(n_pruned / numel)
    _assert_smallest(w.abs(), res.mask)
    assert res.rounding is None and res.requested == amount


def test_dcp_ranks_the_layer_so_sub_gemms_are_unbalanced():
    # block 0 (32 channels) holds large weights, block 1 (38 channels) small ones: DCP prunes block 1 first
    w = _dw(70)
    w[:32] = w[:32].sign() * (10 + w[:32].abs())
    res = depthwise_mask(w, 0.4, "dcp")
    per = _pruned_per_block(res.mask, 32)
    assert per[0] == 0 and res.real_dw == 0.0
    balanced = depthwise_mask(w, 0.4, "dcp-b")
    assert balanced.real_dw > 0.35


# ----------------------------------------------------------------------------------------------- DCP-B
@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("amount", AMOUNTS)
@pytest.mark.parametrize("k", [3, 5])
def test_dcp_b_same_ratio_in_every_sub_gemm(c, amount, k):
    w = _dw(c, k, seed=c + k)
    res = depthwise_mask(w, amount, "dcp-b")
    per = _pruned_per_block(res.mask, 32)
    cols = _cols_per_block(w, 32)
    assert res.pruned_columns == per and res.subgemm_columns == cols
    for p, n in zip(per, cols, strict=True):
        assert abs(p / n - amount) <= 0.5 / n + 1e-12, (p, n, amount)
        assert p == _closest(amount, n)
    # ranked inside every sub-GEMM
    flat, keep = w.reshape(c, -1).abs(), res.mask.reshape(c, -1)
    for sl in _block_slices(c, 32):
        _assert_smallest(flat[sl], keep[sl])
    assert res.sparsity == pytest.approx(sum(per) / w.numel())


# ----------------------------------------------------------------------------------------------- DCP-BH
@pytest.mark.parametrize("c", [*CHANNELS, 35])
@pytest.mark.parametrize("amount", AMOUNTS)
@pytest.mark.parametrize("rounding", ["down", "up", "u", "o"])
def test_dcp_bh_aligned_counts_are_rounded_dcp_b_counts(c, amount, rounding):
    w = _dw(c, seed=c)
    base = _pruned_per_block(depthwise_mask(w, amount, "dcp-b").mask, 32)
    res = depthwise_mask(w, amount, "dcp-bh", rounding=rounding)
    per = _pruned_per_block(res.mask, 32)
    cols = _cols_per_block(w, 32)
    assert all(p % 32 == 0 for p in per), per
    assert per == [_align_ref(b, 32, rounding, n) for b, n in zip(base, cols, strict=True)], (per, base)
    assert res.pruned_columns == per
    assert res.rounding == ("u" if rounding in ("down", "u") else "o")
    flat, keep = w.reshape(c, -1).abs(), res.mask.reshape(c, -1)
    for sl in _block_slices(c, 32):
        _assert_smallest(flat[sl], keep[sl])


def test_dcp_bh_3x3_counts_are_multiples_of_32_up_to_288():
    # C = 35: two sub-GEMMs of 288 and 27 columns; 27 < 32 so HSR can never prune the partial one
    w = _dw(35)
    seen = set()
    for amount in [i / 20 for i in range(21)]:
        for rounding in ("down", "up"):
            res = depthwise_mask(w, amount, "dcp-bh", rounding=rounding)
            full, part = _pruned_per_block(res.mask, 32)
            assert full in range(0, 289, 32) and part == 0
            seen.add(full)
    assert max(seen) == 288 and min(seen) == 0
    res = depthwise_mask(w, 0.5, "dcp-bh", rounding="up")
    assert any("HSR cannot prune" in note for note in res.notes)
    assert res.real_dw == 0.0  # the partial sub-GEMM is the minimum


def test_dcp_bh_other_tile_and_5x5():
    w = _dw(45, k=5)
    res = depthwise_mask(w, 0.6, "dcp-bh", tile=16, rounding="o")
    cols = _cols_per_block(w, 16)  # 400, 400, 325
    base = _pruned_per_block(depthwise_mask(w, 0.6, "dcp-b", tile=16).mask, 16)
    assert _pruned_per_block(res.mask, 16) == [_align_ref(b, 16, "up", n) for b, n in zip(base, cols, strict=True)]


# ----------------------------------------------------------------------------------------------- all methods
@given(
    c=st.sampled_from([1, 31, 33, 70, 96, 100]),
    k=st.sampled_from([3, 5]),
    tile=st.sampled_from([32, 32, 8, 5]),
    amount=st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0)),
    method=st.sampled_from(DW_METHODS),
    rounding=st.sampled_from(["down", "up"]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60)
def test_invariants_all_methods(c, k, tile, amount, method, rounding, seed):
    w = _dw(c, k, seed)
    res = depthwise_mask(w, amount, method, tile=tile, rounding=rounding)
    per = _pruned_per_block(res.mask, tile)
    cols = _cols_per_block(w, tile)
    ratios = [p / n for p, n in zip(per, cols, strict=True)]
    assert res.pruned_columns == per and res.subgemm_columns == cols
    assert res.subgemm_ratios == pytest.approx(ratios)
    assert res.real_dw == pytest.approx(min(ratios))
    assert res.sparsity == pytest.approx(float((~res.mask).sum()) / w.numel())
    if amount == 0:
        assert res.mask.all()
    if amount == 1:
        expected = cols if method != "dcp-bh" else [(n // tile) * tile for n in cols]
        assert per == expected
    if method == "dcp-bh":
        assert all(p % tile == 0 for p in per)


@pytest.mark.parametrize("method", DW_METHODS)
def test_amount_zero_is_a_no_op(method):
    res = depthwise_mask(_dw(70), 0.0, method, rounding="up")
    assert res.mask.all() and res.sparsity == 0.0 and res.real_dw == 0.0 and res.pruned_columns == [0, 0, 0]


@pytest.mark.parametrize("method", DW_METHODS)
@pytest.mark.parametrize("c", [33, 100])
def test_mask_is_a_column_mask_of_the_dr_matrices(method, c):
    w = _dw(c)
    res = depthwise_mask(w, 0.55, method, rounding="up")
    mats = dr_matrices(w)
    keeps = dr_column_masks(res.mask)
    masked = [m * keep for m, keep in zip(mats, keeps, strict=True)]
    for m_masked, m_ref, keep, pruned in zip(masked, dr_matrices(w * res.mask), keeps, res.pruned_columns,
                                             strict=True):
        assert torch.equal(m_masked, m_ref)
        assert int((m_masked == 0).all(dim=0).sum()) == pruned == int((~keep).sum())
    x = torch.randn(2, c, 9, 8, dtype=torch.float64)
    ref = F.conv2d(x, w * res.mask, padding=1, groups=c)
    torch.testing.assert_close(dr_conv2d(x, from_dr_matrices(masked, 3, 3), padding=1), ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ref, F.conv2d(x, w, padding=1, groups=c))


@pytest.mark.parametrize("method", DW_METHODS)
def test_importance_replaces_magnitude(method):
    w = _dw(70)
    imp = torch.rand(w.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    res = depthwise_mask(w, 0.5, method, importance=imp)
    by_mag = depthwise_mask(w, 0.5, method)
    assert not torch.equal(res.mask, by_mag.mask)
    if method == "dcp":
        _assert_smallest(imp, res.mask)
    else:
        for sl in _block_slices(70, 32):
            _assert_smallest(imp[sl], res.mask[sl])


def test_l1_and_l2_rank_single_weights_alike():
    w = _dw(70)
    for method in DW_METHODS:
        assert torch.equal(depthwise_mask(w, 0.45, method, score="l1").mask,
                           depthwise_mask(w, 0.45, method, score="l2").mask)


def test_depthwise_mask_errors():
    w = _dw(33)
    with pytest.raises(ValueError, match=r"\(C, 1, kh, kw\), got \(33, 3, 3\)"):
        depthwise_mask(w[:, 0], 0.5, "dcp")
    with pytest.raises(ValueError, match=r"\(C, 1, kh, kw\), got \(4, 2, 3, 3\)"):
        depthwise_mask(torch.randn(4, 2, 3, 3), 0.5, "dcp")
    with pytest.raises(ValueError, match="must not be empty"):
        depthwise_mask(torch.randn(0, 1, 3, 3), 0.5, "dcp")
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match=r"amount must be a number in \[0, 1\]"):
            depthwise_mask(w, bad, "dcp")
    valid = r"\['dcp', 'dcp-b', 'dcp-bh', 'channel'\]"
    with pytest.raises(ValueError, match=r"method='dcp-x' is not valid; valid values are " + valid):
        depthwise_mask(w, 0.5, "dcp-x")
    for bad_tile in (0, -32, 2.0, True):
        with pytest.raises(ValueError, match="tile must be a positive int"):
            depthwise_mask(w, 0.5, "dcp-b", tile=bad_tile)
    with pytest.raises(ValueError, match=r"rounding='sideways' is not valid; valid values are \['down', 'u', 'up'"):
        depthwise_mask(w, 0.5, "dcp-bh", rounding="sideways")
    with pytest.raises(ValueError, match="score='l3' is not valid"):
        depthwise_mask(w, 0.5, "dcp", score="l3")
    with pytest.raises(ValueError, match="needs an importance tensor"):
        depthwise_mask(w, 0.5, "dcp", score="importance")
    with pytest.raises(ValueError, match="importance must have the weight's shape"):
        depthwise_mask(w, 0.5, "dcp", importance=torch.ones(33, 9))


# ----------------------------------------------------------------------------------------------- pointwise
@pytest.mark.parametrize("k, c", [(31, 33), (70, 16), (100, 96)])
@pytest.mark.parametrize("amount", [0.0, 0.25, 0.5, 0.83, 1.0])
def test_pointwise_prunes_whole_filters_with_smallest_l2(k, c, amount):
    w = torch.randn(k, c, 1, 1, dtype=torch.float64)
    res = pointwise_filter_mask(w, amount)
    assert res.mask.shape == w.shape and res.mask.dtype == torch.bool
    per_filter = res.mask.reshape(k, c)
    assert (per_filter.all(dim=1) | ~per_filter.any(dim=1)).all(), "a filter is partially pruned"
    pruned = torch.nonzero(~per_filter[:, 0]).reshape(-1).tolist()
    assert res.pruned_filters == pruned == sorted(pruned)
    assert len(pruned) == _closest(amount, k)
    assert res.sparsity == pytest.approx(len(pruned) / k)
    _assert_smallest(w.reshape(k, c).norm(dim=1), per_filter[:, 0])


def test_pointwise_l1_differs_from_l2_and_errors():
    # filter 0: one large entry (L2 = L1 = 3); filter 1: four small ones (L2 = 2, L1 = 4)
    w = torch.zeros(3, 4, 1, 1)
    w[0, 0] = 3.0
    w[1] = 1.0
    w[2] = 5.0
    assert pointwise_filter_mask(w, 1 / 3).pruned_filters == [1]
    assert pointwise_filter_mask(w, 1 / 3, score="l1").pruned_filters == [0]
    imp = torch.ones_like(w)
    imp[2] = 0.0
    assert pointwise_filter_mask(w, 1 / 3, importance=imp).pruned_filters == [2]
    with pytest.raises(ValueError, match=r"\(K, C, 1, 1\) tensor, got \(3, 4, 3, 3\)"):
        pointwise_filter_mask(torch.randn(3, 4, 3, 3), 0.5)
    with pytest.raises(ValueError, match=r"amount must be a number in \[0, 1\]"):
        pointwise_filter_mask(w, 2.0)
    with pytest.raises(ValueError, match="score='bogus' is not valid"):
        pointwise_filter_mask(w, 0.5, score="bogus")


@pytest.mark.parametrize("c", [31, 33, 70])
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.9])
def test_channel_baseline_prunes_whole_lowest_l2_channels(c, amount):
    w = torch.randn(c, 1, 3, 3, generator=torch.Generator().manual_seed(c))
    res = depthwise_mask(w, amount, "channel")
    pruned = (~res.mask).flatten(1)
    channels = pruned.all(1)
    assert torch.equal(pruned.any(1), channels)  # whole channels only
    assert int(channels.sum()) == round(amount * c) or abs(int(channels.sum()) - amount * c) <= 0.5
    norms = w.flatten(1).norm(dim=1)
    if 0 < int(channels.sum()) < c:
        assert norms[channels].max() <= norms[~channels].min()
