"""``WinogradPruning``: structured pruning of Winograd-domain weights during fine-tuning.

The callback's arguments come flat (``WinogradPruning(method="abwsp", amount=0.7, start_epoch=6)``, what recipes and
LightningCLI use) or grouped in the dataclasses below (``schedule_config=ScheduleConfig(start_epoch=6)``); both forms
meet in ``_winograd_args.merged``. Each pruning step is one call of the masking engine's
:func:`~lightning_winoprune.pruning._stages.step_masks`; the callback keeps the schedule, the calibration and the
per-layer decisions, the broadcast of the masks under DDP, their upkeep through training, and the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_winoprune._utils import set_submodule
from lightning_winoprune.callbacks._base import (
    LossFn,
    PruningCallback,
    check_choice,
    check_fraction,
    has_wandb,
    print_rich,
    print_table,
)
from lightning_winoprune.callbacks._logging import log_pruning_report
from lightning_winoprune.callbacks._schedule import PruningSchedule
from lightning_winoprune.callbacks._winograd_args import (
    _LATENCY_TABLES,
    _SCORES,
    CalibrationConfig,
    ConversionConfig,
    PatternConfig,
    ScheduleConfig,
    SpatialConfig,
    merged,
)
from lightning_winoprune.importance._latency import LatencyTable
from lightning_winoprune.pruning._engine import MaskResult, Pattern
from lightning_winoprune.pruning._methods import (
    METHODS,
    POLICIES,
    importance_factor,
    project_spatial,
    spatial_gradient,
)
from lightning_winoprune.pruning._stages import (
    LayerMask,
    layer_pattern,
    ring_keep,
    spatial_kernels,
    stage_one_from_kernels,
    step_masks,
)
from lightning_winoprune.winograd._convert import winogradize
from lightning_winoprune.winograd._layer import WinogradConv2d
from lightning_winoprune.winograd._transforms import SUPPORTED_M

__all__ = ["CalibrationConfig", "ConversionConfig", "PatternConfig", "ScheduleConfig", "SpatialConfig",
           "WinogradPruning"]

#: ``score=None`` means the method's own score: ``l2`` unless listed here.
_METHOD_SCORE = {"spatial-winograd": "l2-factor"}
_SPATIAL = "spatial-winograd"
_POLICY_CODE = {"dense": -1.0, "wsp": 0.0, "bwsp": 1.0}


def _check_method(method: str, amount: object, m: object, schedule: ScheduleConfig, calibration: CalibrationConfig,
                  spatial: SpatialConfig) -> None:
    """Refuse what the groups cannot check alone: the method, the tile size and spatial-Winograd's constraints."""
    check_choice("method", method, sorted(METHODS))
    if method == _SPATIAL:
        if schedule.schedule != "one_shot":
            raise MisconfigurationException(f"schedule={schedule.schedule!r} is not valid with "
                                            "method='spatial-winograd' (its stages are the schedule); valid values "
                                            "are ['one_shot']")
        if calibration.latency_budget is not None:
            raise MisconfigurationException(f"latency_budget={calibration.latency_budget!r} is not valid with "
                                            "method='spatial-winograd'; valid values are [None]")
        if spatial.stages == 2 and isinstance(amount, (int, float)) and amount < spatial.spatial_amount:
            raise MisconfigurationException(
                f"amount={amount!r} is below spatial_amount={spatial.spatial_amount!r}: stage 2 would un-prune stage "
                "1's zeros; valid values are amount >= spatial_amount (or stages=1)")
    check_fraction("amount", amount)
    if isinstance(m, bool) or not isinstance(m, int):
        raise MisconfigurationException(f"m={m!r} is not valid; valid values are {list(SUPPORTED_M)}")
    check_choice("m", m, SUPPORTED_M)


