"""Measured speed of pruned models: :func:`measure_latency` and its :class:`LatencyReport`.

The :class:`~lightning_winoprune.LatencyValidation` callback runs :func:`measure_latency` at the end of fit.
"""

from lightning_winoprune.latency._measure import LatencyMismatchError, measure_latency, pruned_layers
from lightning_winoprune.latency._report import GpuLatency, LatencyReport, LayerLatency, ModelLatency

__all__ = [
    "GpuLatency",
    "LatencyMismatchError",
    "LatencyReport",
    "LayerLatency",
    "ModelLatency",
    "measure_latency",
    "pruned_layers",
]
