"""What the importance factor buys: Winograd-domain fine-tuning with and without ``gradient_scaling``.

A timm model is trained dense once on scikit-learn's bundled digits (upsampled). Then, for each method, ratio and
fine-tuning learning rate (the dense one and a tenth of it), a copy is pruned one-shot by ``WinogradPruning`` at the
start of fine-tuning and fine-tuned for the same epochs, once with ``gradient_scaling=False`` and once with
``True``. The table gives the test accuracy right after pruning and after every fine-tuning epoch. Optionally,
``spatial-winograd`` runs too (``--spatial``: stage 1 at the first epoch, stage 2 one epoch later, always with the
factor; ``--stage1 0.4 0.6``: stage 1 alone to those Winograd-domain sparsities, then spatial training only).

    python benchmarks/bench_gradient_scaling.py [--m 2] [--epochs 4] [--finetune 3] [--spatial] [--seed 0]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import lightning as L
import torch
from _common import PrunedAccuracy, accuracy, quiet, train_dense, trainer
from rich.table import Table

from lightning_winoprune import WinogradPruning
from lightning_winoprune.data import DigitsDataModule
from lightning_winoprune.recipes import ImageClassifier


class EpochAccuracy(L.Callback):
    """Test accuracy at the end of every training epoch."""

    def __init__(self, data: DigitsDataModule) -> None:
        self.data, self.acc = data, []

    def on_train_epoch_end(self, tr: L.Trainer, module: L.LightningModule) -> None:
        self.acc.append(accuracy(module, self.data))


def run(dense: ImageClassifier, data: DigitsDataModule, pruner: WinogradPruning, lr: float,
        epochs: int, seed: int = 1) -> tuple[float, list[float], float]:
    """Fine-tune a pruned copy; return the accuracy right after pruning, after each epoch, and the sparsity."""
    L.seed_everything(seed, verbose=False)
    module = copy.deepcopy(dense)
    module.hparams["lr"] = lr
    module.hparams["lr_schedule"] = "constant"
    pruned, per_epoch = PrunedAccuracy(data), EpochAccuracy(data)
    trainer(epochs, [pruner, pruned, per_epoch]).fit(module, datamodule=data)
    return pruned.acc, per_epoch.acc, pruner.history[-1]["sparsity"]  # Winograd-domain, also after stages=1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--m", type=int, default=2, help="Winograd tile size of every run (2: F(2,3), 4: F(4,3))")
    ap.add_argument("--epochs", type=int, default=4, help="dense training epochs")
    ap.add_argument("--finetune", type=int, default=3, help="fine-tuning epochs after pruning (same for every run)")
    ap.add_argument("--dense-lr", type=float, default=0.05, help="the dense training's learning rate")
    ap.add_argument("--amounts", type=float, nargs="+", default=[0.7, 0.9])
    ap.add_argument("--methods", nargs="+", default=["wsp-r", "bwsp"])
    ap.add_argument("--score", default="l2-scaled", help="block score of the WSP runs")
    ap.add_argument("--spatial", action="store_true", help="also run spatial-winograd (stage 2 one epoch later)")
    ap.add_argument("--stage1", type=float, nargs="*", default=[],
                    help="also run spatial-winograd's stage 1 alone (stages=1) to these sparsities, dense LR")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the dense training; every fine-tuning run uses seed + 1 (the data order)")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args()
    console = quiet()
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seed {args.seed}")
    dense, data, dense_acc = train_dense(args.model, args.image_size, args.epochs, console, seed=args.seed)
    rows = []
    runs: list[tuple[str, float, float, bool | None]] = [
        (method, amount, lr, scaled) for amount in args.amounts for method in args.methods
        for lr in (args.dense_lr, args.dense_lr / 10) for scaled in (False, True)]
    if args.spatial:
        runs += [("spatial-winograd", amount, lr, True) for amount in args.amounts
                 for lr in (args.dense_lr, args.dense_lr / 10)]
    runs += [("stage 1", amount, args.dense_lr, None) for amount in args.stage1]
    for method, amount, lr, scaled in runs:
        extra: dict = {"score": args.score}
        if method == "spatial-winograd":
            extra = {"spatial_epochs": 1}
        elif method == "stage 1":
            method, extra = "spatial-winograd", {"stages": 1, "spatial_amount": amount}
        cb = WinogradPruning(method=method, amount=amount, m=args.m, gradient_scaling=scaled, verbose=0,
                             calibration_batches=4, **extra)
        t0 = time.perf_counter()
        acc_pruned, per_epoch, sparsity = run(dense, data, cb, lr, args.finetune, seed=args.seed + 1)
        method = "spatial-winograd stage 1" if extra.get("stages") == 1 else method
        rows.append({"method": method, "amount": amount, "lr": lr, "gradient_scaling": bool(scaled),
                     "sparsity": sparsity, "acc_pruned": acc_pruned, "acc_per_epoch": per_epoch,
                     "seconds": time.perf_counter() - t0})
        console.print(f"  {method} {amount:.0%} lr {lr:g} scaling {scaled}: {acc_pruned:.4f} -> "
                      + " ".join(f"{a:.4f}" for a in per_epoch))

    table = Table(title=f"{args.model} F({args.m},3) on digits {args.image_size}x{args.image_size}: dense test "
                        f"accuracy {dense_acc:.4f}; fine-tuning {args.finetune} epochs, constant LR")
    for col in ("method", "amount", "LR", "gradient scaling", "sparsity", "after pruning",
                *[f"epoch {e}" for e in range(args.finetune)]):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['amount']:.0%}", f"{r['lr']:g}", "yes" if r["gradient_scaling"] else "no",
                      f"{r['sparsity']:.3f}", f"{r['acc_pruned']:.4f}", *[f"{a:.4f}" for a in r["acc_per_epoch"]])
    console.print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "torch": torch.__version__, "dense_acc": dense_acc, "rows": rows}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
