"""One scoring model: the score is part of ``Pattern``, and every consumer ranks the mask the callback applies.

For every method (ABWSP under both policies) and every score of ``WinogradPruning``, the pattern the callback builds
for pruning is the pattern its estimators get, and the engine (``winograd_mask``), the sensitivity estimator
(``measure_sensitivity``, through ``Candidate.keep_mask``), the latency tables (``TorchLatencyTable`` /
``NativeLatencyTable.keep_mask`` and the GEMM shapes they time) and the budget search's Taylor loss (also
``Candidate.keep_mask``) all produce the same mask. Also: the importance factor and the ``l2-factor`` score.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_winoprune import WinogradConv2d, WinogradPruning
from lightning_winoprune.callbacks._winograd_args import _SCORES
from lightning_winoprune.importance import Candidate, NativeLatencyTable, TorchLatencyTable, measure_sensitivity
from lightning_winoprune.pruning import (
    METHODS,
    POLICIES,
    Pattern,
    Score,
    compute_mask,
    importance_factor,
    method_pattern,
    position_scale,
    score_scale,
    winograd_mask,
    winograd_view,
)
from lightning_winoprune.winograd import filter_transform, get_transforms

CONFIGS = [(m, None) for m in METHODS if m != "abwsp"] + [("abwsp", p) for p in POLICIES]


class RecordingConv(WinogradConv2d):
    """Records every mask set on it (what ``measure_sensitivity`` evaluates)."""

    def set_mask(self, mask: torch.Tensor | None) -> None:
        if mask is not None:
            self.recorded.append(mask.clone())
        super().set_mask(mask)


def _layer(m: int) -> RecordingConv:
    torch.manual_seed(0)
    layer = RecordingConv(6, 10, m=m, bias=False)
    layer.recorded = []  # type: ignore[attr-defined]
    return layer


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("score", list(_SCORES))
@pytest.mark.parametrize(("method", "policy"), CONFIGS, ids=[f"{m}-{p}" if p else m for m, p in CONFIGS])
def test_every_consumer_ranks_the_mask_the_callback_applies(method, policy, score, m):
    cb = WinogradPruning(method=method, score=score, m=m, verbose=0)
    if policy is not None:
        cb.policies = {"conv": policy}
    applied_pattern = cb._pattern("conv")  # what prune() applies
    estimator_pattern = cb._policy_pattern(policy)  # what the ABWSP toggle and the budget search rank
    assert applied_pattern == estimator_pattern and applied_pattern.score is _SCORES[score]

    layer = _layer(m)
    saliency = torch.rand_like(layer.weight)
    imp = saliency if score == "taylor" else None
    amount = 0.55
    applied, _ = winograd_mask(layer.weight, amount, applied_pattern, cb._saliency({"conv": saliency}, "conv"))
    cand = Candidate(policy or method, amount, estimator_pattern)

    # budget search (Taylor losses) and sensitivity both use Candidate.keep_mask
    assert torch.equal(cand.keep_mask(layer.weight, imp), applied)
    model = nn.Sequential(layer)
    x = torch.randn(2, 6, 6, 6)
    batches = [(x, torch.zeros(2, 10, 6, 6))]
    measure_sensitivity(model, {"conv": layer}, {"conv": [cand]}, batches,
                        lambda mod, b: F.mse_loss(mod(b[0]), b[1]), progress=False,
                        importance={"conv": saliency} if imp is not None else None)
    assert len(layer.recorded) == 1 and torch.equal(layer.recorded[0], applied)

    # latency tables: the mask they time, and the GEMM shapes derived from it
    for table_cls in (TorchLatencyTable, NativeLatencyTable):
        table = table_cls({"conv": layer}, {"conv": (6, 6)}, reps=1, warmup=0,
                          importance={"conv": saliency} if imp is not None else None)
        assert torch.equal(table.keep_mask("conv", cand), applied), table_cls.__name__
    shapes = TorchLatencyTable({"conv": layer}, {"conv": (6, 6)}, importance={"conv": saliency}).gemm_shapes("conv",
                                                                                                             cand)
    kept = winograd_view(applied).sum(dim=(1, 2)).tolist()
    block = applied_pattern.block.value
    if block in ("row", "row_segment", "filter"):
        assert shapes == [(-(-int(n) // 6), 6) for n in kept]
    elif block in ("column", "column_segment"):
        assert shapes == [(10, -(-int(n) // 10)) for n in kept]


def test_scaled_scores_are_pattern_data_and_need_a_scale():
    view = torch.randn(4, 3, 5)
    for score in ("l2-scaled", "l2-factor"):
        pattern = Pattern("row", score=score)
        assert pattern.score.scaled and pattern == method_pattern("wsp-r", score=score)
        with pytest.raises(ValueError, match=rf"score='{score}' needs a per-matrix scale of shape \(4,\)"):
            compute_mask(view, 0.5, pattern)
        with pytest.raises(ValueError, match=r"scale must have shape \(4,\), got \(3,\)"):
            compute_mask(view, 0.5, pattern, scale=torch.ones(3))
        # the scaled score ranks the view multiplied per matrix by the scale
        scale = torch.rand(4) + 0.1
        a = compute_mask(view, 0.5, pattern, scale=scale).mask
        b = compute_mask(view * scale.view(-1, 1, 1), 0.5, Pattern("row")).mask
        assert torch.equal(a, b)
    assert not Score.L2.scaled and score_scale("l2", 2) is None and score_scale("importance", 2) is None


def test_legacy_position_scaled_flag_is_the_l2_scaled_score():
    u = torch.randn(8, 6, 4, 4)
    legacy, _ = winograd_mask(u, 0.5, method_pattern("wsp-r"), position_scaled=True)
    now, _ = winograd_mask(u, 0.5, method_pattern("wsp-r", score="l2-scaled"))
    assert torch.equal(legacy, now)
    with pytest.raises(ValueError, match=r"position_scaled=True is score='l2-scaled'.*'l1'"):
        winograd_mask(u, 0.5, method_pattern("wsp-r", score="l1"), position_scaled=True)


def test_callback_score_defaults_to_the_methods_own():
    assert WinogradPruning(method="wsp-r").score == "l2"
    assert WinogradPruning(method="spatial-winograd").score == "l2-factor"
    assert WinogradPruning(method="spatial-winograd", score="l2-scaled").score == "l2-scaled"


# ------------------------------------------------------------------------------------------- importance factor
@pytest.mark.parametrize("m", [2, 4, 6])
def test_importance_factor_is_the_diagonal_of_the_spatial_step(m):
    # a spatial step moves U = G g G^T by (G G^T) dL/dU (G G^T): as a (p*p x p*p) operator, kron(GG^T, GG^T)
    g = get_transforms(m, torch.float64).G
    ggt = g @ g.T
    op = torch.kron(ggt, ggt)
    f = importance_factor(m, torch.float64)
    assert torch.allclose(torch.diagonal(op), f)
    rows = g.square().sum(1)
    assert torch.allclose(f.view(m + 2, m + 2), torch.outer(rows, rows))


def test_importance_factor_f23_values():
    # G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]: |G_i|^2 = 1, 3/4, 3/4, 1
    f = importance_factor(2, torch.float64).view(4, 4)
    want = torch.outer(torch.tensor([1, 0.75, 0.75, 1], dtype=torch.float64),
                       torch.tensor([1, 0.75, 0.75, 1], dtype=torch.float64))
    assert torch.allclose(f, want)


@pytest.mark.parametrize("m", [2, 4])
def test_factor_score_is_invariant_to_the_toom_cook_normalisation(m):
    # G -> D^-1 G gives U' = U / (d_i d_j) and F' = F / (d_i^2 d_j^2): U' / sqrt(F') = U / sqrt(F)
    torch.manual_seed(0)
    p = m + 2
    u = filter_transform(torch.randn(9, 7, 3, 3, dtype=torch.float64), m)
    d = torch.rand(p, dtype=torch.float64) * 3 + 0.2
    dd = torch.outer(d, d)
    f = importance_factor(m, torch.float64).view(p, p)
    f2 = f / dd.square()
    for method in ("wsp-r", "wsp-c", "wwp"):
        a, _ = winograd_mask(u, 0.6, method_pattern(method, score="l2-factor"))
        b, _ = winograd_mask((u / dd) / f2.sqrt(), 0.6, method_pattern(method))
        assert torch.equal(a, b), method


@pytest.mark.parametrize("m", [2, 4, 6])
def test_factor_and_output_energy_differ_by_an_invariant_constant(m):
    # sqrt(F) * s = c_i c_j with c_i = |G_i| |BT_i| |AT[:, i]|: no normalisation in it
    t = get_transforms(m, torch.float64)
    c = t.G.norm(dim=1) * t.BT.norm(dim=1) * t.AT.norm(dim=0)
    got = importance_factor(m, torch.float64).sqrt() * position_scale(m, torch.float64)
    assert torch.allclose(got, torch.outer(c, c).reshape(-1))


def test_gradient_scaling_multiplies_winograd_gradients_by_the_factor():
    torch.manual_seed(0)
    model = nn.Sequential(WinogradConv2d(3, 4, m=4, bias=False))
    layer = model[0]
    cb = WinogradPruning(method="wsp-r", m=4, gradient_scaling=True, verbose=0)
    cb.layer_names = ["0"]
    mask = torch.rand_like(layer.weight) > 0.3
    layer.set_mask(mask)
    grad = torch.randn_like(layer.weight)
    layer.weight.grad = grad.clone()
    cb.on_before_optimizer_step(None, model, None)  # type: ignore[arg-type]
    want = grad * importance_factor(4).view(6, 6) * mask
    assert torch.allclose(layer.weight.grad, want)
    # off by default: only the mask
    cb2 = WinogradPruning(method="wsp-r", m=4, verbose=0)
    cb2.layer_names = ["0"]
    layer.weight.grad = grad.clone()
    cb2.on_before_optimizer_step(None, model, None)  # type: ignore[arg-type]
    assert torch.equal(layer.weight.grad, grad * mask)
    assert "gradient_scaling" not in cb.mask_config()  # it changes the training, not how masks are chosen
