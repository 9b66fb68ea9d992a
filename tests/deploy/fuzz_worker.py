"""Hypothesis fuzzing of the deployed layers and of ``deploy``, run by ``test_reliability.py`` in a subprocess.

Run as ``python fuzz_worker.py {ops,deploy} MAX_EXAMPLES``; a crash (segfault, abort) then fails that test instead
of killing pytest. Every case must either compute the reference function or be refused with a ``ValueError`` /
``TypeError`` whose message is one line; anything else (another exception type, a wrong answer, a crash) fails the
property, and hypothesis prints the falsifying example. On success the last line is ``fuzz: N cases, K refused``.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_winoprune import WinogradConv2d
from lightning_winoprune.deploy import DenseConv, NativeMaxPool2d, PackedDepthwiseConv, PackedWinogradConv, deploy
from lightning_winoprune.kernels._backend import Backend
from lightning_winoprune.pruning._depthwise import depthwise_mask
from lightning_winoprune.winograd._tiles import filter_transform

COUNTS = {"cases": 0, "refused": 0, "nan_clamped": 0, "second_shape_skipped": 0}
ACTS = {0: lambda y: y, 1: F.relu, 2: F.relu6, 3: F.silu, 4: F.hardswish}
ACT_NAMES = ["none", "relu", "relu6", "silu", "hardswish"]


def check_refusal(exc: BaseException) -> None:
    """A refusal is fine only as a ValueError / TypeError with a one-line message."""
    if not isinstance(exc, (ValueError, TypeError)):
        raise AssertionError(f"refused with {type(exc).__name__} (want ValueError/TypeError): {exc}") from exc
    msg = str(exc)
    if not msg.strip() or "\n" in msg.strip():
        raise AssertionError(f"{type(exc).__name__} message is not one line: {msg!r}") from exc
    COUNTS["refused"] += 1


def settings_for(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------- (a) the ops
@dataclass
class LayerCase:
    """One deployed layer and the function it must compute."""

    kind: str
    module: nn.Module
    weight: torch.Tensor | None = None  # spatial weight (K, C/groups, kh, kw), pruned taps zero
    keep: torch.Tensor | None = None  # kept taps (None: dense); pruned weights are absent, not zero times x
    bias: torch.Tensor | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1
    act: int = 0
    m: int = 0  # Winograd tile (0: a direct layer)
    pool: tuple[int, int] = (0, 0)  # max-pool kernel
    winograd_u: torch.Tensor | None = None  # pruned Winograd layers: the masked U (no spatial equivalent)
    in_channels: int = 1
    notes: list[str] = field(default_factory=list)


def direct_reference(x: torch.Tensor, case: LayerCase) -> torch.Tensor:
    """The layer's function in float64, as F.conv2d computes it; pruned taps are absent (``where``, not ``0 * x``).

    Built from ``F.unfold`` so a NaN / inf that only meets pruned taps does not reach the output, as in the kernels.
    Checked against ``F.conv2d`` itself on finite inputs (``check_reference``).
    """
    w = case.weight.double()
    k, cg, kh, kw = w.shape
    n = x.shape[0]
    ho = (x.shape[2] + 2 * case.padding[0] - kh) // case.stride[0] + 1
    wo = (x.shape[3] + 2 * case.padding[1] - kw) // case.stride[1] + 1
    cols = F.unfold(x.double(), (kh, kw), padding=case.padding, stride=case.stride)  # (N, C*kh*kw, L)
    cols = cols.view(n, case.groups, 1, cg * kh * kw, ho * wo)
    wg = w.reshape(case.groups, k // case.groups, cg * kh * kw, 1)
    prod = wg * cols  # (N, G, K/G, C/G*kh*kw, L)
    if case.keep is not None:
        keep = case.keep.reshape(case.groups, k // case.groups, cg * kh * kw, 1)
        prod = torch.where(keep, prod, torch.zeros((), dtype=prod.dtype))
    y = prod.sum(3).reshape(n, k, ho, wo)
    if case.bias is not None:
        y = y + case.bias.double().view(1, -1, 1, 1)
    return ACTS[case.act](y)


def winograd_reference(x: torch.Tensor, case: LayerCase) -> torch.Tensor:
    """A Winograd layer's function in float64: F.conv2d for a dense U, the eager WinogradConv2d for a pruned one."""
    if case.winograd_u is None:
        y = F.conv2d(x.double(), case.weight.double(), None if case.bias is None else case.bias.double(), 1,
                     case.padding)
        return ACTS[case.act](y)
    k, c = case.winograd_u.shape[:2]
    layer = WinogradConv2d(c, k, m=case.m, padding=case.padding, bias=case.bias is not None, backend="torch",
                           dtype=torch.float64).eval()
    with torch.no_grad():
        layer.weight.copy_(case.winograd_u.double())
        if case.bias is not None:
            layer.bias.copy_(case.bias.double())
        layer.set_mask(case.keep)
        return ACTS[case.act](layer(x.double()))


