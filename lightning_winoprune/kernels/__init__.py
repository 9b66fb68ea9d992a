"""The compiled extension ``lightning_winoprune._C``: probed once, chosen per call, with a torch fallback."""

from lightning_winoprune.kernels._backend import (
    DISABLE_ENV_VAR,
    Backend,
    extension_status,
    native_available,
    resolve_backend,
)
from lightning_winoprune.kernels._conv import (
    NativeConv,
    PackedDepthwiseConv,
    PackedWinogradConv,
    SparseForm,
    native_isa,
)

__all__ = [
    "DISABLE_ENV_VAR",
    "Backend",
    "NativeConv",
    "PackedDepthwiseConv",
    "PackedWinogradConv",
    "SparseForm",
    "extension_status",
    "native_available",
    "native_isa",
    "resolve_backend",
]
