"""Load a pruned Lightning checkpoint outside the Trainer, into a freshly built model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_winoprune._io import load_checkpoint
from lightning_winoprune._utils import MASK_ATTR
from lightning_winoprune.callbacks._winograd_pruning import load_spatial
from lightning_winoprune.pruning._shrink import register_mask_buffer, replay_shrink, require_torch_pruning
from lightning_winoprune.winograd._convert import winogradize
from lightning_winoprune.winograd._layer import WinogradConv2d, conv_ineligibility

__all__ = ["load_pruned_checkpoint"]


def load_pruned_checkpoint(
    model: nn.Module, checkpoint: str | Path | dict[str, Any], prefix: str = "", strict: bool = True,
    trust: bool = False,
) -> nn.Module:
    """Rebuild the pruned structure on ``model`` and load a checkpoint written by a Trainer with pruning callbacks.

    The callbacks' saved state says which layers were converted to the Winograd domain and with which tile size;
    those layers are converted on ``model`` (in place). When ``DEPrune(physical=True)`` shrank the model before the
    checkpoint was written (``trainer.save_checkpoint(path)`` after ``fit``), the same channels are removed from
    ``model`` (this needs ``torch-pruning``). Then the weights, biases and masks are loaded. A
    ``WinogradPruning(method="spatial-winograd", stages=1)`` checkpoint holds its layers as plain 3x3 kernels (the
    spatial model): they are converted with the checkpoint's tile size too, and the border positions of every
    kernel whose eight outer entries are exactly zero (the pruned rings) are masked. Use it for inference::

        model = MyLightningModule(...)            # or the bare network, with prefix="model."
        load_pruned_checkpoint(model, "last.ckpt").eval()

    Before anything on ``model`` changes, its architecture is checked against the checkpoint (the state-dict keys,
    and their shapes once converted); on a mismatch ``model`` is left as it was. Pruned weights are absent: entries
    a mask prunes are stored as exact zeros after loading, whatever the checkpoint held there.

    Args:
        model: The LightningModule the checkpoint was trained with, or its inner network (see ``prefix``).
        checkpoint: A path, or an already loaded checkpoint dict.
        prefix: Prefix of the inner network's attribute in the LightningModule (e.g. ``"model."``); names and
            state-dict keys starting with it are loaded into ``model`` without it.
        strict: Passed to ``load_state_dict``; with ``False`` missing and unexpected keys are allowed (shapes must
            still match).
        trust: Unpickle the file without restrictions. By default only tensors, containers, strings and numbers are
            read (``torch.load(weights_only=True)``), so a file someone else made cannot run code on load; pass
            ``True`` only for a file you made yourself that needs more.

    Returns:
        ``model``, converted and loaded.

    Raises:
        CheckpointError: If the file is missing, truncated or not a checkpoint (a ``ValueError``), or
            ``UntrustedCheckpointError`` if its pickle needs more than tensors and plain data (the file's code never
            runs).
        ValueError: If the checkpoint holds no pruning-callback state (``WinogradPruning`` or ``DEPrune``), if it
            does not fit ``model`` (the message names the first mismatching key and, when another ``prefix`` would
            make the keys match, suggests it), or if a physically shrunk one has layers that are not under
            ``prefix``.
        MisconfigurationException: If the checkpoint was physically shrunk and ``torch-pruning`` is not installed.
    """
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, trust=trust)
    callbacks = ckpt.get("callbacks", {})
    if not isinstance(callbacks, dict):
        raise ValueError(f"the checkpoint's 'callbacks' entry is a {type(callbacks).__name__}, not a dict: it was not "
                         "written by a Lightning Trainer")
    wino = [v for k, v in callbacks.items() if k.startswith("WinogradPruning")]
    deprune = [v for k, v in callbacks.items() if k.startswith("DEPrune")]
    if not wino and not deprune:
        raise ValueError("the checkpoint holds no WinogradPruning or DEPrune state: was it written with the callback "
                         "attached?")
    state_dict: dict[str, Any] = ckpt.get("state_dict", {})
    physical = any(state.get("physical_done") for state in deprune)
    if physical:  # say what is missing before any other check
        require_torch_pruning()
    problem = _mismatch(model, state_dict, wino, deprune, prefix, strict, check_shapes=not physical)
    if problem is not None:
        hint = _better_prefix(model, state_dict, wino, deprune, prefix, strict, physical)
        raise ValueError(
            f"the checkpoint does not fit this model (nothing was changed): {problem}"
            + (f"; with prefix={hint!r} it does: load_pruned_checkpoint(model, path, prefix={hint!r})" if hint
               is not None else "; is it the model the checkpoint was trained with (same constructor arguments)?")
        )
    for state in wino:
        names = [n[len(prefix):] for n in state["layer_names"] if n.startswith(prefix)]
        if names:
            winogradize(model, m=state["m"], skip_first=False, include=[_literal(n) for n in names])
    masked: list[nn.Conv2d] = []
    for state in deprune:
        if state.get("physical_done"):
            _replay_physical(model, state, prefix)
        for name in state["layer_names"]:
            if name.startswith(prefix):
                conv = model.get_submodule(name[len(prefix):])
                assert isinstance(conv, nn.Conv2d)
                register_mask_buffer(conv)
                masked.append(conv)
    weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    for state in wino:
        for full in state["layer_names"]:
            if full.startswith(prefix) and _saved_spatial(state, state_dict, full):
                name = full[len(prefix):]
                layer = model.get_submodule(name)
                assert isinstance(layer, WinogradConv2d)
                load_spatial(weights, f"{name}.", weights[f"{name}.weight"], layer)
    model.load_state_dict(weights, strict=strict)
    with torch.no_grad():  # pruned weights are absent: a NaN or inf stored there must not reach the output
        for mod in model.modules():
            if isinstance(mod, WinogradConv2d):
                mod.zero_pruned_()
        for conv in masked:
            mask = getattr(conv, MASK_ATTR)
            if mask.shape == conv.weight.shape:
                conv.weight.masked_fill_(~mask, 0)
    return model


def _mismatch(model: nn.Module, state_dict: dict[str, Any], wino: list[dict[str, Any]],
              deprune: list[dict[str, Any]], prefix: str, strict: bool, check_shapes: bool = True) -> str | None:
    """The first reason the checkpoint cannot load into ``model`` under ``prefix`` (``None`` if it can), read-only."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional: set[str] = set()
    for state in wino:
        p = int(state["m"]) + 2
        for full in state["layer_names"]:
            if not full.startswith(prefix):
                continue
            name = full[len(prefix):]
            mod = _submodule(model, name)
            if mod is None:
                return f"the checkpoint's Winograd layer {full!r} is not a module of the model"
            if not isinstance(mod, WinogradConv2d):
                reason = conv_ineligibility(mod)
                if reason is not None:
                    return f"the checkpoint's Winograd layer {full!r} cannot be converted in the model: {reason}"
                assert isinstance(mod, nn.Conv2d)
            assert isinstance(mod, (nn.Conv2d, WinogradConv2d))
            # a spatial-Winograd stages=1 checkpoint saves the 3x3 kernels (converted after loading), no mask
            spatial = _saved_spatial(state, state_dict, full)
            winograd = (mod.out_channels, mod.in_channels, p, p)
            if spatial:
                shapes[f"{name}.weight"] = (mod.out_channels, mod.in_channels, 3, 3)
            elif not isinstance(mod, WinogradConv2d):
                shapes[f"{name}.weight"] = winograd
            optional.add(f"{name}.mask")
            shapes[f"{name}.mask"] = winograd if spatial else shapes[f"{name}.weight"]
    for state in deprune:
        for full in state["layer_names"]:
            if not full.startswith(prefix):
                continue
            name = full[len(prefix):]
            mod = _submodule(model, name)
            if not isinstance(mod, nn.Conv2d):
                return f"the checkpoint's DEPrune layer {full!r} is not a Conv2d of the model"
            shapes[f"{name}.{MASK_ATTR}"] = tuple(mod.weight.shape)
    saved = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if strict:
        unexpected = [k for k in saved if k not in shapes]
        if unexpected:
            return f"the checkpoint's key {prefix + unexpected[0]!r} has no counterpart in the model " \
                   f"({len(unexpected)} such keys)"
        missing = [k for k in shapes if k not in saved and k not in optional]
        if missing:
            return f"the model's key {missing[0]!r} is not in the checkpoint under prefix={prefix!r} " \
                   f"({len(missing)} such keys)"
    elif not any(k in shapes for k in saved):
        return f"no key of the checkpoint under prefix={prefix!r} is a key of the model"
    if check_shapes:
        for key, value in saved.items():
            want = shapes.get(key)
            if want is not None and isinstance(value, torch.Tensor) and tuple(value.shape) != want:
                return f"{prefix + key!r} has shape {tuple(value.shape)} in the checkpoint, {want} in the model"
    return None