def winograd_reach(bad: torch.Tensor, case: LayerCase) -> torch.Tensor:
    """Output positions of a Winograd layer that a non-finite input value may reach (bool, the output's shape).

    F(2,3): the receptive field (its transforms mix exactly the receptive field). F(4,3): the whole 4x4 output tile,
    since its input transform mixes all 6 rows of the input tile and ``NaN * 0`` is NaN; the eager WinogradConv2d does
    the same: it is the algorithm, not the kernel. Every input channel reaches every output channel.
    """
    per_image = bad.double().amax(1, keepdim=True)  # (N, 1, H, W) 1.0 where any channel is not finite
    ph, pw = case.padding
    h, w = bad.shape[2], bad.shape[3]
    ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
    if case.m == 2:
        out = F.max_pool2d(F.pad(per_image, (pw, pw, ph, ph)), 3, 1)
    else:
        th, tw = -(-ho // 4), -(-wo // 4)  # tiles; the last one may stick out (it reads zeros there)
        padded = F.pad(per_image, (pw, max(0, 4 * tw + 2 - w - pw), ph, max(0, 4 * th + 2 - h - ph)))
        tiles = F.max_pool2d(padded, 6, 4)[:, :, :th, :tw]
        out = tiles.repeat_interleave(4, 2).repeat_interleave(4, 3)[:, :, :ho, :wo]
    return (out > 0).expand(-1, case.module.out_channels, -1, -1)


def winograd_layer(draw: st.DrawFn, act: int) -> LayerCase:
    c, k = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    m = draw(st.sampled_from([2, 4]))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    g = torch.randn(k, c, 3, 3, dtype=torch.float64)
    bias = torch.randn(k) if draw(st.booleans()) else None
    u = filter_transform(g, m, Backend.TORCH).float()
    amount = draw(st.sampled_from([0.0, 0.0, 0.5, 0.9]))
    keep = None
    if amount:
        pattern = draw(st.sampled_from(["element", "rows", "cols"]))
        p = m + 2
        if pattern == "element":
            keep = torch.rand(k, c, p, p) >= amount
        elif pattern == "rows":  # whole output rows per Winograd position (WSP-R)
            keep = (torch.rand(k, 1, p, p) >= amount).expand(k, c, p, p).clone()
        else:  # whole input channels per position (WSP-C)
            keep = (torch.rand(1, c, p, p) >= amount).expand(k, c, p, p).clone()
    form = draw(st.sampled_from(["structured", "csr"]))
    mod = PackedWinogradConv(u, keep, m, padding, bias, form, "native", -1, ACT_NAMES[act])
    case = LayerCase("winograd", mod, g.float(), keep, bias, (1, 1), padding, 1, act, m, in_channels=c)
    if keep is not None:
        case.winograd_u = torch.where(keep, u, torch.zeros(()))
    case.notes.append(f"winograd m={m} c={c} k={k} pad={padding} form={form} pruned={amount} act={act}")
    return case


@st.composite
def layer_cases(draw: st.DrawFn) -> LayerCase:
    kind = draw(st.sampled_from(["winograd", "winograd", "depthwise", "onednn", "eager", "gemm", "linear",
                                 "maxpool"]))
    act = 0 if kind == "maxpool" else draw(st.integers(0, 4))
    if kind == "winograd":
        return winograd_layer(draw, act)
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    if kind == "maxpool":
        kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        padding = (min(padding[0], kernel[0] // 2), min(padding[1], kernel[1] // 2))
        c = draw(st.integers(1, 4))
        mod = NativeMaxPool2d(kernel, stride, padding)
        return LayerCase(kind, mod, None, None, None, stride, padding, 1, 0, 0, kernel, in_channels=c,
                         notes=[f"maxpool k={kernel} s={stride} pad={padding}"])
    kernel = (draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 3])))
    if kind == "depthwise":
        c = draw(st.integers(1, 6))
        w = torch.randn(c, 1, *kernel)
        amount = draw(st.sampled_from([0.0, 0.5, 0.9]))
        keep = None if not amount else torch.rand(c, 1, *kernel) >= amount
        bias = torch.randn(c) if draw(st.booleans()) else None
        mod = PackedDepthwiseConv(w, keep, stride, padding, bias, "native", -1, ACT_NAMES[act])
        w = w if keep is None else torch.where(keep, w, torch.zeros(()))
        return LayerCase(kind, mod, w, keep, bias, stride, padding, c, act, in_channels=c,
                         notes=[f"depthwise c={c} k={kernel} s={stride} pad={padding} pruned={amount} act={act}"])
    groups = draw(st.integers(1, 3)) if kind in ("onednn", "eager") else 1
    c, k = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    if kind == "gemm":
        kernel, stride, padding = (1, 1), (1, 1), (0, 0)
    if kind == "linear":
        padding = (0, 0)
    w = torch.randn(k, c // groups, *kernel)
    bias = torch.randn(k) if draw(st.booleans()) else None
    mod = DenseConv(w, bias, stride, padding, groups, kind, ACT_NAMES[act])
    return LayerCase(kind, mod, w, None, bias, stride, padding, groups, act, in_channels=c,
                     notes=[f"{kind} c={c} k={k} kernel={kernel} s={stride} pad={padding} g={groups} act={act}"])


def make_input(draw: st.DrawFn, case: LayerCase) -> tuple[torch.Tensor, str]:
    n = draw(st.integers(0, 3))
    c = case.in_channels if draw(st.integers(0, 19)) else case.in_channels + 1  # now and then the wrong channels
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    layout = draw(st.sampled_from(["contiguous", "contiguous", "channels_last", "sliced", "permuted", "transposed",
                                   "expanded"]))
    if layout == "channels_last":
        x = torch.randn(n, c, h, w).to(memory_format=torch.channels_last)
    elif layout == "sliced":  # every other row / column of a larger tensor, and a batch stride
        x = torch.randn(2 * n, c + 1, 2 * h, 2 * w + 1)[::2, 1:, ::2, 1::2]
    elif layout == "permuted":
        x = torch.randn(n, h, w, c).permute(0, 3, 1, 2)
    elif layout == "transposed":
        x = torch.randn(n, c, w, h).transpose(2, 3)
    else:
        x = torch.randn(1, c, h, w).expand(n, c, h, w) if layout == "expanded" else torch.randn(n, c, h, w)
    special = draw(st.sampled_from(["finite"] * 4 + ["nan", "inf", "-inf", "mixed"]))
    if special != "finite" and x.numel():
        x = x.clone(memory_format=torch.preserve_format) if layout != "expanded" else x.clone()
        idx = torch.randint(x.numel(), (draw(st.integers(1, 3)),))
        values = {"nan": [float("nan")], "inf": [float("inf")], "-inf": [float("-inf")],
                  "mixed": [float("nan"), float("inf"), float("-inf")]}[special]
        for j, i in enumerate(idx.tolist()):
            pos = torch.unravel_index(torch.tensor(i), x.shape)
            x[tuple(int(p) for p in pos)] = values[j % len(values)]
    dtype = draw(st.sampled_from([torch.float32] * 6 + [torch.float64, torch.float16, torch.bfloat16, torch.int64]))
    if dtype is torch.int64:
        x = torch.nan_to_num(x, 0.0, 0.0, 0.0).round().to(dtype)
    elif dtype is not torch.float32:
        x = x.to(dtype)
    return x, f"x {tuple(x.shape)} {layout} {special} {dtype}"


def compare(out: torch.Tensor, x: torch.Tensor, case: LayerCase, tol: float) -> None:
    x64 = x.double()
    bad = ~torch.isfinite(x64)
    clean = torch.where(bad, torch.zeros((), dtype=torch.float64), x64)
    if case.pool != (0, 0):
        ref_fn = lambda t: F.max_pool2d(t, case.pool, case.stride, case.padding)  # noqa: E731
    elif case.m:
        ref_fn = lambda t: winograd_reference(t, case)  # noqa: E731
    else:
        ref_fn = lambda t: direct_reference(t, case)  # noqa: E731
    ref_clean = ref_fn(clean)
    assert out.shape == ref_clean.shape, f"shape {tuple(out.shape)} != reference {tuple(ref_clean.shape)}"
    assert out.dtype == x.dtype, f"dtype {out.dtype} != input dtype {x.dtype}"
    out64 = out.double()
    if bool(bad.any()):
        if case.m:  # Winograd: inside the reach anything non-finite goes (inf - inf is NaN in the transforms)
            free = ~winograd_reach(bad, case)
        else:  # direct layers: exactly the reference's NaN and +-inf positions
            ref = ref_fn(x64)
            if case.act in (1, 2):
                # A fused ReLU / ReLU6 may clamp a NaN (oneDNN's post-op and the native kernels take max(x, 0),
                # which drops NaN; torch's relu keeps it): the one deviation allowed, counted and reported.
                clamped = torch.isnan(ref) & ~torch.isnan(out64) & ((out64 == 0) | ((out64 == 6) & (case.act == 2)))
                COUNTS["nan_clamped"] += int(clamped.any())
                ref = torch.where(clamped, out64, ref)
            for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
                got, want = test(out64), test(ref)
                assert torch.equal(got, want), (f"{name} positions differ: {int((got & ~want).sum())} extra, "
                                                f"{int((want & ~got).sum())} missing")
            free = torch.isfinite(ref)
            ref_clean = torch.where(free, ref, ref_clean)
    else:
        free = torch.ones_like(out64, dtype=torch.bool)
    assert bool(torch.isfinite(out64[free]).all()), "non-finite output where the input reaching it is finite"
    if free.any():
        diff = float((out64[free] - ref_clean[free]).abs().max())
        scale = float(ref_clean[free].abs().max())
        assert diff <= tol * scale + 1e-5, f"max error {diff:.3e} > {tol:.0e} x {scale:.3e}"


def check_reference(case: LayerCase) -> None:
    """The unfold reference is F.conv2d (with pruned taps zero) on a finite input."""
    if case.m or case.pool != (0, 0):
        return
    x = torch.randn(2, case.in_channels, 7, 6, dtype=torch.float64)
    try:
        want = F.conv2d(x, case.weight.double(), None if case.bias is None else case.bias.double(), case.stride,
                        case.padding, 1, case.groups)
    except RuntimeError:
        return
    torch.testing.assert_close(direct_reference(x, case), ACTS[case.act](want))


@given(data=st.data())
def fuzz_ops(data: st.DataObject) -> None:
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    case = data.draw(layer_cases(), label="layer")
    x, desc = make_input(data.draw, case)
    data.draw(st.just(desc + " | " + "; ".join(case.notes)), label="case")
    check_reference(case)
    COUNTS["cases"] += 1
    try:
        out = case.module(x)
    except Exception as exc:  # the type is what is checked
        check_refusal(exc)
        return
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(x.dtype, 1e-3 if case.m == 4 else 1e-4)
    compare(out, x, case, tol)


# ------------------------------------------------------------------------------------------------ (b) deploy
def randomize_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(bn.num_features) - 0.5)
        bn.running_var.copy_(torch.rand(bn.num_features) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features) + 0.5)
        bn.bias.copy_(torch.rand(bn.num_features) - 0.5)
    return bn


