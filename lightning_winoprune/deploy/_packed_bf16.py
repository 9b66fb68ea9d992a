"""The bfloat16 deployment: the Winograd layer of the bfloat16 kernels, and the boundary of a bfloat16 model.

:class:`PackedWinogradConvBf16` is a pruned Winograd layer packed for the bfloat16 kernels; :class:`Bf16Model`
converts a ``precision="bf16"`` model's input and outputs.

The kept rows of every Winograd position are cut into panels of 16 rows and the input channels into chunks of 32,
the shape of an AMX tile (``TDPBF16PS``) and of 16 ``VDPBF16PS`` rows; a pruned row and a chunk that a whole panel
pruned are never loaded. The weights are rounded to bfloat16 once, at packing; the input and output transforms run
in float32, the products in bfloat16 with float32 sums. The layer takes float32 NCHW (and returns it) or bfloat16
channels-last (and returns that: what a ``precision="bf16"`` model passes between layers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from lightning_winoprune.deploy._ops import Activation
from lightning_winoprune.deploy._packed import (
    _act_code,
    _check_input,
    _check_threads,
    _check_weight,
    _output_size,
    _pair,
)
from lightning_winoprune.kernels._backend import extension_status, native_available, native_bf16_path, native_module
from lightning_winoprune.winograd._layer import WinogradConv2d

__all__ = ["Bf16Model", "PackedWinogradConvBf16", "bf16_refusal"]


def bf16_refusal() -> str | None:
    """Why this machine cannot run the bfloat16 Winograd kernels (one line), or ``None`` when it can."""
    if not native_available():
        return f"precision='bf16' needs the native extension: {extension_status()}"
    if native_bf16_path() is None:
        return ("precision='bf16' needs a CPU with AVX512-BF16 (AMD Zen 4 and newer, Intel Xeon since Cooper Lake) or "
                f"AMX-BF16 (Intel Xeon since Sapphire Rapids); this one has neither (native ISA "
                f"{native_module().isa()}, or $WINOPRUNE_BF16=none); deploy with precision='fp32'")
    return None


class PackedWinogradConvBf16(nn.Module):
    """A 3x3 stride-1 conv in the Winograd domain with a bfloat16 multiply, run by ``winoprune::winograd_conv_bf16``.

    Args:
        weight: Winograd-domain weights ``U``, ``(K, C, p, p)`` or its BGEMM view ``(p*p, K, C)``.
        mask: Bool keep-mask of the same shape, or ``None`` for dense.
        m: Output tile size: 2 for F(2,3), 4 for F(4,3).
        padding: Zero padding ``(pad_h, pad_w)``.
        bias: ``(K,)`` or ``None`` (kept in float32).
        threads: CPU threads of the kernel (``-1``: OpenMP's setting of the calling thread, at call time).
        act: Activation fused after the bias.

    Raises:
        ValueError: On a bad shape, ``m``, padding, ``act`` or ``threads``, or on a CPU without bfloat16 kernels.
        TypeError: If ``weight`` or ``mask`` is not a tensor of the right dtype.

    """

    plan_meta: torch.Tensor
    plan_chunks: torch.Tensor
    plan_A: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor | None = None, m: int = 2,
                 padding: int | tuple[int, int] = 1, bias: torch.Tensor | None = None, threads: int = -1,
                 act: Activation | str = Activation.NONE) -> None:
        super().__init__()
        refusal = bf16_refusal()
        if refusal is not None:
            raise ValueError(refusal)
        _check_weight(weight)
        if isinstance(m, bool) or m not in (2, 4):
            raise ValueError(f"m={m!r} is not valid; valid values are [2, 4]")
        p = m + 2
        view, keep = _bgemm_view(weight, mask, p)
        if bias is not None and tuple(bias.shape) != (view.shape[1],):
            raise ValueError(f"bias must have shape ({view.shape[1]},), got {tuple(bias.shape)}")
        self.m, self.p = m, p
        self.padding = _pair(padding, "padding")
        self.threads = _check_threads(threads)
        self.act_code = _act_code(act)
        self.out_channels, self.in_channels = int(view.shape[1]), int(view.shape[2])
        masked = torch.where(keep, view, torch.zeros((), dtype=view.dtype)).float().contiguous()
        meta, chunks, a = native_module().pack_winograd_bf16(masked.numpy(), keep.contiguous().numpy(), m)
        self.register_buffer("plan_meta", torch.from_numpy(meta))
        self.register_buffer("plan_chunks", torch.from_numpy(chunks))
        self.register_buffer("plan_A", torch.from_numpy(a.view("int16")))  # bfloat16 bits (numpy has no bfloat16)
        self.register_buffer("bias", None if bias is None else bias.detach().float().cpu().contiguous())

    @property
    def act(self) -> Activation:
        """The fused activation."""
        return Activation.from_code(self.act_code)

    def _plan_info(self) -> Any:
        return native_module().winograd_bf16_plan_info(self.plan_meta.numpy())

    @property
    def kept_fraction(self) -> float:
        """Fraction of the Winograd-domain weights kept by the mask."""
        return int(self._plan_info().kept) / (self.p * self.p * self.out_channels * self.in_channels)

    @property
    def work_fraction(self) -> float:
        """Multiply-adds the kernel runs (whole 16 x 32 tiles), relative to the dense Winograd GEMMs."""
        return int(self._plan_info().work) / (self.p * self.p * self.out_channels * self.in_channels)

    def extra_repr(self) -> str:
        """A one-line summary."""
        return (f"K={self.out_channels}, C={self.in_channels}, m={self.m}, padding={self.padding}, "
                f"kept={self.kept_fraction:.3f}, work={self.work_fraction:.3f}, act={self.act.value}, "
                f"path={native_bf16_path()}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(Ho, Wo)`` for an ``height x width`` input."""
        return _output_size(height, width, (3, 3), (1, 1), self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` ``(N, C, H, W)`` (CPU float32, or bfloat16 read channels-last), then the fused activation."""
        _check_input(x, self.in_channels)
        return torch.ops.winoprune.winograd_conv_bf16(x, self.plan_meta, self.plan_chunks, self.plan_A, self.bias,
                                                      self.out_channels, self.padding[0], self.padding[1],
                                                      self.act_code, self.threads)

    @classmethod
    def from_layer(cls, layer: nn.Module, threads: int = -1, dense: bool = False,
                   act: Activation | str = Activation.NONE) -> PackedWinogradConvBf16:
        """Pack a :class:`~lightning_winoprune.winograd.WinogradConv2d` (its mask unless ``dense``)."""
        if not isinstance(layer, WinogradConv2d):
            raise TypeError(f"layer must be a WinogradConv2d, got {type(layer).__name__}")
        mask = None if dense or layer.mask is None else layer.mask.cpu()
        bias = None if layer.bias is None else layer.bias.detach().float().cpu()
        return cls(layer.weight.detach().float().cpu(), mask, layer.m, layer.padding, bias, threads, act)


def _bgemm_view(weight: torch.Tensor, mask: torch.Tensor | None, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p*p, K, C)`` views of ``weight`` and of its keep-mask (all kept when ``mask`` is ``None``)."""
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask must have weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    w = weight.detach().cpu()
    mk = None if mask is None else mask.detach().cpu()
    if w.dim() == 4 and tuple(w.shape[2:]) == (p, p):
        w = w.permute(2, 3, 0, 1).reshape(p * p, w.shape[0], w.shape[1])
        mk = None if mk is None else mk.permute(2, 3, 0, 1).reshape(w.shape)
    elif not (w.dim() == 3 and w.shape[0] == p * p):
        raise ValueError(f"weight must be (K, C, {p}, {p}) or ({p * p}, K, C), got shape {tuple(weight.shape)}")
    return w, torch.ones(w.shape, dtype=torch.bool) if mk is None else mk


class Bf16Model(nn.Module):
    """A deployed ``precision="bf16"`` model: the input goes in as bfloat16 channels-last, the outputs come out float32.

    Between the two, every layer takes and returns bfloat16 channels-last activations (no conversion between layers).

    Args:
        inner: The deployed layers, their weights in bfloat16 (the Winograd layers' biases stay float32).

    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> Any:
        """``inner`` on ``x`` in bfloat16 channels-last; floating-point outputs back in float32."""
        out = self.inner(x.to(torch.bfloat16, memory_format=torch.channels_last))
        return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)
