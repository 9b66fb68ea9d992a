"""``winoprune``: LightningCLI for the recipes (``fit``, ``validate``, ``test``, ``predict``) plus ``recipes``.

Examples::

    winoprune fit --config recipes/resnet18_abwsp.yaml             # run a recipe (from any directory)
    winoprune fit --config resnet18_abwsp --pruning.amount 0.5    # a bundled recipe by name, one value changed
    winoprune recipes                                              # list the bundled recipes
    winoprune recipes resnet18_abwsp                               # print one

A bad value (``--pruning.amount 2``, ``--trainer.max_epochs abc``, an unknown recipe) prints one short error naming
the argument, the value and the valid ones, and exits with status 2; ``--debug`` (anywhere on the command line) or
``WINOPRUNE_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import inspect
import netrc
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.model_helpers import is_overridden
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typing_extensions import override

from lightning_winoprune._io import CheckpointError, load_checkpoint
from lightning_winoprune.callbacks import DEPrune, LatencyValidation, PruningCallback, SafeCheckpointIO
from lightning_winoprune.recipes._callbacks import FitSummary, prune_epochs, trainer_callbacks
from lightning_winoprune.recipes._deploy_cmd import deploy_command
from lightning_winoprune.recipes._module import ImageClassifier
from lightning_winoprune.recipes._recipes import list_recipes, recipe_path, recipe_title

__all__ = ["CLIError", "RecipeConfigCallback", "WinopruneCLI", "configure_wandb_mode", "main", "run_cli"]

_EPILOG = ("Also: `winoprune recipes` lists the bundled recipes, `winoprune recipes NAME` prints one. "
           "`--config NAME` accepts a bundled recipe's name as well as a path.")


# ---------------------------------------------------------------------------------------------------- W&B mode
def _wandb_has_credentials() -> bool:
    """Whether W&B would find an API key without asking: ``WANDB_API_KEY``, an identity token, or a netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        auth = netrc.netrc(path).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def configure_wandb_mode() -> str:
    """Make W&B offline unless the user chose a mode (``WANDB_MODE``) or is logged in; return the mode.

    Runs before any ``WandbLogger`` starts a run, so a machine without network or W&B account never waits on a
    login prompt or a connection: the run is written locally and can be uploaded later with ``wandb sync``.
    An explicit ``WANDB_MODE=online`` without credentials would end the run with a login error after the fit has
    started; it is written offline too, with a warning that says how to upload it.
    """
    mode = os.environ.get("WANDB_MODE")
    if mode and not (mode == "online" and not _wandb_has_credentials()):
        return mode
    if not mode and _wandb_has_credentials():
        return "online"
    if mode == "online":
        sys.stderr.write("warning: WANDB_MODE=online but no W&B credentials were found (WANDB_API_KEY, netrc): the "
                         "run is written offline; `wandb login`, then `wandb sync <run dir>` uploads it\n")
    os.environ["WANDB_MODE"] = "offline"
    return "offline"


# ---------------------------------------------------------------------------------------------------- config
class RecipeConfigCallback(SaveConfigCallback):
    """Save the run's full config: into the W&B run (its files and its config) when a ``WandbLogger`` is used.

    With a ``WandbLogger`` the resolved config goes to the run's ``config`` (key ``config``, with the recipe name
    under ``recipe``) and ``config.yaml`` into the run's files folder (uploaded with the run); otherwise it is
    written to the trainer's ``log_dir`` as ``LightningCLI`` does.
    """

    @override
    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            super().setup(trainer, pl_module, stage)
            return
        if self.already_saved:
            return
        if trainer.is_global_zero:
            config = self.parser.dump(self.config, skip_none=False, format="yaml")
            for logger in wandb_loggers:
                if not _tracking_off(logger.experiment):  # a disabled run has no files folder
                    (Path(logger.experiment.dir) / self.config_filename).write_text(config)
                logger.log_hyperparams({"recipe": _recipe_name(self.config), "config": _yaml_load(config)})
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def _tracking_off(run: Any) -> bool:
    """Whether a W&B run object is a disabled one (``WANDB_MODE=disabled``: it records and writes nothing)."""
    return bool(getattr(run, "disabled", False)) or getattr(getattr(run, "settings", None), "mode", None) == "disabled"


