"""Load a pruned Lightning checkpoint outside the Trainer, into a freshly built model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_winoprune.callbacks._deprune import register_mask_buffer, replay_shrink
from lightning_winoprune.winograd._convert import winogradize

__all__ = ["load_pruned_checkpoint"]


def load_pruned_checkpoint(
    model: nn.Module, checkpoint: str | Path | dict[str, Any], prefix: str = "", strict: bool = True
) -> nn.Module:
    """Rebuild the pruned structure on ``model`` and load a checkpoint written by a Trainer with pruning callbacks.

    The callbacks' saved state says which layers were converted to the Winograd domain and with which tile size;
    those layers are converted on ``model`` (in place). When ``DEPrune(physical=True)`` shrank the model before the
    checkpoint was written (``trainer.save_checkpoint(path)`` after ``fit``), the same channels are removed from
    ``model`` (this needs ``torch-pruning``). Then the weights, biases and masks are loaded. Use it for inference::

        model = MyLightningModule(...)            # or the bare network, with prefix="model."
        load_pruned_checkpoint(model, "last.ckpt").eval()

    Args:
        model: The LightningModule the checkpoint was trained with, or its inner network (see ``prefix``).
        checkpoint: A path, or an already loaded checkpoint dict.
        prefix: Prefix of the inner network's attribute in the LightningModule (e.g. ``"model."``); names and
            state-dict keys starting with it are loaded into ``model`` without it.
        strict: Passed to ``load_state_dict``.

    Returns:
        ``model``, converted and loaded.

    Raises:
        ValueError: If the checkpoint holds no pruning-callback state (``WinogradPruning`` or ``DEPrune``), or a
            physically shrunk one whose layers are not under ``prefix``.
        MisconfigurationException: If the checkpoint was physically shrunk and ``torch-pruning`` is not installed.
    """
    ckpt = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location="cpu",
                                                                      weights_only=False)
    callbacks = ckpt.get("callbacks", {})
    wino = [v for k, v in callbacks.items() if k.startswith("WinogradPruning")]
    deprune = [v for k, v in callbacks.items() if k.startswith("DEPrune")]
    if not wino and not deprune:
        raise ValueError("the checkpoint holds no WinogradPruning or DEPrune state: was it written with the callback "
                         "attached?")
    for state in wino:
        names = [n[len(prefix):] for n in state["layer_names"] if n.startswith(prefix)]
        if names:
            winogradize(model, m=state["m"], skip_first=False, include=[_literal(n) for n in names])
    for state in deprune:
        if state.get("physical_done"):
            _replay_physical(model, state, prefix)
        for name in state["layer_names"]:
            if name.startswith(prefix):
                conv = model.get_submodule(name[len(prefix):])
                assert isinstance(conv, nn.Conv2d)
                register_mask_buffer(conv)
    weights = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(weights, strict=strict)
    return model


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
