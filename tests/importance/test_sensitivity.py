"""``Candidate`` validation and ``measure_sensitivity`` on a self-distillation problem with a provable answer.

The model's target is its own unpruned output, so the baseline MSE is exactly zero and every pruned candidate has
a non-negative loss increase. Filter pruning removes whole output channels, whose squared outputs add up: a larger
amount prunes a superset of filters and the increase grows strictly.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_winoprune import WinogradConv2d
from lightning_winoprune.importance import DENSE, Candidate, measure_sensitivity
from lightning_winoprune.pruning import Pattern, method_pattern

FP = method_pattern("fp")
BWSP = method_pattern("bwsp")
WSP = method_pattern("wsp-r")


Batch = tuple[torch.Tensor, torch.Tensor]


def teacher_problem(n_layers: int = 1) -> tuple[nn.Sequential, list[Batch], dict[str, WinogradConv2d]]:
    mods: list[nn.Module] = [WinogradConv2d(4, 8, bias=False)]
    for _ in range(n_layers - 1):
        mods.append(WinogradConv2d(8, 8, bias=False))
    model = nn.Sequential(*mods)
    xs = [torch.randn(3, 4, 6, 6) for _ in range(2)]
    with torch.no_grad():
        data = [(x, model(x)) for x in xs]  # (input, target): the model's own unpruned output
    layers = {name: mod for name, mod in model.named_children() if isinstance(mod, WinogradConv2d)}
    return model, data, layers


def mse(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def direct_loss(model: nn.Module, data: list[Batch], layer: WinogradConv2d, cand: Candidate) -> float:
    saved = layer.mask
    layer.set_mask(cand.keep_mask(layer.weight))
    with torch.no_grad():
        loss = sum(mse(model, b).item() for b in data) / len(data)
    layer.set_mask(saved)
    return loss


# ----------------------------------------------------------------------------------------------- Candidate
def test_candidate_validation_and_identity():
    assert DENSE == Candidate("dense") == Candidate("dense", 0, None)
    assert Candidate("bwsp", 0.5, BWSP) == Candidate("bwsp", 0.5, method_pattern("bwsp"))
    assert len({Candidate("bwsp", 0.5, BWSP), Candidate("bwsp", 0.5, BWSP), Candidate("bwsp", 0.7, BWSP)}) == 2
    assert Candidate("bwsp", 1, BWSP).amount == 1.0 and isinstance(Candidate("bwsp", 1, BWSP).amount, float)
    assert Candidate("bwsp", 0.7, BWSP).label == "bwsp@0.70" and DENSE.label == "dense"
    with pytest.raises(ValueError, match="neither a pattern nor an amount"):
        Candidate("dense", 0.5)
    with pytest.raises(ValueError, match="neither a pattern nor an amount"):
        Candidate("dense", 0.0, FP)
    with pytest.raises(ValueError, match="needs a pattern"):
        Candidate("wsp", 0.5)
    with pytest.raises(ValueError, match="scope='position'"):
        Candidate("bwsp", 0.5, WSP)
    with pytest.raises(ValueError, match="scope='layer'"):
        Candidate("wsp", 0.5, BWSP)
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="amount"):
            Candidate("wsp", bad, WSP)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="policy"):
        Candidate("", 0.5, WSP)
    with pytest.raises(TypeError, match="Pattern"):
        Candidate("wsp", 0.5, "row")  # type: ignore[arg-type]


def test_candidate_balance_and_keep_mask():
    assert DENSE.balanced and Candidate("bwsp", 0.5, BWSP).balanced and Candidate("fp", 0.5, FP).balanced
    assert Candidate("x", 0.5, Pattern("column", "position")).balanced
    assert not Candidate("wsp", 0.5, WSP).balanced
    u = torch.randn(8, 4, 4, 4)
    assert DENSE.keep_mask(u) is None
    mask = Candidate("bwsp", 0.5, BWSP).keep_mask(u)
    assert mask is not None and mask.shape == u.shape and mask.dtype == torch.bool
    assert mask.float().mean().item() == 0.5
    assert torch.equal(mask.sum(dim=(0, 1)), torch.full((4, 4), 16))  # 4 of 8 rows kept at every position


# ----------------------------------------------------------------------------------------------- sensitivity
def test_zero_amount_is_zero_and_filter_pruning_increases_strictly():
    model, data, layers = teacher_problem()
    amounts = [0.25, 0.5, 0.75, 1.0]
    cands = [DENSE, Candidate("fp", 0.0, FP)] + [Candidate("fp", a, FP) for a in amounts]
    out = measure_sensitivity(model, layers, {"0": cands}, data, mse, progress=False)
    inc = out["0"]
    assert list(inc) == cands
    assert inc[DENSE] == 0.0 and inc[Candidate("fp", 0.0, FP)] == pytest.approx(0.0, abs=1e-12)
    values = [inc[Candidate("fp", a, FP)] for a in amounts]
    assert values[0] > 0 and all(b > a for a, b in itertools.pairwise(values))
    # pruning every filter zeroes the output: the increase is the mean squared target
    assert values[-1] == pytest.approx(sum(b[1].square().mean().item() for b in data) / len(data), rel=1e-5)
    for cand in cands:
        assert inc[cand] == pytest.approx(direct_loss(model, data, layers["0"], cand), rel=1e-6, abs=1e-12)


def test_row_policies_are_non_negative_and_match_direct_evaluation():
    model, data, layers = teacher_problem()
    cands = [Candidate("wsp", 0.5, WSP), Candidate("bwsp", 0.5, BWSP), Candidate("bwsp", 0.9, BWSP)]
    out = measure_sensitivity(model, layers, {"0": cands}, data, mse, progress=True)
    for cand in cands:
        assert out["0"][cand] > 0
        assert out["0"][cand] == pytest.approx(direct_loss(model, data, layers["0"], cand), rel=1e-6)


def test_prunes_only_the_measured_layer_in_eval_mode_without_grad():
    model, data, layers = teacher_problem(n_layers=2)
    model.train()
    seen = []

    def recording(m: nn.Module, batch: Batch) -> torch.Tensor:
        seen.append(([layers[n].mask is not None for n in ("0", "1")], m.training, torch.is_grad_enabled()))
        return mse(m, batch)

    cand = Candidate("bwsp", 0.5, BWSP)
    out = measure_sensitivity(model, layers, {"0": [cand], "1": [cand]}, data, recording, progress=False)
    assert set(out) == {"0", "1"} and all(v[cand] > 0 for v in out.values())
    masks = [s[0] for s in seen]
    assert masks == [[False, False]] * 2 + [[True, False]] * 2 + [[False, True]] * 2  # baseline once, then each
    assert all(not training and not grad for _, training, grad in seen)
    assert model.training and all(layers[n].mask is None for n in layers)


def test_existing_masks_are_restored_and_dense_removes_them():
    model, data, layers = teacher_problem(n_layers=2)
    prior = torch.rand(layers["0"].weight.shape) > 0.3
    layers["0"].set_mask(prior)
    with torch.no_grad():  # retarget so the masked model is the baseline
        data = [(b[0], model(b[0])) for b in data]
    cands = {"0": [DENSE, Candidate("fp", 0.5, FP)], "1": [DENSE, Candidate("fp", 0.5, FP)]}
    out = measure_sensitivity(model, layers, cands, data, mse, progress=False)
    assert out["0"][DENSE] > 0  # the existing mask was lifted: the output moves away from the target
    assert out["1"][DENSE] == 0.0
    assert torch.equal(layers["0"].mask, prior) and layers["1"].mask is None
    with torch.no_grad():
        assert torch.equal(layers["0"].effective_weight(), layers["0"].weight * prior)


def test_candidate_masks_act_when_a_callback_turned_mask_in_forward_off():
    model, data, layers = teacher_problem()
    layer = layers["0"]
    prior = Candidate("fp", 0.25, FP).keep_mask(layer.weight)
    assert prior is not None
    layer.set_mask(prior)
    layer.zero_pruned_()  # what a gradient-masking callback maintains, then it skips the forward multiply
    layer.mask_in_forward = False
    with torch.no_grad():
        data = [(b[0], model(b[0])) for b in data]
    cands = [DENSE, Candidate("fp", 0.25, FP), Candidate("fp", 0.75, FP)]
    out = measure_sensitivity(model, layers, {"0": cands}, data, mse, progress=False)["0"]
    assert out[DENSE] == 0.0 and out[cands[1]] == pytest.approx(0.0, abs=1e-12)  # zeroed filters rank first
    assert out[cands[2]] > 0
    assert layer.mask_in_forward is False and torch.equal(layer.mask, prior)


def test_masks_and_modes_restored_when_loss_fn_raises():
    model, data, layers = teacher_problem(n_layers=2)
    prior = torch.rand(layers["1"].weight.shape) > 0.5
    layers["1"].set_mask(prior)
    model.train()
    calls = []

    def failing(m: nn.Module, batch: Batch) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 4:  # inside the second candidate evaluation
            raise RuntimeError("boom")
        return mse(m, batch)

    cands = {"0": [Candidate("bwsp", 0.5, BWSP)], "1": [Candidate("fp", 0.75, FP)]}
    with pytest.raises(RuntimeError, match="boom"):
        measure_sensitivity(model, layers, cands, data, failing, progress=False)
    assert len(calls) == 4
    assert layers["0"].mask is None and torch.equal(layers["1"].mask, prior)
    with torch.no_grad():
        assert torch.equal(layers["1"].effective_weight(), layers["1"].weight * prior)
    assert all(mod.training for mod in model.modules())
    assert all(layer.mask_in_forward for layer in layers.values())


def test_errors():
    model, data, layers = teacher_problem()
    cands = {"0": [DENSE]}
    with pytest.raises(KeyError, match=r"unknown layers \['nope'\]; known layers: \['0'\]"):
        measure_sensitivity(model, layers, {"nope": [DENSE]}, data, mse, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        measure_sensitivity(model, layers, cands, [], mse, progress=False)
    with pytest.raises(ValueError, match="layers is empty"):
        measure_sensitivity(model, {}, {}, data, mse, progress=False)
    with pytest.raises(TypeError, match="WinogradConv2d"):
        measure_sensitivity(model, {"0": nn.Conv2d(4, 8, 3)}, cands, data, mse, progress=False)
    with pytest.raises(TypeError, match="Candidate objects"):
        measure_sensitivity(model, layers, {"0": ["dense"]}, data, mse, progress=False)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not a submodule"):
        measure_sensitivity(model, {"0": WinogradConv2d(4, 8)}, cands, data, mse, progress=False)
