"""``choose_under_budget`` against brute force on small random instances, its thinning bound, and its errors."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_winoprune.importance import DENSE, Candidate, DictLatencyTable, choose_under_budget
from lightning_winoprune.pruning import Pattern

PATTERN = Pattern()

Instance = tuple[dict[str, dict[Candidate, float]], DictLatencyTable]


def cand(j: int) -> Candidate:
    return Candidate("x", j / 16, PATTERN)


def build(rows: list[list[tuple[float, float]]]) -> Instance:
    """``rows[i][j] = (loss, latency)`` of candidate ``j`` of layer ``L{i}``."""
    losses = {f"L{i}": {cand(j): loss for j, (loss, _) in enumerate(row)} for i, row in enumerate(rows)}
    table = DictLatencyTable({(f"L{i}", cand(j)): lat for i, row in enumerate(rows) for j, (_, lat) in enumerate(row)})
    return losses, table


def totals(choice: dict[str, Candidate], losses: dict[str, dict[Candidate, float]],
           table: DictLatencyTable) -> tuple[float, float]:
    loss = lat = 0.0
    for name, c in choice.items():  # layer order, as the solver sums
        loss += losses[name][c]
        lat += table.latency(name, c)
    return loss, lat


def brute_force(losses: dict[str, dict[Candidate, float]], table: DictLatencyTable, budget: float) -> float | None:
    best = None
    names = list(losses)
    for combo in itertools.product(*(list(losses[n]) for n in names)):
        loss, lat = totals(dict(zip(names, combo, strict=True)), losses, table)
        if lat <= budget and (best is None or loss < best):
            best = loss
    return best


rows_strategy = st.lists(
    st.lists(st.tuples(st.floats(-1, 1), st.floats(0, 1)), min_size=1, max_size=4), min_size=1, max_size=4
)


@given(rows=rows_strategy, frac=st.floats(-0.2, 1.1))
def test_equals_brute_force(rows: list[list[tuple[float, float]]], frac: float):
    losses, table = build(rows)
    lo = sum(min(lat for _, lat in row) for row in rows)
    hi = sum(max(lat for _, lat in row) for row in rows)
    budget = max(0.0, lo + frac * (hi - lo))
    best = brute_force(losses, table, budget)
    if best is None:
        with pytest.raises(ValueError, match="infeasible"):
            choose_under_budget(losses, table, budget)
        return
    choice = choose_under_budget(losses, table, budget)
    assert list(choice) == list(losses) and all(choice[n] in losses[n] for n in losses)
    loss, lat = totals(choice, losses, table)
    assert lat <= budget
    assert loss == pytest.approx(best, abs=1e-12)


@given(rows=st.lists(st.lists(st.tuples(st.floats(-1, 1), st.floats(0, 1)), min_size=2, max_size=4), min_size=2,
                     max_size=5),
       frac=st.floats(0, 1), bins=st.integers(1, 12))
def test_thinned_frontier_keeps_the_documented_bound(rows: list[list[tuple[float, float]]], frac: float, bins: int):
    losses, table = build(rows)
    lo = sum(min(lat for _, lat in row) for row in rows)
    hi = sum(max(lat for _, lat in row) for row in rows)
    budget = lo + frac * (hi - lo)
    choice = choose_under_budget(losses, table, budget, bins=bins)
    loss, lat = totals(choice, losses, table)
    assert lat <= budget  # always feasible
    assert loss >= brute_force(losses, table, budget) - 1e-12  # type: ignore[operator]
    tightened = brute_force(losses, table, budget * (1 - len(rows) / bins))
    if tightened is not None:
        assert loss <= tightened + 1e-12


def test_thinning_keeps_the_lowest_loss_of_a_bin_and_the_fastest_state():
    chain = [(5.0 - j, j / 100) for j in range(6)]  # 6 Pareto-optimal choices > bins: all land in one bin
    losses, table = build([chain, [(0.0, 0.1)]])
    assert choose_under_budget(losses, table, 1.0, bins=4) == {"L0": cand(5), "L1": cand(0)}
    # a budget only the fastest choice of L0 fits: the fastest state survives the thinning
    losses, table = build([chain, [(0.0, 1.0)]])
    assert choose_under_budget(losses, table, 1.0, bins=4) == {"L0": cand(0), "L1": cand(0)}
    assert choose_under_budget(losses, table, 1.05, bins=4) == {"L0": cand(5), "L1": cand(0)}


def test_small_known_instance_and_tie_break():
    # layer A: dense (loss 0, 4 s) or pruned (loss 1, 1 s); layer B: dense (0, 4 s), pruned (3, 2 s), (3, 1 s)
    rows = [[(0.0, 4.0), (1.0, 1.0)], [(0.0, 4.0), (3.0, 2.0), (3.0, 1.0)]]
    losses, table = build(rows)
    assert choose_under_budget(losses, table, 8.0) == {"L0": cand(0), "L1": cand(0)}
    assert choose_under_budget(losses, table, 7.0) == {"L0": cand(1), "L1": cand(0)}
    # B must be pruned; its two pruned candidates tie on loss: the faster one wins
    assert choose_under_budget(losses, table, 4.0) == {"L0": cand(1), "L1": cand(2)}
    assert choose_under_budget(losses, table, 2.0) == {"L0": cand(1), "L1": cand(2)}


def test_infeasible_names_the_minimum_latency():
    losses, table = build([[(0.0, 0.5), (1.0, 0.25)], [(0.0, 1.0), (2.0, 0.5)]])
    with pytest.raises(ValueError, match=r"infeasible.*0\.75 s"):
        choose_under_budget(losses, table, 0.7)
    assert choose_under_budget(losses, table, 0.75) == {"L0": cand(1), "L1": cand(1)}


def test_many_layers_run_fast_and_stay_feasible():
    rows = [[(float((7 * i + 3 * j) % 11) / 10, 1.0 - j / 8 + (i % 3) / 100) for j in range(8)] for i in range(60)]
    losses, table = build(rows)
    budget = 0.6 * sum(max(lat for _, lat in row) for row in rows)
    choice = choose_under_budget(losses, table, budget)
    loss, lat = totals(choice, losses, table)
    assert lat <= budget and math.isfinite(loss)
    greedy_fastest = sum(min(row, key=lambda r: r[1])[0] for row in rows)
    assert loss <= greedy_fastest


def test_validation():
    losses, table = build([[(0.0, 1.0)]])
    assert choose_under_budget({}, table, 1.0) == {}
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="budget"):
            choose_under_budget(losses, table, bad)
    with pytest.raises(ValueError, match="bins"):
        choose_under_budget(losses, table, 1.0, bins=0)
    with pytest.raises(ValueError, match="no candidates"):
        choose_under_budget({"L0": {}}, table, 1.0)
    with pytest.raises(ValueError, match="loss of 'L0'"):
        choose_under_budget({"L0": {cand(0): math.nan}}, table, 1.0)
    with pytest.raises(KeyError, match="unknown layer 'L9'"):
        choose_under_budget({"L9": {DENSE: 0.0}}, table, 1.0)
    negative = DictLatencyTable({("L0", DENSE): 0.0})
    with pytest.raises(ValueError, match="latency of 'L0'"):
        choose_under_budget({"L0": {DENSE: 0.0}}, _Negative(negative), 1.0)


class _Negative:
    def __init__(self, inner: DictLatencyTable) -> None:
        self.inner = inner

    def latency(self, name: str, candidate: Candidate) -> float:
        return self.inner.latency(name, candidate) - 1.0
