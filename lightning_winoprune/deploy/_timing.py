"""Timing helpers shared by ``deploy``'s route tuning and ``measure_latency``: medians of interleaved rounds."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["cache_flusher", "median_ms", "rel_error", "threads_context"]


@contextmanager
def threads_context(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (shared with the native kernels' OpenMP), then restore it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's max absolute value (``inf`` on a shape mismatch)."""
    if out.shape != ref.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    out, ref = out.double(), ref.double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def cache_flusher() -> Callable[[], None]:
    """A function that evicts the CPU caches (writes a buffer of twice the last-level cache, at least 64 MiB)."""
    try:
        llc = int(os.sysconf("SC_LEVEL3_CACHE_SIZE"))
    except (ValueError, OSError, AttributeError):
        llc = 0
    buf = torch.zeros(max(2 * llc, 64 << 20) // 4)

    def flush() -> None:
        buf.add_(1.0)

    return flush


def median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
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
