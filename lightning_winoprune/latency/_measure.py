"""``measure_latency``: time every pruned layer and the whole model against PyTorch's dense conv, side by side."""

from __future__ import annotations

import copy
import functools
import platform
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from lightning_winoprune._utils import MASK_ATTR, is_depthwise
from lightning_winoprune.deploy import DeployMismatchError, PackedDepthwiseConv, PackedWinogradConv, SparseForm, deploy
from lightning_winoprune.deploy._packed_bf16 import bf16_refusal
from lightning_winoprune.deploy._timing import median_ms, rel_error, threads_context
from lightning_winoprune.kernels import Backend, native_available, native_isa
from lightning_winoprune.latency._report import GpuLatency, LatencyReport, LayerLatency, ModelLatency
from lightning_winoprune.winograd._layer import WinogradConv2d

__all__ = ["LatencyMismatchError", "measure_latency", "pruned_layers"]


class LatencyMismatchError(RuntimeError):
    """The pruned kernel's output differs from the PyTorch reference by more than the tolerance."""


def _is_masked_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and is_depthwise(module) and module.weight.shape[1] == 1
            and isinstance(getattr(module, MASK_ATTR, None), torch.Tensor) and module.dilation == (1, 1)
            and not isinstance(module.padding, str) and module.padding_mode == "zeros")


