"""``deploy``: turn a pruned model into the fast inference model that the latency report measures and users ship.

A pipeline of named passes (``_passes.py``, :data:`PASSES`) on a copy of the model in eval mode:

1. **record** one forward pass on the example input with hooks: which conv feeds which BatchNorm, which BatchNorm
   (or conv) feeds which activation, and every layer's input (``_record.py``).
2. **fold** each BatchNorm into the conv before it (exact: a Winograd layer's ``U`` rows are scaled per output
   channel, so its mask is unchanged), with torch's ``fuse_conv_bn_weights`` in float64.
3. **fuse** the activation after it (ReLU, ReLU6, SiLU, Hardswish) into the conv's output stage.
4. **route** every conv: each candidate (``_routes.py``: our pruned Winograd kernel, its CSR form, our pruned
   depthwise kernel, our dense Winograd kernels for unpruned 3x3 convs, oneDNN with the activation fused,
   ``F.conv2d``, a ``Linear`` for a conv that covers its whole input) is built, checked against the layer's
   recorded output and, with ``tune=True``, timed at the example input's shape; the fastest accurate one wins.
5. **pack** the chosen modules into the copy; **pools** moves max-pools to the native kernel where it is faster.
6. **check** the deployed model's output against the model's (relative max error <= 1e-4, 1e-3 when an F(4,3) route
   runs) and raise :class:`DeployMismatchError` if it differs; **report** builds the :class:`DeployReport`.

The result is an ordinary ``nn.Module`` whose pruned layers run the ``winoprune::`` torch custom ops: it deep-copies,
saves through ``state_dict``, compiles with ``torch.compile(fullgraph=True)``, exports with ``torch.export`` (a
dynamic batch by default; :func:`deploy`'s ``dynamic`` chooses which dims stay free) and is safe to call from
several threads.
"""

from __future__ import annotations

import copy

import torch
from rich.console import Console
from torch import nn

from lightning_winoprune.deploy._packed_bf16 import bf16_refusal
from lightning_winoprune.deploy._passes import PASSES, DeployOptions, DeployState, run_passes
from lightning_winoprune.deploy._report import DeployMismatchError, DeployReport, LayerRoute
from lightning_winoprune.deploy._routes import DeployRoute, Precision
from lightning_winoprune.deploy._shapes import check_dynamic
from lightning_winoprune.deploy._timing import cache_flusher, threads_context
from lightning_winoprune.kernels._backend import Backend, native_available

__all__ = ["PASSES", "DeployMismatchError", "DeployReport", "DeployRoute", "LayerRoute", "Precision", "deploy"]


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
    precision: Precision | str = Precision.FP32,
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
        precision: ``"fp32"`` (float32 everywhere, the default) or ``"bf16"``: a bfloat16 model, its activations
            bfloat16 channels-last from input to output (:class:`~lightning_winoprune.deploy.Bf16Model` converts at
            the two ends): our Winograd kernels on AMX or AVX512-BF16 (bfloat16 products, float32 sums), oneDNN's
            bfloat16 convs for the rest. bfloat16 is a different precision: each layer is checked on its rounded
            input, the output against the float32 model with a looser tolerance (5e-2 relative max error), and the
            report gives the top-1 agreement on ``example_input``. Refused (``ValueError``) on a CPU without
            AVX512-BF16 or AMX-BF16.

    Returns:
        The deployed ``nn.Module`` (eval mode, CPU float32 in and out); its ``deploy_report`` attribute holds the
        :class:`DeployReport`, its ``deploy_shapes`` the :class:`~lightning_winoprune.deploy.DeployShapes`.

    Raises:
        ValueError: On a model in training mode, a bad ``example_input``, ``repeats``, ``threads``, ``tolerance``,
            ``dynamic`` or ``precision`` (``"bf16"`` on a CPU without bfloat16 kernels), or, with a dynamic H / W, a
            model that fails at a size inside the range.
        TypeError: If ``model`` is not an ``nn.Module``.
        DeployMismatchError: If the deployed model's output differs from the model's beyond the tolerance.

    """
    _check_args(model, example_input, repeats, threads, dynamic)
    if tolerance is not None and not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}")
    precision = Precision.parse(precision, "precision")
    resolved = _resolve_backend(backend)
    if precision is Precision.BF16:
        refusal = "precision='bf16' needs backend='native'" if resolved is not Backend.NATIVE else bf16_refusal()
        if refusal is not None:
            raise ValueError(refusal)
    options = DeployOptions(tune, fold_bn, fuse_activation, threads or torch.get_num_threads(),
                            -1 if threads is None else threads, repeats, warmup, resolved, tolerance,
                            time_model, dynamic, cache_flusher() if tune and cold_cache else None, precision)
    x = example_input.detach().to("cpu", torch.float32).contiguous()
    state = DeployState(model, copy.deepcopy(model).to("cpu").float().eval(), x, options)
    with torch.no_grad(), threads_context(options.threads):
        state = run_passes(state)
    work, report = state.work, state.report
    work.deploy_report = report  # type: ignore[assignment]
    work.deploy_shapes = state.shapes  # type: ignore[assignment]
    if verbose:
        Console().print(report.table())  # type: ignore[union-attr]
        for note in state.notes:
            Console().print(f"note: {note}")
    return work


def _resolve_backend(backend: Backend | str) -> Backend:
    """``auto`` as ``native`` where the extension is loaded, else ``torch``; ``native`` without it is an error."""
    backend = Backend.parse(backend, "backend")
    if backend is Backend.AUTO:
        return Backend.NATIVE if native_available() else Backend.TORCH
    if backend is Backend.NATIVE and not native_available():
        raise ValueError("backend='native' but the native extension is unavailable (lightning_winoprune."
                         "extension_status() says why)")
    return backend
