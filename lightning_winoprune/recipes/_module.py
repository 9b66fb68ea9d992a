"""A generic image-classification LightningModule around a timm model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ImageClassifier"]


_Sched = torch.optim.lr_scheduler.LRScheduler
_SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, int, int, float, list[int]], _Sched]] = {
    "cosine": lambda opt, epochs, step, gamma, milestones: torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=max(epochs, 1)),
    "step": lambda opt, epochs, step, gamma, milestones: torch.optim.lr_scheduler.StepLR(
        opt, step_size=step, gamma=gamma),
    "multistep": lambda opt, epochs, step, gamma, milestones: torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=milestones, gamma=gamma),
    "constant": lambda opt, epochs, step, gamma, milestones: torch.optim.lr_scheduler.ConstantLR(
        opt, factor=1.0, total_iters=0),
}
#: Top-k accuracy beyond top-1 is logged when there are more classes than this k.
_TOP_K = 5


class ImageClassifier(L.LightningModule):
    """Classify images with any timm model; SGD with momentum, an LR schedule, torchmetrics accuracy.

    Logs ``{split}/loss`` and ``{split}/acc`` (top-1, micro) for ``train``, ``val`` and ``test``, and
    ``{split}/acc_top5`` when there are more than 5 classes.

    Args:
        model_name: A timm model name, e.g. ``"resnet18"``.
        num_classes: Number of classes.
        in_chans: Input channels.
        pretrained: Load timm's pretrained weights (needs them cached or a network).
        lr: Initial learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        lr_schedule: One of ``"cosine"`` (over ``max_epochs``), ``"step"`` (times ``lr_gamma`` every
            ``lr_step_size`` epochs), ``"multistep"`` (times ``lr_gamma`` at each of ``lr_milestones``) or
            ``"constant"``.
        lr_step_size: Epochs between decays for ``"step"``.
        lr_gamma: Decay factor for ``"step"`` and ``"multistep"``.
        model_kwargs: Extra keyword arguments for ``timm.create_model``.
        checkpoint_path: Load the model's weights from this file after creating it: a Lightning checkpoint of an
            ``ImageClassifier``, or a state dict (or a dict holding one under ``"state_dict"``, ``"model"`` or
            ``"model_state_dict"``) of the timm model. A classifier head of another shape (another number of
            classes) is left freshly initialised, with a warning; a stem conv for another number of input channels is
            adapted as timm adapts pretrained weights.
        lr_milestones: Epochs at which ``"multistep"`` multiplies the LR by ``lr_gamma``, e.g. the prune point and the
            middle of fine-tuning.

    Raises:
        ValueError: On an invalid schedule or learning rate, or a checkpoint whose weights do not fit the model.
        FileNotFoundError: If ``checkpoint_path`` does not exist.
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
        checkpoint_path: str | None = None,
        lr_milestones: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if lr_schedule not in _SCHEDULES:
            raise ValueError(f"lr_schedule={lr_schedule!r} is not valid; valid values are {sorted(_SCHEDULES)}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        milestones = list(lr_milestones or [])
        if lr_schedule == "multistep" and not milestones:
            raise ValueError("lr_schedule='multistep' needs lr_milestones, e.g. [6, 8]")
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in milestones) or milestones != sorted(
                milestones):
            raise ValueError(f"lr_milestones must be increasing epochs >= 0, got {lr_milestones!r}")
        if checkpoint_path is not None and not Path(checkpoint_path).is_file():
            raise FileNotFoundError(f"checkpoint_path={checkpoint_path!r} is not a file")
        self.save_hyperparameters()
        self.model = timm.create_model(
            model_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **(model_kwargs or {})
        )
        if checkpoint_path is not None:
            load_model_weights(self.model, checkpoint_path, in_chans)
        self.metrics = torch.nn.ModuleDict(
            {f"{split}_acc": MulticlassAccuracy(num_classes=num_classes, average="micro")
             for split in ("train", "val", "test")}
        )
        if num_classes > _TOP_K:
            for split in ("train", "val", "test"):
                self.metrics[f"{split}_acc_top{_TOP_K}"] = MulticlassAccuracy(num_classes=num_classes,
                                                                              average="micro", top_k=_TOP_K)

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
        top_k = f"{split}_acc_top{_TOP_K}"
        if top_k in self.metrics:
            acc_k = self.metrics[top_k]
            assert isinstance(acc_k, MulticlassAccuracy)
            acc_k(logits, y)
            self.log(f"{split}/acc_top{_TOP_K}", acc_k, on_step=False, on_epoch=True)
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
        try:
            epochs = self.trainer.max_epochs or 1
        except RuntimeError:  # not attached to a Trainer
            epochs = 1
        milestones = list(hp.get("lr_milestones") or [])
        sched = _SCHEDULES[hp["lr_schedule"]](opt, epochs, hp["lr_step_size"], hp["lr_gamma"], milestones)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


def _state_dict_of(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint file (Lightning, timm/torchvision-style or bare)."""
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict: expected a Lightning checkpoint, a state dict, or a dict with "
                         f"one under one of {list(_STATE_DICT_KEYS)}")
    for prefix in ("model.", "module."):  # an ImageClassifier's Lightning checkpoint, a DataParallel/DDP model
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_model_weights(model: nn.Module, path: str | Path, in_chans: int) -> None:
    """Load the weights in ``path`` into the timm ``model`` (see ``ImageClassifier``'s ``checkpoint_path``).

    Raises:
        ValueError: If the file holds no state dict, or keys or shapes other than the classifier head's differ.
    """
    state = _state_dict_of(torch.load(path, map_location="cpu", weights_only=True), path)
    own = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    stem = f"{cfg['first_conv']}.weight" if isinstance(cfg.get("first_conv"), str) else None
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    if stem in state and stem in own and state[stem].shape != own[stem].shape and state[stem].shape[2:] == own[
            stem].shape[2:] and state[stem].shape[0] == own[stem].shape[0]:
        from timm.models import adapt_input_conv

        state = {**state, stem: adapt_input_conv(in_chans, state[stem])}
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    head_only = [k for k in mismatched if any(k.startswith(f"{h}.") for h in heads)]
    if len(head_only) != len(mismatched):
        bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched
               if k not in head_only]
        raise ValueError(f"the weights in {path} do not fit {type(model).__name__}: " + "; ".join(bad[:5])
                         + (" ..." if len(bad) > 5 else "") + ". For a pruned checkpoint use "
                         "lightning_winoprune.load_pruned_checkpoint.")
    state = {k: v for k, v in state.items() if k not in head_only}
    missing = [k for k in own if k not in state and k not in head_only]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"the weights in {path} do not fit the model: missing keys {missing[:5]}, unexpected keys "
                         f"{unexpected[:5]}")
    if head_only:
        rank_zero_warn(f"{path}: the classifier head {head_only} has another shape (number of classes) and stays "
                       "freshly initialised")
    model.load_state_dict(state, strict=False)
