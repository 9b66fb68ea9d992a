"""The ``winoprune::`` torch custom ops: the native inference kernels as real torch operators.

Each op takes a packed plan as plain tensors (the buffers of a deployed layer) and returns a fresh output, so it
works under ``torch.compile(fullgraph=True)``, ``torch.export`` (with a dynamic batch) and ``torch.jit.trace``, and
it is safe to call from several threads at once: the output is allocated per call and the kernels' scratch memory is
per calling thread. Every op has a fake (meta) implementation for tracing, and a backward that raises, because the
deployed model is inference only (train the :class:`~lightning_winoprune.winograd.WinogradConv2d` model instead).

* ``winoprune::winograd_conv``: a 3x3 stride-1 conv from packed Winograd-domain weights (dense, structured or CSR).
* ``winoprune::winograd_conv_bf16``: the same conv with a bfloat16 multiply (AMX tiles or AVX512-BF16 rows; float32
  transforms and sums): float32 NCHW in and out, or bfloat16 channels-last in and out.
* ``winoprune::depthwise_conv``: a depthwise conv from the kept taps of each channel.
* ``winoprune::conv2d_act``: a dense conv with a fused activation on oneDNN (``mkldnn._convolution_pointwise``), with
  ``F.conv2d`` as its fallback: the dense route of :func:`~lightning_winoprune.deploy` for unpruned convs. The weight
  stays a plain tensor (what is saved and exported); its oneDNN-blocked copy is made on first use and cached per
  weight tensor and input shape, and made again when the weight changes in place.
* ``winoprune::conv2d_act_bf16``: ``conv2d_act`` in bfloat16 (oneDNN's AMX / AVX512-BF16 convs) with a bfloat16
  weight: bfloat16 channels-last in and out, or float32 NCHW in and out (rounded to bfloat16 inside).
* ``winoprune::conv1x1_act``: a 1x1 conv as one matrix product per image, bias and activation in place.
* ``winoprune::max_pool2d``: max pooling of NCHW planes (PyTorch's is slow at small batches).

Importing :mod:`lightning_winoprune` registers them, so a saved ``.pt2`` loads in a process that imports it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_winoprune._enum import ParsableEnum
from lightning_winoprune._utils import conv_output_size
from lightning_winoprune.kernels._backend import native_available, native_module

__all__ = ["Activation", "activate_fresh", "apply_activation", "apply_activation_", "onednn_bf16_available"]


class Activation(ParsableEnum):
    """The activation fused into a deployed layer's output stage (applied after the bias)."""

    NONE = "none"
    RELU = "relu"
    RELU6 = "relu6"
    SILU = "silu"
    HARDSWISH = "hardswish"

    @property
    def code(self) -> int:
        """The code the ops and the native kernels take: the activation's position in this enum."""
        return _CODES[self]

    @classmethod
    def from_code(cls, code: int) -> Activation:
        """The activation with native code ``code``."""
        if not 0 <= code < len(_ORDER):
            raise ValueError(f"act must be one of {list(range(len(_ORDER)))}, got {code!r}")
        return _ORDER[code]


_ORDER = tuple(Activation)
_CODES = {act: code for code, act in enumerate(_ORDER)}


def _check_native_activations() -> None:
    """The extension's table of activations (``activation_names``, from ``csrc/isa.h``) must be this enum's order."""
    if not native_available():
        return
    names = tuple(native_module().activation_names)
    if names != tuple(act.value for act in _ORDER):
        raise ImportError(f"lightning_winoprune.kernels._C was built from other sources: its activations are {names}, "
                          f"this package's are {tuple(a.value for a in _ORDER)}; reinstall with `pip install .`")


_check_native_activations()
# oneDNN's post-op names and scalars for each activation
_ONEDNN = {Activation.NONE: ("none", None), Activation.RELU: ("relu", None), Activation.RELU6: ("hardtanh", [0.0, 6.0]),
           Activation.SILU: ("swish", None), Activation.HARDSWISH: ("hardswish", None)}


