"""Inference kernels for pruned layers: packed once, run many times, native on CPU with a torch path elsewhere.

* :class:`PackedWinogradConv`: a (pruned) Winograd layer's ``U`` and mask packed for the native F(2,3) / F(4,3)
  kernels. ``form="structured"`` runs only kept panels (kept rows for WSP-R/BWSP/ABWSP, kept input channels for
  WSP-C); ``form="csr"`` is the WWP baseline (element-sparse CSR). The torch path (any device) runs the same
  compacted GEMMs with ``torch.bmm``: one equal-shape batch for balanced layers, per-position GEMMs otherwise; on a
  GPU that is exactly the "no custom kernel needed" case of WSP-R.
* :class:`PackedDepthwiseConv`: a DEPrune-masked depthwise conv as kept taps per channel, run by a direct
  per-channel kernel (on CPUs faster than a dense DR GEMM).

Both preallocate their outputs and workspaces per input shape, so timing them measures the kernel, not the
allocator.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_winoprune._enum import ParsableEnum
from lightning_winoprune.kernels._backend import Backend, native_available, native_module, resolve_backend

__all__ = ["NativeConv", "PackedDepthwiseConv", "PackedWinogradConv", "SparseForm", "native_isa"]


class SparseForm(ParsableEnum):
    """How a Winograd layer's mask is packed: compacted panels, or element-wise CSR (the WWP baseline)."""

    STRUCTURED = "structured"
    CSR = "csr"


def native_isa() -> str | None:
    """The instruction set the native kernels dispatch to (``"avx512"``, ``"avx2"``, ``"generic"``), or ``None``."""
    return str(native_module().isa()) if native_available() else None