def pruned_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers the report covers, by module name.

    Every :class:`~lightning_winoprune.winograd.WinogradConv2d` and every depthwise ``nn.Conv2d`` with a DEPrune
    ``weight_mask``.
    """
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, WinogradConv2d) or _is_masked_depthwise(mod)}


def _capture_inputs(model: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_hook(lambda m, inp, out, n=name: inputs.__setitem__(n, inp[0].detach().clone()))
             for name, mod in layers.items()]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def _winograd_row(name: str, layer: WinogradConv2d, x: torch.Tensor, threads: int, repeats: int, warmup: int,
                  tol: float, check: bool, backend: Backend | str) -> LayerLatency:
    k, c = layer.out_channels, layer.in_channels
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(k, c, 3, 3, generator=gen) * (2.0 / (9 * c)) ** 0.5
    bias = None if layer.bias is None else layer.bias.detach().float()
    pruned = PackedWinogradConv.from_layer(layer, backend=backend, threads=threads)
    dense = PackedWinogradConv.from_layer(layer, backend=backend, threads=threads, dense=True)
    csr = PackedWinogradConv.from_layer(layer, form=SparseForm.CSR, backend=backend, threads=threads)
    kept = pruned.kept_fraction
    k_fp = max(1, round(k * kept))
    pad = layer.padding
    err = 0.0
    if check:
        ref = layer(x)
        err = max(rel_error(pruned(x), ref), rel_error(csr(x), ref))
        tolerance = tol * (1 if layer.m == 2 else 10)
        if err > tolerance:
            raise LatencyMismatchError(
                f"{name}: the pruned kernel's output differs from the PyTorch reference by {err:.2e} "
                f"(relative max error, tolerance {tolerance:.0e}); the measured speedup would be meaningless"
            )
    medians = median_ms({
        "torch": lambda: F.conv2d(x, weight, bias, padding=pad),
        "dense": lambda: dense(x),
        "pruned": lambda: pruned(x),
        "fp": lambda: F.conv2d(x, weight[:k_fp], None if bias is None else bias[:k_fp], padding=pad),
        "csr": lambda: csr(x),
    }, repeats, warmup)
    shape = f"{c}->{k} {x.shape[-2]}x{x.shape[-1]} F({layer.m},3)"
    return LayerLatency(name, "winograd", shape, kept, medians["torch"], medians["dense"], medians["pruned"],
                        medians["fp"], medians["csr"], err, pruned.work_fraction, pruned.balanced)


def _depthwise_row(name: str, conv: nn.Conv2d, x: torch.Tensor, threads: int, repeats: int, warmup: int,
                   tol: float, check: bool, backend: Backend | str) -> LayerLatency:
    packed = PackedDepthwiseConv.from_conv(conv, backend=backend, threads=threads)
    weight = conv.weight.detach().float()
    bias = None if conv.bias is None else conv.bias.detach().float()
    stride, pad = conv.stride, conv.padding
    ch = conv.in_channels
    c_fp = max(1, round(ch * packed.kept_fraction))
    x_fp = x[:, :c_fp].contiguous()
    err = 0.0
    if check:
        masked = torch.where(packed.mask.bool(), weight, torch.zeros((), dtype=weight.dtype))
        ref = F.conv2d(x, masked, bias, stride, pad, groups=ch)
        err = rel_error(packed(x), ref)
        if err > tol:
            raise LatencyMismatchError(
                f"{name}: the pruned depthwise kernel's output differs from the PyTorch reference by {err:.2e} "
                f"(relative max error, tolerance {tol:.0e})"
            )
    medians = median_ms({
        "torch": lambda: F.conv2d(x, weight, bias, stride, pad, groups=ch),
        "pruned": lambda: packed(x),
        "fp": lambda: F.conv2d(x_fp, weight[:c_fp], None if bias is None else bias[:c_fp], stride, pad,
                               groups=c_fp),
    }, repeats, warmup)
    kh = conv.kernel_size[0]
    shape = f"{ch} dw {x.shape[-2]}x{x.shape[-1]} k{kh} s{stride[0]}"
    return LayerLatency(name, "depthwise", shape, packed.kept_fraction, medians["torch"], None, medians["pruned"],
                        medians["fp"], None, err)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _dense_copy(model: nn.Module, layers: dict[str, nn.Module]) -> nn.Module:
    """The dense PyTorch model: Winograd layers back as ``nn.Conv2d`` (random weights: only timed), no masks."""
    dense = copy.deepcopy(model)
    for name, mod in layers.items():
        if isinstance(mod, WinogradConv2d):
            _set_module(dense, name, nn.Conv2d(mod.in_channels, mod.out_channels, 3, padding=mod.padding,
                                               bias=mod.bias is not None))
    return dense


def _gpu_rows(layers: dict[str, nn.Module], inputs: dict[str, torch.Tensor], repeats: int,
              warmup: int) -> list[GpuLatency]:
    device = torch.device("cuda")
    rows = []
    for name, mod in layers.items():
        if not isinstance(mod, WinogradConv2d) or name not in inputs:  # not on the forward path of this input
            continue
        x = inputs[name].to(device)
        # weights on the GPU: the timed calls must not copy them from the host every time
        packed = PackedWinogradConv(mod.weight.detach().float().to(device),
                                    None if mod.mask is None else mod.mask.to(device), mod.m, mod.padding,
                                    None if mod.bias is None else mod.bias.detach().float().to(device),
                                    backend="torch")
        weight = torch.randn(mod.out_channels, mod.in_channels, 3, 3, device=device)
        medians = median_ms({
            "cudnn": functools.partial(F.conv2d, x, weight, padding=mod.padding),
            "compacted": functools.partial(packed, x),
        }, repeats, warmup, sync=lambda: torch.cuda.synchronize(device))
        rows.append(GpuLatency(name, medians["cudnn"], medians["compacted"]))
    return rows


def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    check_output: bool = True,
    tolerance: float = 1e-4,
    whole_model: bool = True,
    gpu: bool | None = None,
    backend: Backend | str = Backend.AUTO,
    progress: bool = True,
    deployed: nn.Module | None = None,
    tune: bool = True,
) -> LatencyReport:
    """Time every pruned layer and the whole model against PyTorch's dense conv, side by side in this process.

    For each :class:`~lightning_winoprune.winograd.WinogradConv2d` (pruned or not) and each depthwise conv with a
    DEPrune ``weight_mask``, on the input that layer sees for ``example_input``, it times PyTorch's dense conv, our
    dense Winograd, our pruned kernel, the FP-equivalent smaller dense conv and the WWP CSR path, interleaved in
    rounds, and reports medians. Before timing it checks the pruned kernel's output against the PyTorch reference.
    The whole-model row times the dense PyTorch model on torch eager, the same dense model through
    :func:`~lightning_winoprune.deploy` (BN folded, fastest dense route per conv: the best dense deployment), the
    model as trained, and the deployed pruned model: exactly what :func:`~lightning_winoprune.deploy` returns and a
    user ships. On a CPU with bfloat16 kernels (AVX512-BF16 or AMX) it also times both deployed with
    ``precision="bf16"``: a row of its own, with its own error, since bfloat16 is another precision. With CUDA
    available (and ``gpu`` not ``False``) it also times the compacted batched GEMM via torch
    against cuDNN per Winograd layer.

    Pin threads for stable numbers (``OMP_PROC_BIND=close OMP_PLACES=cores`` before starting Python).

    Args:
        model: Any module; it is put in eval mode for the measurement and restored afterwards.
        example_input: A CPU batch ``(N, C, H, W)``; its batch size and image size are the measured ones.
        repeats: Timed rounds per median.
        warmup: Untimed runs of every alternative first.
        threads: CPU threads for every alternative (``None``: torch's current count).
        check_output: Verify the pruned kernels' outputs (and the whole native model's) against PyTorch.
        tolerance: Largest allowed relative max error (F(4,3) layers get 10x this).
        whole_model: Also time the whole model.
        gpu: Time the GPU path too (``None``: when CUDA is available).
        backend: Kernel backend for our kernels (``"auto"`` falls back to torch without the extension).
        progress: Show a progress bar.
        deployed: The model as :func:`~lightning_winoprune.deploy` returned it for this ``model`` and input (deployed
            here when ``None``).
        tune: Let :func:`~lightning_winoprune.deploy` choose routes by measurement (for both whole-model rows).

    Returns:
        The :class:`LatencyReport`.

    Raises:
        LatencyMismatchError: If an output check fails.
        ValueError: On a bad input, ``repeats``, ``warmup``, ``threads`` or ``tolerance``.

    """
    _check_args(example_input, repeats, warmup, threads, tolerance)
    backend = Backend.parse(backend, "backend")
    n_threads = threads or torch.get_num_threads()
    x = example_input.detach().to("cpu", torch.float32).contiguous()
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    use_gpu = torch.cuda.is_available() if gpu is None else gpu
    if use_gpu and not torch.cuda.is_available():
        raise ValueError("gpu=True but CUDA is not available")
    work = copy.deepcopy(model).to("cpu").float().eval() if device.type != "cpu" else model.eval()
    timing = _Timing(n_threads, repeats, warmup, tolerance, check_output, backend)
    try:
        with torch.no_grad(), threads_context(n_threads):
            layers = pruned_layers(work)
            inputs = _capture_inputs(work, layers, x)
            with Progress(disable=not progress, transient=True) as bar:
                task = bar.add_task("timing pruned layers", total=len(layers) + int(whole_model))
                rows = _layer_rows(layers, inputs, timing, bar, task)
                model_row = None
                if whole_model:
                    bar.update(task, description="timing the whole model")
                    model_row = _model_row(work, layers, x, deployed, tune, timing)
                    bar.advance(task)
            gpu_rows = _gpu_rows(layers, inputs, repeats, warmup) if use_gpu else []
    finally:
        model.train(was_training)
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "native_extension": native_available(),
        "cuda": torch.cuda.get_device_name(0) if use_gpu else None,
    }
    isa = None if backend is Backend.TORCH else native_isa()  # None: no native kernel ran
    return LatencyReport(rows, model_row, int(x.shape[0]), (int(x.shape[2]), int(x.shape[3])), n_threads,
                         isa, repeats, gpu_rows, env)


@dataclass(frozen=True)
class _Timing:
    """How every row is timed and checked."""

    threads: int
    repeats: int
    warmup: int
    tolerance: float
    check_output: bool
    backend: Backend


def _check_args(example_input: torch.Tensor, repeats: int, warmup: int, threads: int | None,
                tolerance: float) -> None:
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise ValueError(f"example_input must be an (N, C, H, W) tensor, got {getattr(example_input, 'shape', None)}")
    for arg, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}")


def _layer_rows(layers: dict[str, nn.Module], inputs: dict[str, torch.Tensor], timing: _Timing, bar: Progress,
                task: Any) -> list[LayerLatency]:
    """One timed row per pruned layer on the forward path of the input."""
    rows: list[LayerLatency] = []
    for name, mod in layers.items():
        if name in inputs:  # else not on the forward path of this input
            bar.update(task, description=f"timing {name}")
            make = _winograd_row if isinstance(mod, WinogradConv2d) else _depthwise_row
            rows.append(make(name, mod, inputs[name], timing.threads, timing.repeats,  # type: ignore[arg-type]
                             timing.warmup, timing.tolerance, timing.check_output, timing.backend))
        bar.advance(task)
    return rows


def _model_row(work: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor, deployed: nn.Module | None,
               tune: bool, timing: _Timing) -> ModelLatency:
    """The whole model: dense eager, dense deployed, as trained and deployed pruned, in interleaved rounds.

    On a CPU with bfloat16 kernels, also the dense and the pruned model deployed in bfloat16 (another precision: a row
    and an error of its own).
    """
    dense = _dense_copy(work, layers).eval()
    opts: dict[str, Any] = {"threads": timing.threads, "backend": timing.backend, "tune": tune, "verbose": False,
                            "time_model": False}
    native = deployed if deployed is not None else deploy(work, x, **opts)
    dense_deployed = deploy(dense, x, **opts)
    reference = work(x)
    err = rel_error(native(x), reference) if timing.check_output else 0.0
    if timing.check_output and err > timing.tolerance * 10:
        raise LatencyMismatchError(
            f"the deployed model differs from the model as trained by {err:.2e} "
            f"(relative max error of the output, tolerance {timing.tolerance * 10:.0e})"
        )
    fns = {"dense": lambda: dense(x), "dense_deployed": lambda: dense_deployed(x), "trained": lambda: work(x),
           "native": lambda: native(x)}
    bf16_err, bf16_note = None, ""
    if timing.backend is not Backend.TORCH and bf16_refusal() is None:
        try:
            native_bf16 = deploy(work, x, precision="bf16", **opts)
            dense_bf16 = deploy(dense, x, precision="bf16", **opts)
        except DeployMismatchError as exc:  # another precision than the headline's: said in the row, not raised
            bf16_note = str(exc)
        else:
            bf16_err = rel_error(native_bf16(x), reference)
            fns.update(native_bf16=lambda: native_bf16(x), dense_bf16=lambda: dense_bf16(x))
    medians = median_ms(fns, max(3, timing.repeats // 2), timing.warmup)
    return ModelLatency(medians["dense"], medians["trained"], medians["native"], err, medians["dense_deployed"],
                        medians.get("dense_bf16"), medians.get("native_bf16"), bf16_err, bf16_note)
