"""Probe the native extension once and choose between it and the torch fallback.

The extension ``kernels._C`` is optional at run time: if it cannot be imported (a source checkout that
was never built, an unsupported platform) or ``WINOPRUNE_DISABLE_EXT=1`` is set, every op falls back to its torch
implementation and a single :class:`RuntimeWarning` says so.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

import torch

from lightning_winoprune._enum import ParsableEnum

__all__ = ["DISABLE_ENV_VAR", "Backend", "extension_status", "native_available", "native_isa", "resolve_backend"]

DISABLE_ENV_VAR = "WINOPRUNE_DISABLE_EXT"


class Backend(ParsableEnum):
    """Which implementation runs a kernel.

    * ``auto``: the native kernel where it applies (CPU float32 tensors and a loaded extension), else torch.
    * ``native``: the native kernel; an error if it is unavailable or does not apply.
    * ``torch``: the pure-torch implementation (any device and dtype, autograd-friendly, slower).
    """

    AUTO = "auto"
    NATIVE = "native"
    TORCH = "torch"


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[ModuleType | None, str]:
    if os.environ.get(DISABLE_ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}:
        return None, f"disabled by {DISABLE_ENV_VAR}={os.environ[DISABLE_ENV_VAR]}"
    try:
        from lightning_winoprune.kernels import _C  # type: ignore[attr-defined]
    except ImportError as err:
        return None, f"lightning_winoprune.kernels._C could not be imported ({err}); reinstall with `pip install .`"
    return _C, f"loaded from {_C.__file__} (OpenMP: {_C.openmp}, threads: {_C.max_threads()})"


_warned = False


def _warn_fallback_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"lightning_winoprune native kernels are unavailable: {reason}. Falling back to the slower torch path.",
            RuntimeWarning,
            stacklevel=3,
        )


def native_available() -> bool:
    """Whether the compiled extension is loaded (and not disabled)."""
    return _probe()[0] is not None


def extension_status() -> str:
    """One line saying whether the extension is loaded, from where, or why not."""
    return _probe()[1]


def native_isa() -> str | None:
    """The instruction set the native kernels dispatch to (``"avx512"``, ``"avx2"``, ``"generic"``), or ``None``."""
    return str(native_module().isa()) if native_available() else None


def native_bf16_path() -> str | None:
    """The bfloat16 path the native Winograd kernels dispatch to (``"amx"``, ``"avx512bf16"``), or ``None``.

    ``None`` where the extension is not loaded, the CPU has neither AMX-BF16 nor AVX512-BF16, Linux refused the AMX
    tile state and there is no AVX512-BF16, or ``$WINOPRUNE_BF16`` is ``none``.
    """
    if not native_available():
        return None
    path = str(native_module().bf16_path())
    return None if path == "none" else path


def native_module() -> ModuleType:
    """The loaded ``_C`` module.

    Raises:
        RuntimeError: If the extension is unavailable (the message says why).

    """
    ext, reason = _probe()
    if ext is None:
        raise RuntimeError(f"backend='native' was requested but the extension is unavailable: {reason}")
    return ext


def resolve_backend(backend: Backend | str, *tensors: torch.Tensor) -> Backend:
    """Decide which implementation runs for these tensors.

    Args:
        backend: The requested backend.
        *tensors: The op's tensor inputs; native kernels need CPU float32.

    Returns:
        ``Backend.NATIVE`` or ``Backend.TORCH``.

    Raises:
        ValueError: If ``backend`` is not a valid name, or is ``native`` for tensors the kernels do not take.
        RuntimeError: If ``native`` is requested and the extension is unavailable.

    """
    backend = Backend.parse(backend)
    if backend is Backend.TORCH:
        return backend
    fits = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    if backend is Backend.NATIVE:
        native_module()
        if not fits:
            found = sorted({f"{t.device.type}/{t.dtype}" for t in tensors})
            raise ValueError(f"backend='native' needs CPU float32 tensors, got {found}")
        return backend
    if not fits:
        return Backend.TORCH
    if not native_available():
        _warn_fallback_once(extension_status())
        return Backend.TORCH
    return Backend.NATIVE