def apply_activation(y: Tensor, act: int) -> Tensor:
    """``y`` through the activation with native code ``act`` (torch ops, for the fallback paths)."""
    if act == 0:
        return y
    if act == 1:
        return F.relu(y)
    if act == 2:
        return F.relu6(y)
    if act == 3:
        return F.silu(y)
    if act == 4:
        return F.hardswish(y)
    raise ValueError(f"act must be one of {list(range(len(_ORDER)))}, got {act!r}")


def activate_fresh(y: Tensor, act: int) -> Tensor:
    """The activation on ``y``, a tensor the caller just made: in place (one pass over memory less) unless recorded."""
    return apply_activation(y, act) if y.requires_grad else apply_activation_(y, act)


def _cpu_float(x: Tensor, op: str) -> Tensor:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise TypeError(f"winoprune::{op} runs on CPU float32 inputs (it is a deployed CPU model), got "
                        f"{x.device.type}/{x.dtype}; call .float() / .cpu() on the input first")
    if x.dim() != 4:
        raise ValueError(f"winoprune::{op} needs an (N, C, H, W) input, got shape {tuple(x.shape)}")
    return x.detach().contiguous()


def _out_size(size: int, kernel: int, stride: int, pad: int, op: str) -> int:
    out = conv_output_size(size, kernel, stride, pad)
    if out < 1:
        raise ValueError(f"winoprune::{op}: an input of size {size} with padding {pad} is smaller than the "
                         f"{kernel}x{kernel} kernel")
    return out


def _fake_out_size(size: Any, kernel: Any, stride: int, pad: int, op: str) -> Any:
    """The output size of a fake kernel: plain or symbolic (``SymInt``) arithmetic, with ``out >= 1`` as a check.

    Under ``torch.export`` with a dynamic H / W the check becomes a guard on the input size (or a constraint error
    that names the smallest size) instead of a failure; on concrete sizes it raises like the eager op.
    """
    out = conv_output_size(size, kernel, stride, pad)
    torch._check(out >= 1, lambda: f"winoprune::{op}: an input of size {size} with padding {pad} is smaller than the "
                                    f"{kernel}x{kernel} kernel")
    return out


def _fake_nchw(x: Tensor, op: str, channels: Any = None) -> None:
    """The input checks of a fake kernel, as ``torch._check`` calls (guards under tracing, errors on real sizes)."""
    torch._check(x.dim() == 4, lambda: f"winoprune::{op} needs an (N, C, H, W) input, got shape {tuple(x.shape)}")
    if channels is not None:
        torch._check(x.shape[1] == channels,
                     lambda: f"winoprune::{op}: x must have {channels} channels, got shape {tuple(x.shape)}")


def _inference_only(op: str) -> Callable[..., Any]:
    def backward(ctx: Any, grad: Tensor) -> Any:
        raise RuntimeError(
            f"winoprune::{op} is inference only: a deployed model has no gradients. Train (or fine-tune) the model "
            "before lightning_winoprune.deploy, or run the deployed model under torch.no_grad()."
        )

    return backward


# The ops are defined with torch.library.Library (not the custom_op decorator): its dispatch costs about 7 us per
# call instead of 14, which matters for the small layers of a deployed network.
_LIB = torch.library.Library("winoprune", "DEF")  # defined once, at import
_LIB.define("winograd_conv(Tensor x, Tensor meta, Tensor cols, Tensor vals, Tensor acc, Tensor? bias, "
            "int out_channels, int pad_h, int pad_w, int act, int threads) -> Tensor")
_LIB.define("depthwise_conv(Tensor x, Tensor meta, Tensor taps, Tensor weights, Tensor? bias, int kernel_h, "
            "int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w, int act, int threads) -> Tensor")
_LIB.define("conv2d_act(Tensor x, Tensor weight, Tensor? bias, int stride_h, int stride_w, int pad_h, int pad_w, "
            "int groups, int act) -> Tensor")
_LIB.define("winograd_conv_bf16(Tensor x, Tensor meta, Tensor chunks, Tensor A, Tensor? bias, int out_channels, "
            "int pad_h, int pad_w, int act, int threads) -> Tensor")
_LIB.define("conv2d_act_bf16(Tensor x, Tensor weight, Tensor? bias, int stride_h, int stride_w, int pad_h, "
            "int pad_w, int groups, int act) -> Tensor")
