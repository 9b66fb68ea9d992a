"""Facts that several packages share, one home each (layer 0: imports nothing from the package).

The mask buffer's name, setting a submodule by dotted name, a conv's output size, what counts as a depthwise or a
pointwise conv, and the median timer that every route choice and latency table uses.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["MASK_ATTR", "conv_output_size", "device_sync", "is_depthwise", "is_pointwise", "median_ms", "set_submodule"]

#: The buffer that holds a spatial conv's pruning mask (``True`` = kept), as ``torch.nn.utils.prune`` names it.
MASK_ATTR = "weight_mask"


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (``"layer1.0.conv1"``) with ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def conv_output_size(size: Any, kernel: Any, stride: Any, padding: Any) -> Any:
    """One spatial dimension of a dilation-1 conv's (or pool's) output: ``(size + 2 * padding - kernel) // stride + 1``.

    Plain ints or symbolic ``SymInt`` sizes alike; the result is below 1 when the padded input is smaller than the
    kernel (callers raise their own error for that).
    """
    return (size + 2 * padding - kernel) // stride + 1


def is_depthwise(mod: nn.Module) -> bool:
    """A depthwise conv: ``groups == in_channels == out_channels > 1``."""
    return isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels


def is_pointwise(mod: nn.Module) -> bool:
    """A pointwise conv: 1x1 kernel, stride 1, groups 1."""
    return (isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) == (1, 1) and mod.groups == 1
            and tuple(mod.stride) == (1, 1))


def median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
              flush: Callable[[], None] | None = None, sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median ms of every function, timed in interleaved rounds so drifting machine load hits all alike.

    Args:
        fns: Name -> the call to time.
        repeats: Timed rounds.
        warmup: Untimed calls of every function first.
        flush: Runs (untimed) before every timed call: each call then starts with cold caches, as a layer does
            inside a whole network whose weights exceed the cache (otherwise a route with large weights, such as a
            dense F(4,3) layer, looks faster in isolation than it is in the model).
        sync: Runs after every call, inside the timing (``torch.cuda.synchronize`` for GPU work).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if sync is not None:
        sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            if flush is not None:
                flush()
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def device_sync(device: torch.device | str) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` for a CUDA device (so a timing includes the kernels), else ``None``."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)
