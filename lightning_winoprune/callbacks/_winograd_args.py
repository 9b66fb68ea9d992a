"""``WinogradPruning``'s arguments grouped by job: schedule, pattern, calibration, spatial-Winograd, conversion.

Each group is a frozen dataclass whose fields are the callback's flat keyword arguments of the same names (same
meanings, same defaults), so a recipe can give either form; :func:`merged` combines them field by field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_winoprune.callbacks._base import (
    LossFn,
    check_choice,
    check_fraction,
    check_positive_int,
    compile_patterns,
)
from lightning_winoprune.callbacks._schedule import PruningSchedule
from lightning_winoprune.importance._latency import LatencyTable, NativeLatencyTable, TorchLatencyTable
from lightning_winoprune.kernels._backend import Backend, extension_status, native_available
from lightning_winoprune.pruning._engine import Rounding, Score
from lightning_winoprune.winograd._layer import Route

__all__ = ["CalibrationConfig", "ConversionConfig", "PatternConfig", "ScheduleConfig", "SpatialConfig", "merged"]

_IMPORTANCE = ("taylor", "sensitivity")
#: The callback's score names -> the engine's scores (``score`` is part of every pattern the callback builds).
_SCORES = {"l2": Score.L2, "l1": Score.L1, "l2-scaled": Score.L2_SCALED, "l2-factor": Score.L2_FACTOR,
           "taylor": Score.IMPORTANCE}
_STAGES = (1, 2)
_LATENCY_TABLES: dict[str, type[TorchLatencyTable]] = {"torch": TorchLatencyTable, "native": NativeLatencyTable}


def _check_latency_table(table: object) -> None:
    if isinstance(table, str):
        check_choice("latency_table", table, sorted(_LATENCY_TABLES))
        if table == "native" and not native_available():
            raise MisconfigurationException(
                f"latency_table='native' needs the native extension ({extension_status()}); use 'torch'"
            )
    elif table is not None and not isinstance(table, LatencyTable):
        raise MisconfigurationException(
            f"latency_table={table!r} is not valid; pass a LatencyTable or one of {sorted(_LATENCY_TABLES)}"
        )


# ---------------------------------------------------------------------------------------------------- argument groups
# A group's fields are WinogradPruning's arguments of the same names, with their meanings and defaults (``None``: the
# method's own); a group checks its fields when it is built and raises MisconfigurationException on a bad one.
@dataclass(frozen=True)
class ScheduleConfig:
    """When :class:`WinogradPruning` prunes: its ``schedule``, ``start_epoch``, ``end_epoch`` and ``frequency``."""

    schedule: str = "one_shot"
    start_epoch: int = 0
    end_epoch: int | None = None
    frequency: int = 1

    def __post_init__(self) -> None:
        PruningSchedule(self.schedule, 0.0, self.start_epoch, self.end_epoch, self.frequency)


@dataclass(frozen=True)
class PatternConfig:
    """How blocks are cut and ranked: :class:`WinogradPruning`'s ``unit``, ``align``, ``rounding`` and ``score``."""

    unit: int | None = None
    align: int | None = None
    rounding: str = "down"
    score: str | None = None

    def __post_init__(self) -> None:
        check_positive_int("unit", self.unit)
        check_positive_int("align", self.align)
        check_choice("rounding", self.rounding, [r.value for r in Rounding])
        if self.score is not None:
            check_choice("score", self.score, list(_SCORES))


