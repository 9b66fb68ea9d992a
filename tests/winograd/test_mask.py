"""``masked``: the bitwise keep-mask equals ``torch.where(mask, t, 0)`` bit for bit, gradient included."""

from __future__ import annotations

import pytest
import torch

from lightning_winoprune.winograd._mask import keep_bits, masked, masked_


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_masked_equals_where_bit_for_bit_with_nan_and_inf(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(5, 7, 4, 4, generator=gen).to(dtype).permute(2, 3, 0, 1)  # non-contiguous, like U's views
    t[0, 0] = float("nan")
    t[1, 1] = float("inf")
    t[2, 2] = -0.0
    mask = torch.rand(t.shape, generator=gen) > 0.5
    mask[0, 0, 0] = True  # a kept NaN stays NaN
    expected = torch.where(mask, t, 0.0)
    out = masked(t, mask)
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out.view(keep_bits(mask, dtype).dtype), expected.contiguous().view(keep_bits(mask, dtype).dtype))
    assert torch.equal(masked_(t.clone(), keep_bits(mask, dtype)).isnan(), expected.isnan())


def test_masked_gradient_is_masked_and_exactly_zero_where_pruned() -> None:
    t = torch.randn(3, 4, requires_grad=True)
    mask = torch.tensor([[True, False, True, False]] * 3)
    out = masked(t, mask)
    (g,) = torch.autograd.grad(out, t, torch.full_like(out, float("nan")))
    assert torch.count_nonzero(g[~mask]) == 0 and torch.isnan(g[mask]).all()


def test_masked_falls_back_to_where_for_broadcast_masks() -> None:
    t = torch.randn(3, 4)
    mask = torch.tensor([True, False, True, False])
    assert torch.equal(masked(t, mask), torch.where(mask, t, 0.0))
