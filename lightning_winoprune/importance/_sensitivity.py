"""Per-layer pruning candidates and their measured sensitivity: the loss increase when only that layer is pruned."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_winoprune.importance._taylor import _check_loss, _preserved_modes, _progress_bar
from lightning_winoprune.pruning._engine import Block, Pattern, Scope
from lightning_winoprune.pruning._methods import winograd_mask
from lightning_winoprune.winograd._layer import WinogradConv2d

__all__ = ["DENSE", "Candidate", "measure_sensitivity"]

#: Policies whose pattern scope is fixed by name (the ABWSP toggle, ``docs/pruning.md``).
_POLICY_SCOPE = {"wsp": Scope.LAYER, "bwsp": Scope.POSITION}


@dataclass(frozen=True)
class Candidate:
    """One way to prune one layer: a policy label, a target amount and the pattern; hashable, usable as a key.

    ``Candidate("dense")`` leaves the layer unpruned. Any other candidate needs a pattern, e.g.
    ``Candidate("bwsp", 0.7, method_pattern("abwsp", "bwsp"))``. The policies ``"wsp"`` and ``"bwsp"`` must use a
    pattern of the matching scope (``layer`` and ``position``); other labels (``"wsp-c"``, ``"fp"``, ...) are free.

    Attributes:
        policy: ``"dense"``, ``"wsp"``, ``"bwsp"`` or another label (used in reports and by latency tables).
        amount: Fraction of the layer's weights to prune, in ``[0, 1]`` (``0.0`` for ``"dense"``).
        pattern: The pruning pattern (``None`` exactly for ``"dense"``).

    """

    policy: str
    amount: float = 0.0
    pattern: Pattern | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or not self.policy:
            raise ValueError(f"policy must be a non-empty str, got {self.policy!r}")
        amount = self.amount
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount <= 1.0:
            raise ValueError(f"amount must be a number in [0, 1], got {amount!r}")
        object.__setattr__(self, "amount", float(amount))
        if self.pattern is not None and not isinstance(self.pattern, Pattern):
            raise TypeError(f"pattern must be a Pattern or None, got {type(self.pattern).__name__}")
        if self.is_dense:
            if self.pattern is not None or self.amount != 0.0:
                raise ValueError("a 'dense' candidate prunes nothing: it takes neither a pattern nor an amount")
            return
        if self.pattern is None:
            raise ValueError(
                f"candidate {self.policy!r} needs a pattern, e.g. method_pattern('abwsp', 'bwsp'); "
                "use Candidate('dense') for no pruning"
            )
        scope = _POLICY_SCOPE.get(self.policy)
        if scope is not None and self.pattern.scope is not scope:
            raise ValueError(
                f"policy {self.policy!r} needs a pattern with scope={scope.value!r}, got {self.pattern.scope.value!r}"
            )

    @property
    def is_dense(self) -> bool:
        """Whether this candidate leaves the layer unpruned."""
        return self.policy == "dense"

    @property
    def balanced(self) -> bool:
        """Whether every BGEMM matrix keeps the same shape, so the pruned layer runs as one batched GEMM.

        True for ``"dense"``, for ``"bwsp"`` and any ``position``-scoped pattern, and for filter pruning (the same
        rows vanish from every matrix).
        """
        if self.pattern is None:
            return True
        return self.policy == "bwsp" or self.pattern.scope is Scope.POSITION or self.pattern.block is Block.FILTER

    @property
    def label(self) -> str:
        """Short text for reports, e.g. ``"bwsp@0.70"`` or ``"dense"``."""
        return self.policy if self.is_dense else f"{self.policy}@{self.amount:.2f}"

    def keep_mask(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor | None:
        """The keep-mask this candidate gives Winograd weights ``weight`` (``(K, C, p, p)``); ``None`` for dense.

        This is the mask :func:`measure_sensitivity` evaluates; apply the chosen candidate with
        ``layer.set_mask(candidate.keep_mask(layer.weight))``.

        Args:
            weight: The layer's Winograd-domain weight ``U``.
            importance: Per-element saliency of ``weight``'s shape, for patterns with ``score="importance"``.

        """
        if self.pattern is None:
            return None
        mask, _ = winograd_mask(weight.detach(), self.amount, self.pattern, importance)
        return mask


#: The unpruned candidate.
DENSE = Candidate("dense")


def _mean_loss(model: nn.Module, batches: Sequence[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
               what: str) -> float:
    total = 0.0
    for i, batch in enumerate(batches):
        total += float(_check_loss(loss_fn(model, batch), f"{what}, batch {i}").item())
    return total / len(batches)


def measure_sensitivity(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    candidates: Mapping[str, Sequence[Candidate]],
    batches: Sequence[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    progress: bool = True,
    description: str = "Sensitivity",
    importance: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[Candidate, float]]:
    """Loss increase of every candidate of every layer, pruning only that layer.

    The baseline is the model as it is (current masks included), evaluated once. Then for every layer and candidate,
    that layer alone gets :meth:`Candidate.keep_mask` of its current weight (which *replaces* its current mask;
    ``"dense"`` removes it) and the mean loss over ``batches`` is measured. A dense candidate of a layer without a
    mask is the baseline itself and is not evaluated (increase ``0.0``).

    The candidate's mask acts in the forward pass even on a layer whose ``mask_in_forward`` a callback switched off
    (such a layer's pruned weights are zero in storage: they rank first, and ``"dense"`` cannot bring them back).

    Evaluation runs in eval mode under ``torch.no_grad()``. Every layer's mask (its values, or ``None``) and
    ``mask_in_forward`` flag, and every submodule's train/eval mode, are restored on return, also when ``loss_fn``
    raises.

    Args:
        model: The model containing the layers.
        layers: Name -> :class:`~lightning_winoprune.winograd.WinogradConv2d`.
        candidates: Name -> the candidates to measure for that layer (every name must be in ``layers``).
        batches: Evaluation batches (materialised once, then iterated once per evaluation).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss of one batch; the mean over batches is used.
        progress: Show a transient rich progress bar over the (layer, candidate) pairs.
        description: The progress bar's label.
        importance: Name -> per-element saliency, for patterns with ``score="importance"``.

    Returns:
        Name -> {candidate: mean loss with that candidate - baseline mean loss} (may be slightly negative: pruning
        can lower the loss).

    Raises:
        KeyError: If ``candidates`` names a layer missing from ``layers`` (the message lists the known ones).
        ValueError: If ``layers`` or ``batches`` is empty, a layer is not a submodule of ``model``, or the baseline
            loss is not finite.
        TypeError: If a layer is not a :class:`~lightning_winoprune.winograd.WinogradConv2d` or a candidate not a
            :class:`Candidate`.

    """
    if not layers:
        raise ValueError("layers is empty: pass at least one {name: WinogradConv2d}")
    in_model = {id(mod) for mod in model.modules()}
    winograd: dict[str, WinogradConv2d] = {}
    for name, layer in layers.items():
        if not isinstance(layer, WinogradConv2d):
            raise TypeError(f"layer {name!r} must be a WinogradConv2d, got {type(layer).__name__}")
        if id(layer) not in in_model:
            raise ValueError(f"layer {name!r} is not a submodule of the model")
        winograd[name] = layer
    unknown = [name for name in candidates if name not in layers]
    if unknown:
        raise KeyError(f"candidates name unknown layers {unknown}; known layers: {sorted(layers)}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: sensitivity needs at least one evaluation batch")
    imp = importance or {}
    pairs = [(name, cand) for name, cands in candidates.items() for cand in cands]
    for name, cand in pairs:
        if not isinstance(cand, Candidate):
            raise TypeError(f"candidates of layer {name!r} must be Candidate objects, got {cand!r}")
    results: dict[str, dict[Candidate, float]] = {name: {} for name in candidates}
    with _preserved_modes(model), torch.no_grad(), _progress_bar(progress) as bar:
        model.eval()
        task = bar.add_task(f"{description}: baseline", total=len(pairs) + 1)
        baseline = _mean_loss(model, batches, loss_fn, "baseline")
        if not math.isfinite(baseline):
            raise ValueError(f"the baseline loss is not finite ({baseline})")
        bar.advance(task)
        for name, cand in pairs:
            layer = winograd[name]
            bar.update(task, description=f"{description}: {name} {cand.label}")
            if cand.is_dense and layer.mask is None:
                results[name][cand] = 0.0
            else:
                new_mask = cand.keep_mask(layer.weight, imp.get(name))
                saved, saved_in_forward = layer.mask, layer.mask_in_forward
                try:
                    layer.set_mask(new_mask)
                    layer.mask_in_forward = True  # the candidate's mask must act even where a callback turned it off
                    loss = _mean_loss(model, batches, loss_fn, f"layer {name!r}, candidate {cand.label}")
                finally:
                    layer.set_mask(saved)
                    layer.mask_in_forward = saved_in_forward
                results[name][cand] = loss - baseline
            bar.advance(task)
    return results
