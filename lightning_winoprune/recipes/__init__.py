"""Runnable jobs: the image-classification LightningModule, the YAML recipes and the ``winoprune`` CLI, the demo."""

from lightning_winoprune.recipes._callbacks import FitSummary, PrunedCheckpoint
from lightning_winoprune.recipes._demo import run_demo
from lightning_winoprune.recipes._module import ImageClassifier
from lightning_winoprune.recipes._recipes import Recipe, list_recipes, load, recipe_path

__all__ = ["FitSummary", "ImageClassifier", "PrunedCheckpoint", "Recipe", "list_recipes", "load", "recipe_path",
           "run_demo"]
