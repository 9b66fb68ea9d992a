"""The routes a deployed layer can take, and the candidate modules :func:`deploy` builds for a folded conv."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from lightning_winoprune._enum import ParsableEnum
from lightning_winoprune._utils import MASK_ATTR, is_depthwise
from lightning_winoprune.deploy._ops import Activation, onednn_available, onednn_bf16_available
from lightning_winoprune.deploy._packed import (
    DenseConv,
    DenseRoute,
    PackedDepthwiseConv,
    PackedWinogradConv,
    SparseForm,
)
from lightning_winoprune.deploy._packed_bf16 import PackedWinogradConvBf16
from lightning_winoprune.deploy._record import Chain
from lightning_winoprune.kernels._backend import Backend
from lightning_winoprune.winograd._layer import WinogradConv2d
from lightning_winoprune.winograd._tiles import filter_transform
from lightning_winoprune.winograd._transforms import get_transforms

__all__ = ["BF16_ROUTES", "DENSE_ROUTES", "DeployRoute", "Factories", "Precision", "candidates", "dense_reference",
           "rule_route", "tolerance"]

#: Relative max error allowed per layer and for the whole model: F(2,3)-like routes, and F(4,3).
TOL_M2, TOL_M4 = 1e-4, 1e-3
#: The same for a bfloat16 route (8 significant bits: about 3e-3 per layer on random data, see docs/deploy.md), and
#: for a whole bfloat16 model (the rounding of every layer, and of the activations between them, adds up).
TOL_BF16, TOL_BF16_MODEL = 2e-2, 5e-2


class Precision(ParsableEnum):
    """The arithmetic of a deployed model: ``fp32`` (float32 everywhere), or ``bf16``.

    A ``bf16`` model keeps its activations in bfloat16, channels-last, from input to output: Winograd layers run our
    kernels on AMX tiles or AVX512-BF16 (float32 transforms and sums), the other convs oneDNN's bfloat16 convs, and
    the rest (adds, pooling, the head) torch's bfloat16 ops; only the input and the output are converted.
    """

    FP32 = "fp32"
    BF16 = "bf16"


class DeployRoute(ParsableEnum):
    """How one layer of a deployed model runs.

    * ``winograd`` / ``csr``: our packed Winograd kernel on the kept panels / on element-wise CSR (a pruned
      :class:`~lightning_winoprune.winograd.WinogradConv2d`, or an unpruned one).
    * ``depthwise``: our kept-taps kernel for a DEPrune-masked depthwise conv.
    * ``winograd-f2`` / ``winograd-f4``: our dense Winograd kernel for a plain 3x3 conv.
    * ``eager``, ``onednn``, ``linear``, ``gemm``: the dense routes of :class:`~lightning_winoprune.deploy.DenseConv`.
    * ``winograd-bf16`` / ``onednn-bf16``: the bfloat16 forms of ``winograd`` and ``onednn`` (``precision="bf16"``).
    * ``native``: our max-pool kernel (``eager`` is ``nn.MaxPool2d``).
    * ``module``: the layer is kept as it is (no candidate applies).
    """

    WINOGRAD = "winograd"
    CSR = "csr"
    DEPTHWISE = "depthwise"
    WINOGRAD_F2 = "winograd-f2"
    WINOGRAD_F4 = "winograd-f4"
    EAGER = "eager"
    ONEDNN = "onednn"
    LINEAR = "linear"
    GEMM = "gemm"
    WINOGRAD_BF16 = "winograd-bf16"
    ONEDNN_BF16 = "onednn-bf16"
    NATIVE = "native"
    MODULE = "module"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


#: The dense routes: a layer's ``dense_ms`` is the fastest of these when no dense reference was timed.
DENSE_ROUTES = (DeployRoute.EAGER, DeployRoute.ONEDNN, DeployRoute.LINEAR, DeployRoute.GEMM, DeployRoute.ONEDNN_BF16)
#: The routes that compute in bfloat16.
BF16_ROUTES = (DeployRoute.WINOGRAD_BF16, DeployRoute.ONEDNN_BF16)
#: The route taken without timing: the first of these that was built (the bfloat16 ones exist only for bf16).
_RULE_ORDER = (DeployRoute.WINOGRAD_BF16, DeployRoute.WINOGRAD, DeployRoute.DEPTHWISE, DeployRoute.LINEAR,
               DeployRoute.GEMM, DeployRoute.ONEDNN_BF16, DeployRoute.ONEDNN, DeployRoute.EAGER)
Factories = dict[DeployRoute, Callable[[], nn.Module]]


def _spatial_equivalent(u: torch.Tensor, m: int) -> torch.Tensor | None:
    """The 3x3 kernels ``g`` with ``G g G^T == U``; ``None`` when a Winograd-domain mask took ``U`` out of range."""
    g_mat = get_transforms(m, torch.float64).G
    pinv = torch.linalg.pinv(g_mat)
    g = pinv @ u.double() @ pinv.T
    back = g_mat @ g @ g_mat.T
    if float((back - u.double()).abs().max()) > 1e-5 * max(float(u.abs().max()), 1e-12):
        return None
    return g.float()


def _plain_3x3(conv: nn.Conv2d) -> bool:
    return (tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def is_masked_depthwise(conv: nn.Module) -> bool:
    """A depthwise conv (one input channel per filter, zero padding, dilation 1) whose mask prunes something."""
    mask = getattr(conv, MASK_ATTR, None)
    if not (is_depthwise(conv) and isinstance(conv, nn.Conv2d) and isinstance(mask, torch.Tensor)):
        return False
    return (conv.weight.shape[1] == 1 and not bool(mask.all()) and tuple(conv.dilation) == (1, 1)
            and not isinstance(conv.padding, str) and conv.padding_mode == "zeros")


def _dense(w: torch.Tensor, b: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int], groups: int,
           act: Activation, x: torch.Tensor, fixed_hw: bool, precision: Precision = Precision.FP32) -> Factories:
    def make(route: DenseRoute, g: int = groups) -> Callable[[], nn.Module]:
        return lambda: DenseConv(w, b, stride, padding, g, route, act)

    out: Factories = {DeployRoute.EAGER: make(DenseRoute.EAGER)}
    linear = fixed_hw and groups == 1 and padding == (0, 0) and tuple(x.shape[2:]) == tuple(w.shape[2:])
    if precision is Precision.BF16:  # the routes that take and return bfloat16 channels-last activations
        # grouped convs stay on eager (float32 inside): torch 2.14's bfloat16 grouped conv on a channels-last input is
        # wrong for some small shapes (docs/reliability.md)
        if onednn_bf16_available() and groups == 1:
            out[DeployRoute.ONEDNN_BF16] = make(DenseRoute.ONEDNN_BF16)
        if linear:
            out[DeployRoute.LINEAR] = make(DenseRoute.LINEAR, 1)
        return out
    if onednn_available():
        out[DeployRoute.ONEDNN] = make(DenseRoute.ONEDNN)
    if linear:
        out[DeployRoute.LINEAR] = make(DenseRoute.LINEAR, 1)
    if groups == 1 and padding == (0, 0) and stride == (1, 1) and tuple(w.shape[2:]) == (1, 1):
        out[DeployRoute.GEMM] = make(DenseRoute.GEMM, 1)
    return out


def _winograd_candidates(chain: Chain, threads: int, backend: Backend, fixed_hw: bool,
                         precision: Precision) -> tuple[Factories, str]:
    conv = chain.conv
    assert isinstance(conv, WinogradConv2d)
    u, mask, b, act = chain.weight, chain.mask, chain.bias, chain.act
    out: Factories = {}
    note = ""
    pruned = mask is not None and not bool(mask.all())
    if conv.m in (2, 4) and precision is Precision.BF16:
        if backend is Backend.NATIVE:
            out[DeployRoute.WINOGRAD_BF16] = lambda: PackedWinogradConvBf16(u, mask, conv.m, conv.padding, b, threads,
                                                                            act)
    elif conv.m in (2, 4):
        out[DeployRoute.WINOGRAD] = lambda: PackedWinogradConv(u, mask, conv.m, conv.padding, b,
                                                               SparseForm.STRUCTURED, backend, threads, act)
        if backend is Backend.NATIVE and pruned:
            out[DeployRoute.CSR] = lambda: PackedWinogradConv(u, mask, conv.m, conv.padding, b, SparseForm.CSR,
                                                              backend, threads, act)
    else:
        note = f"no native kernel for F({conv.m},3)"
    g = None if pruned else _spatial_equivalent(u, conv.m)
    if g is not None:  # unpruned: the dense routes compute the same function
        out.update(_dense(g, b, (1, 1), tuple(conv.padding), 1, act, chain.x, fixed_hw,  # type: ignore[arg-type]
                          precision))
    elif not out:
        note += "; kept on its own (torch) path"
    return out, note


def _conv_candidates(chain: Chain, threads: int, backend: Backend, fixed_hw: bool,
                     precision: Precision) -> tuple[Factories, str]:
    conv = chain.conv
    assert isinstance(conv, nn.Conv2d)
    w, mask, b, act = chain.weight, chain.mask, chain.bias, chain.act
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or tuple(conv.dilation) != (1, 1):
        return {}, (f"kept as nn.Conv2d (padding_mode={conv.padding_mode!r}, padding={conv.padding!r}, "
                    f"dilation={tuple(conv.dilation)})")
    stride: tuple[int, int] = (int(conv.stride[0]), int(conv.stride[1]))
    padding: tuple[int, int] = (int(conv.padding[0]), int(conv.padding[1]))
    out = _dense(w, b, stride, padding, conv.groups, act, chain.x, fixed_hw, precision)
    if precision is Precision.BF16:  # our depthwise and dense Winograd kernels are float32 NCHW
        return out, ""
    if is_masked_depthwise(conv):
        out[DeployRoute.DEPTHWISE] = lambda: PackedDepthwiseConv(w, mask, stride, padding, b,
                                                                 backend, threads, act)
    elif backend is Backend.NATIVE and _plain_3x3(conv) and conv.in_channels >= 4:

        def dense_winograd(m: int) -> nn.Module:
            u = filter_transform(w.double(), m, Backend.TORCH).float()
            return PackedWinogradConv(u, None, m, padding, b, SparseForm.STRUCTURED, backend, threads, act)

        out[DeployRoute.WINOGRAD_F2] = functools.partial(dense_winograd, 2)
        out[DeployRoute.WINOGRAD_F4] = functools.partial(dense_winograd, 4)
    return out, ""


def candidates(chain: Chain, threads: int, backend: Backend, fixed_hw: bool = True,
               precision: Precision = Precision.FP32) -> tuple[Factories, str]:
    """``(route -> module factory, note)`` for one folded conv chain (``fixed_hw=False``: routes for any H x W).

    Args:
        chain: The conv with its folded ``weight`` / ``mask`` / ``bias`` and fused ``act``.
        threads: The deployed kernels' threads (-1: torch's count at call time).
        backend: ``native`` or ``torch`` (resolved).
        fixed_hw: Whether the deployed model runs at the example's H x W only (allows the ``linear`` route).
        precision: ``bf16``: the routes of a bfloat16 model instead (bfloat16 channels-last activations in and out).
    """
    if isinstance(chain.conv, WinogradConv2d):
        return _winograd_candidates(chain, threads, backend, fixed_hw, precision)
    return _conv_candidates(chain, threads, backend, fixed_hw, precision)


def tolerance(route: DeployRoute, conv: nn.Module, precision: Precision = Precision.FP32) -> float:
    """The relative max error a route may show against the layer's own output.

    Every route of a bfloat16 model runs on bfloat16 activations: that precision's tolerance.
    """
    if route in BF16_ROUTES or precision is Precision.BF16:
        return TOL_BF16
    f4 = isinstance(conv, WinogradConv2d) and conv.m == 4 and route in (DeployRoute.WINOGRAD, DeployRoute.CSR)
    return TOL_M4 if route is DeployRoute.WINOGRAD_F4 or f4 else TOL_M2


def rule_route(built: dict[DeployRoute, nn.Module]) -> DeployRoute:
    """The route taken without timing: our kernels for pruned layers, then the dense routes."""
    return next((route for route in _RULE_ORDER if route in built), next(iter(built)))


def dense_reference(chain: Chain, precision: Precision = Precision.FP32,
                    x: torch.Tensor | None = None) -> Callable[[], object] | None:
    """The layer's dense route with random weights (for a Winograd layer pruned beyond any spatial equivalent).

    In the deployment's precision (oneDNN's bfloat16 conv for ``precision="bf16"`` where it runs), called on ``x``
    (default: the layer's recorded input).
    """
    conv = chain.conv
    if not isinstance(conv, WinogradConv2d):
        return None
    w = torch.randn(conv.out_channels, conv.in_channels, 3, 3) * (2.0 / (9 * conv.in_channels)) ** 0.5
    route = DenseRoute.ONEDNN if onednn_available() else DenseRoute.EAGER
    if precision is Precision.BF16 and onednn_bf16_available():
        route = DenseRoute.ONEDNN_BF16
    mod = DenseConv(w, torch.zeros(conv.out_channels), (1, 1), conv.padding, 1, route, chain.act)
    xin = chain.x if x is None else x
    return lambda: mod(xin)