def _yaml_load(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _recipe_name(config: Any) -> str | None:
    """The stem of the (last) ``--config`` file, e.g. ``resnet18_abwsp``."""
    paths = config.get("config") if hasattr(config, "get") else None
    if not paths:
        return None
    last = paths[-1] if isinstance(paths, list) else paths
    return Path(str(getattr(last, "relative", last))).stem


# ---------------------------------------------------------------------------------------------------- CLI
def _names_wandb(logger_config: Any) -> bool:
    """Whether a parsed ``trainer.logger`` value is (or lists) a ``WandbLogger``."""
    if isinstance(logger_config, (list, tuple)):
        return any(_names_wandb(item) for item in logger_config)
    if isinstance(logger_config, WandbLogger):
        return True
    class_path = logger_config.get("class_path") if hasattr(logger_config, "get") else None
    return isinstance(class_path, str) and class_path.rsplit(".", 1)[-1] == "WandbLogger"


def _wandb_save_dirs(logger_config: Any) -> list[str]:
    """The ``save_dir`` of every ``WandbLogger`` config in a parsed ``trainer.logger`` value."""
    items = logger_config if isinstance(logger_config, (list, tuple)) else [logger_config]
    dirs = []
    for item in items:
        init_args: Any = item.get("init_args") if hasattr(item, "get") and _names_wandb(item) else None
        save_dir: Any = init_args.get("save_dir") if hasattr(init_args, "get") else None
        if isinstance(save_dir, str) and save_dir:
            dirs.append(save_dir)
    return dirs


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
        logger_config = trainer_config.get("logger") if trainer_config is not None else None
        if _names_wandb(logger_config):
            configure_wandb_mode()
            # wandb looks for a git repository in its folder and warns when the folder does not exist yet
            for save_dir in _wandb_save_dirs(logger_config):
                Path(save_dir).mkdir(parents=True, exist_ok=True)

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
        self.fit_summary = build_summary(trainer, self.summary_callback, test_acc, tested, _recipe_name(
            self.config.get(str(self.subcommand), self.config)))
        log_summary(trainer, self.fit_summary)
        # the fit is over: close the W&B run, so its files are complete and its footer comes before the summary
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
                logger.experiment.finish()
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


# ---------------------------------------------------------------------------------------------------- summary
def _wandb_run(trainer: Trainer) -> Any:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            return logger.experiment
    return None


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
    run = _wandb_run(trainer)
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
        "wandb_run_dir": str(Path(run.dir).parent) if run is not None and not _tracking_off(run) else None,
        "wandb_mode": ("disabled" if _tracking_off(run) else run.settings.mode) if run is not None else None,
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
    title = f"winoprune summary: {summary['recipe'] or summary['model']}"
    table = Table(title=title)
    table.add_column("", no_wrap=True)
    table.add_column("value", overflow="fold")
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
    console.print(table)
    if summary["wandb_mode"] in ("offline", "dryrun") and summary["wandb_run_dir"]:
        console.print(f"upload the W&B run with: wandb sync {summary['wandb_run_dir']}", markup=False,
                      soft_wrap=True)


# ---------------------------------------------------------------------------------------------------- entry point
class CLIError(Exception):
    """A bad command line: :func:`main` prints its message as one short error and exits with status 2."""


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
        if debug or (phase[0] == "run" and not isinstance(err, (MisconfigurationException, CheckpointError))):
            raise
        sys.stderr.write(f"error: {_short_error(err)}\n{_HINT}\n")
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
    before = _current_wandb_run()
    ok, saved_argv = False, sys.argv
    sys.argv = saved_argv[:1]  # the arguments are passed explicitly; LightningCLI warns when sys.argv has more
    try:
        cli = WinopruneCLI(args=argv, exit_on_error=exit_on_error, phase=phase)
        ok = True
    finally:
        sys.argv = saved_argv
        # close the W&B run this command opened, so its files are complete when the command returns
        run = _current_wandb_run()
        if run is not None and run is not before:
            run.finish(exit_code=0 if ok else 1)
    return cli


# ---------------------------------------------------------------------------------------------------- short errors
#: The CLI group of an object whose constructor refused a value.
_GROUPS: tuple[tuple[type, str], ...] = (
    (PruningCallback, "pruning"), (LatencyValidation, "latency"), (LightningDataModule, "data"),
    (LightningModule, "model"), (Trainer, "trainer"),
)


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of ``err``'s ``__cause__`` / ``__context__`` chain (jsonargparse wraps errors)."""
    seen = {id(err)}
    while True:
        nxt = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if nxt is None or id(nxt) in seen:
            return err
        seen.add(id(nxt))
        err = nxt


def _argument_of(err: BaseException, message: str) -> str | None:
    """``--group.param`` for an error a constructor raised about its parameter ``param`` (the message's first word)."""
    word = re.match(r"[A-Za-z_]\w*", message)
    if word is None:
        return None
    for frame, _ in reversed(list(traceback.walk_tb(err.__traceback__))):
        obj = frame.f_locals.get("self")
        if obj is None or frame.f_code.co_name not in ("__init__", "__post_init__"):
            continue
        for cls, group in _GROUPS:
            if isinstance(obj, cls):
                try:
                    params = inspect.signature(type(obj).__init__).parameters
                except (TypeError, ValueError):
                    params = {}  # type: ignore[assignment]
                return f"--{group}.{word.group()}" if word.group() in params else f"--{group}"
    return None


def _short_parse_error(message: str) -> str:
    """One line from a jsonargparse error: the key, the value given and the types, values or options expected."""
    key = re.search(r'(?:Parser key|key) "([^"]+)"', message)
    if key is None:
        return message.strip().splitlines()[0] if message.strip() else "invalid arguments"
    name = key.group(1)
    nested = re.search(r"NestedArg\(key='([^']*)', val=(.*)\)", message)
    unknown = re.search(r"class_path '([\w.]+)':\s*Option '([^']+)' is not accepted", message)
    if nested is not None and unknown is not None:  # --group.typo value
        options = _init_options(unknown.group(1))
        listed = f"; valid options are {', '.join(options)}" if options else ""
        return f"--{name}.{unknown.group(2)}: {unknown.group(1).rsplit('.', 1)[-1]} has no option " \
               f"{unknown.group(2)!r}{listed}"
    given = re.search(r"Given value: (.*)", message)
    value = given.group(1).strip() if given is not None else None
    if nested is not None:  # --group.key value
        name, value = f"{name}.{nested.group(1)}", nested.group(2).strip()
    text = f"--{name}" + (f" {value}" if value is not None else "") + " is not valid"
    expected = [t for t in re.findall(r"Expected a <class '(?:[\w.]*\.)?(\w+)'>", message)]
    problems = [ln.strip()[2:] for ln in message.splitlines() if ln.strip().startswith("- ")
                and "Expected a <class 'NoneType'>" not in ln]
    if expected and len(problems) == len([t for t in expected if t != "NoneType"]):
        return f"{text}; expected {' or '.join(dict.fromkeys('None' if t == 'NoneType' else t for t in expected))}"
    if problems:
        detail = " ".join(problems[0].split())
        follow = [ln.strip() for ln in message.splitlines() if ln.startswith("        ")]
        return f"{text}: {detail}" + (f" {follow[0]}" if follow and detail.endswith(":") else "")
    return text


def _init_options(class_path: str) -> list[str]:
    """The constructor parameters of the class at ``class_path`` (empty when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
        params = inspect.signature(cls.__init__).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p for p in params if p != "self" and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                          inspect.Parameter.VAR_KEYWORD)]


def _short_error(err: BaseException) -> str:
    """The one-line message :func:`main` prints for ``err``."""
    if isinstance(err, (CLIError, CheckpointError)):  # already one line naming the file
        return str(err)
    if isinstance(err, ArgumentError):
        return _short_parse_error(str(err))
    root = _root_cause(err)
    message = " ".join(str(root).split()) or type(root).__name__
    argument = _argument_of(root, message)
    return f"{argument}: {message}" if argument else message


def _current_wandb_run() -> Any:
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


if __name__ == "__main__":
    main()