def _better_prefix(model: nn.Module, state_dict: dict[str, Any], wino: list[dict[str, Any]],
                   deprune: list[dict[str, Any]], prefix: str, strict: bool, physical: bool) -> str | None:
    """Another prefix under which the checkpoint fits ``model``: one of its keys' leading dotted parts, or ``""``."""
    candidates = {""}
    for key in state_dict:
        parts = key.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in range(1, min(len(parts), 3)))
    for cand in sorted(candidates - {prefix}, key=len):
        if _mismatch(model, state_dict, wino, deprune, cand, strict, check_shapes=not physical) is None:
            return cand
    return None


def _saved_spatial(state: dict[str, Any], state_dict: dict[str, Any], name: str) -> bool:
    """Whether a spatial-Winograd checkpoint holds layer ``name`` as 3x3 kernels (what ``stages=1`` saves)."""
    saved = state_dict.get(f"{name}.weight")
    return (state.get("method") == "spatial-winograd" and isinstance(saved, torch.Tensor) and saved.dim() == 4
            and tuple(saved.shape[-2:]) == (3, 3))


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _replay_physical(model: nn.Module, state: dict[str, Any], prefix: str) -> None:
    """Remove from ``model`` the pointwise filters (and coupled channels) DEPrune removed, in the same order."""
    removed = []
    for name, idxs in state["physical_removed"]:
        if not name.startswith(prefix):
            raise ValueError(f"the checkpoint's DEPrune shrank {name!r}, which is not under prefix={prefix!r}")
        removed.append((name[len(prefix):], list(idxs)))
    shape, dtype = state["physical_input"]
    param = next(model.parameters())
    example = torch.zeros(shape, dtype=getattr(torch, dtype), device=param.device)
    replay_shrink(model, removed, example)


def _literal(name: str) -> str:
    import re

    return re.escape(name)
