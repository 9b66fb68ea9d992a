"""``step_masks``: one pruning step of the Winograd methods as one call, tested alone (no callback, no trainer).

Single-stage methods give stage 0, the masks of ``winograd_mask`` with each layer's pattern; spatial-Winograd gives
stage 1 (ring masks and the projected weights), stage 2 (elements) or both, the second ranking the first's weights.
"""

from __future__ import annotations

import pytest
import torch
from pruning_helpers import random_weights

from lightning_winoprune.pruning import (
    SPATIAL_STAGE,
    Score,
    _stages,
    method_pattern,
    project_spatial,
    spatial_stage_mask,
    spatial_weight,
    winograd_mask,
)
from lightning_winoprune.pruning._stages import STAGES, LayerMask, layer_pattern, ring_keep, step_masks
from lightning_winoprune.winograd import filter_transform


def weights(m: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two layers' Winograd weights of real 3x3 kernels, stored position-major as ``WinogradConv2d`` stores them."""
    out = {}
    for i, (k, c) in enumerate([(8, 6), (16, 8)]):
        u = filter_transform(random_weights((k, c, 3, 3), seed + i, "randn"), m)
        out[f"layer{i}"] = u.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    return out


def test_layer_pattern_takes_a_policy_for_abwsp_only():
    assert layer_pattern("abwsp", "bwsp", unit=8) == method_pattern("abwsp", "bwsp", unit=8)
    assert layer_pattern("abwsp", "dense") == layer_pattern("abwsp") == method_pattern("abwsp")
    assert layer_pattern("bwsp", "bwsp", score="l1") == method_pattern("bwsp", score="l1")  # a budget's policy
    with pytest.raises(ValueError, match=r"policy='x' is not valid; valid values are \['bwsp', 'wsp'\]"):
        layer_pattern("abwsp", "x")


@pytest.mark.parametrize("method", ["wwp", "wsp-r", "bwsp", "abwsp"])
def test_single_stage_methods_give_stage_zero_the_masks_of_winograd_mask(method):
    ws = weights()
    before = {n: u.clone() for n, u in ws.items()}
    policies = {"layer0": "wsp", "layer1": "bwsp"} if method == "abwsp" else {}
    steps = step_masks(ws, method, {"layer0": 0.3, "layer1": 0.6}, policies=policies, unit=4, rounding="up")
    assert list(steps) == [0] and list(steps[0]) == list(ws)
    for name, amount in (("layer0", 0.3), ("layer1", 0.6)):
        step = steps[0][name]
        pattern = layer_pattern(method, policies.get(name), unit=4, rounding="up")
        mask, result = winograd_mask(ws[name], amount, pattern)
        assert isinstance(step, LayerMask) and step.weight is None
        assert torch.equal(step.mask, mask) and step.result.pattern == pattern == result.pattern
        assert step.result.sparsity == pytest.approx(result.sparsity)
        assert torch.equal(ws[name], before[name])  # the weights are left as they are


def test_one_amount_for_every_layer_and_importance_per_layer():
    ws = weights()
    imp = {n: torch.rand(u.shape, generator=torch.Generator().manual_seed(3)) for n, u in ws.items()}
    steps = step_masks(ws, "wwp", 0.5, importance=imp, score=Score.IMPORTANCE)
    for name, u in ws.items():
        mask, _ = winograd_mask(u, 0.5, method_pattern("wwp", score="importance"), imp[name])
        assert torch.equal(steps[0][name].mask, mask)


def test_sync_sees_every_mask_once_in_order_and_its_answer_is_used():
    ws = weights()
    seen: list[tuple[str, float]] = []

    def keep_all(name: str, mask: torch.Tensor) -> torch.Tensor:
        seen.append((name, 1.0 - mask.float().mean().item()))
        return torch.ones_like(mask)

    steps = step_masks(ws, "wwp", 0.5, sync=keep_all)
    assert [n for n, _ in seen] == list(ws) and all(s == pytest.approx(0.5, abs=0.02) for _, s in seen)
    assert all(bool(step.mask.all()) for step in steps[0].values())


@pytest.mark.parametrize("m", [2, 4])
def test_stage_one_prunes_rings_and_projects_the_weights(m):
    ws = weights(m)
    before = {n: u.clone() for n, u in ws.items()}
    steps = step_masks(ws, "spatial-winograd", 0.7, spatial_amount=0.3, stages=(1,), score="l2-factor")
    assert list(steps) == [1]
    for name, u in ws.items():
        step = steps[1][name]
        mask, _ = spatial_stage_mask(u, 0.3, SPATIAL_STAGE.with_(score="l2-factor"))
        assert torch.equal(step.mask, mask) and torch.equal(u, before[name])
        assert step.weight is not None and step.weight.stride() == u.stride()  # the layer's memory layout
        assert torch.equal(step.weight, project_spatial(u, ring_keep(mask)).masked_fill(~mask, 0))
        assert torch.count_nonzero(step.weight[~mask]) == 0
        # the new weights are those of 3x3 kernels whose pruned rings are zero
        g = spatial_weight(step.weight)
        assert torch.allclose(g.masked_fill(~ring_keep(mask), 0), g, atol=1e-6)


def test_a_synced_stage_one_mask_is_the_one_the_weights_are_projected_with():
    ws = weights()
    other = step_masks(weights(seed=5), "spatial-winograd", 0.7, spatial_amount=0.3, stages=(1,))[1]
    steps = step_masks(ws, "spatial-winograd", 0.7, spatial_amount=0.3, stages=(1,),
                       sync=lambda name, mask: other[name].mask)  # "rank 0" ranked other kernels
    for name, u in ws.items():
        mask = other[name].mask
        assert torch.equal(steps[1][name].mask, mask)
        assert torch.equal(steps[1][name].weight, project_spatial(u, ring_keep(mask)).masked_fill(~mask, 0))


def test_both_stages_in_one_step_are_stage_one_then_stage_two_on_its_weights():
    ws = weights()
    both = step_masks(ws, "spatial-winograd", 0.6, spatial_amount=0.4, score="l2-factor")  # None: all stages
    assert list(both) == [1, 2] == list(STAGES["spatial-winograd"])
    one = step_masks(ws, "spatial-winograd", 0.6, spatial_amount=0.4, stages=(1,), score="l2-factor")[1]
    two = step_masks({n: s.weight for n, s in one.items()}, "spatial-winograd", 0.6, stages=(2,),
                     score="l2-factor")[2]
    for name in ws:
        assert torch.equal(both[1][name].mask, one[name].mask) and torch.equal(both[1][name].weight, one[name].weight)
        assert torch.equal(both[2][name].mask, two[name].mask) and both[2][name].weight is None
        assert both[2][name].result.sparsity == pytest.approx(0.6, abs=0.01)
        assert not bool((both[2][name].mask & ~one[name].mask).any())  # stage 2 keeps stage 1's zeros pruned
    assert step_masks(ws, "spatial-winograd", 0.6, stages=()) == {}


@pytest.mark.parametrize(
    ("method", "stages", "spatial_amount", "match"),
    [
        ("spatial-winograd", (2, 1), 0.4,
         r"stages=\(2, 1\) is not valid for method='spatial-winograd'; valid values are \[\(\), \(1,\), \(2,\), "
         r"\(1, 2\)\]"),
        ("spatial-winograd", (3,), 0.4, r"stages=\(3,\) is not valid.*\(1, 2\)"),
        ("wsp-r", (1,), 0.4, r"stages=\(1,\) is not valid for method='wsp-r'; valid values are \[\(\), \(0,\)\]"),
        ("spatial-winograd", (1,), None, r"stages=\(1,\) runs stage 1, which needs spatial_amount"),
        ("nope", None, None, r"method='nope' is not valid; valid values are \['abwsp'"),
    ],
)
def test_stages_a_method_does_not_have_are_refused(method, stages, spatial_amount, match):
    with pytest.raises(ValueError, match=match):
        step_masks(weights(), method, 0.5, stages=stages, spatial_amount=spatial_amount)


@pytest.mark.parametrize("m", [2, 4])
def test_stage_one_survives_the_round_trip_through_plain_kernels(m):
    ws = weights(m)
    stage = step_masks(ws, "spatial-winograd", 0.6, spatial_amount=0.4, stages=(1,))[1]
    for step in stage.values():
        g = _stages.spatial_kernels(step.weight, step.mask)  # what a stages=1 checkpoint saves
        assert torch.equal(g.masked_fill(~ring_keep(step.mask), 0), g)
        u, mask = _stages.stage_one_from_kernels(g, m)  # what loading it rebuilds
        assert mask is not None and torch.equal(mask, step.mask)
        assert u.dtype == torch.float64 and torch.allclose(u.float(), step.weight, atol=1e-5)
    dense_u, no_mask = _stages.stage_one_from_kernels(_stages.spatial_kernels(ws["layer0"]), m)
    assert no_mask is None and torch.allclose(dense_u.float(), ws["layer0"], atol=1e-5)


def test_ring_keep_keeps_the_centre_of_every_kernel_and_the_ring_of_the_kept_ones():
    mask = torch.ones(3, 2, 4, 4, dtype=torch.bool)
    mask[1, 0, 0, :] = mask[1, 0, -1, :] = mask[1, 0, :, 0] = mask[1, 0, :, -1] = False  # kernel (1, 0) pruned
    keep = ring_keep(mask)
    assert keep.shape == (3, 2, 3, 3) and bool(keep[:, :, 1, 1].all())
    assert int((~keep).sum()) == 8 and not bool(keep[1, 0].flatten()[[0, 1, 2, 3, 5, 6, 7, 8]].any())
