"""W&B for ``winoprune``: the mode (offline without credentials), the run's config upload, the runs of a trainer."""

from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch import Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

__all__ = ["RecipeConfigCallback", "configure_wandb_mode", "current_wandb_run", "prepare_wandb", "recipe_name",
           "tracking_off", "wandb_runs"]


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


def prepare_wandb(logger_config: Any) -> None:
    """Before a parsed ``trainer.logger`` value is instantiated: if it names W&B, set the mode and make its folders."""
    if not _names_wandb(logger_config):
        return
    configure_wandb_mode()
    # wandb looks for a git repository in its folder and warns when the folder does not exist yet
    for save_dir in _wandb_save_dirs(logger_config):
        Path(save_dir).mkdir(parents=True, exist_ok=True)


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
                if not tracking_off(logger.experiment):  # a disabled run has no files folder
                    (Path(logger.experiment.dir) / self.config_filename).write_text(config)
                logger.log_hyperparams({"recipe": recipe_name(self.config), "config": _yaml_load(config)})
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def tracking_off(run: Any) -> bool:
    """Whether a W&B run object is a disabled one (``WANDB_MODE=disabled``: it records and writes nothing)."""
    return bool(getattr(run, "disabled", False)) or getattr(getattr(run, "settings", None), "mode", None) == "disabled"


def _yaml_load(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def recipe_name(config: Any) -> str | None:
    """The stem of the (last) ``--config`` file, e.g. ``resnet18_abwsp``."""
    paths = config.get("config") if hasattr(config, "get") else None
    if not paths:
        return None
    last = paths[-1] if isinstance(paths, list) else paths
    return Path(str(getattr(last, "relative", last))).stem


def wandb_runs(trainer: Trainer) -> Iterator[Any]:
    """The W&B run of each of the trainer's W&B loggers that has started one."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            yield logger.experiment


def current_wandb_run() -> Any:
    """``wandb.run`` if wandb is imported (``None`` otherwise: this never imports it)."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None
