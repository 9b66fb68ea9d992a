"""The passes of :func:`~lightning_winoprune.deploy.deploy`, in order (:data:`PASSES`).

record, fold, fuse, route, pack, pools, precision (a ``bf16`` model's boundary), check, report.

Each pass takes the :class:`DeployState` (the working copy of the model and what the earlier passes learnt about it)
and returns it; :data:`PASSES` names them, so a test (or a new pass) can run the pipeline up to any step.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from lightning_winoprune._utils import MASK_ATTR, is_depthwise, median_ms, set_submodule
from lightning_winoprune.deploy._ops import Activation
from lightning_winoprune.deploy._packed import NativeMaxPool2d
from lightning_winoprune.deploy._packed_bf16 import Bf16Model, PackedWinogradConvBf16
from lightning_winoprune.deploy._record import Chain, bn_act, record
from lightning_winoprune.deploy._report import DeployMismatchError, DeployReport, LayerRoute
from lightning_winoprune.deploy._routes import (
    DENSE_ROUTES,
    TOL_BF16_MODEL,
    TOL_M2,
    TOL_M4,
    DeployRoute,
    Precision,
    candidates,
    dense_reference,
    rule_route,
    tolerance,
)
from lightning_winoprune.deploy._shapes import DeployShapes, resolve_shapes
from lightning_winoprune.deploy._timing import rel_error
from lightning_winoprune.kernels._backend import Backend
from lightning_winoprune.winograd._layer import WinogradConv2d

__all__ = ["PASSES", "DeployOptions", "DeployState", "run_passes"]


@dataclass(frozen=True)
class DeployOptions:
    """:func:`deploy`'s arguments, validated and resolved (``backend`` is ``native`` or ``torch``)."""

    tune: bool = True
    fold_bn: bool = True
    fuse_activation: bool = True
    threads: int = 1  # CPU threads for timing
    kernel_threads: int = -1  # the deployed kernels' threads (-1: torch's count at call time)
    repeats: int = 10
    warmup: int = 2
    backend: Backend = Backend.TORCH
    tolerance: float | None = None
    time_model: bool = True
    dynamic: str = "batch"
    flush: Callable[[], None] | None = None  # runs before every timed call (cold caches)
    precision: Precision = Precision.FP32


@dataclass
class DeployState:
    """The working copy of the model and what the passes learnt about it."""

    model: nn.Module  # the model as given (never changed)
    work: nn.Module  # the copy the passes turn into the deployed model
    x: torch.Tensor
    options: DeployOptions
    reference: torch.Tensor | None = None  # the model's output on x
    chains: list[Chain] = field(default_factory=list)
    rows: list[LayerRoute] = field(default_factory=list)
    chosen: dict[str, nn.Module] = field(default_factory=dict)  # chain name -> the module of its route
    notes: list[str] = field(default_factory=list)
    error: float = float("inf")
    top1_agreement: float | None = None
    tol: float = TOL_M2
    shapes: DeployShapes | None = None
    report: DeployReport | None = None


def record_pass(state: DeployState) -> DeployState:
    """Record one forward pass: every conv's chain (conv -> BatchNorm -> activation) and the model's output."""
    state.chains, state.reference = record(state.work, state.x)
    return state


