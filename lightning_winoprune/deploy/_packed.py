"""Inference layers for pruned convs: packed once into tensors, run by the ``winoprune::`` custom ops.

* :class:`PackedWinogradConv`: a (pruned) Winograd layer's ``U`` and mask packed for the native F(2,3) / F(4,3)
  kernels. ``form="structured"`` runs only kept panels (kept rows for WSP-R/BWSP/ABWSP, kept input channels for
  WSP-C); ``form="csr"`` is the WWP baseline (element-sparse CSR). The torch path (any device, or no extension) runs
  the same compacted GEMMs with ``torch.bmm``: one equal-shape batch for balanced layers, per-position GEMMs otherwise.
* :class:`PackedDepthwiseConv`: a DEPrune-masked depthwise conv as kept taps per channel, run by a direct
  per-channel kernel (on CPUs faster than a dense DR GEMM).
* :class:`DenseConv`: an unpruned conv on the fastest dense route: oneDNN with a fused activation, ``F.conv2d``, or a
  ``Linear`` when the kernel covers the whole input.

All of them are ``nn.Module`` s whose state lives in buffers (the packed plan as int64 / int32 / float32 / uint8
tensors), so they deep-copy, pickle, save and load through ``state_dict``, trace, compile and export. Every call
allocates its own output and the kernels keep their scratch memory per calling thread, so one layer can be called
from several threads at once. An activation (``act``) is fused into the output stage.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_winoprune._enum import ParsableEnum
from lightning_winoprune._utils import MASK_ATTR, conv_output_size
from lightning_winoprune.deploy._ops import Activation, activate_fresh, onednn_available, onednn_bf16_available
from lightning_winoprune.kernels._backend import Backend, native_module, resolve_backend
from lightning_winoprune.pruning._depthwise import DEFAULT_DR_TILE, dr_column_masks
from lightning_winoprune.winograd._layer import WinogradConv2d
from lightning_winoprune.winograd._tiles import input_transform, output_transform, tile_geometry

__all__ = ["DenseConv", "DenseRoute", "NativeMaxPool2d", "PackedDepthwiseConv", "PackedWinogradConv", "SparseForm"]


class SparseForm(ParsableEnum):
    """How a Winograd layer's mask is packed: compacted panels, or element-wise CSR (the WWP baseline)."""

    STRUCTURED = "structured"
    CSR = "csr"


class DenseRoute(ParsableEnum):
    """How :class:`DenseConv` runs an unpruned conv.

    * ``eager``: ``F.conv2d`` and the activation as separate torch ops (oneDNN without prepacking).
    * ``onednn``: oneDNN's conv with the activation fused as a post-op (``winoprune::conv2d_act``).
    * ``linear``: a conv whose kernel covers its whole (unpadded) input is one matrix product (``F.linear``); other
      input sizes run ``F.conv2d``.
    * ``gemm``: a 1x1 stride-1 conv as one matrix product per image (``W @ x`` on the ``(C, H*W)`` view): no layout
      reorders, often 1.5-2x faster than ``F.conv2d`` at small batches (14x for 16 -> 96 channels at 112x112).
    * ``onednn-bf16``: oneDNN's bfloat16 conv (AMX or AVX512-BF16) on a bfloat16 copy of the weight
      (``winoprune::conv2d_act_bf16``): bfloat16 channels-last in and out, as between the layers of a
      ``deploy(precision="bf16")`` model; a float32 input is rounded to bfloat16 and its output returned in float32.
    """

    EAGER = "eager"
    ONEDNN = "onednn"
    LINEAR = "linear"
    GEMM = "gemm"
    ONEDNN_BF16 = "onednn-bf16"


def _check_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or (threads < 1 and threads != -1):
        raise ValueError(f"threads must be a positive int or -1 (all), got {threads!r}")
    return threads


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in pair):
        raise ValueError(f"{name} must be a non-negative int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _act_code(act: Activation | str) -> int:
    return Activation.parse(act, "act").code


def _output_size(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int]) -> tuple[int, int]:
    ho = conv_output_size(height, kernel[0], stride[0], padding[0])
    wo = conv_output_size(width, kernel[1], stride[1], padding[1])
    if height + 2 * padding[0] < kernel[0] or width + 2 * padding[1] < kernel[1]:
        raise ValueError(f"input {height}x{width} with padding {padding} is smaller than the "
                         f"{kernel[0]}x{kernel[1]} kernel")
    return ho, wo


