"""Physical filter pruning of pointwise convs: pruned filters removed with torch-pruning, exactly where it is safe.

A filter whose ``weight_mask`` row is all False computes zeros; removing it (and the channels coupled to it through
BatchNorm, depthwise convs, squeeze-and-excitation and the next layers' inputs) leaves the masked model's function
unchanged, except where another live filter writes the same channel (a residual add). :func:`shrink_pointwise` removes
what is safe and says why it kept the rest; :func:`replay_shrink` redoes a recorded shrink on a fresh model, so a
shrunk checkpoint loads. torch-pruning is an optional extra, imported on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_winoprune._utils import MASK_ATTR, is_depthwise

__all__ = ["count_parameters", "filters_left", "register_mask_buffer", "replay_shrink", "require_torch_pruning",
           "shrink_pointwise"]

def register_mask_buffer(conv: nn.Conv2d) -> None:
    """Give ``conv`` an all-True ``weight_mask`` buffer (no-op if it has one), so checkpoints with masks load."""
    if getattr(conv, MASK_ATTR, None) is None:
        conv.register_buffer(MASK_ATTR, torch.ones_like(conv.weight, dtype=torch.bool))


_INSTALL_HINT = "pip install 'lightning-winoprune[physical]'"


def require_torch_pruning() -> Any:
    """Import ``torch_pruning`` or raise a ``MisconfigurationException`` that says how to install it."""
    try:
        import torch_pruning
    except ImportError as err:
        raise MisconfigurationException(
            f"DEPrune(physical=True) removes pruned channels with torch-pruning, which is not installed: {err}. "
            f"Install it with `{_INSTALL_HINT}` (or `pip install torch-pruning`)."
        ) from err
    return torch_pruning


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dependency_graph(model: nn.Module, example: torch.Tensor) -> Any:
    """A torch-pruning ``DependencyGraph`` of ``model`` traced in eval mode (BatchNorm statistics stay untouched)."""
    tp = require_torch_pruning()
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    finally:
        model.train(was_training)


def filters_left(conv: nn.Module) -> int:
    return conv.out_channels if isinstance(conv, nn.Conv2d) else 0


def _pruned_filters(conv: nn.Module) -> list[int]:
    """Output filters of ``conv`` whose ``weight_mask`` is all False."""
    mask = getattr(conv, MASK_ATTR, None)
    if not isinstance(mask, torch.Tensor) or mask.shape != conv.weight.shape:
        return []
    return torch.nonzero(~mask.flatten(1).any(1)).flatten().tolist()


#: Autograd ops that map a silent (all-zero) channel to a silent channel, one channel in, the same channel out.
#: BatchNorm counts as one: its constant shift on a pruned channel is the documented difference of the shrunk model.
_SILENT_PRESERVING = frozenset({
    "Convolution", "NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm", "Silu", "Relu", "Hardtanh", "Hardswish",
    "Gelu", "LeakyRelu", "Elu", "Mish", "Tanh", "Mean", "Sum", "AvgPool2D", "AdaptiveAvgPool2D",
    "MaxPool2DWithIndices", "AdaptiveMaxPool2D", "View", "UnsafeView", "Reshape", "Alias", "Permute",
    "Transpose", "Clone", "Squeeze", "Unsqueeze", "Expand", "ConstantPadNd", "UpsampleNearest2D",
    "UpsampleBilinear2D", "NativeDropout", "ToCopy",
})
_WRITERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.RNNBase, nn.MultiheadAttention)


def _op_name(node: Any) -> str:
    """``"Mul"`` for a node whose output came from ``MulBackward0``."""
    return type(node.grad_fn).__name__.rstrip("0123456789").removesuffix("Backward") if node.grad_fn else ""


def _removable(dg: Any, group: Any, names: dict[nn.Module, str]) -> tuple[set[int], set[str]]:
    """Root indices of ``group`` whose removal leaves the masked model's function (but constant shifts) unchanged.

    Removing a channel is exact where every layer that reads it (the convs and linears whose input channels the group
    removes) reads zeros. A channel is silent at the output of a conv or linear whose filter is pruned, stays silent
    through per-channel ops (BatchNorm, the usual activations, depthwise convs, pooling, reshapes), through a product
    with one silent factor (a squeeze-and-excitation gate) and through a sum of silent terms only (a residual add
    with another conv's live filter is not silent). Anything else (an unknown op, a sigmoid, GroupNorm, the network
    output) counts as live.

    Returns:
        The removable root indices, and the writers (convs, linears) with a live filter on a channel that is not.
    """
    root_of: dict[Any, dict[int, int]] = {}  # node -> {local index: root index} of the channels the group removes
    writers: dict[Any, set[int]] = {}  # writer node -> root indices of its live filters
    sinks = []
    for item in group.items:
        node, mod, handler = item.dep.target, item.dep.target.module, item.dep.handler
        root_of.setdefault(node, {}).update({int(i): int(r) for i, r in zip(item.idxs, item.root_idxs, strict=True)})
        if isinstance(mod, _WRITERS) and not is_depthwise(mod):
            if dg.is_out_channel_pruning_fn(handler):
                dead = set(_pruned_filters(mod))
                writers[node] = {int(r) for i, r in zip(item.idxs, item.root_idxs, strict=True) if int(i) not in dead}
            elif dg.is_in_channel_pruning_fn(handler):
                sinks.append(node)
    every = {r for m in root_of.values() for r in m.values()}
    if any(n.type == dg.ops.OPTYPE.OUTPUT for n in root_of):  # the group would remove network outputs
        return set(), set()

    memo: dict[Any, set[int]] = {}

    def silent(node: Any) -> set[int]:  # root indices that are silent at the output of ``node``
        if node in memo:
            return memo[node]
        memo[node] = set()  # a cycle (should not happen in a traced graph) counts as live
        carried = set(root_of.get(node, {}).values())
        ins = [i for i in node.inputs if i in root_of]
        op = _op_name(node)
        if node in writers:
            out = carried - writers[node]
        elif op in ("Mul", "Cat") or node in sinks:  # one silent factor / the one input that carries the channel
            out = set().union(*(silent(i) for i in ins)) & carried if ins else set()
        elif op in ("Add", "Sub"):  # silent only if every term is (a term outside the group, a constant, is not)
            out = set.intersection(*(silent(i) for i in ins)) & carried if len(ins) == len(node.inputs) >= 2 else set()
        elif op in _SILENT_PRESERVING and len(ins) == 1:
            out = silent(ins[0]) & carried
        else:
            out = set()
        memo[node] = out
        return out

    ok = set(every)
    for sink in sinks:
        ok &= silent(sink)
    live = {names.get(n.module, str(n.module)) for n, lv in writers.items() if lv & (every - ok)}
    return ok, live


def _prune_group(dg: Any, group: Any) -> None:
    """``group.prune()``, and the same rows / columns cut from the ``weight_mask`` buffers of the convs it shrinks."""
    cuts = []
    for item in group.items:
        mod = item.dep.target.module
        mask = getattr(mod, MASK_ATTR, None) if isinstance(mod, nn.Conv2d) else None
        if not isinstance(mask, torch.Tensor):
            continue
        if dg.is_out_channel_pruning_fn(item.dep.handler):
            dim = 0  # output filters; a depthwise conv's input channels are its filters
        elif dg.is_in_channel_pruning_fn(item.dep.handler) and mod.groups == 1:
            dim = 1
        else:  # pragma: no cover - DEPrune masks only depthwise and pointwise convs
            continue
        cuts.append((mod, dim, {int(i) for i in item.idxs}))
    group.prune()
    for mod, dim, idxs in cuts:
        mask = getattr(mod, MASK_ATTR)
        keep = torch.tensor([i for i in range(mask.shape[dim]) if i not in idxs], dtype=torch.long, device=mask.device)
        setattr(mod, MASK_ATTR, mask.index_select(dim, keep))
        assert getattr(mod, MASK_ATTR).shape == mod.weight.shape, "mask and weight shapes diverged"


def shrink_pointwise(
    model: nn.Module, names: Sequence[str], example: torch.Tensor
) -> tuple[list[tuple[str, list[int]]], dict[str, str]]:
    """Remove the pruned filters (all-False ``weight_mask`` rows) of the pointwise convs ``names`` from ``model``.

    Every conv's pruned filters are removed with torch-pruning's ``prune_conv_out_channels`` group, which also removes
    the coupled channels everywhere (BatchNorm, depthwise convs, SE convs, next layers' inputs, convs coupled through
    residual adds). Indices whose channel another conv of the group still writes with a live filter are kept, as are
    groups torch-pruning's ``check_pruning_group`` refuses (they would empty a layer). ``weight_mask`` buffers follow
    the new shapes.

    Args:
        model: The module (names are relative to it), masked by DEPrune.
        names: The pointwise convs to shrink, in order.
        example: An input ``model`` can be traced with.

    Returns:
        ``(removed, skipped)``: the ``(name, filter indices)`` removed, in order, with indices as of that step (replay
        them with :func:`replay_shrink`), and name -> reason for convs with pruned filters that were kept.
    """
    tp = require_torch_pruning()
    dg = _dependency_graph(model, example)
    module_names = {m: n for n, m in model.named_modules()}
    removed: list[tuple[str, list[int]]] = []
    skipped: dict[str, str] = {}
    for name in names:
        conv = model.get_submodule(name)
        idxs = _pruned_filters(conv)
        if not idxs:  # nothing pruned, or already removed with an earlier conv's group
            continue
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs)
        ok, live = _removable(dg, group, module_names)
        safe = [i for i in idxs if i in ok]
        if len(safe) < len(idxs):
            why = f"live filters of {', '.join(sorted(live))}" if live else "a layer that is not channel-wise"
            skipped[name] = (f"{len(idxs) - len(safe)} of {len(idxs)} pruned filters kept masked: their channels also "
                             f"carry {why} (residual add, SE gate)")
            if not safe:
                continue
            group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, safe)
        if not dg.check_pruning_group(group):
            skipped[name] = f"{len(idxs)} pruned filters kept masked: removing them would empty a coupled layer"
            continue
        _prune_group(dg, group)
        removed.append((name, safe))
    return removed, skipped


def replay_shrink(model: nn.Module, removed: Sequence[tuple[str, Sequence[int]]], example: torch.Tensor) -> None:
    """Redo the shrink :func:`shrink_pointwise` returned ``removed`` for, on a freshly built ``model`` of the same kind.

    ``weight_mask`` buffers already on ``model`` follow the new shapes; register the others afterwards.

    Args:
        model: The unshrunk module (names are relative to it).
        removed: ``(pointwise conv name, filter indices)`` in the order they were removed.
        example: An input ``model`` can be traced with.
    """
    tp = require_torch_pruning()
    dg = _dependency_graph(model, example)
    for name, idxs in removed:
        _prune_group(dg, dg.get_pruning_group(model.get_submodule(name), tp.prune_conv_out_channels, list(idxs)))
