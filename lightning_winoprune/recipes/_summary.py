"""The end-of-fit summary of ``winoprune fit``: its numbers (a dict), logged to every logger and printed as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lightning_winoprune.callbacks import PruningCallback
from lightning_winoprune.recipes._callbacks import FitSummary, prune_epochs, trainer_callbacks
from lightning_winoprune.recipes._wandb import tracking_off, wandb_runs

__all__ = ["build_summary", "log_summary", "print_summary"]


def build_summary(trainer: Trainer, fit: FitSummary, test_acc: float | None, tested: str | None,
                  recipe: str | None) -> dict[str, Any]:
    """The end-of-fit numbers as a JSON-friendly dict."""
    epochs = prune_epochs(trainer)
    sparsity: dict[str, float] = {}
    for cb in trainer_callbacks(trainer):
        if isinstance(cb, PruningCallback) and cb.history:
            name = type(cb).__name__
            sparsity.update({f"{name} {k}": float(v) for k, v in cb.history[-1].items() if k.endswith("sparsity")})
    params = list(trainer.lightning_module.parameters())
    total = sum(p.numel() for p in params)
    zeros = sum(int((p == 0).sum()) for p in params)
    ckpt = trainer.checkpoint_callback
    run = next(wandb_runs(trainer), None)
    best_score = getattr(ckpt, "best_model_score", None) if ckpt is not None else None
    return {
        "recipe": recipe,
        "model": dict(trainer.lightning_module.hparams).get("model_name"),
        "epochs": trainer.current_epoch,
        "prune_epochs": list(epochs) if epochs else None,
        "dense_val_acc": fit.dense_acc,
        "dense_val_epoch": fit.dense_epoch,
        "pruned_val_acc": fit.last_val_acc,
        "best_pruned_val_acc": float(best_score) if isinstance(best_score, torch.Tensor) else None,
        "test_acc": test_acc,
        "tested": tested,
        "sparsity": sparsity,
        "zero_parameters": zeros / max(total, 1),
        "fit_seconds": fit.fit_seconds,
        "best_checkpoint": (getattr(ckpt, "best_model_path", "") or None) if ckpt is not None else None,
        "last_checkpoint": (getattr(ckpt, "last_model_path", "") or None) if ckpt is not None else None,
        "wandb_run_dir": str(Path(run.dir).parent) if run is not None and not tracking_off(run) else None,
        "wandb_mode": ("disabled" if tracking_off(run) else run.settings.mode) if run is not None else None,
        "reports": [_report_entry(cb) for cb in _reporting_callbacks(trainer)],
    }


def _reporting_callbacks(trainer: Trainer) -> list[Callback]:
    return [cb for cb in trainer_callbacks(trainer) if getattr(cb, "report", None) is not None]


def _report_entry(cb: Callback) -> dict[str, Any]:
    path = getattr(cb.report, "json_path", None)  # type: ignore[attr-defined]
    deployed = getattr(cb, "deployed_path", None)
    return {"callback": type(cb).__name__, "json_path": str(path) if path is not None else None,
            "deployed_path": str(deployed) if deployed is not None else None}


def log_summary(trainer: Trainer, summary: dict[str, Any]) -> None:
    """Log the summary's numbers to every logger under ``summary/``."""
    keys = ("dense_val_acc", "pruned_val_acc", "best_pruned_val_acc", "test_acc", "zero_parameters", "fit_seconds")
    metrics = {f"summary/{k}": float(summary[k]) for k in keys if summary.get(k) is not None}
    metrics.update({f"summary/sparsity/{k.replace(' ', '/')}": v for k, v in summary["sparsity"].items()})
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def print_summary(trainer: Trainer, summary: dict[str, Any], console: Console | None = None) -> None:
    """Print every report a callback left in ``report``, then the summary table."""
    console = console or Console()
    # reports are wide tables: never squeeze them below 150 columns (rich uses 80 when output is not a terminal)
    wide = Console(width=max(console.width, 150)) if console.width < 150 else console
    for cb in _reporting_callbacks(trainer):
        wide.print(cb.report)  # type: ignore[attr-defined]
    table = Table(title=f"winoprune summary: {summary['recipe'] or summary['model']}")
    table.add_column("", no_wrap=True)
    table.add_column("value", overflow="fold")
    _add_accuracy_rows(table, summary)
    _add_outcome_rows(table, summary)
    console.print(table)
    if summary["wandb_mode"] in ("offline", "dryrun") and summary["wandb_run_dir"]:
        console.print(f"upload the W&B run with: wandb sync {summary['wandb_run_dir']}", markup=False,
                      soft_wrap=True)


def _add_accuracy_rows(table: Table, summary: dict[str, Any]) -> None:
    """The pruning epochs (or why nothing was pruned) and the dense, pruned and test accuracies."""
    dense_when = (f"end of epoch {summary['dense_val_epoch']}" if summary["dense_val_epoch"] is not None
                  else "measured at the prune point")
    nothing_pruned = not summary["sparsity"]
    pruned = "pruned " if summary["prune_epochs"] is not None and not nothing_pruned else ""
    if nothing_pruned:
        planned = summary["prune_epochs"]
        why = (f"the pruning epochs {planned[0]}..{planned[1]} were never reached (the fit ended at epoch "
               f"{summary['epochs']})" if planned is not None else "no pruning callback")
        table.add_row("pruning", Text(f"NOTHING WAS PRUNED: {why}; the model is dense"))
    elif summary["prune_epochs"] is not None:
        first, last = summary["prune_epochs"]
        table.add_row("pruning epochs", f"{first}" if first == last else f"{first}..{last}")
        table.add_row(f"dense val accuracy ({dense_when})", _fmt(summary["dense_val_acc"]))
    table.add_row(f"{pruned}val accuracy (last epoch)", _fmt(summary["pruned_val_acc"]))
    if summary["best_pruned_val_acc"] is not None:
        table.add_row(f"{pruned}val accuracy (best checkpoint)", _fmt(summary["best_pruned_val_acc"]))
    if summary["tested"] is not None:
        table.add_row(f"test accuracy ({summary['tested']})", _fmt(summary["test_acc"]))


def _add_outcome_rows(table: Table, summary: dict[str, Any]) -> None:
    """Sparsity, fit time, and where the checkpoint, the W&B run, the reports and the deployed model are."""
    for name, value in summary["sparsity"].items():
        table.add_row(f"{name}", f"{value:.4f}")
    table.add_row("zero parameters, whole model", f"{summary['zero_parameters']:.4f}")
    table.add_row("fit time", f"{summary['fit_seconds']:.0f} s")
    if summary["best_checkpoint"]:
        table.add_row("best checkpoint", Text(summary["best_checkpoint"]))  # Text: no markup in paths
    if summary["wandb_mode"] == "disabled":
        table.add_row("W&B tracking", "off (WANDB_MODE=disabled: nothing was recorded)")
    elif summary["wandb_run_dir"]:
        table.add_row(f"W&B run ({summary['wandb_mode']})", Text(summary["wandb_run_dir"]))
    for entry in summary["reports"]:
        if entry["json_path"]:
            table.add_row(f"{entry['callback']} report", Text(entry["json_path"]))
        if entry.get("deployed_path"):
            table.add_row("deployed model (torch.export)", Text(entry["deployed_path"]))
