"""Per-layer candidate choice under a latency budget: a multiple-choice knapsack solved by dynamic programming."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from lightning_winoprune.importance._latency import LatencyTable
from lightning_winoprune.importance._sensitivity import Candidate

__all__ = ["choose_under_budget"]


def _finite(value: object, what: str, non_negative: bool = False) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x) or (non_negative and x < 0):
        raise ValueError(f"{what} must be finite{' and >= 0' if non_negative else ''}, got {value!r}")
    return x


def _layer_table(name: str, row: Mapping[Candidate, float],
                 latency: LatencyTable) -> tuple[list[Candidate], np.ndarray, np.ndarray]:
    """A layer's candidates with their validated losses and latencies."""
    if not row:
        raise ValueError(f"layer {name!r} has no candidates")
    cands = list(row)
    loss = np.array([_finite(row[c], f"loss of {name!r} / {c.label}") for c in cands], dtype=np.float64)
    lat = np.array([_finite(latency.latency(name, c), f"latency of {name!r} / {c.label}", non_negative=True)
                    for c in cands], dtype=np.float64)
    return cands, loss, lat


def choose_under_budget(
    losses: Mapping[str, Mapping[Candidate, float]],
    latency: LatencyTable,
    budget: float,
    bins: int = 1000,
) -> dict[str, Candidate]:
    """One candidate per layer minimising the summed loss increase with the summed latency within ``budget``.

    This is a multiple-choice knapsack. It is solved by dynamic programming over the layers, keeping the
    Pareto-optimal partial choices (no other is both faster and lower-loss). Latencies are summed as given, never
    rounded, so the choice always fits the budget; among choices of equal loss the fastest wins.

    The frontier is exact as long as it holds at most ``bins`` partial choices (always when the product of the
    candidate counts is at most ``bins``). Past that, it is thinned to one partial choice per latency bin of width
    ``budget / bins`` (the lowest-loss one, plus the fastest overall), which bounds the work to
    ``O(layers * bins * candidates)`` and guarantees a loss no larger than the exact optimum under the tightened
    budget ``budget * (1 - layers / bins)``.

    Args:
        losses: Layer name -> {candidate: estimated loss increase} (e.g. from
            :func:`~lightning_winoprune.importance.measure_sensitivity`).
        latency: Gives each (layer, candidate) latency in seconds, see
            :class:`~lightning_winoprune.importance.LatencyTable`.
        budget: The largest allowed total latency, in seconds (summed over the layers).
        bins: Largest frontier kept exactly, and the number of latency bins when it is thinned.

    Returns:
        Layer name -> chosen candidate, in the order of ``losses`` (empty when ``losses`` is).

    Raises:
        ValueError: If even the fastest candidate of every layer exceeds the budget (the message gives that minimum
            latency), a layer has no candidates, or a loss, latency, budget or ``bins`` is invalid.
        KeyError: If ``latency`` does not know a (layer, candidate).

    """
    budget = _finite(budget, "budget", non_negative=True)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    names = list(losses)
    layers = [_layer_table(name, losses[name], latency) for name in names]
    fastest_total = sum(float(lat.min()) for _, _, lat in layers)
    if fastest_total > budget:
        raise ValueError(
            f"the latency budget {budget:.6g} s is infeasible: the fastest candidate of every layer already takes "
            f"{fastest_total:.6g} s in total (the minimum achievable latency)"
        )

    width = budget / bins
    state_lat = np.zeros(1)
    state_loss = np.zeros(1)
    trace: list[tuple[np.ndarray, np.ndarray]] = []  # per layer: (parent state, candidate index) of each state
    for _, loss, lat in layers:
        n_states, n_cands = state_lat.size, lat.size
        new_lat = (state_lat[:, None] + lat[None, :]).reshape(-1)
        new_loss = (state_loss[:, None] + loss[None, :]).reshape(-1)
        parent = np.repeat(np.arange(n_states), n_cands)
        choice = np.tile(np.arange(n_cands), n_states)
        ok = np.flatnonzero(new_lat <= budget)
        order = ok[np.lexsort((new_loss[ok], new_lat[ok]))]  # by latency, then loss; stable
        new_lat, new_loss, parent, choice = new_lat[order], new_loss[order], parent[order], choice[order]
        # Pareto filter: keep a state only if it beats the loss of every faster (or equally fast, earlier) one.
        best_before = np.concatenate(([np.inf], np.minimum.accumulate(new_loss)[:-1]))
        keep = new_loss < best_before
        if keep.sum() > bins and width > 0:
            idx = np.flatnonzero(keep)
            bucket = np.floor(new_lat[idx] / width)
            last_in_bucket = np.append(bucket[1:] != bucket[:-1], True)
            last_in_bucket[0] = True  # the fastest partial choice keeps every budget-feasible completion reachable
            keep = np.zeros_like(keep)
            keep[idx[last_in_bucket]] = True
        state_lat, state_loss = new_lat[keep], new_loss[keep]
        trace.append((parent[keep], choice[keep]))

    chosen: dict[str, Candidate] = {}
    state = int(np.argmin(state_loss)) if names else 0  # losses fall along the frontier: the lowest is unique
    for name, (cands, _, _), (parent, choice) in reversed(list(zip(names, layers, trace, strict=True))):
        chosen[name] = cands[int(choice[state])]
        state = int(parent[state])
    return {name: chosen[name] for name in names}
