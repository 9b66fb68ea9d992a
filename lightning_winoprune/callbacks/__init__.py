"""Lightning callbacks: pruning during fine-tuning, and loading pruned checkpoints."""

from lightning_winoprune.callbacks._base import PruningCallback
from lightning_winoprune.callbacks._checkpoint import load_pruned_checkpoint
from lightning_winoprune.callbacks._deprune import DEPrune
from lightning_winoprune.callbacks._schedule import PruningSchedule
from lightning_winoprune.callbacks._winograd_pruning import WinogradPruning

__all__ = ["DEPrune", "PruningCallback", "PruningSchedule", "WinogradPruning", "load_pruned_checkpoint"]
