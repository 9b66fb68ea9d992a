"""One pruning step of the Winograd methods as one call: every layer's mask, from weights, method, amounts and stage.

:func:`step_masks` is what ``WinogradPruning`` calls at a pruning step; it holds no state and changes no tensor it is
given. A single-stage method runs stage ``0``: each layer's weights pruned to its amount with the pattern of its
policy. ``spatial-winograd`` runs stage 1 (the eight outer weights of the lowest-scoring 3x3 kernels, which zeroes
their Winograd border positions exactly, see :func:`~lightning_winoprune.pruning.spatial_stage_mask`), stage 2
(elements in the Winograd domain) or both in order. The helpers below turn stage-1 masks into the 3x3 kernel entries
they keep and back: what a ``stages=1`` run saves as plain kernels and loads again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lightning_winoprune.pruning._engine import MaskResult, Pattern, Rounding, Score
from lightning_winoprune.pruning._methods import (
    SPATIAL_GROUPS,
    SPATIAL_STAGE,
    method_pattern,
    project_spatial,
    spatial_stage_mask,
    spatial_weight,
    winograd_mask,
    zero_positions,
)
from lightning_winoprune.winograd import filter_transform

__all__ = [
    "STAGES",
    "LayerMask",
    "MaskSync",
    "layer_pattern",
    "ring_keep",
    "spatial_kernels",
    "stage_one_from_kernels",
    "step_masks",
]

#: ``(name, mask) -> mask``: called on every mask as soon as it is computed; the mask it returns is the one used
#: (under DDP: rank 0's, so every rank applies, and projects with, the same masks).
MaskSync = Callable[[str, torch.Tensor], torch.Tensor]

#: The stages of each kind of method, in the order they run: ``0`` is the one stage of a single-stage method.
STAGES: dict[str, tuple[int, ...]] = {"spatial-winograd": (1, 2)}
_SINGLE_STAGE = (0,)


@dataclass(frozen=True)
class LayerMask:
    """One layer's outcome of one stage of a pruning step.

    Attributes:
        mask: Keep-mask in the weight's shape (``True`` keeps).
        result: The engine's decision (sparsity, pruned blocks per position, rounding notes), for reports.
        weight: The layer's new Winograd weights, pruned entries zero, or ``None`` when they stay as they are.
            Spatial-Winograd's stage 1 prunes the kernels' rings themselves (``U = G (keep * g) G^T``), so it
            rewrites the weights; zeroing only ``U``'s border positions would leave the ring entries' share of the
            inner positions, a ``U`` of no 3x3 kernel.
    """

    mask: torch.Tensor
    result: MaskResult
    weight: torch.Tensor | None = None


def layer_pattern(method: str, policy: str | None = None, *, unit: int | None = None, align: int | None = None,
                  rounding: Rounding | str | None = None, score: Score | str | None = None) -> Pattern:
    """The pattern one layer is pruned with: the method's, completed by the layer's policy and the field overrides.

    Only ``abwsp`` takes a policy (``wsp`` or ``bwsp``); ``dense`` and the policies a latency budget gives the other
    methods (their own name) leave the method's pattern as it is. ``None`` overrides keep the method's own fields.

    Raises:
        ValueError: On an unknown method, or an unknown ABWSP policy.
    """
    policy = policy if method == "abwsp" and policy != "dense" else None
    return method_pattern(method, policy, unit=unit, align=align, rounding=rounding, score=score)


def ring_keep(mask: torch.Tensor) -> torch.Tensor:
    """The ``(K, C, 3, 3)`` kernel entries a spatial-Winograd stage-1 mask ``(K, C, p, p)`` keeps.

    Stage 1 prunes whole borders, the corner position ``(0, 0)`` included, so a kernel whose corner is pruned loses
    its eight outer weights (its ring) and keeps its centre.
    """
    ring_pruned = ~mask[:, :, 0, 0]
    ring = SPATIAL_GROUPS["ring"].to(mask.device)
    return ~(ring_pruned[:, :, None, None] & ring)


def spatial_kernels(u: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The 3x3 kernels ``g`` with ``G g G^T = u`` (least squares), the rings a stage-1 ``mask`` prunes exactly zero."""
    with torch.no_grad():
        g = spatial_weight(u.detach())
        return g if mask is None else g.masked_fill(~ring_keep(mask), 0)


