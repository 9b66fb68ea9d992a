"""Timing helpers shared by ``deploy``'s route tuning and ``measure_latency``: medians of interleaved rounds."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from lightning_winoprune._utils import median_ms

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
