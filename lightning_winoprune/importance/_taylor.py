"""First-order Taylor saliency ``|w * dL/dw|`` of layer weights, summed over calibration batches (docs/pruning.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from torch import nn

__all__ = ["layer_scores", "taylor_importance"]


def _progress_bar(enabled: bool) -> Progress:
    """A transient rich progress bar; with ``enabled=False`` it renders nothing."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
        disable=not enabled,
    )


@contextlib.contextmanager
def _preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore the ``training`` flag of every submodule of ``model`` on exit (also on an exception)."""
    modes = [(mod, mod.training) for mod in model.modules()]
    try:
        yield
    finally:
        for mod, training in modes:
            mod.training = training


def _check_loss(loss: object, what: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a torch.Tensor, got {type(loss).__name__} ({what})")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)} ({what})")
    return loss.reshape(())


def _layer_weights(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    if not layers:
        raise ValueError("layers is empty: pass at least one {name: module} whose weight is to be scored")
    in_model = {id(p) for p in model.parameters()}
    weights: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        w = getattr(layer, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"layer {name!r} ({type(layer).__name__}) has no tensor attribute 'weight'")
        if id(w) not in in_model:
            raise ValueError(f"the weight of layer {name!r} is not a parameter of the model")
        if not w.is_floating_point():
            raise TypeError(f"the weight of layer {name!r} must be floating point, got {w.dtype}")
        weights[name] = w
    return weights


def taylor_importance(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    progress: bool = True,
    description: str = "Taylor importance",
) -> dict[str, torch.Tensor]:
    """First-order Taylor saliency ``|w * dL/dw|`` of every layer's ``weight``, summed over ``batches``.

    For a :class:`~lightning_winoprune.winograd.WinogradConv2d` the weight is the Winograd-domain ``U``; entries its
    mask prunes score zero (their gradient is zero, or with ``mask_in_forward`` off, their stored weight).

    The model runs in eval mode (batch-norm statistics are used, not updated; dropout is off), with gradients
    enabled even when called under ``torch.no_grad()`` or ``torch.inference_mode()``. Gradients are taken with
    :func:`torch.autograd.grad`, so no ``.grad`` is accumulated; the ``.grad`` of every model parameter (the very
    tensor, untouched, or ``None``), the ``requires_grad`` flag of every scored weight (frozen weights are scored
    too) and every submodule's train/eval mode are restored on return, also when ``loss_fn`` raises.

    Args:
        model: The model; every layer's weight must be one of its parameters.
        layers: Name -> module with a ``weight``, e.g. ``dict(iter_winograd_layers(model))`` (see
            :func:`~lightning_winoprune.winograd.iter_winograd_layers`).
        batches: Calibration batches, iterated once. They must not be inference tensors (made under
            ``torch.inference_mode()``, as Lightning's validation loop does): autograd cannot use those.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss of one batch.
        progress: Show a transient rich progress bar.
        description: The progress bar's label.

    Returns:
        Name -> float32 saliency of the weight's shape, detached, on the weight's device.

    Raises:
        ValueError: If ``layers`` or ``batches`` is empty, a weight is not a parameter of ``model``, the loss is not
            a scalar, or it does not depend on any parameter (e.g. computed under ``torch.no_grad()``).
        TypeError: If a layer has no tensor ``weight`` or ``loss_fn`` returns something other than a tensor.

    """
    weights = _layer_weights(model, layers)
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    saved_requires_grad = [(w, w.requires_grad) for w in weights.values()]
    saliency: dict[str, torch.Tensor] = {}
    inputs = list(weights.values())
    total = len(batches) if isinstance(batches, Sized) else None
    seen = 0
    try:
        for p in params:  # set aside: anything accumulated meanwhile lands in fresh tensors that are dropped
            p.grad = None
        with _preserved_modes(model), torch.inference_mode(False), torch.enable_grad(), _progress_bar(progress) as bar:
            model.eval()
            saliency = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()}
            for w in inputs:
                w.requires_grad_(True)
            task = bar.add_task(description, total=total)
            for batch in batches:
                loss = _check_loss(loss_fn(model, batch), f"batch {seen}")
                if not loss.requires_grad:
                    raise ValueError(
                        f"the loss of batch {seen} does not require grad: loss_fn must compute it from the model's "
                        "parameters with autograd enabled (not under torch.no_grad())"
                    )
                grads = torch.autograd.grad(loss, inputs, allow_unused=True)
                for (name, w), g in zip(weights.items(), grads, strict=True):
                    if g is not None:  # None: the loss does not depend on this layer (zero saliency)
                        saliency[name] += (w.detach().float() * g.float()).abs()
                seen += 1
                bar.advance(task)
    finally:
        for w, flag in saved_requires_grad:
            w.requires_grad_(flag)
        for p, g_old in zip(params, saved_grads, strict=True):
            p.grad = g_old
    if seen == 0:
        raise ValueError("batches is empty: Taylor importance needs at least one calibration batch")
    return saliency


def layer_scores(saliency: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Mean saliency per element of every layer, comparable across layers of different sizes.

    Args:
        saliency: Name -> per-element saliency (e.g. from :func:`taylor_importance`).

    Returns:
        Name -> mean saliency (``0.0`` for an empty tensor).

    """
    return {name: float(s.detach().float().mean()) if s.numel() else 0.0 for name, s in saliency.items()}