def stage_one_from_kernels(g: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """F(m, 3) Winograd weights of 3x3 kernels ``g`` and the stage-1 mask their zero rings stand for.

    A kernel whose eight outer entries are all exactly zero (a pruned ring) gets its border positions masked: their
    Winograd weights are exactly zero (:func:`~lightning_winoprune.pruning.zero_positions`).

    Returns:
        The weights (float64, on ``g``'s device) and the mask, or ``None`` when no ring is zero.
    """
    g64 = g.detach().to(torch.float64)
    u = filter_transform(g64, m, "torch")
    ring_zero = (g64[:, :, SPATIAL_GROUPS["ring"].to(g64.device)] == 0).all(dim=-1)
    if not bool(ring_zero.any()):
        return u, None
    border = zero_positions(m, SPATIAL_GROUPS["ring"]).to(g64.device)
    return u, ~(ring_zero[:, :, None, None] & border)


def step_masks(
    weights: Mapping[str, torch.Tensor],
    method: str,
    amounts: Mapping[str, float] | float,
    *,
    policies: Mapping[str, str] | None = None,
    importance: Mapping[str, torch.Tensor] | None = None,
    unit: int | None = None,
    align: int | None = None,
    rounding: Rounding | str | None = None,
    score: Score | str | None = None,
    stages: Sequence[int] | None = None,
    spatial_amount: float | None = None,
    sync: MaskSync | None = None,
) -> dict[int, dict[str, LayerMask]]:
    """Every layer's mask for one pruning step of ``method``, stage by stage.

    Stage 0 (single-stage methods) and stage 2 (``spatial-winograd``) rank each layer's Winograd weights with
    :func:`layer_pattern` and prune them to the layer's amount (at most 1). Stage 1 prunes the rings of the
    lowest-scoring kernels (:data:`~lightning_winoprune.pruning.SPATIAL_STAGE` with ``score``) to ``spatial_amount``
    of each layer's Winograd weights and returns the projected weights; a stage 2 in the same step ranks those.

    Args:
        weights: Layer name -> Winograd weights ``(K, C, p, p)``; left unchanged.
        method: A name of :data:`~lightning_winoprune.pruning.METHODS`.
        amounts: The fraction of every layer's weights pruned (stage 0 and 2), or one per layer name.
        policies: Layer name -> its policy (see :func:`layer_pattern`); layers not listed take the method's pattern.
        importance: Layer name -> per-entry saliency of its weights' shape, for ``score="importance"``.
        unit: Segment length override of the pattern.
        align: Per-position rounding override of the pattern.
        rounding: Rounding direction override of the pattern.
        score: Score override of every pattern, stage 1's included.
        stages: The stages this step runs, in order (``None``: all of the method's, see :data:`STAGES`): for
            ``spatial-winograd`` ``(1,)``, ``(2,)`` (on weights that hold stage 1 already), ``(1, 2)`` or ``()``.
        spatial_amount: Stage 1's Winograd-domain sparsity.
        sync: Called on every mask as soon as it is computed (see :data:`MaskSync`).

    Returns:
        Stage -> layer name -> :class:`LayerMask`, in the order the stages ran.

    Raises:
        ValueError: On stages the method does not have (or out of order), a stage 1 without ``spatial_amount``, and
            what :func:`layer_pattern` and the engine refuse.
    """
    run = _check_stages(method, stages, spatial_amount)
    per_layer = amounts if isinstance(amounts, Mapping) else dict.fromkeys(weights, float(amounts))
    policies = policies or {}
    patterns = {n: layer_pattern(method, policies.get(n), unit=unit, align=align, rounding=rounding, score=score)
                for n in weights}
    out: dict[int, dict[str, LayerMask]] = {}
    current = dict(weights)
    for stage in run:
        if stage == 1:
            assert spatial_amount is not None
            stage_pattern = SPATIAL_STAGE if score is None else SPATIAL_STAGE.with_(score=score)
            out[1] = _stage_one(current, spatial_amount, stage_pattern, importance, sync)
            current = {n: lm.weight for n, lm in out[1].items() if lm.weight is not None}
        else:
            out[stage] = _winograd_stage(current, per_layer, patterns, importance, sync)
    return out


def _check_stages(method: str, stages: Sequence[int] | None, spatial_amount: float | None) -> tuple[int, ...]:
    """The stages to run; raises on stages ``method`` does not have, out of order, or stage 1 without its amount."""
    own = STAGES.get(method, _SINGLE_STAGE)
    run = own if stages is None else tuple(stages)
    valid = [sub for size in range(len(own) + 1) for sub in itertools.combinations(own, size)]  # in order
    if run not in valid:
        raise ValueError(f"stages={stages!r} is not valid for method={method!r}; valid values are {valid}")
    if 1 in run and spatial_amount is None:
        raise ValueError(f"stages={run!r} runs stage 1, which needs spatial_amount; valid values are numbers in "
                         "[0, 1)")
    return run


def _saliency(importance: Mapping[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
    return None if importance is None else importance[name]


def _sync(sync: MaskSync | None, name: str, mask: torch.Tensor) -> torch.Tensor:
    return mask if sync is None else sync(name, mask)


def _stage_one(weights: Mapping[str, torch.Tensor], amount: float, pattern: Pattern,
               importance: Mapping[str, torch.Tensor] | None, sync: MaskSync | None) -> dict[str, LayerMask]:
    """Spatial-Winograd's stage 1 on every layer: the ring mask and the weights of the ring-pruned kernels."""
    out = {}
    for name, u in weights.items():
        mask, result = spatial_stage_mask(u.detach(), amount, pattern, _saliency(importance, name))
        mask = _sync(sync, name, mask)
        with torch.no_grad():
            weight = u.detach().clone()  # the same memory layout as the layer's weights
            weight.copy_(project_spatial(weight, ring_keep(mask)))
            weight.masked_fill_(~mask, 0)
        out[name] = LayerMask(mask, result, weight)
    return out


def _winograd_stage(weights: Mapping[str, torch.Tensor], amounts: Mapping[str, float], patterns: Mapping[str, Pattern],
                    importance: Mapping[str, torch.Tensor] | None, sync: MaskSync | None) -> dict[str, LayerMask]:
    """Every layer's Winograd weights pruned to its amount with its pattern."""
    out = {}
    for name, u in weights.items():
        mask, result = winograd_mask(u, min(amounts[name], 1.0), patterns[name], _saliency(importance, name))
        out[name] = LayerMask(_sync(sync, name, mask), result)
    return out
