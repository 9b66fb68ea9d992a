"""``winoprune``: LightningCLI for the recipes (``fit``, ``validate``, ``test``, ``predict``) plus ``recipes``.

Examples::

    winoprune fit --config recipes/resnet18_abwsp.yaml             # run a recipe (from any directory)
    winoprune fit --config resnet18_abwsp --pruning.amount 0.5    # a bundled recipe by name, one value changed
    winoprune recipes                                              # list the bundled recipes
    winoprune recipes resnet18_abwsp                               # print one

A bad value (``--pruning.amount 2``, ``--trainer.max_epochs abc``, an unknown recipe) prints one short error naming
the argument, the value and the valid ones, and exits with status 2; ``--debug`` (anywhere on the command line) or
``WINOPRUNE_DEBUG=1`` shows the full traceback instead.

This module parses and runs the command; ``_wandb.py`` sets W&B up, ``_summary.py`` prints the end-of-fit summary
and ``_errors.py`` shortens the errors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.model_helpers import is_overridden
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from lightning_winoprune._io import load_checkpoint
from lightning_winoprune.callbacks import DEPrune, LatencyValidation, PruningCallback, SafeCheckpointIO
from lightning_winoprune.recipes._callbacks import FitSummary, trainer_callbacks
from lightning_winoprune.recipes._deploy_cmd import deploy_command
from lightning_winoprune.recipes._errors import CLIError, short_error, shortened_while_running
from lightning_winoprune.recipes._module import ImageClassifier
from lightning_winoprune.recipes._recipes import list_recipes, recipe_path, recipe_title
from lightning_winoprune.recipes._summary import build_summary, log_summary, print_summary
from lightning_winoprune.recipes._wandb import (
    RecipeConfigCallback,
    configure_wandb_mode,
    current_wandb_run,
    prepare_wandb,
    recipe_name,
    wandb_runs,
)

__all__ = ["CLIError", "RecipeConfigCallback", "WinopruneCLI", "configure_wandb_mode", "main", "run_cli"]

_EPILOG = ("Also: `winoprune recipes` lists the bundled recipes, `winoprune recipes NAME` prints one. "
           "`--config NAME` accepts a bundled recipe's name as well as a path.")


def _num_classes(data: LightningDataModule) -> int:
    value = getattr(data, "num_classes", None)
    if not isinstance(value, int):
        raise ValueError(f"the datamodule {type(data).__name__} has no int attribute num_classes, which the model's "
                         "num_classes is taken from; give it one")
    return value


def _in_chans(data: LightningDataModule) -> int:
    value = getattr(data, "in_chans", 3)
    return value if isinstance(value, int) else 3


class WinopruneCLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` with a ``pruning`` callback group and an end-of-fit summary.

    * ``--data`` is any LightningDataModule (the recipes use the embedded digits); the model's ``num_classes`` and
      ``in_chans`` come from the instantiated datamodule (``in_chans`` defaults to 3 where it has none).
    * ``--pruning`` is one :class:`~lightning_winoprune.callbacks.PruningCallback` (``WinogradPruning``,
      ``DEPrune``, or a subclass), added to the trainer's callbacks; ``--pruning.amount 0.5`` changes one value.
    * ``--latency`` is an optional :class:`~lightning_winoprune.LatencyValidation` run at the end of fit (the
      recipes time batch 1 at 224x224: ``--latency.input_size 64`` changes it, ``--latency null`` drops it).
    * After ``fit`` the test set is evaluated (``--test_after_fit false`` skips it; the best checkpoint when one was
      saved) and a summary is printed: dense and pruned accuracy, sparsity, checkpoint and W&B run, and the report of
      every callback that has a ``report`` (e.g. the latency validation). It is kept in :attr:`fit_summary`.
    """

    fit_summary: dict[str, Any] | None = None
    #: ``"parse"``, ``"instantiate"`` or ``"run"``: how far the command got (read by :func:`main` on an error).
    phase: str = "parse"

    def __init__(self, args: list[str] | dict[str, Any] | None = None, run: bool = True,
                 exit_on_error: bool = True, phase: list[str] | None = None, **kwargs: Any) -> None:
        self._exit_on_error = exit_on_error
        self._phase = phase if phase is not None else ["parse"]
        kwargs.setdefault("save_config_callback", RecipeConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": "Prune timm CNNs with the lightning_winoprune recipes.",
                                            "epilog": _EPILOG})
        self.summary_callback = FitSummary()
        super().__init__(ImageClassifier, LightningDataModule, subclass_mode_data=True, args=args, run=run, **kwargs)

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("exit_on_error", self._exit_on_error)  # False: parse errors raise, main() shortens them
        return super().init_parser(**kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PruningCallback, "pruning", subclass_mode=True, required=False)
        parser.add_lightning_class_args(LatencyValidation, "latency", subclass_mode=True, required=False)
        parser.link_arguments("data", "model.num_classes", compute_fn=_num_classes, apply_on="instantiate")
        parser.link_arguments("data", "model.in_chans", compute_fn=_in_chans, apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit: evaluate the test set (best checkpoint if any) for the summary.")
        parser.add_argument("--trust_checkpoint", type=bool, default=False,
                            help="Unpickle --ckpt_path and the checkpoints the run reads without restrictions (only "
                                 "for files you made: a checkpoint's pickle can run code). By default only tensors "
                                 "and plain data are read.")

    @override
    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyper-parameters of --ckpt_path while parsing: check the file first, so a damaged or
        # untrusted one gives our one-line error (what SafeCheckpointIO says when the Trainer reads it)
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path:
            trust = bool(self.config[sub].get("trust_checkpoint", False))
            load_checkpoint(ckpt_path, trust=trust, trust_hint="--trust_checkpoint true")
            if trust:
                return  # LightningCLI would read it again with weights_only=True; the Trainer reads it trusted
        super()._parse_ckpt_path()

    @override
    def before_instantiate_classes(self) -> None:
        self._phase[0] = "instantiate"
        trainer_config = self._get(self.config, "trainer")
        prepare_wandb(trainer_config.get("logger") if trainer_config is not None else None)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        extra = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        # the summary first: it measures the dense accuracy before a pruning callback prunes in the same hook
        config["callbacks"] = [self.summary_callback, *(cb for cb in extra if cb is not None), *callbacks]
        config["plugins"] = _with_safe_checkpoint_io(config.get("plugins"),
                                                     bool(self._get(self.config, "trust_checkpoint", False)))
        trainer = self._instantiate_trainer(config, [])
        self._phase[0] = "run"
        return trainer

    def after_fit(self) -> None:
        """Evaluate the test set and print the summary (rank zero)."""
        trainer = self.trainer
        test_acc, tested = None, None
        datamodule = self.datamodule
        can_test = datamodule is not None and is_overridden("test_dataloader", datamodule, LightningDataModule)
        if self._get(self.config, "test_after_fit", True) and can_test and not trainer.interrupted:
            ckpt = trainer.checkpoint_callback
            best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
            shrunk = any(isinstance(cb, DEPrune) and cb.physical_done for cb in trainer_callbacks(trainer))
            use_best = bool(best) and Path(best).is_file() and not shrunk
            results = trainer.test(self.model, datamodule=datamodule, ckpt_path=best if use_best else None,
                                   verbose=False)
            tested = "best checkpoint" if use_best else "final model"
            value = results[0].get("test/acc") if results else None
            test_acc = float(value) if value is not None else None
        self.fit_summary = build_summary(trainer, self.summary_callback, test_acc, tested, recipe_name(
            self.config.get(str(self.subcommand), self.config)))
        log_summary(trainer, self.fit_summary)
        # the fit is over: close the W&B run, so its files are complete and its footer comes before the summary
        for run in list(wandb_runs(trainer)):
            run.finish()
        if trainer.is_global_zero:
            print_summary(trainer, self.fit_summary)


def _with_safe_checkpoint_io(plugins: Any, trust: bool) -> list[Any]:
    """The trainer's plugins with a :class:`SafeCheckpointIO` added, unless they name a ``CheckpointIO`` already."""
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else ([] if plugins is None else [plugins])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        io = SafeCheckpointIO(trust=trust)
        io.trust_hint = "--trust_checkpoint true"
        plugins.append(io)
    return plugins


_DEBUG_ENV = "WINOPRUNE_DEBUG"
_HINT = f"(add --debug or set {_DEBUG_ENV}=1 for the full traceback)"


def _bundled_recipe(value: str) -> Path | None:
    """The bundled recipe ``value`` names: ``NAME``, ``NAME.yaml`` or ``recipes/NAME.yaml`` (the repository's link)."""
    path = Path(value)
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent in (Path("."), Path("recipes")) and stem in list_recipes():
        return recipe_path(stem)
    return None


def _resolve_config_names(args: list[str]) -> list[str]:
    """Let ``--config`` name a bundled recipe (``NAME``, or ``recipes/NAME.yaml`` outside the repository root).

    Raises:
        CLIError: If a ``--config`` value is neither a file nor a bundled recipe; the message lists the recipes.
    """
    out = list(args)
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            at, value, prefix = i + 1, args[i + 1], ""
        elif arg.startswith(("--config=", "-c=")):
            prefix = arg[: arg.index("=") + 1]
            at, value = i, arg[len(prefix):]
        else:
            continue
        if Path(value).is_file():
            continue
        bundled = _bundled_recipe(value)
        if bundled is None:
            raise CLIError(f"--config {value!r}: no such file and no bundled recipe of that name; the recipes are "
                           f"{', '.join(list_recipes())} (`winoprune recipes` describes them)")
        out[at] = prefix + str(bundled)
    return out


def _print_recipes(args: list[str], console: Console) -> int:
    if args and args[0] in ("-h", "--help"):
        console.print("usage: winoprune recipes [NAME]\n\nList the bundled recipes, or print the YAML of one.")
        return 0
    if args:
        try:
            text = recipe_path(args[0]).read_text()
        except ValueError as err:
            sys.stderr.write(f"error: {err}\n")
            return 2
        sys.stdout.write(text)  # plain, unwrapped: `winoprune recipes NAME > mine.yaml` gives a valid file
        return 0
    table = Table(title="bundled recipes: winoprune fit --config <name>")
    table.add_column("name")
    table.add_column("what it does")
    for name in list_recipes():
        table.add_row(name, recipe_title(recipe_path(name)))
    console.print(table)
    return 0


#: Subcommands that are not LightningCLI's: name -> function of the remaining arguments returning an exit status.
#: ``fit``, ``validate``, ``test`` and ``predict`` (and anything else) go to :class:`WinopruneCLI`.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "recipes": lambda args: _print_recipes([a for a in args if a != "--debug"], Console()),
    "deploy": deploy_command,
}


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point ``winoprune``; ``args`` replaces ``sys.argv[1:]`` (see :func:`run_cli`).

    Subcommands in :data:`COMMANDS` run their function; the others run :class:`WinopruneCLI`. A bad value ends the
    command with one short error on stderr and exit status 2, unless ``--debug`` is among the arguments or
    ``WINOPRUNE_DEBUG`` is set (to anything but ``0``), which show the full traceback.
    """
    raw = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in raw or os.environ.get(_DEBUG_ENV, "0") not in ("", "0")
    argv = [a for a in raw if a != "--debug"]
    if argv and argv[0] in COMMANDS:  # they take --debug themselves (WINOPRUNE_DEBUG passes it on)
        code = COMMANDS[argv[0]](argv[1:] + (["--debug"] if debug else []))
        if code:
            raise SystemExit(code)
        return
    phase = ["parse"]
    try:
        run_cli(argv, exit_on_error=False, phase=phase)
    except Exception as err:
        # a bad value: anything while parsing or building the objects, a configuration error while running
        if debug or (phase[0] == "run" and not shortened_while_running(err)):
            raise
        sys.stderr.write(f"error: {short_error(err)}\n{_HINT}\n")
        raise SystemExit(2) from None


def run_cli(args: Sequence[str] | None = None, exit_on_error: bool = True,
            phase: list[str] | None = None) -> WinopruneCLI | None:
    """Run ``winoprune`` with ``args`` (default ``sys.argv[1:]``) in this process.

    Args:
        args: The command line without the program name.
        exit_on_error: ``False`` to raise parse errors (``jsonargparse.ArgumentError``) instead of printing the
            usage and exiting (what :func:`main` does, to shorten them).
        phase: A one-element list that gets ``"parse"``, ``"instantiate"`` or ``"run"``: how far the command got.

    Returns:
        The CLI object (its ``trainer``, ``model``, ``datamodule`` and, after ``fit``, ``fit_summary``), or ``None``
        for ``winoprune recipes``.

    Raises:
        CLIError: If a ``--config`` value is neither a file nor a bundled recipe.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "recipes":
        code = _print_recipes(argv[1:], Console())
        if code:
            raise SystemExit(code)
        return None
    argv = _resolve_config_names(argv)
    before = current_wandb_run()
    ok, saved_argv = False, sys.argv
    sys.argv = saved_argv[:1]  # the arguments are passed explicitly; LightningCLI warns when sys.argv has more
    try:
        cli = WinopruneCLI(args=argv, exit_on_error=exit_on_error, phase=phase)
        ok = True
    finally:
        sys.argv = saved_argv
        # close the W&B run this command opened, so its files are complete when the command returns
        run = current_wandb_run()
        if run is not None and run is not before:
            run.finish(exit_code=0 if ok else 1)
    return cli


if __name__ == "__main__":
    main()
