"""Run by test_ddp.py: 2-process CPU DDP (gloo) fine-tuning with WinogradPruning; each rank dumps its masks."""

import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

from lightning_winoprune import DEPrune, WinogradConv2d, WinogradPruning
from lightning_winoprune.data import DigitsDataModule
from lightning_winoprune.recipes import ImageClassifier


class DumpMasks(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, (WinogradPruning, DEPrune)))
        if isinstance(cb, WinogradPruning):
            layers = {n: (m.weight, m.mask) for n, m in pl_module.named_modules() if isinstance(m, WinogradConv2d)}
            decisions = cb.policies
        else:
            layers = {n: (pl_module.get_submodule(n).weight, pl_module.get_submodule(n).weight_mask)
                      for n in cb.layer_names}
            decisions = {"dw_rounding": cb.dw_rounding, "pw_pruned": cb.pw_pruned}
        torch.save({"masks": {n: m.clone() for n, (_, m) in layers.items()},
                    "weights": {n: w.detach().clone() for n, (w, _) in layers.items()},
                    "policies": decisions, "importance": cb.layer_importance},
                   self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "winograd"
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    L.seed_everything(0)
    if mode == "winograd":
        module = ImageClassifier("resnet18", num_classes=10, in_chans=1, lr=0.01)
        pruning: L.Callback = WinogradPruning(method="abwsp", amount=0.5, importance="taylor", calibration_batches=2,
                                              unit=8, align=2, verbose=0)
    elif mode == "spatial":  # stage 1 at epoch 0 (Taylor-ranked rings), spatial training, stage 2 at epoch 1
        module = ImageClassifier("resnet18", num_classes=10, in_chans=1, lr=0.01)
        pruning = WinogradPruning(method="spatial-winograd", amount=0.5, spatial_amount=0.3, spatial_epochs=1,
                                  score="taylor", calibration_batches=2, verbose=0)
    else:
        module = ImageClassifier("mobilenetv2_100", num_classes=10, in_chans=1, lr=0.01)
        pruning = DEPrune(method="dcp-bh", dw_amount=0.5, pw_amount=0.3, calibration_batches=2, verbose=0)
    epochs = 2 if mode == "spatial" else 1
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=epochs, limit_train_batches=2,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[pruning, DumpMasks(out)])
    trainer.fit(module, datamodule=DigitsDataModule(image_size=16, batch_size=16))


if __name__ == "__main__":
    main()