_LIB.define("conv1x1_act(Tensor x, Tensor weight, Tensor? bias, int act) -> Tensor")
_LIB.define("max_pool2d(Tensor x, int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w, "
            "int threads) -> Tensor")


# ------------------------------------------------------------------------------------------------- winograd_conv
def winograd_conv(x: Tensor, meta: Tensor, cols: Tensor, vals: Tensor, acc: Tensor, bias: Tensor | None,
                  out_channels: int, pad_h: int, pad_w: int, act: int, threads: int) -> Tensor:
    """A 3x3 stride-1 conv from a Winograd plan's arrays (:class:`~lightning_winoprune.deploy.PackedWinogradConv`)."""
    x = _cpu_float(x, "winograd_conv")
    n, _, h, w = x.shape
    out = torch.empty(n, out_channels, _out_size(h, 3, 1, pad_h, "winograd_conv"),
                      _out_size(w, 3, 1, pad_w, "winograd_conv"))
    native_module().winograd_run(x.numpy(), meta.numpy(), cols.numpy(), vals.numpy(), acc.numpy(),
                                 None if bias is None else bias.detach().numpy(), act, pad_h, pad_w, out.numpy(),
                                 threads)
    return out


def _winograd_conv_fake(x: Tensor, meta: Tensor, cols: Tensor, vals: Tensor, acc: Tensor, bias: Tensor | None,
                        out_channels: int, pad_h: int, pad_w: int, act: int, threads: int) -> Tensor:
    _fake_nchw(x, "winograd_conv")
    return x.new_empty((x.shape[0], out_channels, _fake_out_size(x.shape[2], 3, 1, pad_h, "winograd_conv"),
                        _fake_out_size(x.shape[3], 3, 1, pad_w, "winograd_conv")))


# ------------------------------------------------------------------------------------------- winograd_conv_bf16
def _cpu_float_or_bf16(x: Tensor, op: str) -> Tensor:
    """A float32 input as contiguous NCHW, a bfloat16 one as contiguous channels-last."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"winoprune::{op} runs on CPU float32 or bfloat16 inputs, got {x.device.type}/{x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"winoprune::{op} needs an (N, C, H, W) input, got shape {tuple(x.shape)}")
    x = x.detach()
    return x.contiguous() if x.dtype == torch.float32 else x.contiguous(memory_format=torch.channels_last)


def _empty_like_layout(x: Tensor, shape: tuple[Any, ...]) -> Tensor:
    """A new ``(N, K, Ho, Wo)`` output: float32 NCHW for a float32 input, bfloat16 channels-last for a bfloat16 one."""
    if x.dtype == torch.bfloat16:
        return torch.empty(shape, dtype=torch.bfloat16, device=x.device, memory_format=torch.channels_last)
    return x.new_empty(shape)


def _nhwc_bits(t: Tensor) -> Any:
    """A channels-last bfloat16 tensor's bits as an ``(N, H, W, C)`` uint16 numpy view (numpy has no bfloat16)."""
    return t.permute(0, 2, 3, 1).view(torch.int16).numpy().view("uint16")


def winograd_conv_bf16(x: Tensor, meta: Tensor, chunks: Tensor, A: Tensor, bias: Tensor | None, out_channels: int,
                       pad_h: int, pad_w: int, act: int, threads: int) -> Tensor:
    """A 3x3 stride-1 conv from a bfloat16 plan's arrays (:class:`~lightning_winoprune.deploy.PackedWinogradConvBf16`).

    A float32 input gives a float32 NCHW output; a bfloat16 input (read channels-last) a bfloat16 channels-last one.
    ``A`` holds the bfloat16 bits as int16 (numpy has no bfloat16); the kernel reads them as uint16.
    """
    x = _cpu_float_or_bf16(x, "winograd_conv_bf16")
    n, _, h, w = x.shape
    out = _empty_like_layout(x, (n, out_channels, _out_size(h, 3, 1, pad_h, "winograd_conv_bf16"),
                                 _out_size(w, 3, 1, pad_w, "winograd_conv_bf16")))
    bf16 = x.dtype == torch.bfloat16
    native_module().winograd_bf16_run(_nhwc_bits(x) if bf16 else x.numpy(), meta.numpy(), chunks.numpy(),
                                      A.numpy().view("uint16"), None if bias is None else bias.detach().numpy(), act,
                                      pad_h, pad_w, _nhwc_bits(out) if bf16 else out.numpy(), threads)
    return out


