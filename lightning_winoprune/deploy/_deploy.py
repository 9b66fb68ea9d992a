"""``deploy``: turn a pruned model into the fast inference model that the latency report measures and users ship.

The pipeline, on a copy of the model in eval mode:

1. **Record** one forward pass on the example input with hooks: which conv feeds which BatchNorm, which BatchNorm
   (or conv) feeds which activation, and every layer's input.
2. **Fold** each BatchNorm into the conv before it (exact: a Winograd layer's ``U`` rows are scaled per output
   channel, so its mask is unchanged) and **fuse** the activation after it (ReLU, ReLU6, SiLU, Hardswish) into the
   conv's output stage.
3. **Route** every conv: each candidate (our pruned Winograd kernel, its CSR form, our pruned depthwise kernel, our
   dense Winograd kernels for unpruned 3x3 convs, oneDNN with the activation fused, ``F.conv2d``, a ``Linear`` for a
   conv that covers its whole input) is built, checked against the layer's recorded output and, with ``tune=True``,
   timed at the example input's shape; the fastest accurate one wins.
4. **Check** the deployed model's output against the model's (relative max error <= 1e-4, 1e-3 when an F(4,3) route
   runs) and raise :class:`DeployMismatchError` if it differs.

The result is an ordinary ``nn.Module`` whose pruned layers run the ``winoprune::`` torch custom ops: it deep-copies,
saves through ``state_dict``, compiles with ``torch.compile(fullgraph=True)``, exports with ``torch.export`` (a
dynamic batch by default; :func:`deploy`'s ``dynamic`` chooses which dims stay free) and is safe to call from
several threads.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from lightning_winoprune.deploy._ops import Activation, onednn_available
from lightning_winoprune.deploy._packed import (
    DenseConv,
    DenseRoute,
    NativeMaxPool2d,
    PackedDepthwiseConv,
    PackedWinogradConv,
    SparseForm,
)
from lightning_winoprune.deploy._shapes import DeployShapes, check_dynamic, resolve_shapes
from lightning_winoprune.deploy._timing import cache_flusher, median_ms, rel_error, threads_context
from lightning_winoprune.kernels._backend import Backend, native_available
from lightning_winoprune.winograd._layer import WinogradConv2d
from lightning_winoprune.winograd._tiles import filter_transform
from lightning_winoprune.winograd._transforms import get_transforms

__all__ = ["DeployMismatchError", "DeployReport", "LayerRoute", "deploy"]

#: Activation modules that fuse into a conv's output stage.
_ACTIVATIONS: dict[type[nn.Module], Activation] = {
    nn.ReLU: Activation.RELU, nn.ReLU6: Activation.RELU6, nn.SiLU: Activation.SILU, nn.Hardswish: Activation.HARDSWISH,
}
#: Relative max error allowed per layer and for the whole model: F(2,3)-like routes, and F(4,3).
_TOL_M2, _TOL_M4 = 1e-4, 1e-3
_MASK = "weight_mask"


class DeployMismatchError(RuntimeError):
    """The deployed model's output differs from the model's by more than the tolerance."""


@dataclass
class LayerRoute:
    """How one conv of the deployed model runs, and what every candidate route measured.

    Attributes:
        name: Module name of the conv in the model.
        kind: ``"winograd"`` (a :class:`~lightning_winoprune.winograd.WinogradConv2d`), ``"depthwise"`` (a
            DEPrune-masked depthwise conv), ``"conv"`` (any other conv) or ``"pool"`` (an ``nn.MaxPool2d``, on the
            native pooling kernel where that is faster).
        shape: ``"C->K HxW"`` of its input, with the kernel and stride.
        route: The chosen route.
        folded: The BatchNorm folded into it, or ``""``.
        act: The activation fused into it.
        times_ms: Median ms of every candidate that was timed (empty with ``tune=False``).
        errors: Relative max error of every candidate against the layer's recorded output.
        dense_ms: Median ms of the layer's dense route (oneDNN or ``F.conv2d`` with the same shape and activation),
            the reference of ``speedup``; ``None`` when not timed.
        note: Why a candidate was left out or a fallback happened.

    """

    name: str
    kind: str
    shape: str
    route: str
    folded: str = ""
    act: str = "none"
    times_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    dense_ms: float | None = None
    note: str = ""

    @property
    def ms(self) -> float | None:
        """Median ms of the chosen route, when timed."""
        return self.times_ms.get(self.route)

    @property
    def speedup(self) -> float | None:
        """Dense route / chosen route."""
        if self.ms is None or self.dense_ms is None or self.ms <= 0:
            return None
        return self.dense_ms / self.ms


@dataclass
class DeployReport:
    """What :func:`deploy` did: one :class:`LayerRoute` per conv, and the whole-model check and times.

    Attributes:
        layers: One row per conv, in forward order.
        batch_size: The example input's batch size.
        input_size: Its ``(H, W)``.
        threads: CPU threads used for timing.
        tuned: Whether routes were chosen by measurement.
        max_error: Relative max error of the deployed model's output against the model's.
        tolerance: The allowed error.
        model_ms: Median ms of the deployed model (``None`` unless timed).
        original_ms: Median ms of the model as given, on torch eager (``None`` unless timed).
        notes: Fallbacks and warnings, one line each.

    """

    layers: list[LayerRoute]
    batch_size: int
    input_size: tuple[int, int]
    threads: int
    tuned: bool
    max_error: float
    tolerance: float
    model_ms: float | None = None
    original_ms: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def routes(self) -> dict[str, str]:
        """Layer name -> chosen route."""
        return {r.name: r.route for r in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {**{k: v for k, v in asdict(self).items() if k != "layers"},
                "layers": [{**asdict(r), "ms": r.ms, "speedup": r.speedup} for r in self.layers]}

    def table(self) -> Table:
        """The routes as a rich table."""
        title = (f"Deployed routes (batch {self.batch_size}, {self.input_size[0]}x{self.input_size[1]}, "
                 f"{self.threads} threads{', tuned' if self.tuned else ''})")
        t = Table(title=title, title_style="bold")
        for col in ("layer", "shape", "fused", "route", "ms", "dense ms", "speedup", "candidates (ms)"):
            t.add_column(col, justify="left" if col in ("layer", "shape", "fused", "route", "candidates (ms)")
                         else "right")
        for r in self.layers:
            fused = "+".join(x for x in (r.folded and "bn", "" if r.act == "none" else r.act) if x)
            cands = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r.times_ms.items(), key=lambda kv: kv[1]))
            t.add_row(r.name, r.shape, fused, r.route, "-" if r.ms is None else f"{r.ms:.3f}",
                      "-" if r.dense_ms is None else f"{r.dense_ms:.3f}",
                      "-" if r.speedup is None else f"{r.speedup:.2f}x", cands)
        t.add_section()
        whole = "-"
        if self.model_ms is not None and self.original_ms is not None:
            whole = f"{self.original_ms / self.model_ms:.2f}x"
        t.add_row("whole model", "as given (eager) / deployed", "", "",
                  "-" if self.model_ms is None else f"{self.model_ms:.3f}",
                  "-" if self.original_ms is None else f"{self.original_ms:.3f}", whole,
                  f"max error {self.max_error:.1e} (tolerance {self.tolerance:.0e})")
        return t

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        console = Console(width=160, record=True, file=None, force_terminal=False)
        with console.capture() as cap:
            console.print(self.table())
            for note in self.notes:
                console.print(f"note: {note}")
        return cap.get()


# ------------------------------------------------------------------------------------------------ helpers
def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _is_conv(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Conv2d, WinogradConv2d))


def _activation_of(mod: nn.Module) -> Activation | None:
    for cls, act in _ACTIVATIONS.items():
        if type(mod) is cls:
            return act
    return None


def _bn_act(bn: nn.Module) -> nn.Module | None:
    """The activation module inside a timm ``BatchNormAct2d``-style BatchNorm (``None`` for a plain one)."""
    act = getattr(bn, "act", None)
    return act if isinstance(act, nn.Module) and not isinstance(act, nn.Identity) else None


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(y) == scale * y + shift`` per channel, in eval mode."""
    var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros(bn.num_features)
    scale = torch.rsqrt(var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


@dataclass
class _Chain:
    """A conv with the BatchNorm and activation that only it feeds."""

    name: str
    conv: nn.Module
    x: torch.Tensor  # its recorded input
    ref: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # the recorded output of the chain's last module
    bn_name: str = ""
    bn: nn.BatchNorm2d | None = None
    act_name: str = ""  # a separate activation module to drop ("" when fused inside the BatchNorm or none)
    act: Activation = Activation.NONE
    keep_bn_act: nn.Module | None = None  # an unfusable activation inside a BatchNormAct module: it stays


def _record(model: nn.Module, x: torch.Tensor) -> tuple[list[_Chain], torch.Tensor]:
    """One forward pass with hooks: every conv's chain (conv -> BatchNorm -> activation) and the model's output.

    A link is made only where the next module reads the very tensor the previous one wrote, unmodified (its version
    counter unchanged: an in-place residual add in between breaks the link), and nothing else that was recorded reads
    it (pass-through ``nn.Identity`` modules aside). What the hooks cannot see (a functional op reading the same
    tensor) is caught by the deployed model's output check.
    """
    names = {id(m): n for n, m in model.named_modules()}
    calls: list[tuple[nn.Module, list[tuple[int, int]], int, int]] = []  # module, [(id, version)], out id, version
    keep: list[torch.Tensor] = []  # keeps recorded tensors alive so their ids stay unique
    pending: dict[int, list[list[tuple[int, int]]]] = {}
    conv_inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    count: dict[int, int] = {}

    def pre_hook(mod: nn.Module, inp: tuple[Any, ...]) -> None:
        tensors = [t for t in inp if isinstance(t, torch.Tensor)]
        keep.extend(tensors)
        pending.setdefault(id(mod), []).append([(id(t), t._version) for t in tensors])
        if _is_conv(mod) and tensors:
            conv_inputs.setdefault(id(mod), tensors[0].detach().clone())

    def hook(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        ins = pending[id(mod)].pop()
        count[id(mod)] = count.get(id(mod), 0) + 1
        is_tensor = isinstance(out, torch.Tensor)
        if is_tensor:
            keep.append(out)
            outputs[len(calls)] = out.detach().clone()
        calls.append((mod, ins, id(out) if is_tensor else -1, out._version if is_tensor else -1))

    recorded = [m for m in model.modules()
                if _is_conv(m) or isinstance(m, nn.BatchNorm2d) or not any(True for _ in m.children())]
    pre = [m.register_forward_pre_hook(pre_hook) for m in recorded]
    post = [m.register_forward_hook(hook) for m in recorded]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in pre + post:
            h.remove()
    consumers: dict[int, list[int]] = {}
    for i, (_, ins, _, _) in enumerate(calls):
        for t, _ in ins:
            consumers.setdefault(t, []).append(i)

    def follow(i: int) -> int | None:
        """The one recorded reader of call i's output, past pass-through Identities, if it reads it unmodified."""
        tensor, version = calls[i][2], calls[i][3]
        readers = [j for j in consumers.get(tensor, []) if j != i]
        while readers and isinstance(calls[readers[0]][0], nn.Identity) and calls[readers[0]][2] == tensor:
            readers = readers[1:]
        if not readers:
            return None
        j = readers[0]
        if dict(calls[j][1]).get(tensor) != version:  # modified in between (an in-place op the hooks did not see)
            return None
        inplace = calls[j][2] == tensor
        if not inplace and any(not isinstance(calls[r][0], nn.Identity) for r in readers[1:]):
            return None
        return j

    chains = []
    for i, (mod, _, _, _) in enumerate(calls):
        if not _is_conv(mod) or count[id(mod)] != 1 or id(mod) not in conv_inputs:
            continue
        chain = _Chain(names[id(mod)], mod, conv_inputs[id(mod)], outputs.get(i, torch.empty(0)))
        last = i
        j = follow(last)
        bn = calls[j][0] if j is not None else None
        if (j is not None and isinstance(bn, nn.BatchNorm2d) and count[id(bn)] == 1 and not bn.training
                and bn.num_features == chain.conv.out_channels and j in outputs):
            chain.bn_name, chain.bn = names[id(bn)], bn
            last = j
            chain.ref = outputs[last]
            inner = _bn_act(bn)
            if inner is not None:
                fusable = _activation_of(inner)
                if fusable is None:
                    chain.keep_bn_act = inner
                else:
                    chain.act = fusable
                chains.append(chain)
                continue
        j = follow(last)
        act = calls[j][0] if j is not None else None
        if j is not None and act is not None and _activation_of(act) is not None and count[id(act)] == 1 \
                and j in outputs:
            chain.act_name, chain.act = names[id(act)], _activation_of(act)  # type: ignore[assignment]
            chain.ref = outputs[j]
        chains.append(chain)
    return chains, y


# --------------------------------------------------------------------------------------------- candidates
def _folded_winograd(layer: WinogradConv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                              torch.Tensor | None]:
    """``(U, mask, bias)`` with the BatchNorm folded in: ``U``'s rows scaled per output channel."""
    u = layer.weight.detach().double().cpu()
    bias = None if layer.bias is None else layer.bias.detach().double().cpu()
    mask = None if layer.mask is None else layer.mask.cpu()
    if bn is not None:
        scale, shift = _bn_affine(bn)
        u = u * scale.view(-1, 1, 1, 1)
        bias = shift if bias is None else bias * scale + shift
    return u.float(), mask, None if bias is None else bias.float()


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                    torch.Tensor | None]:
    """``(weight, mask, bias)`` with masked weights zeroed (pruned weights are absent) and the BatchNorm folded in."""
    w = conv.weight.detach().double().cpu()
    mask = getattr(conv, _MASK, None)
    mask = mask.detach().bool().cpu() if isinstance(mask, torch.Tensor) and mask.shape == w.shape else None
    if mask is not None:
        w = torch.where(mask, w, torch.zeros((), dtype=w.dtype))
    bias = None if conv.bias is None else conv.bias.detach().double().cpu()
    if bn is not None:
        scale, shift = _bn_affine(bn)
        w = w * scale.view(-1, 1, 1, 1)
        bias = shift if bias is None else bias * scale + shift
    return w.float(), mask, None if bias is None else bias.float()


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


def _is_masked_depthwise(conv: nn.Module) -> bool:
    mask = getattr(conv, _MASK, None)
    return (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels
            and conv.weight.shape[1] == 1 and isinstance(mask, torch.Tensor) and not bool(mask.all())
            and tuple(conv.dilation) == (1, 1) and not isinstance(conv.padding, str)
            and conv.padding_mode == "zeros")


def _dense_candidates(w: torch.Tensor, b: torch.Tensor | None, conv: nn.Conv2d, act: Activation,
                      x: torch.Tensor, fixed_hw: bool = True) -> dict[str, Callable[[], nn.Module]]:
    stride, padding = tuple(conv.stride), tuple(conv.padding)
    out: dict[str, Callable[[], nn.Module]] = {
        "eager": lambda: DenseConv(w, b, stride, padding, conv.groups, DenseRoute.EAGER, act),  # type: ignore[arg-type]
    }
    if onednn_available():
        out["onednn"] = lambda: DenseConv(w, b, stride, padding, conv.groups, DenseRoute.ONEDNN, act)  # type: ignore[arg-type]
    if fixed_hw and conv.groups == 1 and padding == (0, 0) and tuple(x.shape[2:]) == tuple(w.shape[2:]):
        out["linear"] = lambda: DenseConv(w, b, stride, padding, 1, DenseRoute.LINEAR, act)  # type: ignore[arg-type]
    if conv.groups == 1 and padding == (0, 0) and stride == (1, 1) and tuple(w.shape[2:]) == (1, 1):
        out["gemm"] = lambda: DenseConv(w, b, stride, padding, 1, DenseRoute.GEMM, act)
    return out


def _candidates(chain: _Chain, threads: int, backend: Backend,
                fixed_hw: bool = True) -> tuple[str, dict[str, Callable[[], nn.Module]], str]:
    """``(kind, name -> module factory, note)`` for one conv chain (``fixed_hw=False``: routes for any H x W)."""
    conv, act, native = chain.conv, chain.act, backend is Backend.NATIVE
    if isinstance(conv, WinogradConv2d):
        u, mask, b = _folded_winograd(conv, chain.bn)
        out: dict[str, Callable[[], nn.Module]] = {}
        note = ""
        if conv.m in (2, 4):
            out["winograd"] = lambda: PackedWinogradConv(u, mask, conv.m, conv.padding, b, SparseForm.STRUCTURED,
                                                         backend, threads, act)
            if native and mask is not None and not bool(mask.all()):
                out["csr"] = lambda: PackedWinogradConv(u, mask, conv.m, conv.padding, b, SparseForm.CSR, backend,
                                                        threads, act)
        else:
            note = f"no native kernel for F({conv.m},3)"
        g = None if mask is not None and not bool(mask.all()) else _spatial_equivalent(u, conv.m)
        if g is not None:  # unpruned: the dense routes compute the same function
            dense = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=conv.padding)
            out.update(_dense_candidates(g, b, dense, act, chain.x, fixed_hw))
        elif not out:
            note += "; kept on its own (torch) path"
        return "winograd", out, note
    assert isinstance(conv, nn.Conv2d)
    w, mask, b = _folded_conv(conv, chain.bn)
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or tuple(conv.dilation) != (1, 1):
        return "conv", {}, f"kept as nn.Conv2d (padding_mode={conv.padding_mode!r}, padding={conv.padding!r}, " \
                           f"dilation={tuple(conv.dilation)})"
    out = _dense_candidates(w, b, conv, act, chain.x, fixed_hw)
    if _is_masked_depthwise(conv):
        out["depthwise"] = lambda: PackedDepthwiseConv(w, mask, tuple(conv.stride), tuple(conv.padding), b,  # type: ignore[arg-type]
                                                       backend, threads, act)
        return "depthwise", out, ""
    if native and _plain_3x3(conv) and conv.in_channels >= 4:
        padding: tuple[int, int] = (int(conv.padding[0]), int(conv.padding[1]))

        def dense_winograd(m: int) -> nn.Module:
            u = filter_transform(w.double(), m, Backend.TORCH).float()
            return PackedWinogradConv(u, None, m, padding, b, SparseForm.STRUCTURED, backend, threads, act)

        for m in (2, 4):
            out[f"winograd-f{m}"] = functools.partial(dense_winograd, m)
    return "conv", out, ""