def random_activation(draw: st.DrawFn) -> list[nn.Module]:
    name = draw(st.sampled_from(["none", "relu", "relu", "relu_inplace", "relu6", "silu", "hardswish"]))
    return {"none": [], "relu": [nn.ReLU()], "relu_inplace": [nn.ReLU(inplace=True)], "relu6": [nn.ReLU6()],
            "silu": [nn.SiLU()], "hardswish": [nn.Hardswish()]}[name]


@st.composite
def stacks(draw: st.DrawFn) -> tuple[nn.Sequential, int, list[str], bool]:
    c_in = c = draw(st.integers(1, 4))
    layers: list[nn.Module] = []
    desc: list[str] = []
    uses_f4 = False
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "winograd", "winograd", "depthwise", "pool"]))
        if kind == "pool":
            kernel = draw(st.integers(2, 3))
            stride, pad = draw(st.integers(1, 2)), draw(st.integers(0, kernel // 2))
            layers.append(nn.MaxPool2d(kernel, stride, pad))
            desc.append(f"maxpool k{kernel} s{stride} p{pad}")
            continue
        if kind == "winograd":
            k, m, pad = draw(st.integers(1, 6)), draw(st.sampled_from([2, 2, 4])), draw(st.integers(0, 2))
            conv = WinogradConv2d(c, k, m=m, padding=pad, bias=draw(st.booleans()))
            amount = draw(st.sampled_from([0.0, 0.3, 0.7, 0.95]))
            if amount:
                score = conv.weight.detach().abs()
                conv.set_mask(score > score.flatten().kthvalue(max(1, int(amount * score.numel()))).values)
                conv.zero_pruned_()
            uses_f4 |= m == 4
            desc.append(f"winograd {c}->{k} F({m},3) p{pad} pruned {amount}")
        elif kind == "depthwise":
            k, kernel, stride = c, draw(st.sampled_from([1, 3])), draw(st.integers(1, 2))
            pad = draw(st.integers(0, kernel // 2 + 1))
            conv = nn.Conv2d(c, c, kernel, stride, pad, groups=c, bias=draw(st.booleans()))
            amount = draw(st.sampled_from([0.0, 0.5, 0.9]))
            if amount:
                mask = depthwise_mask(conv.weight.detach(), amount, draw(st.sampled_from(["dcp", "dcp-b"]))).mask
                conv.register_buffer("weight_mask", mask)
                with torch.no_grad():
                    conv.weight.mul_(mask)
            desc.append(f"depthwise {c} k{kernel} s{stride} p{pad} pruned {amount}")
        else:
            k, kernel, stride = draw(st.integers(1, 6)), draw(st.sampled_from([1, 3])), draw(st.integers(1, 2))
            pad = draw(st.integers(0, kernel // 2 + 1))
            conv = nn.Conv2d(c, k, kernel, stride, pad, bias=draw(st.booleans()))
            desc.append(f"conv {c}->{k} k{kernel} s{stride} p{pad}")
        layers.append(conv)
        if draw(st.booleans()):
            layers.append(randomize_bn(nn.BatchNorm2d(k)))
            desc.append("bn")
        act = random_activation(draw)
        layers.extend(act)
        desc.extend(type(a).__name__ for a in act)
        c = k
    return nn.Sequential(*layers).eval(), c_in, desc, uses_f4


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6))


@given(data=st.data())
def fuzz_deploy(data: st.DataObject) -> None:
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model, c_in, desc, uses_f4 = data.draw(stacks(), label="stack")
    data.draw(st.just(" | ".join(desc)), label="layers")
    n, h, w = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    x = torch.randn(n, c_in, h, w)
    try:
        with torch.no_grad():
            expected = model(x)
    except (RuntimeError, ValueError):
        expected = None
    assume(expected is not None)  # the eager model itself cannot take this input: not deploy's case
    tune = data.draw(st.booleans(), label="tune")
    COUNTS["cases"] += 1
    try:
        deployed = deploy(model, x, tune=tune, repeats=1, warmup=0, time_model=False, verbose=False,
                          cold_cache=False)
    except Exception as exc:  # the type is what is checked
        check_refusal(exc)
        return
    tol = 1e-3 if uses_f4 else 1e-4
    with torch.no_grad():
        err = rel_error(deployed(x), expected)
        routes = deployed.deploy_report.routes
        assert err <= tol, f"deployed output differs from the model's by {err:.2e} (routes {routes})"
        # another batch (and now and then another size): the deployed model is not tied to the example's shape
        n2 = data.draw(st.integers(1, 3), label="n2")
        h2, w2 = (h, w) if data.draw(st.booleans(), label="same size") else (h + 3, w + 1)
        x2 = torch.randn(n2, c_in, h2, w2)
        try:
            expected2 = model(x2)
        except (RuntimeError, ValueError):  # the eager model cannot take the second shape: counted, not checked
            COUNTS["second_shape_skipped"] += 1
            return
        err = rel_error(deployed(x2), expected2)
        assert err <= tol, f"on {tuple(x2.shape)} deployed differs by {err:.2e} (routes {routes})"


def main() -> int:
    which, n = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # fallback notes (RuntimeWarning) are not what is fuzzed
    prop = {"ops": fuzz_ops, "deploy": fuzz_deploy}[which]
    settings_for(n)(prop)()
    print(f"fuzz: {COUNTS['cases']} cases, {COUNTS['refused']} refused, "
          f"{COUNTS['second_shape_skipped']} without a second-shape check", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
