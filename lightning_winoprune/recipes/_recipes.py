"""The bundled YAML recipes, and :func:`load` for users who bring their own LightningModule."""

from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

from lightning_winoprune.callbacks import PruningCallback

__all__ = ["CONFIG_DIR", "Recipe", "list_recipes", "load", "recipe_path"]

#: Folder of the bundled recipes (``recipes/`` at the repository root links here).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def list_recipes() -> list[str]:
    """Names of the bundled recipes, e.g. ``["efficientnet_b0_deprune_bh", ..., "vgg16_wspr"]``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def recipe_path(name: str | Path) -> Path:
    """The YAML file of a bundled recipe (``"resnet18_abwsp"`` or ``"resnet18_abwsp.yaml"``) or a YAML file path.

    Raises:
        ValueError: If ``name`` is neither a bundled recipe nor an existing file; the message lists the recipes.
    """
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent == Path(".") and stem in list_recipes():
        return CONFIG_DIR / f"{stem}.yaml"
    raise ValueError(f"unknown recipe {str(name)!r}; valid recipes are {list_recipes()} (or a path to a YAML file)")


def recipe_title(path: Path) -> str:
    """The first comment line of a recipe file (its one-line description)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


@dataclass(frozen=True)
class Recipe:
    """A recipe, parsed: what ``winoprune fit --config <recipe>`` would run, for use from Python.

    Attributes:
        name: The recipe's name (its file's stem).
        path: The YAML file.
        config: The whole YAML document.
        callbacks: The recipe's callbacks, instantiated: the pruning callback first (``WinogradPruning`` or
            ``DEPrune``), then the trainer's callbacks of the recipe (e.g. a
            :class:`~lightning_winoprune.recipes.PrunedCheckpoint` monitoring ``val/acc``: drop it if your module
            logs no such metric), then the recipe's :class:`~lightning_winoprune.LatencyValidation`.
        trainer_kwargs: The recipe's ``Trainer`` arguments other than ``callbacks`` and ``logger`` (plain values).
        model: The ``ImageClassifier`` arguments of the recipe (``num_classes`` and ``in_chans`` come from the data).
        data: The datamodule's config (``class_path`` and ``init_args``).
        logger: The logger's config (``class_path`` and ``init_args``), or ``None``.
    """

    name: str
    path: Path
    config: dict[str, Any]
    callbacks: list[Callback] = field(repr=False)
    trainer_kwargs: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    logger: dict[str, Any] | None = None

    @property
    def pruning(self) -> PruningCallback | None:
        """The recipe's pruning callback."""
        return next((cb for cb in self.callbacks if isinstance(cb, PruningCallback)), None)


def load(name: str | Path, **overrides: Any) -> Recipe:
    """Load a recipe: its callbacks instantiated, its trainer, model and data settings as plain values.

    For a LightningModule of your own::

        recipe = lightning_winoprune.recipes.load("resnet18_abwsp", start_epoch=0)
        trainer = L.Trainer(callbacks=[recipe.pruning], max_epochs=recipe.trainer_kwargs["max_epochs"])

    Args:
        name: A bundled recipe (see :func:`list_recipes`) or a path to a YAML recipe file.
        **overrides: Arguments of the recipe's pruning callback to change, e.g. ``amount=0.5`` or ``start_epoch=0``
            (the recipes warm up dense first; start at 0 when your model is already trained).

    Raises:
        ValueError: For an unknown recipe (the message lists the valid ones), an override the pruning callback does
            not take, or a recipe file that does not parse.
    """
    path = recipe_path(name)
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a recipe: expected a YAML mapping with trainer/model/data/pruning keys")
    trainer_cfg = dict(config.get("trainer") or {})
    pruning_cfg = copy.deepcopy(config.get("pruning"))
    if overrides:
        if not isinstance(pruning_cfg, dict) or "class_path" not in pruning_cfg:
            raise ValueError(f"recipe {path.stem!r} has no pruning callback to apply {sorted(overrides)} to")
        _check_overrides(pruning_cfg["class_path"], overrides)
        pruning_cfg.setdefault("init_args", {}).update(overrides)
    callbacks_cfg = trainer_cfg.pop("callbacks", None) or []
    if isinstance(callbacks_cfg, dict):
        callbacks_cfg = [callbacks_cfg]
    logger_cfg = trainer_cfg.pop("logger", None)
    latency_cfg = config.get("latency")
    if latency_cfg is not None:  # the recipe's LatencyValidation runs after the pruning callback's work
        callbacks_cfg = [*callbacks_cfg, latency_cfg]
    pruning, callbacks = _instantiate_callbacks(path, pruning_cfg, callbacks_cfg)
    return Recipe(
        name=path.stem,
        path=path,
        config=config,
        callbacks=([pruning] if pruning is not None else []) + callbacks,
        trainer_kwargs=trainer_cfg,
        model=dict(config.get("model") or {}),
        data=dict(config.get("data") or {}),
        logger=logger_cfg if isinstance(logger_cfg, dict) else None,
    )


def _check_overrides(class_path: str, overrides: dict[str, Any]) -> None:
    """Name the override keys the pruning callback does not take, and list the ones it does."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return  # a short class name: jsonargparse resolves it and reports problems itself
    params = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ValueError(f"{name} takes no argument {', '.join(map(repr, unknown))}; valid arguments are {params}")


def _instantiate_callbacks(path: Path, pruning: Any, callbacks: list[Any]) -> tuple[Any, list[Callback]]:
    """Type-check and instantiate the callbacks with jsonargparse, as the CLI does."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    if pruning is not None:
        parser.add_argument("--pruning", type=PruningCallback)
    parser.add_argument("--callbacks", type=list[Callback], default=[])
    value = {"callbacks": callbacks, **({"pruning": pruning} if pruning is not None else {})}
    try:
        init = parser.instantiate_classes(parser.parse_object(value))
    except Exception as err:  # jsonargparse's ArgumentError, or an error raised by a callback's __init__
        raise ValueError(f"recipe {path.stem!r} ({path}): {err}") from err
    return init.get("pruning"), list(init.callbacks)