def _winograd_conv_bf16_fake(x: Tensor, meta: Tensor, chunks: Tensor, A: Tensor, bias: Tensor | None,
                             out_channels: int, pad_h: int, pad_w: int, act: int, threads: int) -> Tensor:
    _fake_nchw(x, "winograd_conv_bf16")
    return _empty_like_layout(x, (x.shape[0], out_channels,
                                  _fake_out_size(x.shape[2], 3, 1, pad_h, "winograd_conv_bf16"),
                                  _fake_out_size(x.shape[3], 3, 1, pad_w, "winograd_conv_bf16")))


# ------------------------------------------------------------------------------------------------ depthwise_conv
def depthwise_conv(x: Tensor, meta: Tensor, taps: Tensor, weights: Tensor, bias: Tensor | None, kernel_h: int,
                   kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int, act: int,
                   threads: int) -> Tensor:
    """A pruned depthwise conv from its kept taps (see :class:`~lightning_winoprune.deploy.PackedDepthwiseConv`)."""
    x = _cpu_float(x, "depthwise_conv")
    n, c, h, w = x.shape
    out = torch.empty(n, c, _out_size(h, kernel_h, stride_h, pad_h, "depthwise_conv"),
                      _out_size(w, kernel_w, stride_w, pad_w, "depthwise_conv"))
    native_module().depthwise_run(x.numpy(), meta.numpy(), taps.numpy(), weights.numpy(),
                                  None if bias is None else bias.detach().numpy(), act, pad_h, pad_w, out.numpy(),
                                  threads)
    return out


def _depthwise_conv_fake(x: Tensor, meta: Tensor, taps: Tensor, weights: Tensor, bias: Tensor | None, kernel_h: int,
                         kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int, act: int,
                         threads: int) -> Tensor:
    _fake_nchw(x, "depthwise_conv")
    return x.new_empty((x.shape[0], x.shape[1], _fake_out_size(x.shape[2], kernel_h, stride_h, pad_h, "depthwise_conv"),
                        _fake_out_size(x.shape[3], kernel_w, stride_w, pad_w, "depthwise_conv")))


