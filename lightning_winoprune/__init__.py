"""lightning_winoprune: prune CNNs in the shapes fast convolution kernels need.

The public API is deliberately small; building blocks live in the subpackages:

* :mod:`lightning_winoprune.winograd`: Winograd transforms, :class:`WinogradConv2d`, :func:`winogradize`.
* :mod:`lightning_winoprune.kernels`: the compiled ``_C`` extension behind a backend switch with a torch fallback.
* :mod:`lightning_winoprune.pruning`: the one masking engine; a pattern is data.
* :mod:`lightning_winoprune.deploy`: :func:`deploy`, the inference layers and the ``winoprune::`` torch custom ops.
* :mod:`lightning_winoprune.latency`: :func:`measure_latency` and its :class:`LatencyReport`.
* :mod:`lightning_winoprune.importance`: layer-importance estimators, latency tables and budgets.
* :mod:`lightning_winoprune.callbacks`: :class:`WinogradPruning`, :class:`DEPrune`, :class:`LatencyValidation` and
  :func:`load_pruned_checkpoint`.
* :mod:`lightning_winoprune.data`: the embedded digits datamodule.
* :mod:`lightning_winoprune.recipes`: the classification module and runnable jobs.
"""

from lightning_winoprune._io import CheckpointError, UntrustedCheckpointError
from lightning_winoprune.callbacks import (
    CalibrationConfig,
    ConversionConfig,
    DEPrune,
    LatencyValidation,
    PatternConfig,
    SafeCheckpointIO,
    ScheduleConfig,
    SpatialConfig,
    WinogradPruning,
    load_pruned_checkpoint,
)
from lightning_winoprune.deploy import DeployReport, deploy, load_deployed, save_deployed
from lightning_winoprune.kernels import Backend, extension_status, native_available
from lightning_winoprune.latency import LatencyReport, measure_latency
from lightning_winoprune.winograd import Route, WinogradConv2d, WinogradizeReport, winogradize

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "CalibrationConfig",
    "CheckpointError",
    "ConversionConfig",
    "DEPrune",
    "DeployReport",
    "LatencyReport",
    "LatencyValidation",
    "PatternConfig",
    "Route",
    "SafeCheckpointIO",
    "ScheduleConfig",
    "SpatialConfig",
    "UntrustedCheckpointError",
    "WinogradConv2d",
    "WinogradPruning",
    "WinogradizeReport",
    "__version__",
    "deploy",
    "extension_status",
    "load_deployed",
    "load_pruned_checkpoint",
    "measure_latency",
    "native_available",
    "save_deployed",
    "winogradize",
]
