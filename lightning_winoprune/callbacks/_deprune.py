"""``DEPrune``: DCP / BWT / HSR pruning of depthwise convs and filter pruning of pointwise convs (design §3)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_winoprune.callbacks._base import (
    LossFn,
    PruningCallback,
    check_choice,
    check_fraction,
    check_positive_int,
    print_table,
)
from lightning_winoprune.callbacks._logging import log_pruning_report
from lightning_winoprune.pruning._depthwise import (
    DW_METHODS,
    DepthwiseMaskResult,
    PointwiseMaskResult,
    depthwise_mask,
    pointwise_filter_mask,
)

__all__ = ["DEPrune", "MASK_BUFFER", "is_depthwise", "is_pointwise"]

#: Name of the boolean keep-mask buffer DEPrune registers on every conv it prunes (saved in checkpoints).
MASK_BUFFER = "weight_mask"
_ROUNDING = ("auto", "down", "up")
_PW_SELECT = ("importance", "all", "none")


def is_depthwise(mod: nn.Module) -> bool:
    """A depthwise conv: ``groups == in_channels == out_channels > 1``."""
    return isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels


def is_pointwise(mod: nn.Module) -> bool:
    """A pointwise conv: 1x1 kernel, stride 1, groups 1."""
    return (isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) == (1, 1) and mod.groups == 1
            and tuple(mod.stride) == (1, 1))


def register_mask_buffer(conv: nn.Conv2d) -> None:
    """Give ``conv`` an all-True ``weight_mask`` buffer (no-op if it has one), so checkpoints with masks load."""
    if getattr(conv, MASK_BUFFER, None) is None:
        conv.register_buffer(MASK_BUFFER, torch.ones_like(conv.weight, dtype=torch.bool))


class DEPrune(PruningCallback):
    r"""Prune depthwise-separable convolutions: DEPrune's patterns on the depthwise convs, filters of pointwise ones.

    Depthwise convs (``groups == channels``) are pruned in place with masks in the DR (diagonal-wise
    refactorization) structure: ``dcp`` ranks all depthwise weights of a layer, ``dcp-b`` (BWT) prunes the same ratio
    in every sub-GEMM of ``tile`` channels, ``dcp-bh`` (BWT + HSR) also rounds every sub-GEMM's pruned-column count to
    a multiple of ``tile``, down ('u': keeps accuracy) or up ('o': more speed) -- with ``rounding="auto"`` the
    importance estimator chooses per layer (the more important half 'u', the rest 'o'). Pointwise (1x1) convs lose
    whole filters by L2 norm; with ``pw_select="importance"`` only the ``pw_fraction`` least important of them.

    Masks are ``weight_mask`` buffers on the convs (part of every checkpoint). Pruned weights and their optimizer
    state are zeroed, and gradients are masked before every optimizer step (the same machinery as
    :class:`~lightning_winoprune.WinogradPruning`, so both can run in one Trainer on a model that has both kinds of
    layer).

    Args:
        method: ``"dcp"``, ``"dcp-b"`` or ``"dcp-bh"``.
        dw_amount: Fraction of every depthwise conv's weights to prune, in ``[0, 1)``.
        pw_amount: Fraction of filters of every selected pointwise conv to prune, in ``[0, 1)`` (0: none).
        tile: Channels per DR sub-GEMM (32, the GPU tile).
        rounding: HSR direction for ``dcp-bh``: ``"auto"`` (per layer, by importance), ``"down"`` ('u') or ``"up"``
            ('o').
        pw_select: Which pointwise convs are pruned: ``"importance"`` (the ``pw_fraction`` least important),
            ``"all"`` or ``"none"``.
        pw_fraction: Share of pointwise convs pruned with ``pw_select="importance"``.
        schedule: ``"one_shot"`` or ``"gradual"`` (both amounts follow the same cubic ramp).
        start_epoch: First pruning epoch.
        end_epoch: Last pruning epoch of the gradual schedule.
        frequency: Epochs between gradual steps.
        include: Regular expressions of module names to prune (``re.fullmatch``).
        exclude: Regular expressions of module names never pruned.
        calibration_batches: Training batches the Taylor importance estimator uses.
        loss_fn: ``(module, batch) -> loss`` for the estimator (default: cross-entropy on ``(x, y)`` batches).
        verbose: 0 silent, 1 progress bars and a per-layer table at every pruning step, 2 also the notes column.
    """

    def __init__(
        self,
        method: str = "dcp-bh",
        dw_amount: float = 0.5,
        pw_amount: float = 0.3,
        tile: int = 32,
        rounding: str = "auto",
        pw_select: str = "importance",
        pw_fraction: float = 0.5,
        schedule: str = "one_shot",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        frequency: int = 1,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        calibration_batches: int = 4,
        loss_fn: LossFn | None = None,
        verbose: int = 1,
    ) -> None:
        dw = check_fraction("dw_amount", dw_amount)
        pw = check_fraction("pw_amount", pw_amount)
        super().__init__(max(dw, pw), schedule, start_epoch, end_epoch, frequency, include, exclude,
                         calibration_batches, loss_fn, verbose, log_masks=False)
        check_choice("method", method, list(DW_METHODS))
        check_positive_int("tile", tile, allow_none=False)
        check_choice("rounding", rounding, list(_ROUNDING))
        check_choice("pw_select", pw_select, list(_PW_SELECT))
        self.pw_fraction = check_fraction("pw_fraction", pw_fraction, high_open=False)
        self.method, self.dw_amount, self.pw_amount, self.tile = method, dw, pw, tile
        self.rounding, self.pw_select = rounding, pw_select
        self.kinds: dict[str, str] = {}  # layer name -> "dw" / "pw"
        self.dw_rounding: dict[str, str] = {}  # layer name -> "down" / "up"
        self.pw_pruned: list[str] = []
        self.layer_importance: dict[str, float] = {}
        self._float_masks: dict[str, torch.Tensor] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, dw_amount=self.dw_amount, pw_amount=self.pw_amount)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        kinds = {}
        for name, mod in pl_module.named_modules():
            if not self.selected(name):
                continue
            if is_depthwise(mod):
                kinds[name] = "dw"
            elif is_pointwise(mod) and self.pw_select != "none" and self.pw_amount > 0:
                kinds[name] = "pw"
        if not any(k == "dw" for k in kinds.values()):
            raise MisconfigurationException(
                "DEPrune found no depthwise conv (groups == in_channels == out_channels > 1) to prune"
                + (f" matching include={self.include}" if self.include else "")
            )
        for name in kinds:
            register_mask_buffer(pl_module.get_submodule(name))  # type: ignore[arg-type]
        self.kinds, self.layer_names = kinds, list(kinds)
        self._float_masks.clear()

    # ------------------------------------------------------------------------------------------ base hooks
    @override
    def masked_parameters(self, pl_module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name in self.layer_names:
            conv = pl_module.get_submodule(name)
            mask = getattr(conv, MASK_BUFFER, None)
            if not isinstance(conv, nn.Conv2d) or mask is None:
                continue
            cached = self._float_masks.get(name)
            if cached is None or cached.shape != conv.weight.shape or cached.device != conv.weight.device:
                cached = self._float_masks[name] = mask.to(conv.weight.dtype)
            out.append((conv.weight, cached))
        return out

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"method": self.method, "kinds": dict(self.kinds), "dw_rounding": dict(self.dw_rounding),
                "pw_pruned": list(self.pw_pruned), "layer_importance": dict(self.layer_importance)}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kinds = dict(state.get("kinds", self.kinds))
        self.dw_rounding = dict(state.get("dw_rounding", {}))
        self.pw_pruned = list(state.get("pw_pruned", []))
        self.layer_importance = dict(state.get("layer_importance", {}))
        self._float_masks.clear()

    # ------------------------------------------------------------------------------------------ pruning
    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: float) -> dict[str, Any]:
        """Prune depthwise and selected pointwise convs to ``target`` (rescaled to each kind's final amount)."""
        scale = target / self.schedule.amount if self.schedule.amount > 0 else 0.0
        convs = {n: pl_module.get_submodule(n) for n in self.layer_names}
        needs_importance = (not self.dw_rounding and self.method == "dcp-bh" and self.rounding == "auto") or (
            not self.pw_pruned and self.pw_select == "importance" and any(k == "pw" for k in self.kinds.values()))
        if needs_importance:
            self._decide(trainer, pl_module, convs)
        if not self.dw_rounding:
            fixed = "down" if self.rounding == "auto" else self.rounding
            self.dw_rounding = {n: fixed for n, k in self.kinds.items() if k == "dw"}
        if not self.pw_pruned and self.pw_select == "all":
            self.pw_pruned = [n for n, k in self.kinds.items() if k == "pw"]
        results: dict[str, Any] = {}
        for name, conv in convs.items():
            assert isinstance(conv, nn.Conv2d)
            res: DepthwiseMaskResult | PointwiseMaskResult
            if self.kinds[name] == "dw":
                res = depthwise_mask(conv.weight.detach(), self.dw_amount * scale, self.method, tile=self.tile,
                                     rounding=self.dw_rounding[name])
            elif name in self.pw_pruned:
                res = pointwise_filter_mask(conv.weight.detach(), self.pw_amount * scale)
            else:
                continue
            mask = res.mask
            if trainer.world_size > 1:
                mask = trainer.strategy.broadcast(mask.cpu(), src=0)
            self._apply(trainer, name, conv, mask.to(conv.weight.device))
            results[name] = res
        self._report(trainer, target, convs, results)
        return results

    def _apply(self, trainer: pl.Trainer, name: str, conv: nn.Conv2d, mask: torch.Tensor) -> None:
        getattr(conv, MASK_BUFFER).copy_(mask)
        self._float_masks.pop(name, None)
        with torch.no_grad():
            conv.weight.mul_(mask.to(conv.weight.dtype))
        self.zero_optimizer_state(trainer, conv.weight, mask)

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, convs: dict[str, nn.Module]) -> None:
        """Taylor importance per layer: DW 'u'/'o' (the more important half keeps 'u') and which PW convs to prune."""
        from lightning_winoprune.importance import layer_scores, taylor_importance

        batches = self.calibration(trainer)
        sal = taylor_importance(pl_module, convs, batches, self.loss_fn,
                                progress=self.verbose >= 1 and trainer.is_global_zero, description="DEPrune importance")
        if trainer.world_size > 1:
            sal = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in sal.items()}
        scores = layer_scores(sal)
        self.layer_importance = {n: float(s) for n, s in scores.items()}
        dw = sorted((n for n, k in self.kinds.items() if k == "dw"), key=lambda n: (-scores[n], n))
        if self.method == "dcp-bh" and self.rounding == "auto":
            half = math.ceil(len(dw) / 2)
            self.dw_rounding = {n: ("down" if i < half else "up") for i, n in enumerate(dw)}
        pw = sorted((n for n, k in self.kinds.items() if k == "pw"), key=lambda n: (scores[n], n))
        if self.pw_select == "importance":
            self.pw_pruned = pw[: math.ceil(self.pw_fraction * len(pw) - 1e-9)]
        self.dw_rounding = trainer.strategy.broadcast(self.dw_rounding, src=0)
        self.pw_pruned = trainer.strategy.broadcast(self.pw_pruned, src=0)

    def _report(self, trainer: pl.Trainer, target: float, convs: dict[str, nn.Module],
                results: dict[str, Any]) -> None:
        rows, metrics = [], {}
        totals = {"dw": [0.0, 0], "pw": [0.0, 0]}
        for name, res in results.items():
            kind, numel = self.kinds[name], res.mask.numel()
            totals[kind][0] += res.sparsity * numel
            totals[kind][1] += numel
            metrics[f"sparsity/{name}"] = res.sparsity
            if kind == "dw":
                metrics[f"real_dw/{name}"] = res.real_dw
                pattern = {"down": "u", "up": "o"}[self.dw_rounding[name]] if self.method == "dcp-bh" else "-"
                rows.append([name, "dw", "x".join(map(str, res.mask.shape)), f"{res.sparsity:.3f}",
                             f"{res.real_dw:.3f}", pattern, "; ".join(res.notes)])
            else:
                rows.append([name, "pw", "x".join(map(str, res.mask.shape)), f"{res.sparsity:.3f}", "-",
                             f"{len(res.pruned_filters)} filters", "; ".join(res.notes)])
        for kind, (pruned, numel) in totals.items():
            if numel:
                metrics[f"{kind}_sparsity"] = pruned / numel
        metrics["target"] = target
        self.history.append({"epoch": trainer.current_epoch, "target": target,
                             **{k: v for k, v in metrics.items() if k.endswith("_sparsity")}})
        columns = ["layer", "kind", "shape", "sparsity", "real DW", "DW-Pat. / PW", "notes"]
        log_pruning_report(trainer, "deprune", metrics, columns, rows, None)
        if self.verbose:
            scale = target / self.schedule.amount if self.schedule.amount > 0 else 0.0
            title = (f"DEPrune {self.method} epoch {trainer.current_epoch}: DW target {self.dw_amount * scale:.3f}, "
                     f"PW target {self.pw_amount * scale:.3f}")
            width = len(columns) if self.verbose >= 2 else len(columns) - 1
            print_table(title, columns[:width], [r[:width] for r in rows])
