"""Callbacks the recipes add around the pruning callbacks: checkpoints of the pruned model, the fit's key numbers."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from typing_extensions import override

from lightning_winoprune.callbacks import PruningCallback

__all__ = ["FitSummary", "PrunedCheckpoint", "prune_epochs", "trainer_callbacks"]


def trainer_callbacks(trainer: pl.Trainer) -> list[Callback]:
    """The trainer's callbacks (an attribute the Trainer sets at runtime, unknown to type checkers)."""
    return list(trainer.callbacks)  # type: ignore[attr-defined]


def prune_epochs(trainer: pl.Trainer) -> tuple[int, int] | None:
    """First and last pruning epoch over the trainer's pruning callbacks, or ``None`` without one."""
    steps = [e for cb in trainer_callbacks(trainer) if isinstance(cb, PruningCallback) for e, _ in
             cb.schedule.steps()]
    return (min(steps), max(steps)) if steps else None


class PrunedCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that saves nothing before the last pruning step of the trainer's pruning callbacks.

    A dense warm-up usually reaches a higher validation accuracy than the pruned model right after pruning; a plain
    ``ModelCheckpoint(monitor="val/acc")`` would then keep a dense checkpoint as the "best" one. This one only
    considers epochs from the last pruning epoch on (the model is then fully pruned), so ``best_model_path`` is the
    best *pruned* model. Without a pruning callback it behaves like ``ModelCheckpoint``. Takes
    ``ModelCheckpoint``'s arguments.
    """

    _from_epoch = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        epochs = prune_epochs(trainer)
        self._from_epoch = epochs[1] if epochs else 0

    def _pruning_pending(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch < self._from_epoch

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._pruning_pending(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._pruning_pending(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._pruning_pending(trainer):
            super().on_validation_end(trainer, pl_module)


class FitSummary(Callback):
    """Record the numbers of the end-of-fit summary: validation accuracy per epoch and the dense accuracy.

    The dense accuracy is the validation accuracy at the prune point: the value logged at the end of the epoch
    before the first pruning epoch, or, when there is none (pruning starts at epoch 0 on pretrained weights, or
    validation skipped that epoch), measured at the start of the first pruning epoch before any pruning callback
    runs (list this callback before them). The measurement is top-1 accuracy of ``(inputs, labels)`` batches of the
    validation loader, so it equals ``ImageClassifier``'s ``val/acc``.

    Args:
        monitor: The logged validation accuracy.
    """

    def __init__(self, monitor: str = "val/acc") -> None:
        super().__init__()
        self.monitor = monitor
        self.val_history: dict[int, float] = {}
        self.dense_acc: float | None = None
        self.dense_epoch: int | None = None
        self.fit_seconds = 0.0
        self._t0: float | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0 is not None:
            self.fit_seconds = time.perf_counter() - self._t0

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or trainer.state.fn != "fit":
            return
        self.val_history[trainer.current_epoch] = float(value)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = prune_epochs(trainer)
        if epochs is None or trainer.current_epoch != epochs[0] or self.dense_acc is not None:
            return
        before = epochs[0] - 1
        if before in self.val_history:
            self.dense_acc, self.dense_epoch = self.val_history[before], before
        else:
            self.dense_acc, self.dense_epoch = _val_accuracy(trainer, pl_module), None

    @property
    def last_val_acc(self) -> float | None:
        """The validation accuracy of the last validated epoch."""
        return self.val_history[max(self.val_history)] if self.val_history else None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"val_history": dict(self.val_history), "dense_acc": self.dense_acc, "dense_epoch": self.dense_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_history = {int(k): float(v) for k, v in state_dict.get("val_history", {}).items()}
        self.dense_acc, self.dense_epoch = state_dict.get("dense_acc"), state_dict.get("dense_epoch")


@torch.no_grad()
def _val_accuracy(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
    """Top-1 accuracy of ``pl_module`` on the validation batches (``None`` if there are none or no labels)."""
    loaders: Any = trainer.val_dataloaders
    datamodule = trainer.datamodule  # type: ignore[attr-defined]
    if loaders is None and datamodule is not None and hasattr(datamodule, "val_dataloader"):
        loaders = datamodule.val_dataloader()
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        return None
    limit = trainer.limit_val_batches
    if isinstance(limit, float):
        limit = math.inf if limit >= 1.0 else max(1, int(limit * len(loaders)))
    if limit == 0:
        return None
    was_training = pl_module.training
    pl_module.eval()
    correct = total = torch.zeros((), dtype=torch.float64, device=pl_module.device)
    try:
        for i, batch in enumerate(loaders):
            if i >= limit:
                break
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor)):
                return None
            x, y = trainer.strategy.batch_to_device(batch)[:2]
            correct = correct + (pl_module(x).argmax(dim=1) == y).sum()
            total = total + y.numel()
    finally:
        pl_module.train(was_training)
    correct = trainer.strategy.reduce(correct, reduce_op="sum")
    total = trainer.strategy.reduce(total, reduce_op="sum")
    return float(correct / total) if float(total) > 0 else None
