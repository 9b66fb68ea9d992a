"""``winoprune deploy CKPT``: the deployed model of a recipe's checkpoint, saved as a ``.pt2``."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lightning_winoprune._io import CheckpointError, load_checkpoint
from lightning_winoprune.callbacks import load_pruned_checkpoint
from lightning_winoprune.deploy import deploy, save_deployed
from lightning_winoprune.recipes._module import ImageClassifier

__all__ = ["deploy_checkpoint", "deploy_command"]


class DeployCommandError(ValueError):
    """A checkpoint that ``winoprune deploy`` cannot rebuild; the message says why and what to do instead."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="winoprune deploy",
        description="Deploy a recipe's checkpoint (BatchNorm folded, activations fused, the fastest kernel per "
                    "layer), check it against the checkpoint's model and save it with torch.export (dynamic batch, "
                    "or H and W too).")
    parser.add_argument("checkpoint", help="a checkpoint written by `winoprune fit` (an ImageClassifier)")
    parser.add_argument("--output", "-o", help="where the .pt2 goes (default: the checkpoint's path with .pt2)")
    parser.add_argument("--input-size", type=int, default=224, help="side of the square input to tune for (224)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size to tune for (1)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's count)")
    parser.add_argument("--dynamic", default="batch", choices=["batch", "none", "batch+hw", "hw"],
                        help="input dims the .pt2 leaves free (default: batch; batch+hw: any batch, H and W)")
    parser.add_argument("--no-tune", action="store_true", help="choose routes by rule instead of by measurement")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle the checkpoint without restrictions (only for a file you made yourself: a "
                             "checkpoint's pickle can run code; by default only tensors and plain data are read)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def deploy_checkpoint(checkpoint: str | Path, output: str | Path | None = None, input_size: int = 224,
                      batch_size: int = 1, threads: int | None = None, tune: bool = True,
                      verbose: bool = True, trust: bool = False, dynamic: str = "batch") -> Path:
    """Rebuild a recipe's pruned model from ``checkpoint``, deploy it, export it and save it as a ``.pt2``.

    Args:
        checkpoint: A Lightning checkpoint of an :class:`~lightning_winoprune.recipes.ImageClassifier` trained with
            a pruning callback (what ``winoprune fit`` writes).
        output: The ``.pt2`` path (default: the checkpoint's path with the suffix ``.pt2``).
        input_size: Side of the square input the routes are tuned for.
        batch_size: Batch size the routes are tuned for (the saved model takes any batch size).
        threads: CPU threads for tuning and the kernels.
        tune: Choose each layer's route by measurement.
        verbose: Print the route table.
        trust: Unpickle the checkpoint without restrictions (only for a file you made yourself).
        dynamic: The input dims the ``.pt2`` leaves free (see :func:`~lightning_winoprune.deploy`).

    Returns:
        The path of the saved ``.pt2``.

    Raises:
        DeployCommandError: If the file is missing, damaged, refused as untrusted or not a recipe checkpoint, if it
            does not fit the model its hyper-parameters build, or if a size is not positive.

    """
    path = Path(checkpoint)
    for name, value in (("--input-size", input_size), ("--batch-size", batch_size)):
        if value < 1:
            raise DeployCommandError(f"{name} must be >= 1, got {value}")
    if input_size < 8:
        raise DeployCommandError(f"--input-size must be >= 8 (the networks downsample), got {input_size}")
    module, hparams = _recipe_module(path, trust)
    module.eval()
    x = torch.randn(batch_size, int(hparams.get("in_chans", 3)), input_size, input_size,
                    generator=torch.Generator().manual_seed(0))
    deployed = deploy(module.model, x, tune=tune, threads=threads, verbose=verbose, time_model=verbose,
                      dynamic=dynamic)
    out = Path(output) if output is not None else path.with_suffix(".pt2")
    return save_deployed(deployed, out, x)  # atomic: an interrupted save leaves no half file under the name


def _recipe_module(path: Path, trust: bool) -> tuple[ImageClassifier, dict[str, Any]]:
    """The recipe's model rebuilt from the checkpoint's hyper-parameters, with the pruned weights loaded."""
    if path.suffix == ".pt2":
        raise DeployCommandError(f"{str(path)!r} is a .pt2, a model that is deployed already: load it with "
                                 "lightning_winoprune.load_deployed; `winoprune deploy` takes a .ckpt")
    try:
        ckpt = load_checkpoint(path, trust=trust, trust_hint="--trust-checkpoint")
    except CheckpointError as err:
        raise DeployCommandError(str(err)) from None
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or "model_name" not in hparams:
        raise DeployCommandError(
            f"checkpoint {str(path)!r} was not written by `winoprune fit` (no ImageClassifier hyper-parameters); "
            "for your own LightningModule use lightning_winoprune.load_pruned_checkpoint and lightning_winoprune.deploy"
        )
    accepted = set(inspect.signature(ImageClassifier.__init__).parameters) - {"self", "pretrained", "checkpoint_path"}
    hparams = {k: v for k, v in hparams.items() if k in accepted}  # not LightningCLI's own entries
    try:
        module = ImageClassifier(**hparams)
        load_pruned_checkpoint(module, ckpt)
    except (ValueError, TypeError, RuntimeError, KeyError) as err:  # an edited or foreign checkpoint
        text = " ".join(str(err).split())
        raise DeployCommandError(f"checkpoint {str(path)!r} does not rebuild its model: {text[:300]}") from None
    return module, hparams


def deploy_command(args: list[str]) -> int:
    """``winoprune deploy``: parse ``args``, deploy, save; returns the exit status."""
    parsed = _parser().parse_args(args)
    try:
        out = deploy_checkpoint(parsed.checkpoint, parsed.output, parsed.input_size, parsed.batch_size,
                                parsed.threads, not parsed.no_tune, trust=parsed.trust_checkpoint,
                                dynamic=parsed.dynamic)
    except DeployCommandError as err:
        if parsed.debug:
            raise
        Console(stderr=True).print(f"error: {err}", markup=False, soft_wrap=True)
        return 2
    Console().print(f"deployed model saved to {out}\nload it with: import lightning_winoprune; "
                    f"model = lightning_winoprune.load_deployed({str(out)!r})", markup=False, soft_wrap=True)
    return 0
