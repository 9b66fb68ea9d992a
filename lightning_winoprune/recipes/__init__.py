"""Runnable jobs: the image-classification LightningModule and the end-to-end demo."""

from lightning_winoprune.recipes._demo import run_demo
from lightning_winoprune.recipes._module import ImageClassifier

__all__ = ["ImageClassifier", "run_demo"]