def _fold_bn(weight: torch.Tensor, bias: torch.Tensor | None,
             bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight`` (any ``(K, ...)`` layout: a conv's or a Winograd ``U``) and ``bias`` with ``bn`` folded in.

    torch's ``fuse_conv_bn_weights``, in float64: scaling ``U``'s rows per output channel is the same fold.
    """
    if bn is None:
        return weight.float(), None if bias is None else bias.float()
    assert bn.running_mean is not None and bn.running_var is not None
    w, b = fuse_conv_bn_weights(
        weight, bias, bn.running_mean.detach().double().cpu(), bn.running_var.detach().double().cpu(), bn.eps,
        None if bn.weight is None else bn.weight.detach().double().cpu(),
        None if bn.bias is None else bn.bias.detach().double().cpu())
    return w.detach().float(), b.detach().float()


def fold_pass(state: DeployState) -> DeployState:
    """Fold each chain's BatchNorm into its conv's weights (masked weights zeroed first); unlink it if not folding."""
    for chain in state.chains:
        if not state.options.fold_bn:
            chain.bn, chain.bn_name, chain.keep_bn_act = None, "", None
            chain.act, chain.act_name = Activation.NONE, ""
            chain.ref = torch.empty(0)
        conv = chain.conv
        assert isinstance(conv.weight, torch.Tensor)
        w = conv.weight.detach().double().cpu()
        bias = conv.bias.detach().double().cpu() if isinstance(conv.bias, torch.Tensor) else None
        if isinstance(conv, WinogradConv2d):  # U's mask is unchanged by the per-row scaling
            chain.mask = None if conv.mask is None else conv.mask.cpu()
        else:
            mask = getattr(conv, MASK_ATTR, None)
            ok = isinstance(mask, torch.Tensor) and mask.shape == w.shape
            chain.mask = mask.detach().bool().cpu() if ok else None  # type: ignore[union-attr]
            if chain.mask is not None:  # pruned weights are absent, not zero times their input
                w = torch.where(chain.mask, w, torch.zeros((), dtype=w.dtype))
        chain.weight, chain.bias = _fold_bn(w, bias, chain.bn)
    return state


def fuse_pass(state: DeployState) -> DeployState:
    """Keep each chain's activation fused into its conv, or unlink it (``fuse_activation=False``)."""
    if state.options.fuse_activation:
        return state
    for chain in state.chains:
        if chain.act is Activation.NONE:
            continue
        chain.act, chain.act_name = Activation.NONE, ""
        if chain.bn is not None and bn_act(chain.bn) is not None:
            chain.keep_bn_act = bn_act(chain.bn)
        chain.ref = torch.empty(0)
    return state


def _chain_reference(chain: Chain) -> torch.Tensor:
    """The chain's output computed from its original modules (when the recorded one does not match the fusion)."""
    y = chain.conv(chain.x)
    if chain.bn is not None:
        y = F.batch_norm(y, chain.bn.running_mean, chain.bn.running_var, chain.bn.weight, chain.bn.bias, False, 0.0,
                         chain.bn.eps)
    return y


def _shape(chain: Chain) -> str:
    conv, x = chain.conv, chain.x
    hw = f"{x.shape[-2]}x{x.shape[-1]}"
    if isinstance(conv, WinogradConv2d):
        return f"{conv.in_channels}->{conv.out_channels} {hw} F({conv.m},3)"
    assert isinstance(conv, nn.Conv2d)
    kind = " dw" if is_depthwise(conv) else ""
    return f"{conv.in_channels}->{conv.out_channels}{kind} {hw} k{conv.kernel_size[0]} s{conv.stride[0]}"


def route_input(chain: Chain, precision: Precision) -> torch.Tensor:
    """The input a layer's routes run on in the deployed model: the recorded one, or in bfloat16 channels-last."""
    if precision is Precision.BF16:
        return chain.x.to(torch.bfloat16, memory_format=torch.channels_last)
    return chain.x


def layer_reference(chain: Chain) -> torch.Tensor:
    """The layer's own output on its recorded input (the recorded one where it matches the fusion)."""
    return chain.ref if chain.ref.numel() else _chain_reference(chain)


def rounded_reference(chain: Chain, x: torch.Tensor, opts: DeployOptions) -> torch.Tensor:
    """The layer's float32 output on ``x``, its bfloat16-rounded input: what a bfloat16 route is compared with.

    A bfloat16 route's own error is its rounding of the weights and of the Winograd domain; the rounding of the input
    is the previous layers' (the whole-model check sees it). The float32 routes of the layer compute the output:
    the first that reproduces the layer on its recorded input runs on the rounded one.
    """
    factories, _ = candidates(chain, opts.kernel_threads, opts.backend, fixed_hw="hw" not in opts.dynamic)
    ref = layer_reference(chain)
    for key, make in factories.items():
        try:
            mod = make().eval()
            if rel_error(mod(chain.x), ref) <= tolerance(key, chain.conv):
                return mod(x.float().contiguous())
        except (ValueError, TypeError, RuntimeError):  # a candidate that does not apply here
            continue
    return ref


def _build(chain: Chain, row: LayerRoute, factories: dict, x: torch.Tensor, precision: Precision,
           ref: torch.Tensor) -> dict[DeployRoute, nn.Module]:
    """Every candidate that applies and reproduces ``ref``, the layer's output on ``x``, within its tolerance."""
    built: dict[DeployRoute, nn.Module] = {}
    for key, make in factories.items():
        try:
            mod = make().eval()
            err = rel_error(mod(x).float(), ref)
        except (ValueError, TypeError, RuntimeError) as exc:  # a candidate that does not apply here
            row.note = (row.note + "; " if row.note else "") + f"{key} skipped: {exc}"
            continue
        row.errors[key] = err
        if err <= tolerance(key, chain.conv, precision):
            built[key] = mod
    if not built:
        raise DeployMismatchError(f"{chain.name}: no route reproduces the layer's output within tolerance "
                                  f"(errors: {row.errors})")
    return built


def _time(chain: Chain, row: LayerRoute, built: dict[DeployRoute, nn.Module], options: DeployOptions,
          x: torch.Tensor) -> None:
    """Time every built candidate on ``x`` (and a dense reference for a pruned Winograd layer); the fastest wins."""
    fns: dict[str, Callable[[], object]] = {k: functools.partial(m, x) for k, m in built.items()}
    dense_fn = dense_reference(chain, options.precision, x)
    if dense_fn is not None:
        fns["dense-reference"] = dense_fn
    row.times_ms = median_ms(fns, options.repeats, options.warmup, options.flush)
    row.dense_ms = row.times_ms.pop("dense-reference", None)
    if row.dense_ms is None:
        row.dense_ms = min(v for k, v in row.times_ms.items() if k in DENSE_ROUTES)
    row.route = DeployRoute(min(row.times_ms, key=row.times_ms.__getitem__))


def route_pass(state: DeployState) -> DeployState:
    """Choose every chain's route: candidates built, checked against the layer's output and (tuned) timed."""
    opts = state.options
    for chain in state.chains:
        factories, note = candidates(chain, opts.kernel_threads, opts.backend, fixed_hw="hw" not in opts.dynamic,
                                     precision=opts.precision)
        kind = ("winograd" if isinstance(chain.conv, WinogradConv2d)
                else "depthwise" if DeployRoute.DEPTHWISE in factories else "conv")
        row = LayerRoute(chain.name, kind, _shape(chain), DeployRoute.MODULE, chain.bn_name, chain.act.value,
                         note=note)
        state.rows.append(row)
        if not factories:
            if note:
                state.notes.append(f"{chain.name}: {note}")
                warnings.warn(f"deploy: {chain.name} {note}", RuntimeWarning, stacklevel=2)
            continue
        x = route_input(chain, opts.precision)
        ref = rounded_reference(chain, x, opts) if opts.precision is Precision.BF16 else layer_reference(chain)
        built = _build(chain, row, factories, x, opts.precision, ref)
        if opts.tune and (len(built) > 1 or kind == "winograd"):  # a Winograd layer is timed against dense
            _time(chain, row, built, opts, x)
        else:
            row.route = rule_route(built)
        state.chosen[chain.name] = built[row.route]
    return state


def pack_pass(state: DeployState) -> DeployState:
    """Install every chosen module in the working copy; drop the BatchNorms and activations folded into it.

    A conv that keeps its module still has its BatchNorm folded when it is a plain ``nn.Conv2d``
    (``fuse_conv_bn_eval``).
    """
    work = state.work
    for chain in state.chains:
        mod = state.chosen.get(chain.name)
        if mod is not None:
            set_submodule(work, chain.name, mod)
            if chain.bn is not None:
                set_submodule(work, chain.bn_name, chain.keep_bn_act or nn.Identity())
            if chain.act_name:
                set_submodule(work, chain.act_name, nn.Identity())
        elif (chain.bn is not None and isinstance(chain.conv, nn.Conv2d) and chain.keep_bn_act is None
              and not chain.act_name):
            set_submodule(work, chain.name, fuse_conv_bn_eval(chain.conv, chain.bn))
            set_submodule(work, chain.bn_name, bn_act(chain.bn) or nn.Identity())
    return state


def _pool_inputs(work: nn.Module, x: torch.Tensor) -> dict[str, tuple[nn.MaxPool2d, torch.Tensor]]:
    pools = {name: mod for name, mod in work.named_modules() if type(mod) is nn.MaxPool2d}
    inputs: dict[str, tuple[nn.MaxPool2d, torch.Tensor]] = {}

    def keep(name: str, mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:  # returns None: inputs unchanged
        inputs.setdefault(name, (mod, inp[0].detach().clone()))  # type: ignore[arg-type]

    hooks = [mod.register_forward_pre_hook(functools.partial(keep, name)) for name, mod in pools.items()]
    try:
        work(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: value for name, value in inputs.items() if value[1].dim() == 4}


def pools_pass(state: DeployState) -> DeployState:
    """Every ``nn.MaxPool2d`` on the native pooling kernel where it is exact (and, when tuned, faster)."""
    opts = state.options
    if opts.backend is not Backend.NATIVE or opts.precision is Precision.BF16:  # the native pool is float32 NCHW
        return state
    for name, (pool, xin) in _pool_inputs(state.work, state.x).items():
        shape = f"{xin.shape[1]} {xin.shape[-2]}x{xin.shape[-1]} k{pool.kernel_size} s{pool.stride}"
        row = LayerRoute(name, "pool", shape, DeployRoute.EAGER)
        state.rows.append(row)
        try:
            native = NativeMaxPool2d.from_module(pool, opts.kernel_threads)
            exact = torch.equal(native(xin), pool(xin))
        except ValueError as err:
            row.note = f"native skipped: {err}"
            continue
        row.errors = {DeployRoute.EAGER: 0.0, DeployRoute.NATIVE: 0.0 if exact else float("inf")}
        if not exact:
            continue
        if opts.tune:
            fns = {DeployRoute.NATIVE: functools.partial(native, xin), DeployRoute.EAGER: functools.partial(pool, xin)}
            row.times_ms = median_ms(fns, opts.repeats, opts.warmup, opts.flush)  # type: ignore[arg-type]
            row.dense_ms = row.times_ms[DeployRoute.EAGER]
            row.route = DeployRoute(min(row.times_ms, key=row.times_ms.__getitem__))
        else:
            row.route = DeployRoute.NATIVE
        if row.route is DeployRoute.NATIVE:
            set_submodule(state.work, name, native)
    return state


def precision_pass(state: DeployState) -> DeployState:
    """A ``bf16`` model: every other floating-point weight in bfloat16, the whole model behind :class:`Bf16Model`."""
    if state.options.precision is not Precision.BF16:
        return state
    for mod in state.work.modules():
        if isinstance(mod, PackedWinogradConvBf16):  # its bias stays float32: the kernel adds it in float32
            continue
        for name, param in list(mod.named_parameters(recurse=False)):
            if param.dtype == torch.float32:
                setattr(mod, name, nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False))
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None and buf.dtype == torch.float32:
                setattr(mod, name, buf.to(torch.bfloat16))
    state.work = Bf16Model(state.work)
    return state


def _check_dynamic(state: DeployState) -> DeployShapes:
    """The deployed model's :class:`DeployShapes`; with a dynamic H / W, its output checked at two more sizes."""
    dynamic, x = state.options.dynamic, state.x
    shapes, checks = resolve_shapes(dynamic, x, state.work, state.model)
    for (h, w), err in checks:
        if not err <= state.tol:
            raise DeployMismatchError(
                f"with dynamic={dynamic!r} the deployed model's output differs from the model's at {h}x{w} by "
                f"{err:.2e} (relative max error, tolerance {state.tol:.0e}; routes were chosen at {x.shape[2]}x"
                f"{x.shape[3]}); deploy with dynamic='batch', and please report it"
            )
    if checks:
        (lo_h, lo_w), (hi_h, hi_w) = shapes.min_hw, shapes.max_hw
        done = ", ".join(f"{h}x{w} (error {err:.1e})" for (h, w), err in checks)
        state.notes.append(f"dynamic={dynamic!r}: H x W from {lo_h}x{lo_w} to {hi_h}x{hi_w}; routes chosen at "
                           f"{x.shape[2]}x{x.shape[3]}, output also checked at {done}")
    return shapes


def top1_agreement(out: torch.Tensor, reference: torch.Tensor) -> float | None:
    """Fraction of images whose arg-max class is the reference's (``None`` unless both are ``(N, classes)``)."""
    if out.dim() != 2 or reference.dim() != 2 or out.shape != reference.shape or out.shape[1] < 2:
        return None
    return float((out.argmax(dim=1) == reference.argmax(dim=1)).float().mean())


def check_pass(state: DeployState) -> DeployState:
    """The deployed model's output against the model's (and at more sizes with a dynamic H / W).

    In a bfloat16 model the tolerance is that precision's and the top-1 agreement on the example batch is
    recorded too (a different precision changes the output; the report says by how much).
    """
    used_m4 = any(r.route is DeployRoute.WINOGRAD_F4 or (r.kind == "winograd" and "F(4,3)" in r.shape)
                  for r in state.rows)
    bf16 = state.options.precision is Precision.BF16  # the only deployments with bfloat16 routes
    tol = state.options.tolerance
    state.tol = tol if tol is not None else (TOL_BF16_MODEL if bf16 else TOL_M4 if used_m4 else TOL_M2)
    assert state.reference is not None, "check_pass runs after record_pass"
    out = state.work(state.x)
    state.error = rel_error(out, state.reference)
    state.top1_agreement = top1_agreement(out, state.reference)
    if not state.error <= state.tol and state.options.precision is Precision.BF16:
        agree = "" if state.top1_agreement is None else f", top-1 agreement {state.top1_agreement:.1%}"
        raise DeployMismatchError(
            f"the bfloat16 model's output differs from the float32 model's by {state.error:.2e} (relative max error"
            f"{agree}; tolerance {state.tol:.0e}): bfloat16 rounds every activation and deep models add it up; "
            "check the agreement on real data and pass a larger tolerance= to accept it, or deploy in float32"
        )
    if not state.error <= state.tol:
        raise DeployMismatchError(
            f"the deployed model's output differs from the model's by {state.error:.2e} (relative max error, "
            f"tolerance {state.tol:.0e}); deploy with fold_bn=False or fuse_activation=False to find the layer, and "
            "please report it"
        )
    state.shapes = _check_dynamic(state)
    return state


def report_pass(state: DeployState) -> DeployState:
    """The :class:`DeployReport`; with ``time_model``, the deployed model timed against the model as given."""
    opts, x = state.options, state.x
    report = DeployReport(state.rows, int(x.shape[0]), (int(x.shape[2]), int(x.shape[3])), opts.threads, opts.tune,
                          state.error, state.tol, notes=state.notes, precision=opts.precision.value,
                          top1_agreement=state.top1_agreement)
    if opts.time_model:
        original = copy.deepcopy(state.model).to("cpu").float().eval()
        work = state.work
        times = median_ms({"deployed": lambda: work(x), "original": lambda: original(x)}, max(3, opts.repeats // 2),
                          opts.warmup)
        report.model_ms, report.original_ms = times["deployed"], times["original"]
    state.report = report
    return state


Pass = Callable[[DeployState], DeployState]
#: The pipeline, in order.
PASSES: tuple[tuple[str, Pass], ...] = (
    ("record", record_pass),
    ("fold", fold_pass),
    ("fuse", fuse_pass),
    ("route", route_pass),
    ("pack", pack_pass),
    ("pools", pools_pass),
    ("precision", precision_pass),
    ("check", check_pass),
    ("report", report_pass),
)


def run_passes(state: DeployState, until: str | None = None) -> DeployState:
    """Run :data:`PASSES` in order on ``state`` (up to and including the pass named ``until``)."""
    names = [name for name, _ in PASSES]
    if until is not None and until not in names:
        raise ValueError(f"until={until!r} is not valid; valid values are {names}")
    for name, fn in PASSES:
        state = fn(state)
        if name == until:
            break
    return state