# ---------------------------------------------------------------------------------------------------- conv2d_act
def onednn_available() -> bool:
    """Whether oneDNN's fused conv (``mkldnn._convolution_pointwise``) can run here."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


#: id(weight) -> (weak reference to it, its version counter, {conv key: oneDNN-blocked copy}). An entry is used only
#: while the reference still points to that very tensor, unchanged; it is dropped when the tensor is freed.
_PACKED: dict[int, tuple[weakref.ref, int, dict[tuple, Tensor]]] = {}
_PACKED_LOCK = threading.Lock()
_PACKED_SHAPES = 4  # blocked copies kept per weight (one per input shape seen; a dynamic batch may bring a few)


def _weight_version(weight: Tensor) -> int | None:
    try:
        return int(weight._version)
    except RuntimeError:  # an inference tensor has no version counter: it cannot be cached safely
        return None


def _packed_weight(x: Tensor, weight: Tensor, pad: list[int], stride: list[int], groups: int) -> Tensor:
    """``weight`` reordered into oneDNN's blocked format for this conv (cached; the plain weight where it can't be)."""
    version = _weight_version(weight)
    if version is None or weight.requires_grad:
        return weight
    key = (tuple(x.shape), tuple(pad), tuple(stride), groups)
    entry = _PACKED.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == version:
        hit = entry[2].get(key)
        if hit is not None:
            return hit
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight, pad, stride, [1, 1], groups, list(x.shape))
    with _PACKED_LOCK:
        entry = _PACKED.get(id(weight))
        if entry is None or entry[0]() is not weight or entry[1] != version:
            wid = id(weight)
            ref = weakref.ref(weight, lambda _, wid=wid: _PACKED.pop(wid, None))  # type: ignore[misc]
            entry = (ref, version, {})
            _PACKED[wid] = entry
        if len(entry[2]) >= _PACKED_SHAPES:
            entry[2].pop(next(iter(entry[2])))
        entry[2][key] = packed
    return packed


def conv2d_act(x: Tensor, weight: Tensor, bias: Tensor | None, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
               groups: int, act: int) -> Tensor:
    """A dense conv with a fused activation on oneDNN (``F.conv2d`` and the activation where oneDNN is absent)."""
    x = _cpu_float(x, "conv2d_act")
    # oneDNN's own error for a too-small input is an obscure RuntimeError
    _out_size(x.shape[2], weight.shape[2], stride_h, pad_h, "conv2d_act")
    _out_size(x.shape[3], weight.shape[3], stride_w, pad_w, "conv2d_act")
    if onednn_available():
        attr, scalars = _ONEDNN[_ORDER[act]]
        pad, stride = [pad_h, pad_w], [stride_h, stride_w]
        y = torch.ops.mkldnn._convolution_pointwise(x, _packed_weight(x, weight, pad, stride, groups), bias, pad,
                                                    stride, [1, 1], groups, attr, scalars or [], "")
        return y.contiguous()  # a blocked weight gives a channels-last output: the op's contract is NCHW
    return activate_fresh(F.conv2d(x, weight, bias, (stride_h, stride_w), (pad_h, pad_w), 1, groups), act)


def _conv2d_act_fake(x: Tensor, weight: Tensor, bias: Tensor | None, stride_h: int, stride_w: int, pad_h: int,
                     pad_w: int, groups: int, act: int) -> Tensor:
    kh, kw = weight.shape[2], weight.shape[3]
    _fake_nchw(x, "conv2d_act", weight.shape[1] * groups)
    return x.new_empty((x.shape[0], weight.shape[0], _fake_out_size(x.shape[2], kh, stride_h, pad_h, "conv2d_act"),
                        _fake_out_size(x.shape[3], kw, stride_w, pad_w, "conv2d_act")))


def onednn_bf16_available() -> bool:
    """Whether oneDNN runs bfloat16 convs on this CPU (AVX512-BF16 or AMX; torch's own check)."""
    return onednn_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def conv2d_act_bf16(x: Tensor, weight: Tensor, bias: Tensor | None, stride_h: int, stride_w: int, pad_h: int,
                    pad_w: int, groups: int, act: int) -> Tensor:
    """``conv2d_act`` on oneDNN's bfloat16 convs with a bfloat16 ``weight``.

    A bfloat16 input (read channels-last) gives a bfloat16 channels-last output, with no conversion; a float32 one is
    rounded to bfloat16 first and the output comes back as float32 NCHW.
    """
    x = _cpu_float_or_bf16(x, "conv2d_act_bf16")
    if weight.dtype != torch.bfloat16:
        raise TypeError(f"winoprune::conv2d_act_bf16 needs a bfloat16 weight, got {weight.dtype}")
    _out_size(x.shape[2], weight.shape[2], stride_h, pad_h, "conv2d_act_bf16")
    _out_size(x.shape[3], weight.shape[3], stride_w, pad_w, "conv2d_act_bf16")
    if not onednn_bf16_available():
        raise RuntimeError("winoprune::conv2d_act_bf16: oneDNN has no bfloat16 convs on this CPU (it needs "
                           "AVX512-BF16 or AMX); deploy with precision='fp32'")
    xb = x.to(torch.bfloat16, memory_format=torch.channels_last)
    attr, scalars = _ONEDNN[_ORDER[act]]
    pad, stride = [pad_h, pad_w], [stride_h, stride_w]
    b = None if bias is None else bias.to(torch.bfloat16)
    y = torch.ops.mkldnn._convolution_pointwise(xb, _packed_weight(xb, weight, pad, stride, groups), b, pad, stride,
                                                [1, 1], groups, attr, scalars or [], "")
    if x.dtype == torch.bfloat16:
        return y.contiguous(memory_format=torch.channels_last)
    return y.to(torch.float32, memory_format=torch.contiguous_format)


def _conv2d_act_bf16_fake(x: Tensor, weight: Tensor, bias: Tensor | None, stride_h: int, stride_w: int, pad_h: int,
                          pad_w: int, groups: int, act: int) -> Tensor:
    kh, kw = weight.shape[2], weight.shape[3]
    _fake_nchw(x, "conv2d_act_bf16", weight.shape[1] * groups)
    return _empty_like_layout(x, (x.shape[0], weight.shape[0],
                                  _fake_out_size(x.shape[2], kh, stride_h, pad_h, "conv2d_act_bf16"),
                                  _fake_out_size(x.shape[3], kw, stride_w, pad_w, "conv2d_act_bf16")))


# ------------------------------------------------------------------------------------------------- conv1x1_act
def apply_activation_(y: Tensor, act: int) -> Tensor:
    """``y`` through the activation with native code ``act``, in place."""
    if act == 1:
        return y.relu_()
    if act == 2:
        return y.clamp_(0.0, 6.0)
    if act == 3:
        return F.silu(y, inplace=True)
    if act == 4:
        return F.hardswish(y, inplace=True)
    if act != 0:
        raise ValueError(f"act must be one of {list(range(len(_ORDER)))}, got {act!r}")
    return y


def conv1x1_act(x: Tensor, weight: Tensor, bias: Tensor | None, act: int) -> Tensor:
    """A 1x1 stride-1 conv as one matrix product per image (no layout reorders), bias and activation in place."""
    x = _cpu_float(x, "conv1x1_act")
    n, c, h, w = x.shape
    k = weight.shape[0]
    mat = weight.reshape(k, c)
    out = torch.empty(n, k, h, w)
    for i in range(n):
        if bias is None:
            torch.mm(mat, x[i].reshape(c, h * w), out=out[i].view(k, h * w))
        else:
            torch.addmm(bias.unsqueeze(1), mat, x[i].reshape(c, h * w), out=out[i].view(k, h * w))
    return apply_activation_(out, act)


def _conv1x1_act_fake(x: Tensor, weight: Tensor, bias: Tensor | None, act: int) -> Tensor:
    _fake_nchw(x, "conv1x1_act", weight.shape[1])
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


# -------------------------------------------------------------------------------------------------- max_pool2d
def max_pool2d(x: Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
               threads: int) -> Tensor:
    """Max pooling of NCHW planes (PyTorch's NCHW pooling is slow at small batches); NaN propagates."""
    x = _cpu_float(x, "max_pool2d")
    n, c, h, w = x.shape
    out = torch.empty(n, c, _out_size(h, kernel_h, stride_h, pad_h, "max_pool2d"),
                      _out_size(w, kernel_w, stride_w, pad_w, "max_pool2d"))
    native_module().max_pool_run(x.numpy(), kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out.numpy(),
                                 threads)
    return out


def _max_pool2d_fake(x: Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                     threads: int) -> Tensor:
    _fake_nchw(x, "max_pool2d")
    return x.new_empty((x.shape[0], x.shape[1], _fake_out_size(x.shape[2], kernel_h, stride_h, pad_h, "max_pool2d"),
                        _fake_out_size(x.shape[3], kernel_w, stride_w, pad_w, "max_pool2d")))


for _name, _impl, _fake in (("winograd_conv", winograd_conv, _winograd_conv_fake),
                             ("winograd_conv_bf16", winograd_conv_bf16, _winograd_conv_bf16_fake),
                             ("conv2d_act_bf16", conv2d_act_bf16, _conv2d_act_bf16_fake),
                             ("max_pool2d", max_pool2d, _max_pool2d_fake),
                             ("conv1x1_act", conv1x1_act, _conv1x1_act_fake),
                             ("depthwise_conv", depthwise_conv, _depthwise_conv_fake),
                             ("conv2d_act", conv2d_act, _conv2d_act_fake)):
    _LIB.impl(_name, _impl, "CPU")
    torch.library.register_fake(f"winoprune::{_name}", _fake, lib=_LIB)
    torch.library.register_autograd(f"winoprune::{_name}", _inference_only(_name), lib=_LIB)
