"""Keep freed memory in the process for reuse: the arena that ONNX Runtime and OpenVINO have and torch on CPU lacks.

A torch model on the CPU allocates every activation per call through the C library's ``malloc``. glibc serves large
blocks (its threshold adapts, up to 32 MiB) with fresh ``mmap`` pages and gives them back on ``free``, so a model
with large activations pays a page fault for every 4 KiB of every large activation on every call (what that costs a
VGG-16 is in ``docs/benchmarks.md``, "Whole-model deployment"). Inference runtimes avoid that with a memory arena;
:func:`keep_freed_memory` gets the same from glibc.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` serve every block from its heap and keep freed memory for reuse (for the process).

    Large activations then cost no page faults after the first call, for our deployed model and for any other torch
    model in the process alike (``benchmarks/bench_deploy.py`` applies it to every torch runtime it times). The price
    is memory: the process keeps the most it ever held (freed blocks are reused, not returned to the system), as an
    inference runtime's arena does. Call it once, early, in a process that serves a model; it changes process-wide
    ``malloc`` settings (``mallopt``: no ``mmap`` blocks, no heap trimming), the same as starting the process with
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``.

    Returns:
        ``True`` when the settings were applied; ``False`` where the C library is not glibc (macOS, Windows, musl),
        which changes nothing.

    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # musl and other C libraries: no mallopt with these parameters
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