@dataclass(frozen=True)
class CalibrationConfig:
    """The per-layer decisions made on calibration batches (ABWSP's toggle, the latency budget).

    :class:`WinogradPruning`'s ``importance``, ``calibration_batches``, ``wsp_fraction``, ``latency_budget``,
    ``budget_amounts``, ``latency_table`` and ``loss_fn``.
    """

    importance: str = "taylor"
    calibration_batches: int = 4
    wsp_fraction: float = 0.5
    latency_budget: float | None = None
    budget_amounts: Sequence[float] = (0.5, 0.7, 0.9)
    latency_table: Any = None
    loss_fn: LossFn | None = None

    def __post_init__(self) -> None:
        check_choice("importance", self.importance, _IMPORTANCE)
        check_positive_int("calibration_batches", self.calibration_batches, allow_none=False)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise MisconfigurationException(f"loss_fn must be callable, got {type(self.loss_fn).__name__}")
        _check_latency_table(self.latency_table)
        object.__setattr__(self, "wsp_fraction", check_fraction("wsp_fraction", self.wsp_fraction, high_open=False))
        if self.latency_budget is not None:
            check_fraction("latency_budget", self.latency_budget, low_open=True, high_open=False)
        amounts = tuple(self.budget_amounts)
        if not amounts or any(not isinstance(a, (int, float)) or not 0 < a < 1 for a in amounts):
            raise MisconfigurationException(f"budget_amounts must be numbers in (0, 1), got {amounts!r}")
        object.__setattr__(self, "budget_amounts", amounts)


@dataclass(frozen=True)
class SpatialConfig:
    """Spatial-domain training: spatial-Winograd's stages and the gradient scaling.

    :class:`WinogradPruning`'s ``spatial_amount``, ``spatial_epochs``, ``stages`` and ``gradient_scaling``.
    """

    spatial_amount: float = 0.4
    spatial_epochs: int = 1
    stages: int = 2
    gradient_scaling: bool | None = None

    def __post_init__(self) -> None:
        if self.gradient_scaling is not None and not isinstance(self.gradient_scaling, bool):
            raise MisconfigurationException(f"gradient_scaling={self.gradient_scaling!r} is not valid; valid values "
                                            "are [True, False, None]")
        object.__setattr__(self, "spatial_amount", check_fraction("spatial_amount", self.spatial_amount))
        epochs = self.spatial_epochs
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise MisconfigurationException(f"spatial_epochs={epochs!r} is not valid; valid values are ints >= 0 (0 "
                                            "runs both stages at start_epoch)")
        if isinstance(self.stages, bool) or self.stages not in _STAGES:
            raise MisconfigurationException(f"stages={self.stages!r} is not valid; valid values are {list(_STAGES)}")


@dataclass(frozen=True)
class ConversionConfig:
    """Which convs become Winograd layers and how they run.

    :class:`WinogradPruning`'s ``skip_first``, ``include``, ``exclude``, ``route`` and ``backend``.
    """

    skip_first: bool = True
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    route: str = "auto"
    backend: str = "auto"

    def __post_init__(self) -> None:
        compile_patterns(self.include, "include")
        compile_patterns(self.exclude, "exclude")
        check_choice("route", self.route, [r.value for r in Route])
        check_choice("backend", self.backend, [b.value for b in Backend])


_Group = TypeVar("_Group", ScheduleConfig, PatternConfig, CalibrationConfig, SpatialConfig, ConversionConfig)


def merged(param: str, given: object, flat: _Group) -> _Group:
    """The group ``flat`` (built from the flat keyword arguments) merged with the group object ``given``.

    A field keeps its default unless one form sets it; a field both forms set to different values is refused.

    Raises:
        MisconfigurationException: If ``given`` is not a group of ``flat``'s type (or ``None``), or if a field is set
            in both forms to different values.
    """
    cls = type(flat)
    if given is None:
        return flat
    if not isinstance(given, cls):
        raise MisconfigurationException(f"{param}={given!r} is not valid; valid values are a {cls.__name__} or None")
    changes = {}
    for f in fields(cls):
        mine, theirs = getattr(flat, f.name), getattr(given, f.name)
        if _same(mine, f.default) or _same(mine, theirs):
            continue
        if not _same(theirs, f.default):
            raise MisconfigurationException(
                f"{f.name}={mine!r} and {param}.{f.name}={theirs!r} disagree; valid values are one of them, given "
                f"once (the keyword argument {f.name} or {param}.{f.name}) or the same in both")
        changes[f.name] = mine
    return replace(given, **changes) if changes else given


def _same(a: object, b: object) -> bool:
    """Equal as argument values: lists and tuples alike (YAML gives lists), numbers by value, booleans as booleans."""
    a, b = (tuple(v) if isinstance(v, list) else v for v in (a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


