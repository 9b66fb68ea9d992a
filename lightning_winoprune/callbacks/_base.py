"""Machinery shared by the pruning callbacks: validation, schedule, calibration, mask maintenance, state."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_winoprune.callbacks._schedule import PruningSchedule

__all__ = ["LossFn", "PruningCallback"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of ``module(x)`` for ``(x, y)`` batches with integer labels."""
    if (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)
            and isinstance(batch[1], torch.Tensor) and not batch[1].is_floating_point()):
        return F.cross_entropy(module(batch[0]), batch[1])
    raise MisconfigurationException(
        "the pruning callbacks' importance estimator needs a loss: the default handles (inputs, integer labels) "
        f"batches with cross-entropy, got a batch of type {type(batch).__name__}; pass loss_fn=(module, batch) -> loss"
    )


def check_choice(name: str, value: object, valid: Sequence[object]) -> None:
    """Raise a ``MisconfigurationException`` naming ``value`` and listing ``valid`` unless it is one of them."""
    if value not in valid:
        raise MisconfigurationException(f"{name}={value!r} is not valid; valid values are {list(valid)}")


def check_positive_int(name: str, value: object, allow_none: bool = True) -> None:
    """Raise unless ``value`` is a positive int (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MisconfigurationException(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                                        f"got {value!r}")


def check_fraction(name: str, value: object, low_open: bool = False, high_open: bool = True) -> float:
    """Return ``value`` as a float in ``[0, 1)`` (bounds configurable) or raise naming it."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise MisconfigurationException(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def compile_patterns(value: str | Sequence[str] | None, name: str) -> list[str]:
    """Validate regular expressions given as one string or a list (YAML-friendly)."""
    items = [] if value is None else [value] if isinstance(value, str) else list(value)
    for pat in items:
        try:
            re.compile(pat)
        except re.error as err:
            msg = f"{name} pattern {pat!r} is not a valid regular expression: {err}"
            raise MisconfigurationException(msg) from None
    return items


