"""Lightning callbacks: pruning during fine-tuning, latency validation at the end, safe pruned checkpoints."""

from lightning_winoprune.callbacks._base import PruningCallback
from lightning_winoprune.callbacks._checkpoint import load_pruned_checkpoint
from lightning_winoprune.callbacks._checkpoint_io import SafeCheckpointIO
from lightning_winoprune.callbacks._deprune import DEPrune
from lightning_winoprune.callbacks._latency import LatencyValidation
from lightning_winoprune.callbacks._schedule import PruningSchedule
from lightning_winoprune.callbacks._winograd_args import (
    CalibrationConfig,
    ConversionConfig,
    PatternConfig,
    ScheduleConfig,
    SpatialConfig,
)
from lightning_winoprune.callbacks._winograd_pruning import WinogradPruning

__all__ = [
    "CalibrationConfig",
    "ConversionConfig",
    "DEPrune",
    "LatencyValidation",
    "PatternConfig",
    "PruningCallback",
    "PruningSchedule",
    "SafeCheckpointIO",
    "ScheduleConfig",
    "SpatialConfig",
    "WinogradPruning",
    "load_pruned_checkpoint",
]
