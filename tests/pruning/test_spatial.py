"""Spatial-Winograd pruning's building blocks: which kernel entries zero which Winograd positions (from ``G``'s
support), the stage-1 mask, and the spatial-domain step expressed on Winograd weights."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_winoprune.pruning import (
    SPATIAL_GROUPS,
    SPATIAL_STAGE,
    Block,
    filter_support,
    method_pattern,
    project_spatial,
    spatial_gradient,
    spatial_stage_mask,
    spatial_weight,
    winograd_view,
    zero_positions,
)
from lightning_winoprune.winograd import filter_transform, get_transforms


@pytest.mark.parametrize("m", [2, 4, 6])
def test_filter_support_first_row_point_zero_last_row_infinity(m):
    support = filter_support(m)
    assert support[0] == {0} and support[-1] == {2}
    assert all(s == {0, 1, 2} for s in support[1:-1]) and len(support) == m + 2


@pytest.mark.parametrize("m", [2, 4])
def test_group_to_position_mapping(m):
    p = m + 2
    corner = torch.zeros(p, p, dtype=torch.bool)
    corner[0, 0] = True
    assert torch.equal(zero_positions(m, SPATIAL_GROUPS["corner"]), corner)
    edge = torch.zeros(p, p, dtype=torch.bool)
    edge[0, :] = True  # kernel row 0 feeds U's row 0 alone
    assert torch.equal(zero_positions(m, SPATIAL_GROUPS["edge"]), edge)
    border = torch.ones(p, p, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert torch.equal(zero_positions(m, SPATIAL_GROUPS["ring"]), border)
    assert int(border.sum()) == {2: 12, 4: 20}[m]
    assert bool(zero_positions(m, SPATIAL_GROUPS["kernel"]).all())
    # the centre alone, or the four edge middles, zero nothing
    assert not zero_positions(m, torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)).any()
    assert not zero_positions(m, torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)).any()


@settings(max_examples=40, deadline=None)
@given(m=st.sampled_from([2, 4]), k=st.integers(1, 7), c=st.integers(1, 7), amount=st.floats(0.0, 0.9),
       seed=st.integers(0, 2**16), score=st.sampled_from(["l2", "l1", "l2-scaled", "l2-factor"]))
def test_stage1_masks_make_the_claimed_positions_exactly_zero(m, k, c, amount, seed, score):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, c, 3, 3, generator=gen)
    u = filter_transform(g, m)
    mask, result = spatial_stage_mask(u, amount, SPATIAL_STAGE.with_(score=score))
    border = zero_positions(m, SPATIAL_GROUPS["ring"])
    # whole borders of whole kernels: the inner positions are kept, a kernel's border is all in or all out
    assert bool(mask[:, :, ~border].all())
    pruned = ~mask[:, :, 0, 0]
    assert torch.equal(~mask[:, :, border], pruned[:, :, None].expand(k, c, int(border.sum())))
    # the amount up to kernel granularity, capped at the border share
    share = float(border.float().mean())
    assert abs(result.sparsity - min(amount, share)) <= share / (k * c) / 2 + 1e-9
    assert result.sparsity == pytest.approx(1 - mask.float().mean().item())
    # zeroing the rings of the pruned kernels makes exactly those Winograd positions exactly zero
    ring = SPATIAL_GROUPS["ring"]
    g_pruned = g.masked_fill(pruned[:, :, None, None] & ring, 0.0)
    u_pruned = filter_transform(g_pruned, m)
    assert torch.count_nonzero(u_pruned[~mask]) == 0
    # and nothing else: the kept entries of pruned kernels are generically non-zero
    assert bool((u_pruned[pruned][:, ~border] != 0).all())


def test_stage1_caps_at_the_border_share_and_refuses_other_blocks():
    u = filter_transform(torch.randn(4, 4, 3, 3), 2)
    _, result = spatial_stage_mask(u, 0.9)
    assert result.sparsity == pytest.approx(0.75) and any("border share" in n for n in result.notes)
    with pytest.raises(ValueError, match=r"block='kernel'.*'row'"):
        spatial_stage_mask(u, 0.5, method_pattern("wsp-r"))
    assert SPATIAL_STAGE.block is Block.KERNEL


def test_stage1_ranks_kernels_by_their_border():
    g = torch.ones(2, 3, 3, 3)
    g[1, 2, :, :] = 0.01  # tiny ring: pruned first
    g[1, 2, 1, 1] = 100.0  # the centre does not count (it only feeds inner positions)
    u = filter_transform(g, 2)
    mask, _ = spatial_stage_mask(u, 0.75 / 6)
    assert (~mask[:, :, 0, 0]).nonzero().tolist() == [[1, 2]]


@pytest.mark.parametrize("m", [2, 4])
def test_spatial_gradient_is_the_spatial_step(m):
    # U = G g G^T: training g with dL/dg = G^T dL/dU G moves U by G dL/dg G^T
    torch.manual_seed(0)
    g = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    t = get_transforms(m, torch.float64)
    u = t.G @ g @ t.G.T
    target = torch.randn_like(u)
    loss = ((u - target) ** 2 * torch.rand_like(u)).sum()
    du, = torch.autograd.grad(loss, u, retain_graph=True)
    dg, = torch.autograd.grad(loss, g)
    assert torch.allclose(spatial_gradient(du), t.G @ dg @ t.G.T)
    keep = torch.rand(3, 2, 3, 3) > 0.4
    assert torch.allclose(spatial_gradient(du, keep), t.G @ (dg * keep) @ t.G.T)


@pytest.mark.parametrize("m", [2, 4])
def test_projection_and_spatial_weight_invert_the_transform(m):
    torch.manual_seed(0)
    g = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    u = filter_transform(g, m)
    assert torch.allclose(spatial_weight(u), g)
    assert torch.allclose(project_spatial(u), u)
    keep = torch.rand(5, 4, 3, 3) > 0.5
    assert torch.allclose(project_spatial(u, keep), filter_transform(g * keep, m))
    # a Winograd-domain perturbation outside the range of the transform is removed
    noisy = u + 0.1 * torch.randn_like(u)
    projected = project_spatial(noisy)
    assert torch.allclose(project_spatial(projected), projected)
    assert torch.allclose(filter_transform(spatial_weight(projected), m), projected)
    assert winograd_view(u).shape == ((m + 2) ** 2, 5, 4)
