"""``winoprune-demo``: train a timm model on the embedded digits, move it to the Winograd domain, fine-tune there.

The smallest end-to-end use of the foundation: dense training, :func:`~lightning_winoprune.winogradize` with an
exactness check, Winograd-domain fine-tuning (the trainable weights are ``U = G g G^T``), and a summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from rich.table import Table

from lightning_winoprune._io import atomic_save, atomic_write
from lightning_winoprune.data import DigitsDataModule
from lightning_winoprune.kernels import extension_status
from lightning_winoprune.recipes._module import ImageClassifier
from lightning_winoprune.winograd import SUPPORTED_M, winogradize

__all__ = ["main", "run_demo"]


def _limits(limit_batches: int | float) -> dict[str, Any]:
    if limit_batches == 1.0:
        return {}
    return {f"limit_{split}_batches": limit_batches for split in ("train", "val", "test")}


def _fit_and_test(module: ImageClassifier, data: DigitsDataModule, epochs: int, out: Path, name: str,
                  limit_batches: int | float) -> tuple[float, float]:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=CSVLogger(out, name=name),
        default_root_dir=out,
        enable_model_summary=False,
        log_every_n_steps=1,
        **_limits(limit_batches),
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - t0
    acc = trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"]
    return float(acc), seconds


@torch.no_grad()
def _max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run_demo(
    model: str = "resnet18",
    m: int = 2,
    dense_epochs: int = 6,
    finetune_epochs: int = 2,
    image_size: int = 32,
    batch_size: int = 64,
    out: str | Path = "runs/demo",
    seed: int = 0,
    limit_batches: int | float = 1.0,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo and return its summary (also written to ``<out>/summary.json``)."""
    console = console or Console()
    out = Path(out)
    L.seed_everything(seed, workers=True, verbose=False)
    data = DigitsDataModule(image_size=image_size, batch_size=batch_size)
    module = ImageClassifier(model, num_classes=data.num_classes, in_chans=data.in_chans, lr=0.05)
    console.rule(f"[bold]1/3 dense training: {model} on digits {image_size}x{image_size}, {dense_epochs} epochs")
    dense_acc, dense_s = _fit_and_test(module, data, dense_epochs, out, "dense", limit_batches)

    console.rule(f"[bold]2/3 winogradize(m={m}): weights move to the Winograd domain F({m}x{m}, 3x3)")
    module.eval()
    x = data.split("val").tensors[0][:batch_size]
    before = module(x)
    report = winogradize(module.model, m=m)
    after = module(x)
    module.train()
    conv_err = _max_rel_error(after, before)
    console.print(report)
    console.print(f"logits rel. max error after conversion: {conv_err:.2e}  (kernels: {extension_status()})")
    converted_acc = float(
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  **_limits(limit_batches)).test(module, datamodule=data, verbose=False)[0]["test/acc"]
    )

    console.rule(f"[bold]3/3 fine-tuning in the Winograd domain, {finetune_epochs} epochs")
    module.hparams["lr"] = 0.01  # fine-tune at a fifth of the dense LR
    wino_acc, wino_s = _fit_and_test(module, data, finetune_epochs, out, "winograd", limit_batches)
    ckpt = out / "winograd_model.pt"
    atomic_save(ckpt, lambda f: torch.save(module.model.state_dict(), f))

    summary = {
        "model": model,
        "m": m,
        "converted_layers": len(report.converted),
        "skipped_layers": len(report.skipped),
        "conversion_rel_error": conv_err,
        "dense_test_acc": dense_acc,
        "converted_test_acc": converted_acc,
        "winograd_finetuned_test_acc": wino_acc,
        "dense_seconds_per_epoch": dense_s / max(dense_epochs, 1),
        "winograd_seconds_per_epoch": wino_s / max(finetune_epochs, 1),
        "state_dict": str(ckpt),
        "logs": str(out),
    }
    with atomic_write(out / "summary.json", "w") as f:
        f.write(json.dumps(summary, indent=2))
    console.print(_summary_table(summary))
    return summary


def _summary_table(summary: dict[str, Any]) -> Table:
    """The demo's summary as a table."""
    table = Table(title="winoprune demo summary")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("dense test accuracy", f"{summary['dense_test_acc']:.4f}")
    table.add_row("after winogradize (no training)", f"{summary['converted_test_acc']:.4f}")
    table.add_row("after Winograd-domain fine-tuning", f"{summary['winograd_finetuned_test_acc']:.4f}")
    table.add_row("converted / skipped convs", f"{summary['converted_layers']} / {summary['skipped_layers']}")
    table.add_row("conversion rel. max error", f"{summary['conversion_rel_error']:.2e}")
    table.add_row("seconds per epoch dense / Winograd",
                  f"{summary['dense_seconds_per_epoch']:.1f} / {summary['winograd_seconds_per_epoch']:.1f}")
    table.add_row("Winograd state dict", summary["state_dict"])
    table.add_row("CSV logs", summary["logs"])
    return table


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point ``winoprune-demo``."""
    ap = argparse.ArgumentParser(prog="winoprune-demo", description=__doc__)
    ap.add_argument("--model", default="resnet18", help="timm model name (default: resnet18)")
    ap.add_argument("--m", type=int, default=2, choices=SUPPORTED_M, help="Winograd output tile size")
    ap.add_argument("--dense-epochs", type=int, default=6)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="runs/demo", help="folder for logs, state dict and summary.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-batches", type=float, default=1.0, help="fraction (or count, if > 1) of batches per epoch")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the console to progress and results
    limit: int | float = int(args.limit_batches) if args.limit_batches > 1 else args.limit_batches
    run_demo(args.model, args.m, args.dense_epochs, args.finetune_epochs, args.image_size, args.batch_size,
             args.out, args.seed, limit)


if __name__ == "__main__":
    main()
