"""Run by test_ddp.py: 2-process CPU DDP (gloo) fine-tuning with WinogradPruning; each rank dumps its masks."""

import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

from lightning_winoprune import WinogradConv2d, WinogradPruning
from lightning_winoprune.data import DigitsDataModule
from lightning_winoprune.recipes import ImageClassifier


class DumpMasks(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        masks = {n: m.mask.clone() for n, m in pl_module.named_modules() if isinstance(m, WinogradConv2d)}
        weights = {n: m.weight.detach().clone() for n, m in pl_module.named_modules() if isinstance(m, WinogradConv2d)}
        cb = next(c for c in trainer.callbacks if isinstance(c, WinogradPruning))
        torch.save({"masks": masks, "weights": weights, "policies": cb.policies, "importance": cb.layer_importance},
                   self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    L.seed_everything(0)
    module = ImageClassifier("resnet18", num_classes=10, in_chans=1, lr=0.01)
    pruning = WinogradPruning(method="abwsp", amount=0.5, importance="taylor", calibration_batches=2, unit=8,
                              align=2, verbose=0)
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, limit_train_batches=2,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[pruning, DumpMasks(out)])
    trainer.fit(module, datamodule=DigitsDataModule(image_size=16, batch_size=16))


if __name__ == "__main__":
    main()