class PruningCallback(Callback):
    """Base of the pruning callbacks: what is pruned and how is the subclass's, when and how it is kept is here.

    A subclass implements :meth:`setup` (find or build its layers and set :attr:`layer_names`), :meth:`prune`
    (compute and apply masks for a cumulative target) and :meth:`masked_parameters` (the weights and their float
    masks). This class runs the schedule at the start of epochs, masks the gradients of those weights before every
    optimizer step (after DDP all-reduce, gradient accumulation and AMP unscaling, before clipping), re-enforces
    masks restored from a checkpoint, and saves the schedule position.

    The list of masked weights is built once per pruning step, not per optimizer step (:meth:`masked_upkeep`): it is
    rebuilt after a pruning step, :meth:`enforce`, :meth:`load_state_dict` and at the start of a fit, or when
    :meth:`upkeep_stale` says so. A subclass skips the multiply for weights whose gradient is already exactly zero
    at every pruned entry (:meth:`gradient_mask_needed`).

    Args:
        amount: The final cumulative target of the schedule.
        schedule: ``"one_shot"`` or ``"gradual"``.
        start_epoch: First pruning epoch.
        end_epoch: Last pruning epoch of the gradual schedule.
        frequency: Epochs between gradual steps.
        include: Regular expressions of module names to prune (``re.fullmatch``).
        exclude: Regular expressions of module names never pruned.
        calibration_batches: Training batches the importance estimators use.
        loss_fn: ``(module, batch) -> loss`` for the estimators (default: cross-entropy on ``(x, y)`` batches).
        verbose: 0 silent, 1 progress and per-layer tables, 2 more detail.
        log_masks: Log mask pictures to W&B loggers.
    """

    def __init__(
        self,
        amount: float,
        schedule: str = "one_shot",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        frequency: int = 1,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        calibration_batches: int = 4,
        loss_fn: LossFn | None = None,
        verbose: int = 1,
        log_masks: bool = True,
    ) -> None:
        super().__init__()
        check_choice("verbose", verbose, [0, 1, 2])
        check_positive_int("calibration_batches", calibration_batches, allow_none=False)
        if loss_fn is not None and not callable(loss_fn):
            raise MisconfigurationException(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.schedule = PruningSchedule(schedule, float(amount), start_epoch, end_epoch, frequency)
        self.include, self.exclude = compile_patterns(include, "include"), compile_patterns(exclude, "exclude")
        self.calibration_batches = calibration_batches
        self.loss_fn: LossFn = loss_fn or default_loss
        self.verbose, self.log_masks = verbose, log_masks
        self.layer_names: list[str] = []
        self.last_pruned_epoch = -1
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ extension points
    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: float) -> Any:
        """Compute and apply the masks for the cumulative ``target``; called by the schedule."""
        raise NotImplementedError

    def masked_parameters(self, pl_module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(weight, float mask)`` of every pruned weight (the mask in the weight's dtype, 1 keeps)."""
        raise NotImplementedError

    def enforce(self, pl_module: nn.Module) -> None:
        """Zero the pruned entries of every masked weight (after a restore); subclasses may do more."""
        self.invalidate_upkeep()
        with torch.no_grad():
            for weight, mask in self.masked_upkeep(pl_module):
                weight.masked_fill_(mask == 0, 0)  # not a multiply: NaN * 0 is NaN, pruned entries become exactly 0

    def masked_upkeep(self, pl_module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`masked_parameters`, cached until :meth:`invalidate_upkeep` (or :meth:`upkeep_stale`).

        The gradient masking before every optimizer step reads this list instead of looking every layer up again.
        """
        if self._upkeep is None or self.upkeep_stale():
            self._upkeep = self.masked_parameters(pl_module)
        return self._upkeep

    def invalidate_upkeep(self) -> None:
        """Drop the cached :meth:`masked_upkeep` list: the masks or the model's structure changed."""
        self._upkeep = None

    def upkeep_stale(self) -> bool:
        """Whether the cached list no longer matches the model (checked before every use; cheap). Default: never."""
        return False

    def gradient_mask_needed(self, trainer: pl.Trainer, weight: torch.Tensor) -> bool:
        """Whether ``weight.grad`` still needs the multiply by its mask before this optimizer step (default: yes).

        A subclass answers no for weights whose gradient is exactly zero at every pruned entry by construction.
        """
        return True

    def after_gradient_masks(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Called after the gradients were masked before an optimizer step (e.g. to reset per-step tracking)."""

    _upkeep: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def release(self, pl_module: nn.Module) -> None:
        """Called when the callback stops (teardown or exception): undo what only holds while it runs."""

    def extra_state(self) -> dict[str, Any]:
        """Subclass state saved next to the schedule's."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""

    def mask_config(self) -> dict[str, Any]:
        """The arguments that define the masks (plain values), saved in the state and compared on resume.

        A subclass extends the schedule's entries with its own (method, amounts, block shape, score, ...). Arguments
        that only change how the callback reports or computes (``verbose``, ``log_masks``, ``route``) are not part
        of it, so they may change on resume.
        """
        s = self.schedule
        return {"schedule": s.kind, "start_epoch": s.start_epoch, "end_epoch": s.end_epoch,
                "frequency": s.frequency, "include": list(self.include), "exclude": list(self.exclude)}

    #: Entries of :meth:`mask_config` that fix the model's structure (which layers, what shapes): a change always
    #: fails, even before the first pruning step.
    structural_config: tuple[str, ...] = ("include", "exclude")

    # ------------------------------------------------------------------------------------------ Lightning hooks
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        target = self.schedule.target_at(epoch)
        if target is None or epoch <= self.last_pruned_epoch:
            return
        try:
            self.prune(trainer, pl_module, target)
        finally:
            self.invalidate_upkeep()
        self.last_pruned_epoch = epoch

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.invalidate_upkeep()
        self.enforce(pl_module)  # masks restored from a checkpoint hold in storage from the first step

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # With a zero gradient and zeroed optimizer state, pruned weights stay exactly zero under any usual optimizer.
        pairs = [(w.grad, m) for w, m in self.masked_upkeep(pl_module)
                 if w.grad is not None and self.gradient_mask_needed(trainer, w)]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])
        self.after_gradient_masks(trainer, optimizer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.invalidate_upkeep()
        self.release(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.invalidate_upkeep()
        self.release(pl_module)  # Lightning skips teardown when fit raises

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "layer_names": list(self.layer_names), "last_pruned_epoch": self.last_pruned_epoch,
                "history": list(self.history), **self.extra_state(), "config": self.mask_config()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._resuming_fit is not False:  # validate/test/predict from a checkpoint prune nothing: no conflict
            self.check_resume_config(state_dict, self._loading_key)
        self.invalidate_upkeep()
        self.layer_names = list(state_dict.get("layer_names", self.layer_names))
        self.last_pruned_epoch = int(state_dict.get("last_pruned_epoch", -1))
        self.history = list(state_dict.get("history", []))
        self.load_extra_state(state_dict)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning restores a callback's state only under its exact state_key, which names some of the arguments
        # (e.g. the amount): with another amount, the state would be silently skipped and pruning would start over.
        # Find the state this callback continues and let load_state_dict compare the configurations.
        self._resuming_fit = trainer.state.fn == "fit"
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            self._loading_key = self.state_key
            return
        mine = type(self).__name__
        claimed = {getattr(cb, "state_key", None) for cb in trainer.callbacks}  # type: ignore[attr-defined]
        candidates = [k for k in states if isinstance(k, str) and _class_of_key(k) == mine and k not in claimed]
        if len(candidates) > 1:
            raise MisconfigurationException(
                f"the checkpoint holds the state of {len(candidates)} {mine} callbacks ({candidates}) and none of them "
                f"has this callback's arguments ({self.state_key}): resume with the arguments the checkpoint was "
                "trained with, or start a new run from the pruned model with "
                "lightning_winoprune.load_pruned_checkpoint(model, path) and fit without ckpt_path"
            )
        if candidates:
            self._loading_key = candidates[0]
            try:
                self.load_state_dict(states[candidates[0]])
            finally:
                self._loading_key = None

    _loading_key: str | None = None
    _resuming_fit: bool | None = None

    def check_resume_config(self, state: dict[str, Any], key: str | None = None) -> None:
        """Refuse a saved state whose mask-defining arguments differ from this callback's.

        A structural argument (see :attr:`structural_config`) must always match. The others must match once the
        saved run has pruned: a pruning step still ahead would recompute the masks with the new arguments (another
        amount un-prunes weights) and a finished schedule would silently ignore them. Before the first pruning step
        they may change freely.

        Raises:
            MisconfigurationException: Naming every differing argument with both values, and the way out.
        """
        saved = state.get("config")
        if not isinstance(saved, dict):
            raise MisconfigurationException(
                f"The checkpoint's state of {key or type(self).__name__} holds no mask configuration ('config'), so "
                "a resume cannot check that it keeps the masks: it was not written by lightning_winoprune. Load its "
                "weights with lightning_winoprune.load_pruned_checkpoint and start a new fit instead of ckpt_path."
            )
        current = self.mask_config()
        diffs = [k for k in current if k in saved and not _same(saved[k], current[k])]
        pruned = int(state.get("last_pruned_epoch", -1)) >= 0 or bool(state.get("history"))
        blocking = [k for k in diffs if pruned or k in self.structural_config]
        if not blocking:
            return
        name = type(self).__name__
        changes = ", ".join(f"{k}={saved[k]!r} (this callback: {k}={current[k]!r})" for k in blocking)
        when = (f"it pruned up to epoch {state.get('last_pruned_epoch', -1)} with {changes}" if pruned
                else f"it was set up with {changes}")
        raise MisconfigurationException(
            f"{name} cannot resume this checkpoint: {when}. Resuming with other arguments would change the masks "
            "(a pruning step still ahead would recompute them, another amount un-prunes weights) or be silently "
            f"ignored. Resume with the checkpoint's values ({', '.join(f'{k}={saved[k]!r}' for k in blocking)}), or "
            "start a new run from the pruned model: lightning_winoprune.load_pruned_checkpoint(model, path), then "
            "fit without ckpt_path."
        )

    def check_schedule(self, trainer: pl.Trainer) -> None:
        """Refuse a schedule that cannot complete within ``trainer.max_epochs`` (warn when there is none).

        Raises:
            MisconfigurationException: If a pruning step falls on or after ``max_epochs``.
        """
        steps = self.schedule.steps()
        last_epoch, name = steps[-1][0], type(self).__name__
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            rank_zero_warn(
                f"{name}: the trainer has no max_epochs ({max_epochs!r}), so the pruning schedule cannot be checked: "
                f"it prunes at epochs {[e for e, _ in steps]} and reaches amount {self.schedule.amount} at the start "
                f"of epoch {last_epoch}; make sure the fit runs at least {last_epoch + 1} epochs"
            )
            return
        if last_epoch < max_epochs:
            return
        reached = [t for e, t in steps if e < max_epochs]
        if not reached:
            what = (f"start_epoch={self.schedule.start_epoch} is not before max_epochs={max_epochs}: nothing would be "
                    "pruned")
        elif self.schedule.kind == "gradual":
            what = (f"the gradual ramp ends at end_epoch={self.schedule.end_epoch}, after the last epoch "
                    f"{max_epochs - 1} (max_epochs={max_epochs}): pruning would stop at {reached[-1]:.3f} instead of "
                    f"{self.schedule.amount}")
        else:  # a schedule of several one-shot steps (spatial-Winograd's stages)
            what = (f"its last step is at epoch {last_epoch}, after the last epoch {max_epochs - 1} "
                    f"(max_epochs={max_epochs}): pruning would stop at {reached[-1]:.3f} instead of "
                    f"{self.schedule.amount}")
        raise MisconfigurationException(
            f"{name}'s schedule cannot complete: {what}. Every pruning epoch must be below max_epochs (epochs count "
            f"from 0): raise max_epochs to at least {last_epoch + 1} or prune earlier (start_epoch"
            f"{', end_epoch' if self.schedule.kind == 'gradual' else ''})."
        )

    # ------------------------------------------------------------------------------------------ helpers
    def selected(self, name: str) -> bool:
        """Whether ``name`` passes the include/exclude regular expressions."""
        if self.include and not any(re.fullmatch(p, name) for p in self.include):
            return False
        return not any(re.fullmatch(p, name) for p in self.exclude)

    @staticmethod
    def zero_optimizer_state(trainer: pl.Trainer, weight: torch.Tensor, mask: torch.Tensor) -> None:
        """Momentum and Adam moments of pruned entries restart from zero."""
        for opt in trainer.optimizers:
            for value in opt.state.get(weight, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                    value.mul_(mask)

    def calibration(self, trainer: pl.Trainer) -> list[Any]:
        """The first ``calibration_batches`` batches of the trainer's train dataloader, on the model's device."""
        loader = trainer.train_dataloader
        if loader is None:
            raise MisconfigurationException(f"{type(self).__name__} needs the trainer's train dataloader")
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        elif isinstance(loader, dict):
            loader = next(iter(loader.values()))
        batches = []
        for i, batch in enumerate(loader):
            if i >= self.calibration_batches:
                break
            batches.append(trainer.strategy.batch_to_device(batch))
        if not batches:
            raise MisconfigurationException(f"{type(self).__name__}'s calibration found an empty train dataloader")
        return batches


def _class_of_key(key: str) -> str:
    """``"WinogradPruning"`` for a state key ``"WinogradPruning{...}"``."""
    return key.split("{", 1)[0]


def _same(a: object, b: object) -> bool:
    """Equal as saved values: numbers by value, tuples as lists."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def has_wandb(trainer: pl.Trainer) -> bool:
    """Whether one of the trainer's loggers is a ``WandbLogger``."""
    from lightning.pytorch.loggers import WandbLogger

    return any(isinstance(lg, WandbLogger) for lg in trainer.loggers)


@rank_zero_only
def print_rich(obj: object, min_width: int = 0) -> None:
    """Print a rich renderable on rank zero, at least ``min_width`` columns wide (rich uses 80 off a terminal)."""
    from rich.console import Console

    console = Console()
    if console.width < min_width:
        console = Console(width=min_width)
    console.print(obj)


@rank_zero_only
def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a rich table on rank zero."""
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[str(v) for v in row])
    print_rich(table)