class WinogradPruning(PruningCallback):
    r"""Prune the Winograd-domain weights of every eligible 3x3 stride-1 conv while the model fine-tunes.

    In :meth:`setup` (before ``configure_optimizers``, checkpoint restore and DDP wrapping) the LightningModule's
    eligible convolutions become :class:`~lightning_winoprune.WinogradConv2d` layers, so optimizers train the
    Winograd weights ``U`` and resumed runs load into the right structure. At the scheduled epochs the callback
    computes masks with the masking engine (:mod:`lightning_winoprune.pruning`) and sets them on the layers; pruned
    weights and their optimizer state are zeroed, and since every forward masks the weight they receive zero
    gradient, so they stay exactly zero through momentum, weight decay, gradient accumulation and AMP.

    Methods (``docs/pruning.md``): ``wwp`` (elements), ``fp`` (whole filters), ``wsp-r`` (rows ``U[xi, k, :]``),
    ``wsp-c`` (columns ``U[xi, :, c]``), ``bwsp`` (rows, the same count in every ``xi``), ``abwsp`` (row segments
    of ``unit`` elements, counts per ``xi`` rounded to multiples of ``align``, and per layer either WSP or BWSP:
    the ``wsp_fraction`` most important layers keep the unbalanced WSP ranking) and ``spatial-winograd`` (two
    stages: at ``start_epoch`` the eight outer weights of the least important 3x3 kernels, which zeroes their
    Winograd border positions exactly, to ``spatial_amount``, then ``spatial_epochs`` of training that is exactly
    spatial-domain training; then elements in the Winograd domain to ``amount`` with importance-factor scores and
    gradients).

    The arguments come flat, as listed below (what the recipes' YAML uses), or grouped: ``schedule_config``
    (:class:`ScheduleConfig`), ``pattern_config`` (:class:`PatternConfig`), ``calibration_config``
    (:class:`CalibrationConfig`), ``spatial_config`` (:class:`SpatialConfig`) and ``conversion_config``
    (:class:`ConversionConfig`) hold the arguments of their fields' names. A field set in one form only takes
    that value; set in both to different values it raises ``MisconfigurationException``.

    Args:
        method: Pruning method, one of ``wwp``, ``fp``, ``wsp-r``, ``wsp-c``, ``bwsp``, ``abwsp``,
            ``spatial-winograd``.
        amount: Target fraction of each pruned layer's Winograd weights set to zero, in ``[0, 1)``.
        m: Winograd output tile size used for the conversion (2: F(2,3), 4: F(4,3), 6: F(6,3)).
        schedule: ``"one_shot"`` (prune at ``start_epoch``) or ``"gradual"`` (cubic ramp to ``end_epoch``).
        start_epoch: First pruning epoch (pruning happens at the start of the epoch).
        end_epoch: Last pruning epoch of the gradual schedule.
        frequency: Epochs between gradual pruning steps.
        skip_first: Keep the first eligible conv dense, as the WSP paper does.
        include: Regular expressions on fully-qualified module names (``re.fullmatch``); only matching convs are
            converted and pruned.
        exclude: Regular expressions of names never converted or pruned.
        unit: Segment length of ABWSP's hardware unit (default 16: the CPU SIMD width; use 32 for GPUs).
        align: Per-``xi`` pruned-unit counts are rounded to multiples of this (ABWSP default 8, others 1).
        rounding: ``"down"`` (prune a little less, keep accuracy) or ``"up"`` (prune a little more).
        score: Block score: ``"l2"`` (group lasso, the definition), ``"l1"``, ``"l2-scaled"`` (L2 of the
            view scaled by each position's weight in the output, see
            :func:`~lightning_winoprune.pruning.position_scale`; ranks blocks of different ``xi`` fairly),
            ``"l2-factor"`` (L2 of the view divided by the square root of the importance factor, see
            :func:`~lightning_winoprune.pruning.importance_factor`) or ``"taylor"`` (sum of ``|w * dL/dw|``).
            ``None``: the method's own (``l2-factor`` for ``spatial-winograd``, ``l2`` for the others). The score
            is part of the pattern every estimator ranks with, so they all rank the mask that is applied.
        importance: Layer-importance estimator for ABWSP's toggle and the latency budget: ``"taylor"`` or
            ``"sensitivity"`` (measured loss increase when only that layer is pruned).
        calibration_batches: Training batches the estimators use.
        wsp_fraction: ABWSP: fraction of layers (the most important ones) that keep WSP.
        latency_budget: If set, choose per layer a policy and amount that minimise the estimated loss increase with
            the pruned layers' total latency at most this fraction of their dense latency (overrides ``amount``).
        budget_amounts: Candidate amounts for the latency-budget search.
        latency_table: Per-layer latencies for the budget: a
            :class:`~lightning_winoprune.importance.LatencyTable`, or ``"torch"`` (default; torch timings of the
            pruned BGEMMs) or ``"native"`` (the whole layer on the native CPU kernels,
            :class:`~lightning_winoprune.importance.NativeLatencyTable`), timed at the calibration batch's shapes.
        loss_fn: ``(module, batch) -> loss`` for the estimators (default: cross-entropy on ``(x, y)`` batches).
        route: Route of the converted layers (see :class:`~lightning_winoprune.winograd.Route`).
        backend: Kernel backend of the converted layers.
        verbose: 0 silent; 1 (default) the conversion report, progress bars of the estimators and a compact
            per-layer table at every pruning step; 2 the full table (block, scope, importance, rounding notes).
        log_masks: Log mask pictures (the WSP paper's Fig. 10 style) to W&B loggers.
        gradient_scaling: Multiply the gradient of every Winograd weight by its position's importance factor
            (:func:`~lightning_winoprune.pruning.importance_factor`) before each optimizer step: the per-position
            step sizes of spatial-domain training, so Winograd-domain fine-tuning works at the dense learning rate.
            ``None``: on for ``spatial-winograd``, off for the others.
        spatial_amount: ``spatial-winograd``: the Winograd-domain sparsity stage 1 reaches (at most the border
            positions' share: 0.75 for F(2,3), 0.556 for F(4,3)).
        spatial_epochs: ``spatial-winograd``: epochs of spatial-domain training between the stages (0: both stages
            at ``start_epoch``).
        stages: ``spatial-winograd``: 2 (both stages) or 1 (stop after stage 1: at the end of the fit the pruned
            layers become plain ``nn.Conv2d`` again, whose kernels have zero rings; every checkpoint of the fit holds
            those plain 3x3 weights, no masks, so it loads into the unconverted model, and a resume converts them
            back).
        schedule_config: ``schedule``, ``start_epoch``, ``end_epoch`` and ``frequency`` as a group.
        pattern_config: ``unit``, ``align``, ``rounding`` and ``score`` as a group.
        calibration_config: ``importance``, ``calibration_batches``, ``wsp_fraction``, ``latency_budget``,
            ``budget_amounts``, ``latency_table`` and ``loss_fn`` as a group.
        spatial_config: ``spatial_amount``, ``spatial_epochs``, ``stages`` and ``gradient_scaling`` as a group.
        conversion_config: ``skip_first``, ``include``, ``exclude``, ``route`` and ``backend`` as a group.
    """

    def __init__(
        self,
        method: str = "abwsp",
        amount: float = 0.7,
        m: int = 2,
        schedule: str = "one_shot",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        frequency: int = 1,
        skip_first: bool = True,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        unit: int | None = None,
        align: int | None = None,
        rounding: str = "down",
        score: str | None = None,
        importance: str = "taylor",
        calibration_batches: int = 4,
        wsp_fraction: float = 0.5,
        latency_budget: float | None = None,
        budget_amounts: Sequence[float] = (0.5, 0.7, 0.9),
        latency_table: Any = None,
        loss_fn: LossFn | None = None,
        route: str = "auto",
        backend: str = "auto",
        verbose: int = 1,
        log_masks: bool = True,
        gradient_scaling: bool | None = None,
        spatial_amount: float = 0.4,
        spatial_epochs: int = 1,
        stages: int = 2,
        *,
        schedule_config: ScheduleConfig | None = None,
        pattern_config: PatternConfig | None = None,
        calibration_config: CalibrationConfig | None = None,
        spatial_config: SpatialConfig | None = None,
        conversion_config: ConversionConfig | None = None,
    ) -> None:
        sched = merged("schedule_config", schedule_config, ScheduleConfig(schedule, start_epoch, end_epoch, frequency))
        pattern = merged("pattern_config", pattern_config, PatternConfig(unit, align, rounding, score))
        calib = merged("calibration_config", calibration_config, CalibrationConfig(
            importance, calibration_batches, wsp_fraction, latency_budget, budget_amounts, latency_table, loss_fn))
        spatial = merged("spatial_config", spatial_config,
                          SpatialConfig(spatial_amount, spatial_epochs, stages, gradient_scaling))
        conv = merged("conversion_config", conversion_config,
                       ConversionConfig(skip_first, include, exclude, route, backend))
        super().__init__(amount, sched.schedule, sched.start_epoch, sched.end_epoch, sched.frequency, conv.include,
                         conv.exclude, calib.calibration_batches, calib.loss_fn, verbose, log_masks)
        _check_method(method, amount, m, sched, calib, spatial)
        if method == _SPATIAL:
            self.schedule = _StagedSchedule(sched.schedule, float(amount), sched.start_epoch, sched.end_epoch,
                                            sched.frequency, spatial_amount=spatial.spatial_amount,
                                            spatial_epochs=spatial.spatial_epochs, stages=spatial.stages)
        self.method, self.amount, self.m = method, float(amount), m
        self.skip_first, self.route, self.backend = conv.skip_first, conv.route, conv.backend
        self.unit, self.align, self.rounding = pattern.unit, pattern.align, pattern.rounding
        self.score = pattern.score or _METHOD_SCORE.get(method, "l2")
        self.importance, self.wsp_fraction = calib.importance, calib.wsp_fraction
        self.latency_budget, self.latency_table = calib.latency_budget, calib.latency_table
        self.budget_amounts = tuple(calib.budget_amounts)
        self.spatial_amount, self.spatial_epochs = spatial.spatial_amount, spatial.spatial_epochs
        self.stages = spatial.stages
        self.gradient_scaling = method == _SPATIAL if spatial.gradient_scaling is None else spatial.gradient_scaling
        self._init_state()

    def _init_state(self) -> None:
        #: spatial-Winograd: the last stage applied (0 before stage 1), saved with the schedule state
        self.stage = 0
        # per-layer decisions, saved with the schedule state
        self.policies: dict[str, str] = {}
        self.layer_amounts: dict[str, float] = {}
        self.layer_importance: dict[str, float] = {}
        self._load_hook: torch.utils.hooks.RemovableHandle | None = None
        #: stages=1: per-layer state-dict hooks that save the 3x3 kernels instead of U and its mask
        self._save_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._factors: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        # the cached upkeep (see PruningCallback.masked_upkeep): layers, the masks it was built from, weight -> layer
        self._layer_cache: tuple[nn.Module, dict[str, WinogradConv2d]] | None = None
        self._upkeep_masks: list[tuple[WinogradConv2d, torch.Tensor | None, int | None]] = []
        self._layer_of: dict[int, WinogradConv2d] = {}

    structural_config = ("m", "skip_first", "include", "exclude")

    @override
    def mask_config(self) -> dict[str, Any]:
        return {"method": self.method, "amount": self.amount, "m": self.m, **super().mask_config(),
                "skip_first": self.skip_first, "unit": self.unit, "align": self.align, "rounding": self.rounding,
                "score": self.score, "importance": self.importance, "wsp_fraction": self.wsp_fraction,
                "latency_budget": self.latency_budget, "budget_amounts": list(self.budget_amounts),
                **({"spatial_amount": self.spatial_amount, "spatial_epochs": self.spatial_epochs,
                    "stages": self.stages} if self.method == _SPATIAL else {})}

    # ------------------------------------------------------------------------------------------ Lightning hooks
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, amount=self.amount, m=self.m)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check_schedule(trainer)
        report = winogradize(pl_module, m=self.m, skip_first=self.skip_first, include=self.include or None,
                             exclude=self.exclude or None, route=self.route, backend=self.backend)
        names = [n for n, mod in pl_module.named_modules() if isinstance(mod, WinogradConv2d) and self.selected(n)]
        if not names:
            raise MisconfigurationException(
                "WinogradPruning found no layer to prune: no eligible 3x3 stride-1 groups-1 conv "
                f"(conversion report:\n{report})"
            )
        self.layer_names = names
        self.invalidate_upkeep()
        if self._load_hook is not None:
            self._load_hook.remove()
        self._load_hook = pl_module.register_load_state_dict_pre_hook(self._refuse_other_tile_sizes)
        self._remove_save_hooks()
        if self._plain_spatial:
            for name in names:
                layer = pl_module.get_submodule(name)
                register = getattr(layer, "register_state_dict_post_hook", None) or layer._register_state_dict_hook
                self._save_hooks.append(register(_save_spatial))
        if self.verbose and report.converted:
            print_rich(report)

    def _refuse_other_tile_sizes(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                                 *args: Any) -> None:
        """``load_state_dict`` pre-hook: a short error naming both tile sizes instead of a size-mismatch dump.

        ``spatial-winograd``: saved 3x3 kernels (a ``stages=1`` checkpoint) are converted to the layer's Winograd
        weights, and the kernels with a zero ring get the stage-1 mask of their border positions.
        """
        for name in self.layer_names:
            key, layer = f"{prefix}{name}.weight", module.get_submodule(name)
            saved = state_dict.get(key)
            if not isinstance(layer, WinogradConv2d) or not isinstance(saved, torch.Tensor) or saved.dim() != 4:
                continue
            size = saved.shape[-1]
            if size == layer.p:
                continue
            if self.method == _SPATIAL and tuple(saved.shape[-2:]) == (3, 3):
                load_spatial(state_dict, f"{prefix}{name}.", saved, layer)
                continue
            way_out = ("start a new run from the pruned checkpoint: lightning_winoprune.load_pruned_checkpoint(model, "
                       "path) converts with the checkpoint's m; then fit without ckpt_path")
            if size - 2 in SUPPORTED_M:
                raise MisconfigurationException(
                    f"the checkpoint was pruned with m={size - 2} ({key} is a {size}x{size} Winograd tile), but this "
                    f"WinogradPruning has m={self.m} ({layer.p}x{layer.p}): resume with m={size - 2}, or {way_out}"
                )
            raise MisconfigurationException(
                f"the checkpoint's {key} has shape {tuple(saved.shape)}, not a Winograd-domain weight: this "
                f"WinogradPruning (m={self.m}, skip_first={self.skip_first}) converts {name}, the run that wrote the "
                "checkpoint did not (other skip_first/include/exclude, or no WinogradPruning); resume with the same "
                f"arguments, or {way_out}"
            )

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"m": self.m, "method": self.method, "policies": dict(self.policies),
                "layer_amounts": dict(self.layer_amounts), "layer_importance": dict(self.layer_importance),
                "stage": self.stage}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.stage = int(state.get("stage", 0))
        self.policies = dict(state.get("policies", {}))
        self.layer_amounts = dict(state.get("layer_amounts", {}))
        self.layer_importance = dict(state.get("layer_importance", {}))

    @override
    def masked_parameters(self, pl_module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        layers = self._layers(pl_module).values()
        for layer in layers:
            value = layer.mask_value()
            if value is not None:
                out.append((layer.weight, value))
        # what the cached list was built from: a mask replaced or edited in place since makes it stale
        self._upkeep_masks = [(layer, layer.mask, None if layer.mask is None else layer.mask._version)
                              for layer in layers]
        self._layer_of = {id(layer.weight): layer for layer in layers}
        return out

    @override
    def invalidate_upkeep(self) -> None:
        super().invalidate_upkeep()
        self._layer_cache = None
        self._upkeep_masks = []
        self._layer_of = {}

    @override
    def upkeep_stale(self) -> bool:
        return any(layer.mask is not mask or (mask is not None and mask._version != version)
                   for layer, mask, version in self._upkeep_masks)

    @override
    def gradient_mask_needed(self, trainer: pl.Trainer, weight: torch.Tensor) -> bool:
        # A layer whose forward passes since the last step all ran the sparse route (or masked the weight) gave its
        # pruned entries an exactly zero gradient: no multiply. Not under DDP, where ranks may pick other routes
        # and the all-reduced gradient mixes them, nor while the spatial phase rewrites the gradient.
        layer = self._layer_of.get(id(weight))
        if layer is None or not layer.pruned_grads_zero or self.in_spatial_phase:
            return True
        return trainer is None or trainer.world_size > 1

    @override
    def after_gradient_masks(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        if optimizer is None:  # called by hand, not before a step: nothing to mark
            return
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for layer in self._layer_of.values():
            if id(layer.weight) in stepped:
                layer.mark_pruned_grads_zero()

    @override
    def enforce(self, pl_module: nn.Module) -> None:
        self.invalidate_upkeep()
        for layer in self._layers(pl_module).values():
            if layer.mask is not None:
                self._enforce(layer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # the gradient adjustments first (after DDP all-reduce: identical on every rank), then the masks
        spatial = self.in_spatial_phase
        if spatial or self.gradient_scaling:
            with torch.no_grad():
                for layer in self._layers(pl_module).values():  # cached: no module lookups per step
                    grad = layer.weight.grad
                    if grad is None:
                        continue
                    if spatial:
                        grad.copy_(spatial_gradient(grad, _spatial_keep(layer)))
                    else:
                        grad.mul_(self._factor(layer))
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.in_spatial_phase:  # any optimizer (Adam too) and rounding: U stays the transform of 3x3 kernels
            with torch.no_grad():
                for layer in self._layers(pl_module).values():
                    layer.weight.copy_(project_spatial(layer.weight, _spatial_keep(layer)))
                    if layer.mask is not None:
                        layer.zero_pruned_()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._plain_spatial:
            for name, layer in self._layers(pl_module).items():
                set_submodule(pl_module, name, _to_conv(layer))
            self._remove_save_hooks()
            self.invalidate_upkeep()

    @property
    def _plain_spatial(self) -> bool:
        """``spatial-winograd`` with ``stages=1``: the model (and every checkpoint) stays an ordinary spatial net."""
        return self.method == _SPATIAL and self.stages == 1

    def _remove_save_hooks(self) -> None:
        for handle in self._save_hooks:
            handle.remove()
        self._save_hooks = []

    @property
    def in_spatial_phase(self) -> bool:
        """``spatial-winograd`` before stage 2: the Winograd weights train exactly as the 3x3 kernels would."""
        return self.method == _SPATIAL and self.stage < 2

    def _factor(self, layer: WinogradConv2d) -> torch.Tensor:
        key = (layer.m, layer.weight.dtype, layer.weight.device)
        factor = self._factors.get(key)
        if factor is None:
            factor = self._factors[key] = importance_factor(layer.m, layer.weight.dtype,
                                                            layer.weight.device).view(layer.p, layer.p)
        return factor

    @override
    def release(self, pl_module: nn.Module) -> None:
        # outside this callback nobody masks gradients: layers go back to masking in every forward pass
        for layer in self._layers(pl_module).values():
            layer.mask_in_forward = True
        self.invalidate_upkeep()
        self._remove_save_hooks()
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    # ------------------------------------------------------------------------------------------ pruning
    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: float) -> dict[str, MaskResult]:
        """Prune every selected layer to the cumulative ``target`` (rescaled per layer in latency-budget mode).

        This is what the schedule calls; it can also be called directly from a hook of your own. ``spatial-winograd``
        runs the stages still ahead instead: stage 1 (rings, to ``spatial_amount``) when none ran yet, stage 2
        (elements, to ``amount``) after it, both at once with ``spatial_epochs=0``.

        Returns:
            The engine's result per layer name (of the last stage that ran).
        """
        layers = self._layers(pl_module)
        saliency = self._calibrate(trainer, pl_module, layers)
        steps = step_masks(
            {name: layer.weight for name, layer in layers.items()}, self.method, self._layer_targets(target, layers),
            policies=self.policies, importance=saliency if self.score == "taylor" else None, unit=self.unit,
            align=self.align, rounding=self.rounding, score=_SCORES[self.score], stages=self._stages_ahead(),
            spatial_amount=self.spatial_amount, sync=lambda name, mask: self._broadcast(trainer, mask, layers[name]),
        )
        if not steps:  # stages=1 after stage 1: nothing left
            return {}
        for stage, masks in steps.items():
            for name, step in masks.items():
                self._apply(trainer, layers[name], step)
            self.stage = stage or self.stage
        last, masks = next(reversed(steps.items()))  # both stages in one step: one report, of stage 2
        results = {name: step.result for name, step in masks.items()}
        self._report(trainer, {1: self.spatial_amount, 2: self.amount}.get(last, target), layers, results)
        return results

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                   layers: dict[str, WinogradConv2d]) -> dict[str, torch.Tensor] | None:
        """Run what this step needs on calibration batches; return the Taylor saliencies (``None`` if not needed).

        The ``taylor`` score and importance need the saliencies; ABWSP's policies and the latency budget's
        per-layer choices are made once, at the first pruning step, and kept in the state.
        """
        needs_policy = self.method == "abwsp" and not self.policies
        needs_budget = self.latency_budget is not None and not self.layer_amounts
        if not (needs_policy or needs_budget or self.score == "taylor"):
            return None
        batches = self.calibration(trainer)
        saliency = None
        if self.score == "taylor" or self.importance == "taylor":
            saliency = self._taylor(trainer, pl_module, layers, batches)
        if needs_budget:
            self._choose_under_budget(trainer, pl_module, layers, batches, saliency)
        elif needs_policy:
            self._choose_policies(trainer, pl_module, layers, batches, saliency)
        return saliency

    def _layer_targets(self, target: float, layers: dict[str, WinogradConv2d]) -> float | dict[str, float]:
        """The amount of every layer at the cumulative ``target``: the budget's per-layer amounts scaled by it."""
        if self.method == _SPATIAL:
            return self.amount  # stage 2's; stage 1 prunes to spatial_amount
        if not self.layer_amounts:
            return target
        return {name: 0.0 if self.policies.get(name) == "dense" else target * self.layer_amounts[name] / self.amount
                for name in layers}

    def _stages_ahead(self) -> tuple[int, ...] | None:
        """Spatial-Winograd's stages this step runs (``None`` for the other methods: their one stage)."""
        if self.method != _SPATIAL:
            return None
        first = self.stage == 0
        both = self.stages == 2 and self.spatial_epochs == 0
        return (1,) * first + (2,) * (self.stages == 2 and (not first or both))

    def _saliency(self, saliency: dict[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
        return saliency[name] if self.score == "taylor" and saliency is not None else None

    @staticmethod
    def _broadcast(trainer: pl.Trainer, mask: torch.Tensor, layer: WinogradConv2d) -> torch.Tensor:
        if trainer.world_size > 1:  # identical masks on every rank, whatever each rank computed
            mask = trainer.strategy.broadcast(mask.cpu(), src=0).to(layer.weight.device)
        return mask

    def _pattern(self, name: str) -> Pattern:
        return self._policy_pattern(self.policies.get(name))

    def _layers(self, pl_module: nn.Module) -> dict[str, WinogradConv2d]:
        """The selected layers, looked up once per pruning step (cached with the upkeep list)."""
        cached = self._layer_cache
        if cached is not None and cached[0] is pl_module:
            return cached[1]
        layers = {n: pl_module.get_submodule(n) for n in self.layer_names}
        out = {n: mod for n, mod in layers.items() if isinstance(mod, WinogradConv2d)}
        self._layer_cache = (pl_module, out)
        return out

    @staticmethod
    def _enforce(layer: WinogradConv2d) -> None:
        layer.zero_pruned_()
        layer.mask_in_forward = False

    def _apply(self, trainer: pl.Trainer, layer: WinogradConv2d, step: LayerMask) -> None:
        if step.weight is not None:  # spatial-Winograd's stage 1: the kernels' rings pruned
            with torch.no_grad():
                layer.weight.copy_(step.weight)
        layer.set_mask(step.mask)
        self._enforce(layer)
        assert layer.mask is not None
        self.zero_optimizer_state(trainer, layer.weight, layer.mask)
        self.invalidate_upkeep()  # also when prune is called from a hook of the user's

    def _taylor(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layers: dict[str, WinogradConv2d],
                batches: list[Any]) -> dict[str, torch.Tensor]:
        from lightning_winoprune.importance import taylor_importance

        progress = self.verbose >= 1 and trainer.is_global_zero
        sal = taylor_importance(pl_module, layers, batches, self.loss_fn, progress=progress,
                                description="Taylor importance")
        if trainer.world_size > 1:
            sal = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in sal.items()}
        return sal

    def _choose_policies(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                         layers: dict[str, WinogradConv2d], batches: list[Any],
                         saliency: dict[str, torch.Tensor] | None) -> None:
        """ABWSP's toggle: the ``wsp_fraction`` most important layers keep WSP, the others become BWSP."""
        from lightning_winoprune.importance import Candidate, layer_scores, measure_sensitivity

        if self.importance == "taylor":
            assert saliency is not None
            scores = layer_scores(saliency)
        else:
            cands = {n: [Candidate("bwsp", self.amount, self._policy_pattern("bwsp"))] for n in layers}
            sens = measure_sensitivity(pl_module, layers, cands, batches, self.loss_fn,
                                       progress=self.verbose >= 1 and trainer.is_global_zero, importance=saliency)
            scores = {n: next(iter(v.values())) for n, v in sens.items()}
            if trainer.world_size > 1:
                scores = {n: float(trainer.strategy.reduce(torch.tensor(s), reduce_op="mean")) for n, s in
                          scores.items()}
        n_wsp = math.ceil(self.wsp_fraction * len(scores) - 1e-9)
        ranked = sorted(scores, key=lambda n: (-scores[n], n))
        policies = {n: ("wsp" if i < n_wsp else "bwsp") for i, n in enumerate(ranked)}
        self.policies = trainer.strategy.broadcast(policies, src=0)
        self.layer_importance = {n: float(s) for n, s in scores.items()}

    def _policy_pattern(self, policy: str | None) -> Pattern:
        """The pattern of this method and policy, the callback's score included: what every estimator ranks."""
        return layer_pattern(self.method, policy, unit=self.unit, align=self.align, rounding=self.rounding,
                             score=_SCORES[self.score])

    def _choose_under_budget(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             layers: dict[str, WinogradConv2d], batches: list[Any],
                             saliency: dict[str, torch.Tensor] | None) -> None:
        """Per layer, the (policy, amount) with the least estimated loss increase under the latency budget."""
        from lightning_winoprune.importance import Candidate, choose_under_budget, measure_sensitivity

        policies = list(POLICIES) if self.method == "abwsp" else [self.method]
        cands = {n: [Candidate("dense", 0.0, None)] + [Candidate(p, a, self._policy_pattern(p)) for p in policies
                                                        for a in self.budget_amounts] for n in layers}
        if self.importance == "taylor" and saliency is not None:
            losses = self._taylor_losses(layers, cands, saliency)
        else:
            losses = measure_sensitivity(pl_module, layers, cands, batches, self.loss_fn,
                                         progress=self.verbose >= 1 and trainer.is_global_zero,
                                         importance=saliency if self.score == "taylor" else None)
        table = self._budget_table(pl_module, layers, batches, saliency)
        dense = sum(table.latency(n, cands[n][0]) for n in layers)
        assert self.latency_budget is not None
        choice = choose_under_budget(losses, table, self.latency_budget * dense)
        choice = trainer.strategy.broadcast(choice, src=0)
        self.policies = {n: c.policy for n, c in choice.items()}
        # final per-layer amounts; gradual schedules scale them by target / amount at every step
        self.layer_amounts = {n: (c.amount if c.policy != "dense" else 0.0) for n, c in choice.items()}

    def _taylor_losses(self, layers: dict[str, WinogradConv2d], cands: dict[str, list[Any]],
                       saliency: dict[str, torch.Tensor]) -> dict[str, dict[Any, float]]:
        """First-order estimate of every candidate: the loss rises by the Taylor saliency of what it prunes."""
        losses: dict[str, dict[Any, float]] = {}
        for n, layer in layers.items():
            losses[n] = {}
            for c in cands[n]:
                if c.pattern is None:
                    losses[n][c] = 0.0
                    continue
                mask = c.keep_mask(layer.weight, self._saliency(saliency, n))
                assert mask is not None
                losses[n][c] = float(saliency[n][~mask].sum())
        return losses

    def _budget_table(self, pl_module: pl.LightningModule, layers: dict[str, WinogradConv2d], batches: list[Any],
                      saliency: dict[str, torch.Tensor] | None) -> LatencyTable:
        """The budget's latency table: the one given, or a ``torch``/``native`` one timed at the batch's shapes."""
        table = self.latency_table
        if table is not None and not isinstance(table, str):
            return table
        sizes = _input_sizes(pl_module, layers, batches[0])
        return _LATENCY_TABLES[table or "torch"](layers, sizes, batch_size=_batch_size(batches[0]),
                                                 importance=saliency if self.score == "taylor" else None)

    def _report(self, trainer: pl.Trainer, target: float, layers: dict[str, WinogradConv2d],
                results: dict[str, MaskResult]) -> None:
        total = sum(layer.weight.numel() for layer in layers.values())
        pruned = sum(r.sparsity * layers[n].weight.numel() for n, r in results.items())
        overall = pruned / max(total, 1)
        self.history.append({"epoch": trainer.current_epoch, "target": target, "sparsity": overall})
        metrics: dict[str, float] = {"sparsity": overall, "target": target}
        rows = []
        for n, r in results.items():
            metrics[f"sparsity/{n}"] = r.sparsity
            policy = self.policies.get(n, self.method)
            if policy in _POLICY_CODE:
                metrics[f"policy_balanced/{n}"] = _POLICY_CODE[policy]
            counts = r.pruned_blocks.tolist()
            rows.append([n, str(tuple(layers[n].weight.shape)), policy, r.pattern.block.value, r.pattern.scope.value,
                         round(r.sparsity, 4), f"{min(counts)}..{max(counts)} of {r.blocks_per_matrix}",
                         round(self.layer_importance.get(n, float("nan")), 6), "; ".join(r.notes)])
        columns = ["layer", "shape", "policy", "block", "scope", "sparsity", "pruned blocks per xi", "importance",
                   "notes"]
        figures = self._figures(layers) if self.log_masks and has_wandb(trainer) and trainer.is_global_zero else None
        log_pruning_report(trainer, "winograd_pruning", metrics, columns, rows, figures)
        title = f"WinogradPruning {self.method} epoch {trainer.current_epoch}: target {target:.3f}, achieved " \
                f"{overall:.3f}"
        if self.verbose >= 2:
            print_table(title, columns, rows)
        elif self.verbose:
            compact = [[n, "x".join(map(str, layers[n].weight.shape)), row[2], f"{r.sparsity:.3f}", row[6]]
                       for (n, r), row in zip(results.items(), rows, strict=True)]
            print_table(title, ["layer", "U shape", "policy", "sparsity", "pruned blocks/xi"], compact)

    def _figures(self, layers: dict[str, WinogradConv2d]) -> dict[str, Any]:
        from lightning_winoprune.pruning._plot import plot_bgemm_masks

        figs = {}
        for n in list(layers)[:4]:
            layer = layers[n]
            figs[n] = plot_bgemm_masks(layer.weight, layer.mask, title=f"{n} ({self.policies.get(n, self.method)})")
        return figs



@dataclass(frozen=True)
class _StagedSchedule(PruningSchedule):
    """Spatial-Winograd's two steps: stage 1 at ``start_epoch``, stage 2 ``spatial_epochs`` later (if ``stages=2``)."""

    spatial_amount: float = 0.4
    spatial_epochs: int = 1
    stages: int = 2

    def steps(self) -> list[tuple[int, float]]:
        first = (self.start_epoch, self.spatial_amount)
        if self.stages == 1:
            return [first]
        second = (self.start_epoch + self.spatial_epochs, self.amount)
        return [second] if self.spatial_epochs == 0 else [first, second]


def _spatial_keep(layer: WinogradConv2d) -> torch.Tensor | None:
    """The 3x3 kernel entries a spatial-Winograd stage-1 mask keeps: rings of kernels whose border is pruned go."""
    return None if layer.mask is None else ring_keep(layer.mask)


def _save_spatial(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook of a ``stages=1`` layer: save what ``nn.Conv2d`` would (3x3 kernels, bias), no mask.

    A module-level function, not a method: a deep copy of the model must not copy the callback.
    """
    assert isinstance(module, WinogradConv2d)
    state_dict[prefix + "weight"] = spatial_kernels(module.weight, module.mask)
    state_dict.pop(prefix + "mask", None)


def load_spatial(state_dict: dict[str, Any], prefix: str, g: torch.Tensor, layer: WinogradConv2d) -> None:
    """Turn saved 3x3 kernels into ``layer``'s Winograd weights (in ``state_dict``), with the stage-1 mask.

    The mask is that of the kernels' zero rings (:func:`~lightning_winoprune.pruning._stages.stage_one_from_kernels`).
    """
    w = layer.weight
    u, mask = stage_one_from_kernels(g.to(device=w.device), layer.m)
    state_dict[prefix + "weight"] = u.to(w.dtype)
    if mask is None:
        state_dict.pop(prefix + "mask", None)
    else:
        state_dict[prefix + "mask"] = mask


def _to_conv(layer: WinogradConv2d) -> nn.Conv2d:
    """The plain ``nn.Conv2d`` whose kernels ``g`` satisfy ``G g G^T = U`` (stage-1 rings exactly zero)."""
    w = layer.weight.detach()
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=layer.padding, bias=layer.bias is not None,
                     device=w.device, dtype=w.dtype)
    with torch.no_grad():
        conv.weight.copy_(spatial_kernels(layer.weight, layer.mask))
        if layer.bias is not None:
            assert conv.bias is not None
            conv.bias.copy_(layer.bias)
    conv.train(layer.training)
    return conv


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else 1


def _input_sizes(module: nn.Module, layers: dict[str, WinogradConv2d], batch: Any) -> dict[str, tuple[int, int]]:
    """Spatial input size of every layer, recorded with forward hooks on one calibration batch."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [layer.register_forward_hook(lambda mod, inp, out, n=n: sizes.__setitem__(n, tuple(inp[0].shape[-2:])))
             for n, layer in layers.items()]
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            module(x)
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()
    return sizes