def _check_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or (threads < 1 and threads != -1):
        raise ValueError(f"threads must be a positive int or -1 (all), got {threads!r}")
    return threads


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in pair):
        raise ValueError(f"{name} must be a non-negative int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_out(out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.device.type != "cpu" or out.dtype != torch.float32:
        raise TypeError(f"out must be a CPU float32 tensor, got {getattr(out, 'dtype', type(out).__name__)}")
    if out.shape != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {tuple(shape)}, got {tuple(out.shape)}")
    return out


class _Buffers:
    """Output and workspace tensors reused while the input shape stays the same."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.out: torch.Tensor | None = None
        self.workspace: torch.Tensor | None = None


class _PackedConv:
    """What both packed convs share: input checks, the native/torch switch and the reused output and workspace."""

    _plan: Any
    _buffers: _Buffers
    in_channels: int
    out_channels: int

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        raise NotImplementedError

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _workspace_size(self, n: int, h: int, w: int, ho: int, wo: int) -> int:
        return 0

    def _native_forward(self, x: torch.Tensor, out: torch.Tensor, workspace: torch.Tensor) -> None:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve ``x`` ``(N, C, H, W)``.

        The native path writes into ``out`` when given (CPU float32, contiguous, the output's shape), else into a
        buffer that the next call with the same input shape reuses.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        if self._plan is None or x.device.type != "cpu" or x.dtype != torch.float32:
            return self._torch_forward(x)
        x = x.contiguous()
        n, _, h, w = x.shape
        ho, wo = self.output_size(h, w)
        b = self._buffers
        if b.key != (n, h, w):
            b.out = torch.empty(n, self.out_channels, ho, wo)
            b.workspace = torch.empty(max(self._workspace_size(n, h, w, ho, wo), 1))
            b.key = (n, h, w)
        assert b.out is not None and b.workspace is not None
        target = b.out if out is None else _check_out(out, b.out.shape)
        self._native_forward(x, target, b.workspace)
        return target


class PackedWinogradConv(_PackedConv):
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
        threads: CPU threads of the native kernel (``-1``: OpenMP's default).

    Raises:
        ValueError: On a bad shape, ``m``, padding, ``form`` or ``threads``; or ``backend="native"`` where it does
            not apply.
        TypeError: If ``weight`` or ``mask`` is not a tensor of the right dtype.

    """

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
    ) -> None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {type(weight).__name__}")
        if isinstance(m, bool) or m not in (2, 4):
            raise ValueError(f"m={m!r} is not valid; valid values are [2, 4]")
        p = m + 2
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
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
            if tuple(mask.shape) != tuple(weight.shape):
                raise ValueError(f"mask must have weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
        if bias is not None and tuple(bias.shape) != (view.shape[1],):
            raise ValueError(f"bias must have shape ({view.shape[1]},), got {tuple(bias.shape)}")
        self.m, self.p = m, p
        self.padding = _pair(padding, "padding")
        self.form = SparseForm.parse(form)
        self.threads = _check_threads(threads)
        self.out_channels, self.in_channels = int(view.shape[1]), int(view.shape[2])
        self.mask_view = (torch.ones(view.shape, dtype=torch.bool, device=view.device) if mask_view is None
                          else mask_view.contiguous())
        self.weight_view = (view * self.mask_view).contiguous()
        self.bias = None if bias is None else bias.detach().contiguous()
        self.backend = resolve_backend(backend, self.weight_view, *(() if self.bias is None else (self.bias,)))
        self._plan: Any = None
        if self.backend is Backend.NATIVE:
            ext = native_module()
            bias_np = None if self.bias is None else self.bias.numpy()
            self._plan = ext.pack_winograd(self.weight_view.numpy(), self.mask_view.numpy(), m, bias_np,
                                           self.form is SparseForm.CSR)
        self._torch_plan: dict[str, Any] | None = None
        self._buffers = _Buffers()

    # ------------------------------------------------------------------------------------------ properties
    @property
    def kept_fraction(self) -> float:
        """Fraction of the Winograd-domain weights kept by the mask."""
        return float(self.mask_view.float().mean())

    @property
    def work_fraction(self) -> float:
        """Multiply-adds the native kernel runs, relative to the dense Winograd GEMMs (panel padding included)."""
        dense = self.p * self.p * self.out_channels * self.in_channels
        if self._plan is not None:
            return float(self._plan.work) / dense
        return self.kept_fraction

    @property
    def balanced(self) -> bool:
        """Whether every Winograd position keeps the same GEMM shape (one equal-shape batched GEMM)."""
        rows = self.mask_view.any(dim=2).sum(dim=1)
        cols = self.mask_view.any(dim=1).sum(dim=1)
        return bool((rows == rows[0]).all() and (cols == cols[0]).all())

    @property
    def isa(self) -> str | None:
        """Instruction set of the native plan, or ``None`` on the torch path."""
        return None if self._plan is None else str(self._plan.isa)

    def extra_repr(self) -> str:
        """A one-line summary."""
        return (f"K={self.out_channels}, C={self.in_channels}, m={self.m}, form={self.form.value}, "
                f"kept={self.kept_fraction:.3f}, backend={self.backend.value}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    # ------------------------------------------------------------------------------------------ forward
    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(Ho, Wo)`` for an ``height x width`` input."""
        ho, wo = height + 2 * self.padding[0] - 2, width + 2 * self.padding[1] - 2
        if ho < 1 or wo < 1:
            raise ValueError(f"input {height}x{width} with padding {self.padding} is smaller than the 3x3 kernel")
        return ho, wo

    def _workspace_size(self, n: int, h: int, w: int, ho: int, wo: int) -> int:
        return int(self._plan.workspace_size(n, h, w, self.padding[0], self.padding[1], ho, wo, self.threads))

    def _native_forward(self, x: torch.Tensor, out: torch.Tensor, workspace: torch.Tensor) -> None:
        self._plan.forward(x.numpy(), self.padding[0], self.padding[1], out.numpy(), workspace.numpy(), self.threads)

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
            plan = {"kind": "cols", "idx": idx, "u": torch.gather(u, 2, idx.unsqueeze(1).expand(-1, u.shape[1], -1))}
        elif whole_rows and int(n_rows.sum()) < rows.numel():
            plan = {"kind": "rows_each", "idx": [r.nonzero().squeeze(1) for r in rows]}
        self._torch_plan = plan
        return plan

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        from lightning_winoprune.winograd._tiles import input_transform, output_transform, tile_geometry

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
        threads: int = -1, dense: bool = False,
    ) -> PackedWinogradConv:
        """Pack a :class:`~lightning_winoprune.winograd.WinogradConv2d` (its mask unless ``dense``)."""
        from lightning_winoprune.winograd._layer import WinogradConv2d

        if not isinstance(layer, WinogradConv2d):
            raise TypeError(f"layer must be a WinogradConv2d, got {type(layer).__name__}")
        mask = None if dense else layer.mask
        return cls(layer.weight.detach().float().cpu(), None if mask is None else mask.cpu(), layer.m,
                   layer.padding, None if layer.bias is None else layer.bias.detach().float().cpu(), form, backend,
                   threads)


class PackedDepthwiseConv(_PackedConv):
    """A depthwise conv with a DEPrune keep-mask, packed as the kept taps of each channel.

    Args:
        weight: ``(C, 1, kh, kw)`` depthwise weights.
        mask: Bool keep-mask of the same shape (a DEPrune ``weight_mask``), or ``None`` for dense.
        stride: ``(sh, sw)``.
        padding: ``(pad_h, pad_w)``, symmetric.
        bias: ``(C,)`` or ``None``.
        backend: ``"auto"``, ``"native"`` or ``"torch"``.
        threads: CPU threads of the native kernel (``-1``: OpenMP's default).

    Raises:
        ValueError: On bad shapes, stride, padding or threads.
        TypeError: On a non-tensor weight or a non-bool mask.

    """

    def __init__(
        self,
        weight: torch.Tensor,
        mask: torch.Tensor | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
        bias: torch.Tensor | None = None,
        backend: Backend | str = Backend.AUTO,
        threads: int = -1,
    ) -> None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {type(weight).__name__}")
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
        self.channels = self.in_channels = self.out_channels = int(weight.shape[0])
        self.mask = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.detach()
        self.weight = (weight.detach() * self.mask).contiguous()
        if bias is not None and tuple(bias.shape) != (self.channels,):
            raise ValueError(f"bias must have shape ({self.channels},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else bias.detach().contiguous()
        self.backend = resolve_backend(backend, self.weight, *(() if self.bias is None else (self.bias,)))
        self._plan: Any = None
        if self.backend is Backend.NATIVE:
            self._plan = native_module().pack_depthwise(
                self.weight[:, 0].contiguous().numpy(), self.mask[:, 0].contiguous().numpy(), self.stride[0],
                self.stride[1], None if self.bias is None else self.bias.numpy())
        self._buffers = _Buffers()

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
        from lightning_winoprune.pruning._depthwise import DEFAULT_DR_TILE, dr_column_masks

        tile = DEFAULT_DR_TILE if tile is None else tile
        out = []
        for g, keep in enumerate(dr_column_masks(self.mask.cpu(), tile)):
            cols = keep.nonzero().squeeze(1)
            first = g * tile
            out.append({"channels": (first, min(tile, self.channels - first)), "kept_columns": cols.tolist(),
                        "aligned": int(cols.numel()) % tile == 0})
        return out

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(Ho, Wo)`` for an ``height x width`` input."""
        kh, kw = self.weight.shape[2:]
        ho = (height + 2 * self.padding[0] - kh) // self.stride[0] + 1
        wo = (width + 2 * self.padding[1] - kw) // self.stride[1] + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"input {height}x{width} is smaller than the {kh}x{kw} kernel")
        return ho, wo

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(device=x.device, dtype=x.dtype)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.conv2d(x, w, b, self.stride, self.padding, groups=self.channels)

    def _native_forward(self, x: torch.Tensor, out: torch.Tensor, workspace: torch.Tensor) -> None:
        self._plan.forward(x.numpy(), self.padding[0], self.padding[1], out.numpy(), self.threads)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None, backend: Backend | str = Backend.AUTO,
                  threads: int = -1) -> PackedDepthwiseConv:
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
            wm = getattr(conv, "weight_mask", None)
            mask = None if wm is None else wm.detach().bool().cpu()
        bias = None if conv.bias is None else conv.bias.detach().float().cpu()
        return cls(conv.weight.detach().float().cpu(), mask, conv.stride, conv.padding, bias, backend,  # type: ignore[arg-type]
                   threads)


class NativeConv(nn.Module):
    """An inference-only module around a packed conv, to swap into a model (``torch.no_grad`` use only).

    Every call returns a new tensor (the kernel writes straight into it), so outputs are safe to keep.
    """

    def __init__(self, packed: PackedWinogradConv | PackedDepthwiseConv) -> None:
        super().__init__()
        self.packed = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the packed conv."""
        if x.device.type != "cpu" or x.dtype != torch.float32 or getattr(self.packed, "_plan", None) is None:
            return self.packed(x)  # the torch path allocates a fresh tensor anyway
        n, _, h, w = x.shape
        out = torch.empty(n, self.packed.out_channels, *self.packed.output_size(h, w))
        return self.packed(x, out=out)

    def extra_repr(self) -> str:
        return repr(self.packed)
