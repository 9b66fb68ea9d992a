"""The structured-sparse BGEMM route (``Route.SPARSE``): exactness against the dense route for every mask family,
exactly zero gradients at pruned entries, optimizers, the cached plan, and how ``auto`` measures and chooses."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightning_winoprune import WinogradConv2d
from lightning_winoprune.winograd import Route
from lightning_winoprune.winograd import _autotune as autotune
from lightning_winoprune.winograd import _layer as layer_module
from lightning_winoprune.winograd._sparse import build_plan

TOL = {2: 1e-5, 4: 1e-4}
FAMILIES = ["rows", "balanced_rows", "columns", "row_segments", "elements", "filters", "pruned_position", "all_pruned",
            "nothing"]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    denom = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    return diff / denom if denom > 0 else diff


def family_mask(family: str, k: int, c: int, p: int, gen: torch.Generator) -> torch.Tensor:
    """A ``(K, C, p, p)`` keep-mask of one pruning family (``docs/pruning.md``), random within the family."""
    p2 = p * p
    keep = torch.ones(p2, k, c, dtype=torch.bool)
    rand = torch.rand(p2, k, c, generator=gen)
    if family == "rows":  # WSP-R: per position, any number of whole rows
        keep &= (torch.rand(p2, k, 1, generator=gen) > torch.rand(p2, 1, 1, generator=gen))
    elif family == "balanced_rows":  # BWSP: the same number of rows in every position
        n = int(torch.randint(0, k + 1, (1,), generator=gen))
        for xi in range(p2):
            keep[xi, torch.randperm(k, generator=gen)[:n]] = False
    elif family == "columns":  # WSP-C: whole input channels per position
        keep &= torch.rand(p2, 1, c, generator=gen) > 0.5
    elif family == "row_segments":  # ABWSP: rows split into units of columns
        unit = int(torch.randint(1, 4, (1,), generator=gen))
        units = -(-c // unit)
        seg = torch.rand(p2, k, units, generator=gen) > 0.6
        keep = seg.repeat_interleave(unit, dim=2)[:, :, :c]
    elif family == "elements":  # WWP / spatial-Winograd's stage 2
        keep = rand > 0.7
    elif family == "filters":  # FP: whole k at every position
        keep &= (torch.rand(1, k, 1, generator=gen) > 0.5)
    elif family == "pruned_position":  # one position entirely pruned, rows elsewhere
        keep &= torch.rand(p2, k, 1, generator=gen) > 0.4
        keep[int(torch.randint(0, p2, (1,), generator=gen))] = False
    elif family == "all_pruned":
        keep[:] = False
    else:
        assert family == "nothing"
    return keep.view(p, p, k, c).permute(2, 3, 0, 1).contiguous()


@st.composite
def sparse_cases(draw):
    m = draw(st.sampled_from([2, 4]))
    pad = draw(st.sampled_from([(0, 0), (1, 1), (0, 1)]))
    h = draw(st.integers(3 if pad[0] == 0 else 1, 9))
    w = draw(st.integers(3 if pad[1] == 0 else 1, 9))
    return {
        "m": m, "pad": pad, "h": h, "w": w,
        "n": draw(st.integers(0, 3)),
        "c": draw(st.integers(1, 7)),
        "k": draw(st.integers(1, 7)),
        "bias": draw(st.booleans()),
        "backend": draw(st.sampled_from(["auto", "torch"])),
        "family": draw(st.sampled_from(FAMILIES)),
        "poison": draw(st.sampled_from([None, float("nan"), float("inf")])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _sparse_and_reference(case: dict) -> tuple[WinogradConv2d, WinogradConv2d, torch.Tensor]:
    gen = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    m = case["m"]
    layer = WinogradConv2d(case["c"], case["k"], m=m, padding=case["pad"], bias=case["bias"], route="sparse",
                           backend=case["backend"])
    mask = family_mask(case["family"], case["k"], case["c"], m + 2, gen)
    layer.set_mask(mask)
    ref = copy.deepcopy(layer)
    ref.route, ref.backend = Route.BGEMM, layer_module.Backend.TORCH  # plain autograd through where(mask, U, 0)
    if case["poison"] is not None:
        with torch.no_grad():
            layer.weight[~mask] = case["poison"]
            ref.weight[~mask] = case["poison"]
    return layer, ref, mask


@given(sparse_cases())
def test_sparse_route_equals_dense_autograd(case: dict) -> None:
    _check_case(case)


def _check_case(case: dict) -> None:
    layer, ref, mask = _sparse_and_reference(case)
    x = torch.randn(case["n"], case["c"], case["h"], case["w"], requires_grad=True)
    y, y_ref = layer(x), ref(x)
    assert layer.last_route is Route.SPARSE and ref.last_route is Route.BGEMM
    assert y.shape == y_ref.shape and torch.isfinite(y).all()
    tol = TOL[case["m"]]
    assert rel_err(y, y_ref) <= tol
    dy = torch.randn_like(y_ref)
    params = [layer.weight] + ([layer.bias] if case["bias"] else [])
    ref_params = [ref.weight] + ([ref.bias] if case["bias"] else [])
    grads = torch.autograd.grad(y, [x, *params], dy)
    ref_grads = torch.autograd.grad(y_ref, [x, *ref_params], dy)
    for name, g, g_ref in zip(["dx", "dU", "dbias"], grads, ref_grads, strict=False):
        assert g.shape == g_ref.shape, name
        assert torch.isfinite(g).all(), name
        assert rel_err(g, g_ref) <= tol, (name, rel_err(g, g_ref))
    du = grads[1]
    assert torch.count_nonzero(du[~mask]) == 0  # exactly zero, by construction, whatever is stored there
    assert du.permute(2, 3, 0, 1).is_contiguous()  # position-major like the weight: no copy in the optimizer


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("m", [2, 4])
def test_every_family_with_nan_in_pruned_weights(family: str, m: int) -> None:
    """The property above for each family on a fixed, larger case (hypothesis may not draw every combination)."""
    case = {"m": m, "pad": (1, 1), "h": 9, "w": 7, "n": 3, "c": 7, "k": 9, "bias": True, "backend": "auto",
            "family": family, "poison": float("nan"), "seed": 5}
    _check_case(case)


def test_plan_pads_with_distinct_pruned_rows_and_columns() -> None:
    gen = torch.Generator().manual_seed(0)
    for family in FAMILIES:
        mask = family_mask(family, 6, 5, 4, gen)
        plan = build_plan(mask)
        mv = mask.permute(2, 3, 0, 1).reshape(16, 6, 5)
        assert plan.rmax == int(mv.any(2).sum(1).max()) and plan.cmax == int(mv.any(1).sum(1).max())
        rows = torch.arange(16 * 6).view(16, 6) if plan.rows is None else plan.rows.view(16, plan.rmax)
        cols = torch.arange(16 * 5).view(16, 5) if plan.cols is None else plan.cols.view(16, plan.cmax)
        for xi in range(16):
            r, c = rows[xi] - xi * 6, cols[xi] - xi * 5
            assert len(set(r.tolist())) == len(r) and len(set(c.tolist())) == len(c)  # never collide
            assert set(torch.nonzero(mv[xi].any(1)).flatten().tolist()) <= set(r.tolist())  # every kept row
            assert set(torch.nonzero(mv[xi].any(0)).flatten().tolist()) <= set(c.tolist())
            assert torch.equal(plan.mask[xi], mv[xi][r][:, c])
        assert 0.0 <= plan.work_fraction <= 1.0


def test_no_gathers_when_every_row_and_column_keeps_something() -> None:
    mask = torch.ones(4, 3, 4, 4, dtype=torch.bool)
    mask[0, 0] = False  # elements: every row and column of every U[xi] still keeps an entry
    plan = build_plan(mask)
    assert plan.rows is None and plan.cols is None and plan.elems is None and plan.work_fraction == 1.0
    mask[3] = False  # a filter: rows gathered, all columns kept
    plan = build_plan(mask)
    assert plan.rows is not None and plan.cols is None and plan.elems is None and plan.rmax == 3
    mask[:, 2] = False  # and an input channel: both gathered, elements addressed one by one
    plan = build_plan(mask)
    assert plan.rows is not None and plan.cols is not None and plan.elems is not None
    assert (plan.rmax, plan.cmax, plan.work_fraction) == (3, 2, 0.5)


# ------------------------------------------------------------------------------------------ optimizers, no callback
def _masked_model(route: str, seed: int = 0) -> tuple[nn.Module, WinogradConv2d, torch.Tensor]:
    torch.manual_seed(seed)
    layer = WinogradConv2d(6, 8, m=2, route=route)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(8, 6, 4, 4, dtype=torch.bool)
    for i in range(4):
        for j in range(4):  # BWSP-like: 5 of the 8 rows of every U[xi] pruned
            mask[torch.randperm(8, generator=gen)[:5], :, i, j] = False
    mask[:, :, 0, 0] = False  # and a whole position: a mix of families
    layer.set_mask(mask)
    layer.zero_pruned_()
    return nn.Sequential(layer, nn.ReLU(), nn.Conv2d(8, 2, 1)), layer, mask


@pytest.mark.parametrize("route", ["sparse", "auto"])
@pytest.mark.parametrize("setting", ["sgd", "adam", "accumulate", "autocast"])
def test_pruned_weights_stay_zero_without_a_callback(route: str, setting: str) -> None:
    model, layer, mask = _masked_model(route)
    before = layer.weight.detach().clone()
    if setting == "adam":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    micro = 3 if setting == "accumulate" else 1
    for step in range(4):
        opt.zero_grad()
        for i in range(micro):
            x = torch.randn(2 + i, 6, 7, 5)  # accumulation over micro-batches of other shapes (other route keys)
            if setting == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(x).float().square().mean()
            else:
                loss = model(x).square().mean()
            loss.backward()
        assert torch.count_nonzero(layer.weight.grad[~mask]) == 0, step
        opt.step()
        assert torch.count_nonzero(layer.weight.detach()[~mask]) == 0, step
    assert not torch.equal(layer.weight.detach()[mask], before[mask])  # the kept weights did train
    assert layer.last_route in (Route.SPARSE, Route.BGEMM)


def test_sparse_route_masks_even_when_mask_in_forward_is_off() -> None:
    _, layer, mask = _masked_model("sparse")
    layer.mask_in_forward = False  # a callback's setting: on the sparse route the mask acts anyway
    with torch.no_grad():
        layer.weight[~mask] = float("nan")
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    y = layer(x)
    assert torch.isfinite(y).all()
    dx, du = torch.autograd.grad(y.sum(), (x, layer.weight))
    assert torch.isfinite(dx).all() and torch.count_nonzero(du[~mask]) == 0
    assert layer.pruned_grads_zero is False  # not marked yet: nothing vouches for earlier passes
    layer.mark_pruned_grads_zero()
    layer(x)
    assert layer.pruned_grads_zero
    layer.route = Route.BGEMM
    layer(x)  # a dense pass with the masking off: its gradient must be masked by someone
    assert not layer.pruned_grads_zero
    layer.mark_pruned_grads_zero()
    with torch.no_grad():
        layer(x)  # no autograd, no gradient
    assert layer.pruned_grads_zero


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize(("h", "w", "pad"), [(1, 1, 1), (2, 2, 1), (1, 3, (1, 0)), (3, 3, 0)])
def test_unrolled_route_masks_by_itself_on_the_positions_it_uses(m: int, h: int, w: int, pad) -> None:
    """``unrolled`` (single-tile maps) uses only positions that reach the output and masks them itself: the
    output and dX equal the dense reference, and dU is exactly zero at pruned entries and at unused positions."""
    gen = torch.Generator().manual_seed(m * 100 + h * 10 + w)
    layer = WinogradConv2d(5, 7, m=m, padding=pad, route="unrolled")
    ref = WinogradConv2d(5, 7, m=m, padding=pad, route="bgemm", backend="torch")
    ref.load_state_dict(layer.state_dict())
    mask = family_mask("elements", 7, 5, m + 2, gen)
    layer.set_mask(mask)
    layer.mask_in_forward = False  # a callback's setting: the unrolled route masks anyway
    with torch.no_grad():
        ref.weight.copy_(torch.where(mask, layer.weight, 0.0))
        layer.weight[~mask] = float("nan")
    x = torch.randn(3, 5, h, w, generator=gen, requires_grad=True)
    y, y_ref = layer(x), ref(x)
    assert layer.last_route is Route.UNROLLED and rel_err(y, y_ref) < TOL[m]
    dx, du = torch.autograd.grad(y.square().sum(), (x, layer.weight))
    dx_ref, du_ref = torch.autograd.grad(y_ref.square().sum(), (x, ref.weight))
    assert rel_err(dx, dx_ref) < TOL[m]
    assert torch.count_nonzero(du[~mask]) == 0
    assert rel_err(du, torch.where(mask, du_ref, 0.0)) < TOL[m]
    layer.mark_pruned_grads_zero()
    layer(x)
    assert layer.pruned_grads_zero  # nothing left for a callback to multiply


# ----------------------------------------------------------------------------------------------- the cached plan
def test_plan_is_cached_and_follows_the_mask() -> None:
    _, layer, mask = _masked_model("sparse")
    plan = layer.sparse_plan()
    assert plan is not None and layer.sparse_plan() is plan
    x = torch.randn(2, 6, 5, 5)
    layer(x)
    assert layer.sparse_plan() is plan  # the forward pass reuses it
    assert layer.mask is not None
    layer.mask[:, :, 1, 1] = False  # edited in place: a new version
    edited = layer.sparse_plan()
    assert edited is not None and edited is not plan and edited.rmax <= plan.rmax
    assert not edited.mask[1 * 4 + 1].any()  # position (1, 1) now gathers only pruned (padding) rows
    assert layer.sparse_plan() is edited
    ref = copy.deepcopy(layer)
    ref.route = Route.BGEMM
    assert rel_err(layer(x), ref(x)) <= TOL[2]  # the edit acts
    layer.set_mask(torch.ones_like(mask))  # replaced
    assert layer.sparse_plan() is not edited and layer.sparse_plan().work_fraction == 1.0
    layer.set_mask(None)
    assert layer.sparse_plan() is None
    layer(x)  # sparse without a mask is bgemm


def test_state_dict_has_no_new_keys_and_copies_work(tmp_path) -> None:
    _, layer, _ = _masked_model("auto")
    layer(torch.randn(2, 6, 5, 5))  # measures, caches a plan and a route
    assert layer._mask_cache is not None and layer._mask_cache.routes
    assert set(layer.state_dict()) == {"weight", "bias", "mask"}
    x = torch.randn(3, 6, 6, 5)
    layer(x)  # measured for this shape first: the copy keeps that choice (a copy measuring on its own could differ)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), layer(x))
    assert twin.mask is not None and layer.mask is not None
    twin.mask[:] = False  # the copy's mask and plan are its own
    assert torch.count_nonzero(twin(x) - twin.bias.view(1, -1, 1, 1)) == 0
    assert rel_err(layer(x), copy.deepcopy(layer)(x)) == 0
    assert torch.equal(pickle.loads(pickle.dumps(layer))(x), layer(x))
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    fresh = WinogradConv2d(6, 8, m=2)  # no mask yet: the saved one is restored and planned
    fresh.load_state_dict(torch.load(path))
    plan = fresh.sparse_plan()
    assert plan is not None and plan.rmax == layer.sparse_plan().rmax  # type: ignore[union-attr]
    fresh.route = Route.SPARSE
    assert rel_err(fresh(x), layer(x)) <= TOL[2]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("route", ["sparse", "auto"])
def test_trace_of_a_masked_layer_runs_plain_torch_ops(route: str) -> None:
    _, layer, _ = _masked_model(route)
    model = nn.Sequential(layer, nn.ReLU()).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 6, 9, 9), check_trace=True)
        x = torch.randn(2, 6, 9, 9)
        assert rel_err(traced(x), model(x)) <= TOL[2]


# ----------------------------------------------------------------------------------------------- route auto
class _FakeTimer:
    """Stands in for ``_median_time``: counts the calls and returns a fixed time per route."""

    def __init__(self, times: dict[Route, float]) -> None:
        self.times, self.calls = times, []

    def __call__(self, fn, device, reps=3):  # the signature of _median_time
        route = fn.args[0]
        fn()  # the candidate really runs, on detached copies
        self.calls.append(route)
        return self.times[route]


@pytest.mark.parametrize("winner", [Route.SPARSE, Route.BGEMM])
def test_auto_measures_once_per_input_shape_and_mask_version(monkeypatch, winner: Route) -> None:
    timer = _FakeTimer({Route.BGEMM: 2.0, Route.SPARSE: 3.0, Route.UNROLLED: 9.0})
    timer.times[winner] = 1.0
    monkeypatch.setattr(autotune, "_median_time", timer)
    model, layer, mask = _masked_model("auto")
    x = torch.randn(4, 6, 7, 7)
    model(x).sum().backward()
    assert sorted(timer.calls) == sorted([Route.BGEMM, Route.SPARSE]) and layer.last_route is winner
    grad = layer.weight.grad.clone()
    for _ in range(3):
        model(x).sum().backward()
    assert len(timer.calls) == 2  # cached for this key
    assert torch.count_nonzero(layer.weight.grad[~mask]) == 0 and torch.allclose(layer.weight.grad, 4 * grad)
    model(torch.randn(3, 6, 7, 7)).sum().backward()  # another shape: measured once more
    assert len(timer.calls) == 4
    layer.mask[:, :, 2, 2] = False  # another mask version: every key again
    model(x)
    assert len(timer.calls) == 6
    model(torch.randn(2, 6, 1, 1))  # one tile at a 1x1 map (and a batch of 2): unrolled is a candidate too
    assert timer.calls[-3:] == [Route.BGEMM, Route.SPARSE, Route.UNROLLED]

    # no timing: without autograd, in eval mode, without a mask
    n = len(timer.calls)
    with torch.no_grad():
        model(torch.randn(5, 6, 7, 7))
    assert layer.last_route is Route.SPARSE  # the cheap rule: the kept work is at most 60% of the dense GEMMs
    assert layer.sparse_plan().work_fraction <= autotune.SPARSE_WORK_FRACTION  # type: ignore[union-attr]
    model.eval()
    model(torch.randn(5, 6, 7, 7)).sum().backward()
    model(torch.randn(2, 6, 1, 1))
    assert layer.last_route is Route.UNROLLED  # where the mask-less rule unrolls, the eval rule does too
    model.train()
    layer.set_mask(None)
    model(torch.randn(5, 6, 7, 7)).sum().backward()
    assert layer.last_route is Route.BGEMM
    assert len(timer.calls) == n


def test_auto_without_anything_to_skip_does_not_measure(monkeypatch) -> None:
    timer = _FakeTimer({Route.BGEMM: 1.0, Route.SPARSE: 1.0})
    monkeypatch.setattr(autotune, "_median_time", timer)
    layer = WinogradConv2d(6, 8, m=2)
    layer.set_mask(torch.rand(layer.weight.shape) > 0.3)  # elements: every row and column keeps something
    assert layer.sparse_plan().work_fraction == 1.0  # type: ignore[union-attr]
    layer(torch.randn(2, 6, 7, 7)).sum().backward()
    assert timer.calls == [] and layer.last_route is Route.BGEMM


def test_measurement_leaves_the_parameters_alone() -> None:
    model, layer, _ = _masked_model("auto")
    x = torch.randn(2, 6, 7, 7, requires_grad=True)
    y = model(x)  # measured here (real timer): detached copies, no .grad anywhere
    assert layer.weight.grad is None and layer.bias.grad is None and x.grad is None
    assert layer._mask_cache is not None and len(layer._mask_cache.routes) == 1
    y.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


def test_median_time_is_a_median() -> None:
    calls = []
    assert autotune._median_time(lambda: calls.append(1), torch.device("cpu"), reps=5) >= 0.0
    assert len(calls) == 6  # one warm-up


def test_copies_and_pickles_keep_the_measured_routes() -> None:
    """A deep copy or an unpickled layer computes exactly what the original does: it keeps the measured route
    (a fresh measurement could pick another route, equal only up to float rounding)."""
    _, layer, _ = _masked_model("auto")
    x = torch.randn(3, 6, 6, 5)
    layer(x)
    key_routes = dict(layer._mask_cache.routes)  # type: ignore[union-attr]
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin._mask_cache is not None and twin._mask_cache.matches(twin.mask)
        assert twin._mask_cache.routes == key_routes
        assert torch.equal(twin(x), layer(x))
    with torch.no_grad():
        layer.mask[0, 0, 0, 0] = ~layer.mask[0, 0, 0, 0]  # stale from here on, in the copies too
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not twin._mask_cache.matches(twin.mask)  # type: ignore[union-attr]


def test_deterministic_mode_chooses_without_timing(monkeypatch) -> None:
    """Under ``torch.use_deterministic_algorithms(True)`` a run must not depend on timings: the fixed rule decides."""

    def no_timing(*args, **kwargs):
        raise AssertionError("auto timed routes in deterministic mode")

    monkeypatch.setattr(autotune, "_median_time", no_timing)
    model, layer, _ = _masked_model("auto")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model(torch.randn(4, 6, 7, 7)).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert layer.last_route is Route.SPARSE  # the kept work is at most 60% of the dense GEMMs
