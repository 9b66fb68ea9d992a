"""A ``winoprune fit`` that SIGKILLs itself at a chosen point, for tests/recipes/test_crash_safety.py.

Usage: ``python crash_worker.py OUT KILL [extra CLI arguments]`` with ``KILL`` one of ``none``, ``mid-epoch``
(epoch 2, after its first batch), ``checkpoint-save`` (half-way through writing the second checkpoint file) or
``deploy`` (half-way through writing the ``.pt2``). With ``none`` the final masks go to ``OUT/masks.pt``.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

import torch

from lightning_winoprune.recipes import ImageClassifier
from lightning_winoprune.recipes._cli import run_cli

#: Five epochs, pruning gradually at epochs 1-3, ``OUT/every/last.ckpt`` rewritten at the end of every epoch.
FIT_ARGS = ["fit", "--config", "resnet18_abwsp", "--trainer.logger", "false", "--trainer.max_epochs", "5",
            "--pruning.schedule", "gradual", "--pruning.start_epoch", "1", "--pruning.end_epoch", "3",
            "--model.lr_milestones", "[4]", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
            "--trainer.limit_test_batches", "1", "--data.image_size", "16", "--data.batch_size", "8",
            "--pruning.calibration_batches", "1", "--pruning.verbose", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.deterministic", "true", "--latency.input_size", "16",
            "--latency.repeats", "1", "--latency.warmup", "0", "--latency.verbose", "0", "--test_after_fit", "false",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.save_top_k=1", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.filename=every-{epoch}"]


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _half_then_die(real_save):  # type: ignore[no-untyped-def]
    """A ``save(obj, f)`` that writes half of what ``real_save`` would write to ``f``, then kills the process."""

    def save(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
        else:
            f.write(data[: len(data) // 2])
            f.flush()
        _die()

    return save


def _arm(kill: str) -> None:
    if kill == "mid-epoch":
        step = ImageClassifier.training_step

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            if self.current_epoch == 2 and batch_idx == 1:
                _die()
            return step(self, batch, batch_idx)

        ImageClassifier.training_step = training_step  # type: ignore[method-assign]
    elif kill == "checkpoint-save":
        real, calls = torch.save, [0]
        dying = _half_then_die(real)

        def save(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
            if isinstance(obj, dict) and "state_dict" in obj:
                calls[0] += 1
                if calls[0] == 2:
                    return dying(obj, f, *args, **kwargs)
            return real(obj, f, *args, **kwargs)

        torch.save = save  # type: ignore[assignment]
    elif kill == "deploy":
        torch.export.save = _half_then_die(torch.export.save)  # type: ignore[assignment]
    elif kill != "none":
        raise SystemExit(f"unknown kill point {kill!r}")


def main() -> None:
    out, kill, extra = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    _arm(kill)
    cli = run_cli([*FIT_ARGS, f"--trainer.callbacks.dirpath={out / 'every'}", "--trainer.default_root_dir", str(out),
                   *extra])
    assert cli is not None
    masks = {n: m.mask.clone() for n, m in cli.model.named_modules() if getattr(m, "mask", None) is not None}
    torch.save(masks, out / "masks.pt")


if __name__ == "__main__":
    main()
