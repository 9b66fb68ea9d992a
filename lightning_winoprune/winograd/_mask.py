"""Exact, fast masking: ``where(mask, t, 0)`` as a bitwise AND with the mask's bit pattern.

On the CPU, ``torch.where`` and ``masked_fill`` with a boolean mask run many times slower than a multiply
(``docs/benchmarks.md``, "Mask maintenance overhead"), and a multiply by a float mask is not exact: a NaN or an inf
stored in a pruned entry would survive it (``NaN * 0`` is ``NaN``). Reinterpreting the floats as integers of the
same width and AND-ing them with ``-1`` (keep: every bit set) or ``0`` (prune) costs what a multiply costs and is
exact: kept entries keep their bits (NaN included), pruned entries become ``+0.0``.

While a tracer or compiler records the graph (``torch.jit.trace``, ``torch.compile``, ``torch.export``), the plain
``torch.where`` is used, so captured graphs contain only ordinary ops.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_winoprune.winograd._tiles import capturing

__all__ = ["keep_bits", "masked", "masked_"]

_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def keep_bits(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The integer bit pattern of a boolean keep-mask for floats of ``dtype``: ``-1`` keeps, ``0`` prunes."""
    return mask.to(_INT_OF[torch.empty((), dtype=dtype).element_size()]).neg_()


def _and(t: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    return torch.bitwise_and(t.view(bits.dtype), bits).view(t.dtype)


def masked_(t: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``t`` with the pruned entries set to ``+0.0`` in place (no autograd); ``bits`` from :func:`keep_bits`."""
    t.view(bits.dtype).bitwise_and_(bits)
    return t


class _Masked(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(bits)
        return _and(t, bits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (bits,) = ctx.saved_tensors
        return _and(grad, bits), None


def masked(t: torch.Tensor, mask: torch.Tensor, bits: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.where(mask, t, 0)``, differentiable (the gradient is masked the same way), exact and fast.

    Args:
        t: A floating-point tensor.
        mask: Boolean keep-mask broadcastable to ``t`` (same shape for the fast path).
        bits: ``keep_bits(mask, t.dtype)`` when the caller caches it.

    """
    if capturing() or mask.shape != t.shape or not t.is_floating_point():
        return torch.where(mask, t, 0.0)
    if bits is None or bits.element_size() != t.element_size():
        bits = keep_bits(mask, t.dtype)
    if torch.is_grad_enabled() and t.requires_grad:
        out: torch.Tensor = _Masked.apply(t, bits)
        return out
    return _and(t, bits)
