"""The compiled extension ``lightning_winoprune._C``: probed once, chosen per call, with a torch fallback."""

from lightning_winoprune.kernels._backend import (
    DISABLE_ENV_VAR,
    Backend,
    extension_status,
    native_available,
    resolve_backend,
)

__all__ = ["DISABLE_ENV_VAR", "Backend", "extension_status", "native_available", "resolve_backend"]