def _tolerance(route: str, conv: nn.Module) -> float:
    if route == "winograd-f4" or (isinstance(conv, WinogradConv2d) and conv.m == 4 and route in ("winograd", "csr")):
        return _TOL_M4
    return _TOL_M2


def _shape(chain: _Chain) -> str:
    conv, x = chain.conv, chain.x
    hw = f"{x.shape[-2]}x{x.shape[-1]}"
    if isinstance(conv, WinogradConv2d):
        return f"{conv.in_channels}->{conv.out_channels} {hw} F({conv.m},3)"
    assert isinstance(conv, nn.Conv2d)
    kind = " dw" if conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1 else ""
    return f"{conv.in_channels}->{conv.out_channels}{kind} {hw} k{conv.kernel_size[0]} s{conv.stride[0]}"


def _dense_reference(chain: _Chain, act: Activation) -> Callable[[], object] | None:
    """The layer's dense route with random weights (for a Winograd layer pruned beyond any spatial equivalent)."""
    conv = chain.conv
    if not isinstance(conv, WinogradConv2d):
        return None
    w = torch.randn(conv.out_channels, conv.in_channels, 3, 3) * (2.0 / (9 * conv.in_channels)) ** 0.5
    route = DenseRoute.ONEDNN if onednn_available() else DenseRoute.EAGER
    mod = DenseConv(w, torch.zeros(conv.out_channels), (1, 1), conv.padding, 1, route, act)
    return lambda: mod(chain.x)


