"""``DEPrune``: DCP / BWT / HSR on depthwise convs, filter pruning of pointwise convs (``docs/deprune.md``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_winoprune._utils import MASK_ATTR, is_depthwise, is_pointwise
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
    DW_BASELINES,
    DW_METHODS,
    DepthwiseMaskResult,
    PointwiseMaskResult,
    depthwise_mask,
    pointwise_filter_mask,
)
from lightning_winoprune.pruning._shrink import (
    count_parameters,
    filters_left,
    register_mask_buffer,
    require_torch_pruning,
    shrink_pointwise,
)

__all__ = ["DEPrune"]

_ROUNDING = ("auto", "down", "up")
_PW_SELECT = ("importance", "all", "none")


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

    With ``physical=True`` the pointwise convs are still only masked while training, and at the end of the fit
    (``on_fit_end``, identically on every rank) their pruned filters are removed for real with `torch-pruning
    <https://github.com/VainF/Torch-Pruning>`_'s dependency graph, which also removes the coupled channels: the
    following BatchNorm, depthwise conv, squeeze-and-excitation convs and the next layers' input channels. A pruned
    filter's channel is removed only where every conv that writes it has that filter pruned too: channels shared
    through a residual add with live filters of another conv, or groups that would empty a layer, are kept (masked)
    and listed in :attr:`physical_skipped`. The removed indices, in the order applied, are in
    :attr:`physical_removed` and in the callback's checkpoint state, so
    :func:`~lightning_winoprune.load_pruned_checkpoint` rebuilds the shrunk model. Notes:

    * The shrunk model is the masked one with the removed channels' outputs set to zero. It is not always identical
      to the masked model: a pruned filter followed by BatchNorm still emits BatchNorm's constant shift
      (``beta - gamma * running_mean / sqrt(running_var + eps)``), and a pruned SE-reduce conv its bias, which the
      shrink drops with the channel.
    * The optimizer (and its state) is stale after the shrink: it is the end of the fit. A checkpoint written by
      ``ModelCheckpoint`` during the fit holds the unshrunk model; save the shrunk one with
      ``trainer.save_checkpoint(path)`` after ``fit``. Such a checkpoint is for inference or export (load it with
      :func:`~lightning_winoprune.load_pruned_checkpoint`); resuming a fit from it is refused.

    Args:
        method: ``"dcp"``, ``"dcp-b"`` or ``"dcp-bh"`` (or the baseline ``"channel"``: whole depthwise channels).
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
        physical: Remove the pruned pointwise filters (and the channels coupled to them) at the end of the fit; needs
            ``torch-pruning`` (``pip install 'lightning-winoprune[physical]'``).

    Raises:
        MisconfigurationException: On an invalid argument, or ``physical=True`` without ``torch-pruning``.
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
        physical: bool = False,
    ) -> None:
        dw = check_fraction("dw_amount", dw_amount)
        pw = check_fraction("pw_amount", pw_amount)
        super().__init__(max(dw, pw), schedule, start_epoch, end_epoch, frequency, include, exclude,
                         calibration_batches, loss_fn, verbose, log_masks=False)
        check_choice("method", method, list(DW_METHODS + DW_BASELINES))
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
        if not isinstance(physical, bool):
            raise MisconfigurationException(f"physical must be a bool, got {physical!r}")
        if physical:
            require_torch_pruning()
        self.physical = physical
        self.physical_done = False
        #: ``(pointwise conv name, removed output filters)`` in the order applied (indices as of that step).
        self.physical_removed: list[tuple[str, list[int]]] = []
        #: Pointwise conv name -> why (some of) its pruned filters were kept masked instead of removed.
        self.physical_skipped: dict[str, str] = {}
        #: Shape and dtype of the example input the dependency graph was traced with.
        self.physical_input: tuple[list[int], str] | None = None
        #: Parameter count of the module before and after the shrink.
        self.physical_params: tuple[int, int] | None = None
        self._load_hook: torch.utils.hooks.RemovableHandle | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, dw_amount=self.dw_amount, pw_amount=self.pw_amount)

    structural_config = ("include", "exclude", "pw_select")

    @override
    def mask_config(self) -> dict[str, Any]:
        return {"method": self.method, "dw_amount": self.dw_amount, "pw_amount": self.pw_amount,
                **super().mask_config(), "tile": self.tile, "rounding": self.rounding, "pw_select": self.pw_select,
                "pw_fraction": self.pw_fraction}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check_schedule(trainer)
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
        self.invalidate_upkeep()
        self.release(pl_module)
        self._load_hook = pl_module.register_load_state_dict_pre_hook(self._refuse_other_shapes)

    @override
    def release(self, pl_module: nn.Module) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def _refuse_other_shapes(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """``load_state_dict`` pre-hook: a clear error for a physically shrunk state dict and an unshrunk model."""
        for name in self.layer_names:
            key, conv = f"{prefix}{name}.weight", module.get_submodule(name)
            if key in state_dict and isinstance(conv, nn.Conv2d) and state_dict[key].shape != conv.weight.shape:
                raise MisconfigurationException(
                    f"the state dict's {key} has shape {tuple(state_dict[key].shape)}, the model's "
                    f"{tuple(conv.weight.shape)}: it holds a model that DEPrune(physical=True) shrank at the end of a "
                    f"fit, and it is for inference or export: load it into a fresh model with "
                    f"lightning_winoprune.load_pruned_checkpoint(model, path) (and start a new fit without ckpt_path "
                    f"to fine-tune it)."
                )

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The model already matched the shrunk weights (it was loaded with load_pruned_checkpoint), but the optimizer
        # state saved with them is stale: the parameters it was built for were replaced at the end of that fit.
        shrunk = any(str(k).startswith("DEPrune") and isinstance(v, dict) and v.get("physical_done")
                     for k, v in checkpoint.get("callbacks", {}).items())
        if shrunk and trainer.state.fn == "fit":
            raise MisconfigurationException(
                "the checkpoint holds a model that DEPrune(physical=True) shrank at the end of a fit; it is for "
                "inference or export and a fit cannot resume from it (its optimizer state is stale). Start a new fit "
                "without ckpt_path to fine-tune the shrunk model."
            )
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    # ------------------------------------------------------------------------------------------ base hooks
    @override
    def masked_parameters(self, pl_module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name in self.layer_names:
            conv = pl_module.get_submodule(name)
            mask = getattr(conv, MASK_ATTR, None)
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
                "pw_pruned": list(self.pw_pruned), "layer_importance": dict(self.layer_importance),
                "physical_done": self.physical_done,
                "physical_removed": [(n, list(idxs)) for n, idxs in self.physical_removed],
                "physical_skipped": dict(self.physical_skipped),
                "physical_input": None if self.physical_input is None else (list(self.physical_input[0]),
                                                                            self.physical_input[1]),
                "physical_params": self.physical_params}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kinds = dict(state.get("kinds", self.kinds))
        self.dw_rounding = dict(state.get("dw_rounding", {}))
        self.pw_pruned = list(state.get("pw_pruned", []))
        self.layer_importance = dict(state.get("layer_importance", {}))
        self.physical_done = bool(state.get("physical_done", False))
        self.physical_removed = [(str(n), [int(i) for i in idxs]) for n, idxs in state.get("physical_removed", [])]
        self.physical_skipped = dict(state.get("physical_skipped", {}))
        shape = state.get("physical_input")
        self.physical_input = None if shape is None else (list(shape[0]), str(shape[1]))
        params = state.get("physical_params")
        self.physical_params = None if params is None else (int(params[0]), int(params[1]))
        self._float_masks.clear()

    # ------------------------------------------------------------------------------------------ physical shrink
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.physical:
            self.shrink(trainer, pl_module)

    def shrink(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Physically remove the pruned filters of the pruned pointwise convs (see the class notes).

        Deterministic (the masks are the same on every rank), so every rank runs it. The example input that the
        dependency graph is traced with is the first sample of the first training batch.
        """
        names = [n for n in self.pw_pruned if self.kinds.get(n) == "pw"]
        if not names:
            return
        example = _example_input(self.calibration(trainer)[0])
        device = next(pl_module.parameters()).device
        example = example.to(device)
        before = count_parameters(pl_module)
        removed, skipped = shrink_pointwise(pl_module, names, example)
        self._float_masks.clear()
        self.invalidate_upkeep()
        after = count_parameters(pl_module)
        self.physical_removed.extend(removed)
        self.physical_skipped.update(skipped)
        self.physical_input = (list(example.shape), str(example.dtype).removeprefix("torch."))
        if removed:
            self.physical_done = True
            self.physical_params = (before if self.physical_params is None else self.physical_params[0], after)
        if skipped:
            rank_zero_warn(f"DEPrune(physical=True) kept pruned filters of {len(skipped)} pointwise convs masked "
                           f"instead of removing them (reasons in DEPrune.physical_skipped): {', '.join(skipped)}")
        n_filters = sum(len(idxs) for _, idxs in removed)
        rank_zero_info(f"DEPrune(physical=True): removed {n_filters} pointwise filters in {len(removed)} groups, "
                       f"parameters {before:,} -> {after:,}")
        if self.verbose:
            rows = [[n, str(len(idxs)), str(filters_left(pl_module.get_submodule(n)))] for n, idxs in removed]
            rows += [[n, "-", reason] for n, reason in skipped.items()]
            print_table(f"DEPrune physical shrink: parameters {before:,} -> {after:,}",
                        ["pointwise conv", "filters removed", "filters left / skipped because"], rows)

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
        getattr(conv, MASK_ATTR).copy_(mask)
        self._float_masks.pop(name, None)
        self.invalidate_upkeep()  # also when prune is called from a hook of the user's
        with torch.no_grad():
            conv.weight.masked_fill_(~mask, 0)  # not a multiply: a NaN in a pruned weight becomes 0 too
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


def _example_input(batch: Any) -> torch.Tensor:
    """The first sample of a batch's input (the batch itself, or the first element of a tuple/list batch)."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise MisconfigurationException(
            "DEPrune(physical=True) traces the model with the input of a training batch: the batch itself or its "
            f"first element must be a batched tensor, got {type(x).__name__}"
        )
    return x[:1].detach()