def _torch_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], groups: int) -> torch.Tensor:
    """``F.conv2d`` with the weights moved to ``x``'s device and dtype; CPU float16/bfloat16 accumulate in float32.

    float32 on the CPU because torch 2.14's bfloat16 grouped conv on a channels-last input gives wrong outputs for
    some small shapes (found by the fuzz tests); a float32 conv rounded once to the input's dtype is also closer.
    """
    dtype = torch.float32 if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    w = weight.to(device=x.device, dtype=dtype)
    b = None if bias is None else bias.to(device=x.device, dtype=dtype)
    return F.conv2d(x.to(dtype), w, b, stride, padding, 1, groups).to(x.dtype)


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {type(weight).__name__}")


def _check_input(x: torch.Tensor, channels: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"x must be (N, {channels}, H, W), got shape {tuple(x.shape)}")


class _Packed(nn.Module):
    """What both packed convs share: the native/torch switch, the fused activation and the summary."""

    backend: Backend
    act_code: int
    in_channels: int
    out_channels: int
    bias: torch.Tensor | None

    @property
    def act(self) -> Activation:
        """The fused activation."""
        return Activation.from_code(self.act_code)

    @property
    def native(self) -> bool:
        """Whether the native kernel runs this layer (else the torch path)."""
        return self.backend is Backend.NATIVE

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class PackedWinogradConv(_Packed):
    """A 3x3 stride-1 conv in the Winograd domain, with its mask packed for fast inference.

    Args:
        weight: Winograd-domain weights ``U``, ``(K, C, p, p)`` (a :class:`~lightning_winoprune.winograd.WinogradConv2d`
            ``weight``) or its BGEMM view ``(p*p, K, C)``.
        mask: Bool keep-mask of the same shape, or ``None`` for dense.
        m: Output tile size: 2 for F(2,3), 4 for F(4,3).
        padding: Zero padding ``(pad_h, pad_w)`` (symmetric, like the layer's).
        bias: ``(K,)`` or ``None``.
        form: ``"structured"`` or ``"csr"``, see :class:`SparseForm`.
        backend: ``"auto"`` (native on CPU float32 when the extension is loaded), ``"native"`` or ``"torch"``.
        threads: CPU threads of the native kernel (``-1``: OpenMP's setting of the calling thread, at call time).
        act: Activation fused after the bias (``"none"``, ``"relu"``, ``"relu6"``, ``"silu"``, ``"hardswish"``).

    Raises:
        ValueError: On a bad shape, ``m``, padding, ``form``, ``act`` or ``threads``; or ``backend="native"`` where it
            does not apply.
        TypeError: If ``weight`` or ``mask`` is not a tensor of the right dtype.

    """

    plan_meta: torch.Tensor
    plan_cols: torch.Tensor
    plan_vals: torch.Tensor
    plan_acc: torch.Tensor
    weight_view: torch.Tensor
    mask_view: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        mask: torch.Tensor | None = None,
        m: int = 2,
        padding: int | tuple[int, int] = 1,
        bias: torch.Tensor | None = None,
        form: SparseForm | str = SparseForm.STRUCTURED,
        backend: Backend | str = Backend.AUTO,
        threads: int = -1,
        act: Activation | str = Activation.NONE,
    ) -> None:
        super().__init__()
        _check_weight(weight)
        if isinstance(m, bool) or m not in (2, 4):
            raise ValueError(f"m={m!r} is not valid; valid values are [2, 4]")
        p = m + 2
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
            if tuple(mask.shape) != tuple(weight.shape):
                raise ValueError(f"mask must have weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
        if weight.dim() == 4:
            if tuple(weight.shape[2:]) != (p, p):
                raise ValueError(f"weight must be (K, C, {p}, {p}) for m={m}, got {tuple(weight.shape)}")
            view = weight.detach().permute(2, 3, 0, 1).reshape(p * p, weight.shape[0], weight.shape[1])
            mask_view = None if mask is None else mask.detach().permute(2, 3, 0, 1).reshape(view.shape)
        elif weight.dim() == 3:
            if weight.shape[0] != p * p:
                raise ValueError(f"weight must be ({p * p}, K, C) for m={m}, got {tuple(weight.shape)}")
            view, mask_view = weight.detach(), None if mask is None else mask.detach()
        else:
            raise ValueError(f"weight must be (K, C, p, p) or (p*p, K, C), got shape {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (view.shape[1],):
            raise ValueError(f"bias must have shape ({view.shape[1]},), got {tuple(bias.shape)}")
        self.m, self.p = m, p
        self.padding = _pair(padding, "padding")
        self.form = SparseForm.parse(form)
        self.threads = _check_threads(threads)
        self.act_code = _act_code(act)
        self.out_channels, self.in_channels = int(view.shape[1]), int(view.shape[2])
        keep = torch.ones(view.shape, dtype=torch.bool, device=view.device) if mask_view is None else mask_view
        # pruned weights are absent: a NaN stored under the mask never reaches the output
        masked = torch.where(keep, view, torch.zeros((), dtype=view.dtype, device=view.device)).contiguous()
        self.backend = resolve_backend(backend, masked, *(() if bias is None else (bias,)))
        bias_t = None if bias is None else bias.detach().float().contiguous()
        if self.backend is Backend.NATIVE:
            meta, cols, vals, acc = native_module().pack_winograd(
                masked.float().cpu().numpy(), keep.cpu().contiguous().numpy(), m,
                None if bias_t is None else bias_t.cpu().numpy(), self.form is SparseForm.CSR)
            self.register_buffer("plan_meta", torch.from_numpy(meta))
            self.register_buffer("plan_cols", torch.from_numpy(cols))
            self.register_buffer("plan_vals", torch.from_numpy(vals))
            self.register_buffer("plan_acc", torch.from_numpy(acc))
        else:
            self.register_buffer("weight_view", masked)
            self.register_buffer("mask_view", keep.contiguous())
        self.register_buffer("bias", bias_t)
        self._torch_plan: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ properties
    @property
    def kept_fraction(self) -> float:
        """Fraction of the Winograd-domain weights kept by the mask."""
        total = self.p * self.p * self.out_channels * self.in_channels
        if self.native:
            return int(self._plan_info().kept) / total
        return float(self.mask_view.float().mean())

    @property
    def work_fraction(self) -> float:
        """Multiply-adds the kernel runs, relative to the dense Winograd GEMMs (panel padding included)."""
        if self.native:
            return int(self._plan_info().work) / (self.p * self.p * self.out_channels * self.in_channels)
        return self.kept_fraction

    @property
    def balanced(self) -> bool:
        """Whether every Winograd position keeps the same GEMM shape (one equal-shape batched GEMM)."""
        if self.native:
            return bool(self._plan_info().balanced)
        rows = self.mask_view.any(dim=2).sum(dim=1)
        cols = self.mask_view.any(dim=1).sum(dim=1)
        return bool((rows == rows[0]).all() and (cols == cols[0]).all())

    @property
    def isa(self) -> str | None:
        """Instruction set the plan was packed for, or ``None`` on the torch path."""
        return str(self._plan_info().isa) if self.native else None

    def _plan_info(self) -> Any:
        """The named fields of the packed plan (``WinogradPlanInfo`` of the extension)."""
        return native_module().winograd_plan_info(self.plan_meta.numpy())

    def extra_repr(self) -> str:
        """A one-line summary."""
        return (f"K={self.out_channels}, C={self.in_channels}, m={self.m}, padding={self.padding}, "
                f"form={self.form.value}, kept={self.kept_fraction:.3f}, act={self.act.value}, "
                f"backend={self.backend.value}")

    # ------------------------------------------------------------------------------------------ forward
    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(Ho, Wo)`` for an ``height x width`` input."""
        return _output_size(height, width, (3, 3), (1, 1), self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` ``(N, C, H, W)`` (native: CPU float32), then the fused activation."""
        _check_input(x, self.in_channels)
        if self.native:
            return torch.ops.winoprune.winograd_conv(x, self.plan_meta, self.plan_cols, self.plan_vals, self.plan_acc,
                                                     self.bias,
                                                     self.out_channels, self.padding[0], self.padding[1],
                                                     self.act_code, self.threads)
        return activate_fresh(self._torch_forward(x), self.act_code)

    def _compacted(self) -> dict[str, Any]:
        """Index form of the mask for the torch path: kept rows (or columns) per position when they are whole."""
        if self._torch_plan is not None:
            return self._torch_plan
        mv, u = self.mask_view, self.weight_view
        rows, cols = mv.any(dim=2), mv.any(dim=1)  # (P2, K), (P2, C)
        whole_rows = bool((mv == rows.unsqueeze(2)).all())
        whole_cols = bool((mv == cols.unsqueeze(1)).all())
        plan: dict[str, Any] = {"kind": "dense"}
        n_rows, n_cols = rows.sum(dim=1), cols.sum(dim=1)
        if self.form is SparseForm.CSR:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                plan = {"kind": "csr", "mats": [u[xi].to_sparse_csr() for xi in range(u.shape[0])]}
        elif whole_rows and bool((n_rows == n_rows[0]).all()) and int(n_rows[0]) < self.out_channels:
            idx = torch.stack([r.nonzero().squeeze(1) for r in rows])  # (P2, R)
            plan = {"kind": "rows", "idx": idx, "u": torch.gather(u, 1, idx.unsqueeze(2).expand(-1, -1, u.shape[2]))}
        elif whole_cols and bool((n_cols == n_cols[0]).all()) and int(n_cols[0]) < self.in_channels:
            idx = torch.stack([c.nonzero().squeeze(1) for c in cols])  # (P2, Ck)
            u_cols = torch.gather(u, 2, idx.unsqueeze(1).expand(-1, u.shape[1], -1))
            plan = {"kind": "cols", "idx": idx, "u": u_cols}
        elif whole_rows and int(n_rows.sum()) < rows.numel():
            plan = {"kind": "rows_each", "idx": [r.nonzero().squeeze(1) for r in rows]}
        self._torch_plan = plan
        return plan

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.weight_view.to(device=x.device, dtype=x.dtype)
        n, _, h, w = x.shape
        geom = tile_geometry(h, w, self.padding, self.m)
        v = input_transform(x, self.m, geom, Backend.TORCH)  # (P2, C, T)
        plan = self._compacted()
        kind = plan["kind"]
        if kind == "rows":  # balanced WSP-R / BWSP: one equal-shape batched GEMM on the kept rows
            idx = plan["idx"].to(x.device)
            mm = torch.zeros(u.shape[0], u.shape[1], v.shape[2], dtype=x.dtype, device=x.device)
            mm.scatter_(1, idx.unsqueeze(2).expand(-1, -1, v.shape[2]),
                        torch.bmm(plan["u"].to(device=x.device, dtype=x.dtype), v))
        elif kind == "cols":  # balanced WSP-C: gather the kept input channels of every position
            idx = plan["idx"].to(x.device)
            vc = torch.gather(v, 1, idx.unsqueeze(2).expand(-1, -1, v.shape[2]))
            mm = torch.bmm(plan["u"].to(device=x.device, dtype=x.dtype), vc)
        elif kind == "rows_each":  # unbalanced rows: one GEMM per position
            mm = torch.zeros(u.shape[0], u.shape[1], v.shape[2], dtype=x.dtype, device=x.device)
            for xi, idx in enumerate(plan["idx"]):
                idx = idx.to(x.device)
                mm[xi, idx] = u[xi, idx] @ v[xi]
        elif kind == "csr":
            mm = torch.stack([mat.to(device=x.device, dtype=x.dtype) @ v[xi] for xi, mat in enumerate(plan["mats"])])
        else:
            mm = torch.bmm(u, v)
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return output_transform(mm, self.m, geom, n, bias, Backend.TORCH)

    @classmethod
    def from_layer(
        cls, layer: nn.Module, form: SparseForm | str = SparseForm.STRUCTURED, backend: Backend | str = Backend.AUTO,
        threads: int = -1, dense: bool = False, act: Activation | str = Activation.NONE,
    ) -> PackedWinogradConv:
        """Pack a :class:`~lightning_winoprune.winograd.WinogradConv2d` (its mask unless ``dense``)."""
        if not isinstance(layer, WinogradConv2d):
            raise TypeError(f"layer must be a WinogradConv2d, got {type(layer).__name__}")
        mask = None if dense else layer.mask
        return cls(layer.weight.detach().float().cpu(), None if mask is None else mask.cpu(), layer.m,
                   layer.padding, None if layer.bias is None else layer.bias.detach().float().cpu(), form, backend,
                   threads, act)


class PackedDepthwiseConv(_Packed):
    """A depthwise conv with a DEPrune keep-mask, packed as the kept taps of each channel.

    Args:
        weight: ``(C, 1, kh, kw)`` depthwise weights.
        mask: Bool keep-mask of the same shape (a DEPrune ``weight_mask``), or ``None`` for dense.
        stride: ``(sh, sw)``.
        padding: ``(pad_h, pad_w)``, symmetric.
        bias: ``(C,)`` or ``None``.
        backend: ``"auto"``, ``"native"`` or ``"torch"``.
        threads: CPU threads of the native kernel (``-1``: OpenMP's setting of the calling thread).
        act: Activation fused after the bias.

    Raises:
        ValueError: On bad shapes, stride, padding, act or threads.
        TypeError: On a non-tensor weight or a non-bool mask.

    """

    plan_meta: torch.Tensor
    plan_taps: torch.Tensor
    plan_weights: torch.Tensor
    weight: torch.Tensor
    mask: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        mask: torch.Tensor | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
        bias: torch.Tensor | None = None,
        backend: Backend | str = Backend.AUTO,
        threads: int = -1,
        act: Activation | str = Activation.NONE,
    ) -> None:
        super().__init__()
        _check_weight(weight)
        if weight.dim() != 4 or weight.shape[1] != 1:
            raise ValueError(f"weight must be a depthwise (C, 1, kh, kw) tensor, got shape {tuple(weight.shape)}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
            if mask.shape != weight.shape:
                raise ValueError(f"mask must have weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
        self.stride = _pair(stride, "stride")
        if min(self.stride) < 1:
            raise ValueError(f"stride must be >= 1, got {stride!r}")
        self.padding = _pair(padding, "padding")
        self.threads = _check_threads(threads)
        self.act_code = _act_code(act)
        self.channels = self.in_channels = self.out_channels = int(weight.shape[0])
        self.kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
        if bias is not None and tuple(bias.shape) != (self.channels,):
            raise ValueError(f"bias must have shape ({self.channels},), got {tuple(bias.shape)}")
        keep = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.detach()
        masked = torch.where(keep, weight.detach(), torch.zeros((), dtype=weight.dtype, device=weight.device))
        self.backend = resolve_backend(backend, masked, *(() if bias is None else (bias,)))
        bias_t = None if bias is None else bias.detach().float().contiguous()
        if self.backend is Backend.NATIVE:
            meta, taps, weights = native_module().pack_depthwise(
                masked.float()[:, 0].contiguous().numpy(), keep[:, 0].contiguous().numpy(), self.stride[0],
                self.stride[1], None if bias_t is None else bias_t.numpy())
            self.register_buffer("plan_meta", torch.from_numpy(meta))
            self.register_buffer("plan_taps", torch.from_numpy(taps))
            self.register_buffer("plan_weights", torch.from_numpy(weights))
        else:
            self.register_buffer("weight", masked.contiguous())
        self.register_buffer("mask", keep.contiguous())
        self.register_buffer("bias", bias_t)

    @property
    def kept_fraction(self) -> float:
        """Fraction of taps kept."""
        return float(self.mask.float().mean())

    def dr_metadata(self, tile: int | None = None) -> list[dict[str, Any]]:
        """The DR (diagonal-wise refactorization) tile structure of the mask: the metadata a GPU DR-GEMM needs.

        On a CPU the direct kept-taps kernel is faster than a dense DR GEMM, so the CPU path does not use this; a GPU
        kernel runs one sub-GEMM per tile of ``tile`` channels over its kept columns (HSR keeps their count a multiple
        of the tile).

        Returns:
            One dict per sub-GEMM: ``channels`` (first, count), ``kept_columns`` (indices into its
            ``channels * kh * kw`` columns) and ``aligned`` (whether the kept count is a multiple of ``tile``).

        """
        tile = DEFAULT_DR_TILE if tile is None else tile
        out = []
        for g, keep in enumerate(dr_column_masks(self.mask.cpu(), tile)):
            cols = keep.nonzero().squeeze(1)
            first = g * tile
            out.append({"channels": (first, min(tile, self.channels - first)), "kept_columns": cols.tolist(),
                        "aligned": int(cols.numel()) % tile == 0})
        return out

    def extra_repr(self) -> str:
        """A one-line summary."""
        return (f"C={self.channels}, kernel={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"kept={self.kept_fraction:.3f}, act={self.act.value}, backend={self.backend.value}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(Ho, Wo)`` for an ``height x width`` input."""
        return _output_size(height, width, self.kernel_size, self.stride, self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` ``(N, C, H, W)`` (native: CPU float32), then the fused activation."""
        _check_input(x, self.channels)
        if self.native:
            return torch.ops.winoprune.depthwise_conv(x, self.plan_meta, self.plan_taps, self.plan_weights, self.bias,
                                                      self.kernel_size[0], self.kernel_size[1], self.stride[0],
                                                      self.stride[1], self.padding[0], self.padding[1], self.act_code,
                                                      self.threads)
        y = _torch_conv(x, self.weight, self.bias, self.stride, self.padding, self.channels)
        return activate_fresh(y, self.act_code)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None, backend: Backend | str = Backend.AUTO,
                  threads: int = -1, act: Activation | str = Activation.NONE) -> PackedDepthwiseConv:
        """Pack a depthwise ``nn.Conv2d`` with ``mask``, or else its ``weight_mask`` buffer when it has one.

        Raises:
            ValueError: If ``conv`` is not a zero-padded, dilation-1 depthwise conv.

        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if not (conv.groups == conv.in_channels == conv.out_channels) or conv.weight.shape[1] != 1:
            raise ValueError(f"conv must be depthwise (groups == in == out channels), got {conv}")
        if conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"conv must be dilation-1 with explicit zero padding, got {conv}")
        if mask is None:
            wm = getattr(conv, MASK_ATTR, None)
            mask = None if wm is None else wm.detach().bool().cpu()
        bias = None if conv.bias is None else conv.bias.detach().float().cpu()
        return cls(conv.weight.detach().float().cpu(), mask, conv.stride, conv.padding, bias, backend,  # type: ignore[arg-type]
                   threads, act)


class DenseConv(nn.Module):
    """An unpruned conv (weights already BN-folded) on one dense route, with a fused activation.

    Args:
        weight: ``(K, C / groups, kh, kw)``.
        bias: ``(K,)`` or ``None``.
        stride: ``(sh, sw)``.
        padding: ``(pad_h, pad_w)``.
        groups: Conv groups.
        route: See :class:`DenseRoute`.
        act: Activation after the bias.

    Raises:
        ValueError: On ``route="linear"`` for a conv that is not a plain ungrouped, unpadded conv, or a bad route.

    """

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int] = (1, 1),
                 padding: tuple[int, int] = (0, 0), groups: int = 1, route: DenseRoute | str = DenseRoute.EAGER,
                 act: Activation | str = Activation.NONE) -> None:
        super().__init__()
        self.route = DenseRoute.parse(route, "route")
        if self.route is DenseRoute.ONEDNN and not onednn_available():
            raise ValueError("route='onednn' needs a torch build with oneDNN (torch.backends.mkldnn)")
        if self.route is DenseRoute.ONEDNN_BF16 and not onednn_bf16_available():
            raise ValueError("route='onednn-bf16' needs oneDNN with bfloat16 convs on this CPU (AVX512-BF16 or AMX)")
        if self.route is DenseRoute.ONEDNN_BF16 and groups != 1:
            raise ValueError(f"route='onednn-bf16' takes ungrouped convs only, got groups={groups} (torch 2.14's "
                             "bfloat16 grouped conv is wrong for some channels-last shapes); use route='eager'")
        if self.route is DenseRoute.LINEAR and (groups != 1 or tuple(padding) != (0, 0)):
            raise ValueError(f"route='linear' needs an ungrouped conv without padding, got groups={groups}, "
                             f"padding={tuple(padding)}")
        self.stride, self.padding, self.groups = _pair(stride, "stride"), _pair(padding, "padding"), int(groups)
        if self.route is DenseRoute.GEMM and (groups != 1 or tuple(weight.shape[2:]) != (1, 1)
                                              or self.stride != (1, 1) or self.padding != (0, 0)):
            raise ValueError(f"route='gemm' needs a 1x1 stride-1 ungrouped conv without padding, got kernel "
                             f"{tuple(weight.shape[2:])}, stride {self.stride}, padding {self.padding}, "
                             f"groups {groups}")
        self.act_code = _act_code(act)
        self.out_channels, self.in_channels = int(weight.shape[0]), int(weight.shape[1]) * self.groups
        self.kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
        dtype = torch.bfloat16 if self.route is DenseRoute.ONEDNN_BF16 else torch.float32
        self.register_buffer("weight", weight.detach().to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @property
    def act(self) -> Activation:
        """The fused activation (as on the packed layers)."""
        return Activation.from_code(self.act_code)

    def extra_repr(self) -> str:
        """A one-line summary."""
        return (f"{self.in_channels}, {self.out_channels}, kernel={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, route={self.route.value}, act={self.act.value}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The conv and its activation."""
        _check_input(x, self.in_channels)
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        _output_size(x.shape[2], x.shape[3], self.kernel_size, self.stride, self.padding)
        if self.route is DenseRoute.ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32:
            return torch.ops.winoprune.conv2d_act(x, self.weight, self.bias, self.stride[0], self.stride[1],
                                                  self.padding[0], self.padding[1], self.groups, self.act_code)
        if self.route is DenseRoute.ONEDNN_BF16 and x.device.type == "cpu" and x.dtype in (torch.float32,
                                                                                             torch.bfloat16):
            return torch.ops.winoprune.conv2d_act_bf16(x, self.weight, self.bias, self.stride[0], self.stride[1],
                                                       self.padding[0], self.padding[1], self.groups, self.act_code)
        if self.route is DenseRoute.GEMM and x.device.type == "cpu" and x.dtype == torch.float32:
            # one op in eager and in an exported graph alike: the route that was timed is the route that ships
            return torch.ops.winoprune.conv1x1_act(x, self.weight, self.bias, self.act_code)
        # the torch routes, and any device or dtype: the weights follow the input (as on the packed layers' torch path)
        if self.route is DenseRoute.LINEAR and tuple(x.shape[2:]) == self.kernel_size:
            w = self.weight.to(device=x.device, dtype=x.dtype).reshape(self.out_channels, -1)
            b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
            y = F.linear(x.flatten(1), w, b)  # flatten: an empty batch reshapes too
            return activate_fresh(y.reshape(x.shape[0], self.out_channels, 1, 1), self.act_code)
        y = _torch_conv(x, self.weight, self.bias, self.stride, self.padding, self.groups)
        return activate_fresh(y, self.act_code)


class NativeMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` (dilation 1, no indices, floor mode) on the native kernel: ``winoprune::max_pool2d``.

    PyTorch's NCHW max pooling is slow at small batches (3.2 ms for ResNet's 3x3 stride-2 pool of 64 x 112 x 112 on
    2 cores; this kernel takes 0.23 ms). Other devices and dtypes run ``F.max_pool2d``.

    Args:
        kernel_size: ``(kh, kw)``.
        stride: ``(sh, sw)``.
        padding: ``(pad_h, pad_w)``, at most half the kernel.
        threads: CPU threads (``-1``: the calling thread's OpenMP setting).

    Raises:
        ValueError: On a bad kernel, stride or padding.

    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int],
                 padding: int | tuple[int, int] = 0, threads: int = -1) -> None:
        super().__init__()
        self.kernel_size, self.stride = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1:
            raise ValueError(f"kernel_size and stride must be >= 1, got {kernel_size!r}, {stride!r}")
        if 2 * self.padding[0] > self.kernel_size[0] or 2 * self.padding[1] > self.kernel_size[1]:
            raise ValueError(f"padding must be at most half the kernel, got {padding!r} for {kernel_size!r}")
        self.threads = _check_threads(threads)

    @classmethod
    def from_module(cls, pool: nn.MaxPool2d, threads: int = -1) -> NativeMaxPool2d:
        """The native twin of ``pool``.

        Raises:
            ValueError: If ``pool`` uses dilation, ``ceil_mode`` or ``return_indices``.

        """
        if pool.dilation not in (1, (1, 1)) or pool.ceil_mode or pool.return_indices:
            raise ValueError(f"only dilation-1, floor-mode max pooling without indices runs natively, got {pool}")
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        return cls(pool.kernel_size, stride, pool.padding, threads)

    def extra_repr(self) -> str:
        """A one-line summary."""
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Max-pool ``x`` ``(N, C, H, W)``."""
        if isinstance(x, torch.Tensor) and x.dim() in (3, 4):  # torch's error for a too-small input: a RuntimeError
            _output_size(x.shape[-2], x.shape[-1], self.kernel_size, self.stride, self.padding)
        if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4:
            return torch.ops.winoprune.max_pool2d(x, self.kernel_size[0], self.kernel_size[1], self.stride[0],
                                                  self.stride[1], self.padding[0], self.padding[1], self.threads)
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