# ------------------------------------------------------------------------------------------------ deploy
def _check_args(model: nn.Module, example_input: torch.Tensor, repeats: int, threads: int | None,
                dynamic: str = "batch") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("deploy needs a model in eval mode (BatchNorm statistics and dropout would change the "
                         "output otherwise): call model.eval() first")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4 or not example_input.is_floating_point():
        raise ValueError("example_input must be a floating-point (N, C, H, W) tensor, got "
                         f"{getattr(example_input, 'shape', type(example_input).__name__)}")
    if example_input.shape[0] < 1:
        raise ValueError(f"example_input must hold at least one image, got shape {tuple(example_input.shape)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    check_dynamic(dynamic)


def deploy(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    tune: bool = True,
    fold_bn: bool = True,
    fuse_activation: bool = True,
    threads: int | None = None,
    repeats: int = 10,
    warmup: int = 2,
    backend: Backend | str = Backend.AUTO,
    tolerance: float | None = None,
    time_model: bool = True,
    verbose: bool = True,
    cold_cache: bool = True,
    dynamic: str = "batch",
) -> nn.Module:
    """Turn a pruned model into the fast inference model: BN folded, activations fused, the fastest route per conv.

    Every :class:`~lightning_winoprune.winograd.WinogradConv2d` runs our packed Winograd kernel (its mask's kept
    panels only), every DEPrune-masked depthwise conv our kept-taps kernel, and every other conv the fastest dense
    route, each with the BatchNorm after it folded in and the activation after that fused into its output stage.
    With ``tune=True`` each layer's candidates are timed at ``example_input``'s shape, so no layer ends up slower
    than the dense route it could take; every candidate is checked against the layer's own output first.

    Physically removing pruned pointwise filters is a separate step: ``DEPrune(physical=True)`` does it at the end of
    fit (and :func:`~lightning_winoprune.load_pruned_checkpoint` replays it); deploy the shrunk model.

    Args:
        model: The pruned model, in eval mode (on any device; the deployed model runs on the CPU in float32).
        example_input: An ``(N, C, H, W)`` batch: routes are tuned, and the output checked, at its shape.
        tune: Choose each conv's route by measuring its candidates (else a fixed rule: our kernels for pruned
            layers, oneDNN for the rest).
        fold_bn: Fold BatchNorms into the convs before them.
        fuse_activation: Fuse ReLU / ReLU6 / SiLU / Hardswish into the convs before them.
        threads: CPU threads for timing and the deployed kernels (``None``: torch's current count at call time).
        repeats: Timed rounds per candidate median.
        warmup: Untimed runs of every candidate first.
        backend: ``"auto"`` (native kernels where the extension is loaded), ``"native"`` or ``"torch"``.
        tolerance: Largest relative max error of the output (default 1e-4, 1e-3 when an F(4,3) route runs).
        time_model: Also time the whole deployed model against the model as given (the report's last row).
        verbose: Print the route table (rich).
        cold_cache: Time every candidate with cold caches (a large buffer is written before each timed call), as
            the layer runs inside a network whose weights exceed the cache. ``False`` times them warm, which favours
            routes with large weights (a dense F(4,3) layer holds 4x the weights of its 3x3 conv).
        dynamic: Which input dims the exported model leaves free (:func:`~lightning_winoprune.deploy.export_deployed`
            reads it): ``"batch"`` (any batch size), ``"none"`` (the example's shape only), ``"batch+hw"`` (any batch
            size and any H, W from the smallest the model runs at up to 4096) or ``"hw"`` (H and W only). With a
            dynamic H / W no route that fits one input size only is chosen (a ``Linear`` for a conv that covers its
            whole input), the smallest H and W are found by probing, and the output is also checked at that size
            and at a larger, odd one (routes are still timed at ``example_input``'s shape only).

    Returns:
        The deployed ``nn.Module`` (eval mode, CPU float32); its ``deploy_report`` attribute holds the
        :class:`DeployReport`, its ``deploy_shapes`` the :class:`~lightning_winoprune.deploy.DeployShapes`.

    Raises:
        ValueError: On a model in training mode, a bad ``example_input``, ``repeats``, ``threads``, ``tolerance`` or
            ``dynamic``, or, with a dynamic H / W, a model that fails at a size inside the range.
        TypeError: If ``model`` is not an ``nn.Module``.
        DeployMismatchError: If the deployed model's output differs from the model's beyond the tolerance.

    """
    _check_args(model, example_input, repeats, threads, dynamic)
    if tolerance is not None and not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}")
    backend = Backend.parse(backend, "backend")
    if backend is Backend.AUTO:
        backend = Backend.NATIVE if native_available() else Backend.TORCH
    if backend is Backend.NATIVE and not native_available():
        raise ValueError("backend='native' but the native extension is unavailable (lightning_winoprune."
                         "extension_status() says why)")
    n_threads = threads or torch.get_num_threads()
    kernel_threads = -1 if threads is None else threads
    x = example_input.detach().to("cpu", torch.float32).contiguous()
    work = copy.deepcopy(model).to("cpu").float().eval()
    notes: list[str] = []
    rows: list[LayerRoute] = []
    flush = cache_flusher() if tune and cold_cache else None
    with torch.no_grad(), threads_context(n_threads):
        chains, reference = _record(work, x)
        for chain in chains:
            if not fold_bn:
                chain.bn, chain.bn_name, chain.keep_bn_act = None, "", None
                chain.act, chain.act_name = Activation.NONE, ""
                chain.ref = torch.empty(0)
            elif not fuse_activation and (chain.act is not Activation.NONE):
                chain.act, chain.act_name = Activation.NONE, ""
                if chain.bn is not None and _bn_act(chain.bn) is not None:
                    chain.keep_bn_act = _bn_act(chain.bn)
                chain.ref = torch.empty(0)
            kind, factories, note = _candidates(chain, kernel_threads, backend, fixed_hw="hw" not in dynamic)
            row = LayerRoute(chain.name, kind, _shape(chain), "module", chain.bn_name, chain.act.value, note=note)
            rows.append(row)
            if not factories:
                if note:
                    notes.append(f"{chain.name}: {note}")
                    warnings.warn(f"deploy: {chain.name} {note}", RuntimeWarning, stacklevel=2)
                _keep_module(work, chain)
                continue
            ref = chain.ref if chain.ref.numel() else _chain_reference(chain)
            built: dict[str, nn.Module] = {}
            for key, make in factories.items():
                try:
                    mod = make().eval()
                    err = rel_error(mod(chain.x), ref)
                except (ValueError, TypeError, RuntimeError) as exc:  # a candidate that does not apply here
                    row.note = (row.note + "; " if row.note else "") + f"{key} skipped: {exc}"
                    continue
                row.errors[key] = err
                if err <= _tolerance(key, chain.conv):
                    built[key] = mod
            if not built:
                raise DeployMismatchError(f"{chain.name}: no route reproduces the layer's output within tolerance "
                                          f"(errors: {row.errors})")
            if tune and len(built) > 1:
                fns: dict[str, Callable[[], object]] = {k: functools.partial(m, chain.x) for k, m in built.items()}
                dense_fn = _dense_reference(chain, chain.act)
                if dense_fn is not None:
                    fns["dense-reference"] = dense_fn
                row.times_ms = median_ms(fns, repeats, warmup, flush)
                row.dense_ms = row.times_ms.pop("dense-reference", None)
                if row.dense_ms is None:
                    row.dense_ms = min(v for k, v in row.times_ms.items() if k in ("eager", "onednn", "linear", "gemm"))
                row.route = min(row.times_ms, key=row.times_ms.__getitem__)
            else:
                row.route = _rule(built)
            _install(work, chain, built[row.route])
        if backend is Backend.NATIVE:
            rows.extend(_route_pools(work, x, tune, repeats, warmup, kernel_threads, flush))
        out = work(x)
        used_m4 = any(r.route == "winograd-f4" or (r.kind == "winograd" and "F(4,3)" in r.shape) for r in rows)
        tol = tolerance if tolerance is not None else (_TOL_M4 if used_m4 else _TOL_M2)
        err = rel_error(out, reference)
        if not err <= tol:
            raise DeployMismatchError(
                f"the deployed model's output differs from the model's by {err:.2e} (relative max error, tolerance "
                f"{tol:.0e}); deploy with fold_bn=False or fuse_activation=False to find the layer, and please "
                "report it"
            )
        shapes = _checked_shapes(dynamic, x, work, model, tol, notes)
        report = DeployReport(rows, int(x.shape[0]), (int(x.shape[2]), int(x.shape[3])), n_threads, tune, err, tol,
                              notes=notes)
        if time_model:
            original = copy.deepcopy(model).to("cpu").float().eval()
            times = median_ms({"deployed": lambda: work(x), "original": lambda: original(x)}, max(3, repeats // 2),
                               warmup)
            report.model_ms, report.original_ms = times["deployed"], times["original"]
    work.deploy_report = report  # type: ignore[assignment]
    work.deploy_shapes = shapes  # type: ignore[assignment]
    if verbose:
        Console().print(report.table())
        for note in notes:
            Console().print(f"note: {note}")
    return work


def _checked_shapes(dynamic: str, x: torch.Tensor, work: nn.Module, model: nn.Module, tol: float,
                    notes: list[str]) -> DeployShapes:
    """The deployed model's :class:`DeployShapes`; with a dynamic H / W, its output checked at two more sizes."""
    shapes, checks = resolve_shapes(dynamic, x, work, model)
    for (h, w), err in checks:
        if not err <= tol:
            raise DeployMismatchError(
                f"with dynamic={dynamic!r} the deployed model's output differs from the model's at {h}x{w} by "
                f"{err:.2e} (relative max error, tolerance {tol:.0e}; routes were chosen at {x.shape[2]}x"
                f"{x.shape[3]}); deploy with dynamic='batch', and please report it"
            )
    if checks:
        (lo_h, lo_w), (hi_h, hi_w) = shapes.min_hw, shapes.max_hw
        done = ", ".join(f"{h}x{w} (error {err:.1e})" for (h, w), err in checks)
        notes.append(f"dynamic={dynamic!r}: H x W from {lo_h}x{lo_w} to {hi_h}x{hi_w}; routes chosen at "
                     f"{x.shape[2]}x{x.shape[3]}, output also checked at {done}")
    return shapes


def _route_pools(work: nn.Module, x: torch.Tensor, tune: bool, repeats: int, warmup: int, threads: int,
                 flush: Callable[[], None] | None) -> list[LayerRoute]:
    """Every ``nn.MaxPool2d`` on the native pooling kernel where it is exact (and, when tuned, faster)."""
    pools = {name: mod for name, mod in work.named_modules() if type(mod) is nn.MaxPool2d}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_pre_hook(lambda m, inp, n=name: inputs.setdefault(n, inp[0].detach().clone()))
             for name, mod in pools.items()]
    try:
        work(x)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, pool in pools.items():
        if name not in inputs or inputs[name].dim() != 4:
            continue
        xin = inputs[name]
        shape = f"{xin.shape[1]} {xin.shape[-2]}x{xin.shape[-1]} k{pool.kernel_size} s{pool.stride}"
        row = LayerRoute(name, "pool", shape, "eager")
        rows.append(row)
        try:
            native = NativeMaxPool2d.from_module(pool, threads)
            exact = torch.equal(native(xin), pool(xin))
        except ValueError as err:
            row.note = f"native skipped: {err}"
            continue
        row.errors = {"eager": 0.0, "native": 0.0 if exact else float("inf")}
        if not exact:
            continue
        if tune:
            row.times_ms = median_ms({"native": functools.partial(native, xin),
                                       "eager": functools.partial(pool, xin)}, repeats, warmup, flush)
            row.dense_ms = row.times_ms["eager"]
            row.route = min(row.times_ms, key=row.times_ms.__getitem__)
        else:
            row.route = "native"
        if row.route == "native":
            _set_module(work, name, native)
    return rows


