"""Helpers shared by the accuracy benchmarks (run them as scripts: this folder is then on sys.path)."""

from __future__ import annotations

import copy
import logging
import warnings

import lightning as L
import torch
from rich.console import Console

from lightning_winoprune.data import DigitsDataModule
from lightning_winoprune.recipes import ImageClassifier


def quiet() -> Console:
    """Silence Lightning's chatter and warnings; return the console for the benchmark's own output."""
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    return Console()


#: The Trainer's ``precision`` for every fit of the accuracy benchmarks (their ``--precision`` sets it).
PRECISION = {"value": "32-true"}


def trainer(epochs: int, callbacks: list | None = None) -> L.Trainer:
    """A quiet CPU trainer without checkpoints or loggers, in the precision ``--precision`` chose."""
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks or [],
                     num_sanity_val_steps=0, precision=PRECISION["value"])


def add_precision_argument(ap) -> None:  # type: ignore[no-untyped-def]
    """``--precision``: the Trainer precision of every fit (dense training and fine-tuning); tests stay float32."""
    ap.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"),
                    help="Trainer precision of every fit; bf16-mixed is CPU autocast to bfloat16")


@torch.no_grad()
def accuracy(module: L.LightningModule, data: DigitsDataModule) -> float:
    """Test accuracy of ``module`` (eval mode, restored afterwards)."""
    was = module.training
    module.eval()
    correct = total = 0
    for x, y in data.test_dataloader():
        correct += int((module(x).argmax(1) == y).sum())
        total += len(y)
    module.train(was)
    return correct / total


class PrunedAccuracy(L.Callback):
    """Test accuracy right after the pruning step (before any fine-tuning update); list it after the pruner."""

    def __init__(self, data: DigitsDataModule) -> None:
        self.data, self.acc = data, float("nan")

    def on_train_epoch_start(self, tr: L.Trainer, module: L.LightningModule) -> None:
        if tr.current_epoch == 0:
            self.acc = accuracy(module, self.data)


def train_dense(model: str, image_size: int, epochs: int, console: Console,
                seed: int = 0) -> tuple[ImageClassifier, DigitsDataModule, float]:
    """Train ``model`` dense on the digits once (initialisation and batch order from ``seed``); return it, the data
    and its test accuracy."""
    L.seed_everything(seed, verbose=False)
    data = DigitsDataModule(image_size=image_size, batch_size=64)
    dense = ImageClassifier(model, num_classes=10, in_chans=1, lr=0.05)
    console.print(f"training {model} dense on digits {image_size}x{image_size}, {epochs} epochs")
    trainer(epochs).fit(dense, datamodule=data)
    acc = accuracy(dense, data)
    console.print(f"dense test accuracy: {acc:.4f}")
    return dense, data, acc


def finetune_copy(dense: ImageClassifier, data: DigitsDataModule, pruner: L.Callback,
                  epochs: int) -> tuple[ImageClassifier, float, float]:
    """Prune a copy of ``dense`` with ``pruner`` and fine-tune it; return it and its accuracy before/after."""
    L.seed_everything(1, verbose=False)
    module = copy.deepcopy(dense)
    module.hparams["lr"] = 0.01
    probe = PrunedAccuracy(data)
    trainer(epochs, [pruner, probe]).fit(module, datamodule=data)
    return module, probe.acc, accuracy(module, data)
