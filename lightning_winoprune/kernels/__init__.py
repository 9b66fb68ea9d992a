"""The compiled extension ``lightning_winoprune.kernels._C``: probed once, chosen per call, with a torch fallback.

This package only wraps ``_C``; the inference layers built on it live in :mod:`lightning_winoprune.deploy`.
"""

from lightning_winoprune.kernels._backend import (
    DISABLE_ENV_VAR,
    Backend,
    extension_status,
    native_available,
    native_bf16_path,
    native_isa,
    resolve_backend,
)

__all__ = [
    "DISABLE_ENV_VAR",
    "Backend",
    "extension_status",
    "native_available",
    "native_bf16_path",
    "native_isa",
    "resolve_backend",
]
