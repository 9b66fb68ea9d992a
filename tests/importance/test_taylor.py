"""``taylor_importance`` against a hand-written |w * dL/dw| sum; state restoration; errors; ``layer_scores``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_winoprune import WinogradConv2d, winogradize
from lightning_winoprune.importance import layer_scores, taylor_importance
from lightning_winoprune.winograd import iter_winograd_layers


def tiny_model() -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 4),
    )
    winogradize(model, skip_first=False)
    return model


def batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(5, 3, 6, 6), torch.randint(0, 4, (5,))) for _ in range(n)]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def winograd_layers(model: nn.Module) -> dict[str, WinogradConv2d]:
    layers = dict(iter_winograd_layers(model))
    assert list(layers) == ["0", "3"]
    return layers


def manual_saliency(model: nn.Module, data: list, names: list[str]) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).eval()
    layers = dict(model.named_modules())
    total = {n: torch.zeros_like(layers[n].weight) for n in names}
    for batch in data:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        for n in names:
            w = layers[n].weight
            total[n] += (w.detach() * w.grad).abs()
    return total


def test_equals_manual_abs_w_times_grad_summed_over_batches():
    model, data = tiny_model(), batches(2)
    layers = winograd_layers(model)
    sal = taylor_importance(model, layers, data, loss_fn, progress=False)
    expected = manual_saliency(model, data, list(layers))
    assert list(sal) == ["0", "3"]
    for name, s in sal.items():
        assert s.shape == layers[name].weight.shape and s.dtype == torch.float32 and not s.requires_grad
        torch.testing.assert_close(s, expected[name], rtol=1e-5, atol=1e-8)
        assert s.sum() > 0
    # summing |w*g| per batch differs from |w * (summed g)|: the batches are scored one by one
    one = taylor_importance(model, layers, data[:1], loss_fn, progress=False)
    two = taylor_importance(model, layers, data[1:], loss_fn, progress=False)
    for name in sal:
        torch.testing.assert_close(sal[name], one[name] + two[name])


def test_restores_grads_modes_and_requires_grad_and_leaves_running_stats():
    model, data = tiny_model(), batches(2)
    layers = winograd_layers(model)
    model.train()
    model[5].eval()  # mixed modes must come back exactly
    params = list(model.parameters())
    marker = torch.full_like(params[0], 3.0)
    params[0].grad = marker
    layers["3"].weight.requires_grad_(False)  # frozen layers are scored as well
    bn_mean = model[1].running_mean.clone()
    seen_modes = []

    def recording_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        seen_modes.append((m.training, m[5].training, torch.is_grad_enabled()))
        return loss_fn(m, batch)

    with torch.no_grad():  # gradients are switched on inside
        sal = taylor_importance(model, layers, data, recording_loss, progress=False)
    assert seen_modes == [(False, False, True)] * 2
    assert sal["3"].sum() > 0
    assert params[0].grad is marker and torch.equal(marker, torch.full_like(marker, 3.0))
    assert all(p.grad is None for p in params[1:])
    assert layers["3"].weight.requires_grad is False and layers["0"].weight.requires_grad is True
    assert model.training and not model[5].training and model[1].training
    torch.testing.assert_close(model[1].running_mean, bn_mean, rtol=0, atol=0)


def test_grads_restored_even_if_loss_fn_accumulates_into_them():
    model, data = tiny_model(), batches(2)
    layers = winograd_layers(model)
    linear = model[7]
    marker = torch.ones_like(linear.weight)
    linear.weight.grad = marker

    def backward_happy(m: nn.Module, batch: tuple) -> torch.Tensor:
        loss = loss_fn(m, batch)
        m[7].weight.square().sum().backward()  # a loss_fn with side effects on .grad
        return loss

    taylor_importance(model, layers, data, backward_happy, progress=False)
    assert linear.weight.grad is marker and torch.equal(marker, torch.ones_like(marker))
    assert all(p.grad is None for p in model.parameters() if p is not linear.weight)


def test_state_restored_when_loss_fn_raises():
    model, data = tiny_model(), batches(3)
    layers = winograd_layers(model)
    model.train()
    calls = []

    def failing_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return loss_fn(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        taylor_importance(model, layers, data, failing_loss, progress=False)
    assert model.training and all(mod.training for mod in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_called_under_inference_mode():
    model, data = tiny_model(), batches(2)  # the batches themselves are ordinary tensors
    layers = winograd_layers(model)
    expected = taylor_importance(model, layers, data, loss_fn, progress=False)
    with torch.inference_mode():
        sal = taylor_importance(model, layers, data, loss_fn, progress=False)
    for name in sal:
        assert not sal[name].is_inference()
        torch.testing.assert_close(sal[name], expected[name])


def test_masked_entries_score_zero():
    model, data = tiny_model(), batches(1)
    layers = winograd_layers(model)
    mask = torch.rand(layers["3"].weight.shape) > 0.5
    layers["3"].set_mask(mask)
    sal = taylor_importance(model, layers, data, loss_fn, progress=False)
    assert torch.all(sal["3"][~mask] == 0) and sal["3"][mask].sum() > 0


def test_progress_bar_and_generator_batches(capsys):
    model = tiny_model()
    layers = winograd_layers(model)
    data = batches(2)
    sal = taylor_importance(model, layers, iter(data), loss_fn, progress=True, description="calib")
    expected = taylor_importance(model, layers, data, loss_fn, progress=False)
    for name in sal:
        torch.testing.assert_close(sal[name], expected[name])
    assert "calib" not in capsys.readouterr().out  # transient: nothing left behind


def test_layer_outside_model_and_errors():
    model, data = tiny_model(), batches(1)
    layers = winograd_layers(model)
    with pytest.raises(ValueError, match="layers is empty"):
        taylor_importance(model, {}, data, loss_fn, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        taylor_importance(model, layers, [], loss_fn, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        taylor_importance(model, layers, iter([]), loss_fn, progress=False)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        taylor_importance(model, {"x": nn.Conv2d(3, 3, 3)}, data, loss_fn, progress=False)
    with pytest.raises(TypeError, match="no tensor attribute 'weight'"):
        taylor_importance(model, {"relu": model[2]}, data, loss_fn, progress=False)
    with pytest.raises(ValueError, match="scalar"):
        taylor_importance(model, layers, data, lambda m, b: m(b[0]), progress=False)

    def detached(m: nn.Module, b: tuple) -> torch.Tensor:
        with torch.no_grad():
            return loss_fn(m, b)

    with pytest.raises(ValueError, match="does not require grad"):
        taylor_importance(model, layers, data, detached, progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_unused_layer_scores_zero():
    model, data = tiny_model(), batches(1)
    layers = winograd_layers(model)

    def first_layer_only(m: nn.Module, b: tuple) -> torch.Tensor:
        return m[0](b[0]).square().mean()

    sal = taylor_importance(model, layers, data, first_layer_only, progress=False)
    assert sal["0"].sum() > 0 and torch.all(sal["3"] == 0)


def test_layer_scores_is_mean_per_element():
    sal = {"a": torch.tensor([[1.0, 3.0]]), "b": torch.arange(9.0).view(3, 3), "e": torch.zeros(0)}
    assert layer_scores(sal) == {"a": 2.0, "b": 4.0, "e": 0.0}
    assert layer_scores({}) == {}
