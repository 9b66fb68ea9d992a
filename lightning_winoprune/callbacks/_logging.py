"""Rank-zero reporting of pruning decisions to the trainer's loggers (and W&B tables and pictures)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["log_pruning_report"]


@rank_zero_only
def log_pruning_report(
    trainer: pl.Trainer,
    prefix: str,
    metrics: dict[str, float],
    table_columns: Sequence[str],
    table_rows: Sequence[Sequence[Any]],
    figures: dict[str, Any] | None = None,
) -> None:
    """Send pruning metrics to every logger of ``trainer``; tables and figures go to W&B loggers as such.

    Args:
        trainer: The trainer whose loggers receive the report.
        prefix: Key prefix, e.g. ``"winograd_pruning"``.
        metrics: Numeric values (overall and per-layer sparsity, policy codes, ...), logged at the global step.
        table_columns: Columns of the per-layer table.
        table_rows: Rows of the per-layer table.
        figures: Matplotlib figures by name (logged as images to W&B; closed afterwards in every case).
    """
    try:
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)
            if isinstance(logger, WandbLogger):
                logger.log_table(key=f"{prefix}/layers", columns=list(table_columns),
                                 data=[list(r) for r in table_rows], step=step)
                if figures:
                    import wandb

                    logger.log_image(key=f"{prefix}/masks", images=[wandb.Image(f) for f in figures.values()],
                                     caption=list(figures), step=step)
    finally:
        if figures:
            import matplotlib.pyplot as plt

            for fig in figures.values():
                plt.close(fig)