def _rule(built: dict[str, nn.Module]) -> str:
    for key in ("winograd", "depthwise", "linear", "gemm", "onednn", "eager"):
        if key in built:
            return key
    return next(iter(built))


def _chain_reference(chain: _Chain) -> torch.Tensor:
    """The chain's output computed from its original modules (when the recorded one does not match the fusion)."""
    y = chain.conv(chain.x)
    if chain.bn is not None:
        y = F.batch_norm(y, chain.bn.running_mean, chain.bn.running_var, chain.bn.weight, chain.bn.bias, False, 0.0,
                         chain.bn.eps)
    return y


def _install(work: nn.Module, chain: _Chain, mod: nn.Module) -> None:
    _set_module(work, chain.name, mod)
    if chain.bn is not None:
        _set_module(work, chain.bn_name, chain.keep_bn_act if chain.keep_bn_act is not None else nn.Identity())
    if chain.act_name:
        _set_module(work, chain.act_name, nn.Identity())


def _keep_module(work: nn.Module, chain: _Chain) -> None:
    """Leave the conv as it is but still fold its BatchNorm when it is a plain ``nn.Conv2d``."""
    if chain.bn is not None and isinstance(chain.conv, nn.Conv2d) and chain.keep_bn_act is None and not chain.act_name:
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(chain.conv, chain.bn)
        _set_module(work, chain.name, fused)
        act = _bn_act(chain.bn)
        _set_module(work, chain.bn_name, act if act is not None else nn.Identity())
