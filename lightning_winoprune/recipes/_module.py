"""A generic image-classification LightningModule around a timm model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ImageClassifier"]


_Sched = torch.optim.lr_scheduler.LRScheduler
_SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, int, int, float], _Sched]] = {
    "cosine": lambda opt, epochs, step, gamma: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1)),
    "step": lambda opt, epochs, step, gamma: torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=gamma),
    "constant": lambda opt, epochs, step, gamma: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0),
}


class ImageClassifier(L.LightningModule):
    """Classify images with any timm model; SGD with momentum, an LR schedule, torchmetrics top-1 (micro) accuracy.

    Args:
        model_name: A timm model name, e.g. ``"resnet18"``.
        num_classes: Number of classes.
        in_chans: Input channels.
        pretrained: Load timm's pretrained weights (needs them cached or a network).
        lr: Initial learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        lr_schedule: One of ``"cosine"``, ``"step"``, ``"constant"``.
        lr_step_size: Epochs between decays for ``"step"``.
        lr_gamma: Decay factor for ``"step"``.
        model_kwargs: Extra keyword arguments for ``timm.create_model``.

    """

    def __init__(
        self,
        model_name: str = "resnet18",
        num_classes: int = 10,
        in_chans: int = 1,
        pretrained: bool = False,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        lr_schedule: str = "cosine",
        lr_step_size: int = 30,
        lr_gamma: float = 0.1,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if lr_schedule not in _SCHEDULES:
            raise ValueError(f"lr_schedule={lr_schedule!r} is not valid; valid values are {sorted(_SCHEDULES)}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.save_hyperparameters()
        self.model = timm.create_model(
            model_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **(model_kwargs or {})
        )
        self.metrics = torch.nn.ModuleDict(
            {f"{split}_acc": MulticlassAccuracy(num_classes=num_classes, average="micro")
             for split in ("train", "val", "test")}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x``."""
        return self.model(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = self.metrics[f"{split}_acc"]
        assert isinstance(acc, MulticlassAccuracy)
        acc(logits, y)
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=split != "test")
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = self.hparams
        opt = torch.optim.SGD(
            self.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"]
        )
        epochs = self.trainer.max_epochs if self.trainer is not None and self.trainer.max_epochs else 1
        sched = _SCHEDULES[hp["lr_schedule"]](opt, epochs, hp["lr_step_size"], hp["lr_gamma"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
