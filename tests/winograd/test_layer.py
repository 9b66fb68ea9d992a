"""``WinogradConv2d`` against ``F.conv2d``: forward, gradients, masks, conversion refusals, state dicts, autocast."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightning_winoprune import WinogradConv2d
from lightning_winoprune.kernels import native_available
from lightning_winoprune.winograd import Route, get_transforms, tile_geometry, winograd_layout, winogradize

# float32 relative tolerances (max|diff| / max|ref|) per tile size. F(6x6, 3x3) has transform entries up to ~10^2
# and its float32 rounding error is about an order of magnitude above F(4x4, 3x3)'s, so it gets a looser bound.
TOL = {2: 1e-5, 4: 1e-4, 6: 5e-4}
ROUTES = ["auto", "bgemm", "sparse", "phase", "unrolled"]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    denom = expected.abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / denom if denom > 0 else diff


def spatial_grad_from_winograd(du: torch.Tensor, m: int) -> torch.Tensor:
    """Chain rule through U = G g G^T: dL/dg = G^T (dL/dU) G."""
    t = get_transforms(m, torch.float64)
    return t.G.T @ du.double() @ t.G


def routes_for(h: int, w: int, pad: tuple[int, int], m: int) -> list[str]:
    one_tile = tile_geometry(h, w, pad, m).tiles == (1, 1)
    return [r for r in ROUTES if r != "unrolled" or one_tile]


@st.composite
def conv_cases(draw, ms=(2, 4)):
    m = draw(st.sampled_from(ms))
    h = draw(st.integers(1, 11))
    w = draw(st.integers(1, 11))
    ph = draw(st.integers((3 - h + 1) // 2 if h < 3 else 0, 2))
    pw = draw(st.integers((3 - w + 1) // 2 if w < 3 else 0, 2))
    return {
        "m": m,
        "n": draw(st.integers(1, 3)),
        "c": draw(st.integers(1, 6)),
        "k": draw(st.integers(1, 6)),
        "h": h,
        "w": w,
        "pad": (ph, pw),
        "bias": draw(st.booleans()),
        "backend": draw(st.sampled_from(["auto", "torch"])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _check_case(case: dict, tol: float) -> None:
    torch.manual_seed(case["seed"])
    m, pad = case["m"], case["pad"]
    conv = nn.Conv2d(case["c"], case["k"], 3, padding=pad, bias=case["bias"])
    x = torch.randn(case["n"], case["c"], case["h"], case["w"], requires_grad=True)
    ref = conv(x)
    dy = torch.randn_like(ref)
    ref_params = (conv.weight,) if conv.bias is None else (conv.weight, conv.bias)
    ref_dx, *ref_dparams = torch.autograd.grad(ref, (x, *ref_params), dy)
    # float64 "phase" route (plain autograd through conv2d) as the reference for dL/dU
    ref_layer64 = WinogradConv2d.from_conv(copy.deepcopy(conv).double(), m=m, route="phase", backend="torch")
    ref_du64, = torch.autograd.grad(ref_layer64(x.detach().double()), ref_layer64.weight, dy.double())

    for route in routes_for(case["h"], case["w"], pad, m):
        layer = WinogradConv2d.from_conv(conv, m=m, route=route, backend=case["backend"])
        y = layer(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert rel_err(y, ref) <= tol, (route, rel_err(y, ref))
        params = (layer.weight,) if layer.bias is None else (layer.weight, layer.bias)
        dx, du, *dparams = torch.autograd.grad(y, (x, *params), dy)
        assert rel_err(dx, ref_dx) <= tol, (route, "dx", rel_err(dx, ref_dx))
        assert du.shape == layer.weight.shape
        assert rel_err(du, ref_du64) <= tol, (route, "dU", rel_err(du, ref_du64))
        # the spatial gradient implied by the chain rule is the conv's weight gradient
        dg = spatial_grad_from_winograd(du, m)
        assert rel_err(dg, ref_dparams[0]) <= tol, (route, "dg", rel_err(dg, ref_dparams[0]))
        if layer.bias is not None:
            assert rel_err(dparams[0], ref_dparams[1]) <= tol


@given(conv_cases())
def test_matches_conv2d_forward_and_backward(case: dict) -> None:
    _check_case(case, TOL[case["m"]])


@pytest.mark.parametrize(
    ("h", "w", "pad"), [(1, 1, (1, 1)), (6, 6, (1, 1)), (7, 11, (0, 2)), (13, 5, (2, 1)), (3, 3, (0, 0))]
)
def test_m6_matches_conv2d_looser_tolerance(h: int, w: int, pad: tuple[int, int]) -> None:
    case = {"m": 6, "n": 2, "c": 5, "k": 4, "h": h, "w": w, "pad": pad, "bias": True, "backend": "auto", "seed": h * w}
    _check_case(case, TOL[6])


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("route", ROUTES)
def test_gradcheck_float64(route: str, m: int) -> None:
    """Finite differences of a tiny float64 layer (torch backend) for x, U and bias, on every route."""
    h = w = m if route == "unrolled" else m + 3  # unrolled needs a single output tile
    layer = WinogradConv2d(2, 2, m=m, padding=1, route=route, backend="torch", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64
    x = torch.randn(1, 2, h, w, dtype=torch.float64, requires_grad=True)
    u = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)

    def fn(x: torch.Tensor, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"weight": u, "bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, u, b), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", ["channels_last", "strided", "empty_batch"])
def test_input_layouts_and_empty_batch(route: str, kind: str) -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = WinogradConv2d.from_conv(conv, m=2, route=route)
    hw = (2, 2) if route == "unrolled" else (7, 6)
    if kind == "channels_last":
        x = torch.randn(2, 3, *hw).to(memory_format=torch.channels_last)
    elif kind == "strided":
        x = torch.randn(2, 6, *hw)[:, ::2]
    else:
        x = torch.randn(0, 3, *hw)
    x.requires_grad_(True)
    y, ref = layer(x), conv(x)
    assert y.shape == ref.shape
    if kind == "empty_batch":
        return
    assert rel_err(y, ref) <= TOL[2]
    dy = torch.randn_like(ref)
    assert rel_err(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(ref, x, dy)[0]) <= TOL[2]


@pytest.mark.parametrize("m", [2, 4])
def test_auto_route_choice(m: int) -> None:
    layer = WinogradConv2d(2, 3, m=m, padding=1)
    assert layer.resolve_route(2, 2) is Route.UNROLLED  # one tile, Ho*Wo*H*W = 16 <= p*p
    assert layer.resolve_route(m + 5, m + 5) is Route.BGEMM
    # given the batch, building the unrolled matrix must pay off: 1x1 maps from a batch of 2, 2x2 never for F(2,3)
    assert layer.resolve_route(1, 1, batch=1) is Route.BGEMM and layer.resolve_route(1, 1, batch=2) is Route.UNROLLED
    assert layer.resolve_route(2, 2, batch=10_000) is (Route.BGEMM if m == 2 else Route.UNROLLED)
    assert WinogradConv2d(2, 3, m=m, route="phase").resolve_route(2, 2) is Route.PHASE


def test_unrolled_route_refuses_multi_tile() -> None:
    layer = WinogradConv2d(2, 3, m=2, padding=1, route="unrolled")
    layer(torch.randn(1, 2, 2, 2))  # 2x2 output: one tile
    with pytest.raises(ValueError, match=r"route='unrolled' needs the output to fit in one 2x2 tile"):
        layer(torch.randn(1, 2, 3, 3))


def test_constructor_and_forward_errors() -> None:
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        WinogradConv2d(0, 3)
    with pytest.raises(ValueError, match="out_channels must be a positive int"):
        WinogradConv2d(3, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="padding must be"):
        WinogradConv2d(3, 3, padding=-1)
    with pytest.raises(ValueError, match="padding must be"):
        WinogradConv2d(3, 3, padding=(1, 1, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not supported"):
        WinogradConv2d(3, 3, m=3)
    with pytest.raises(ValueError, match="route='fast' is not valid"):
        WinogradConv2d(3, 3, route="fast")
    with pytest.raises(ValueError, match="backend='gpu' is not valid"):
        WinogradConv2d(3, 3, backend="gpu")
    layer = WinogradConv2d(3, 4)
    with pytest.raises(ValueError, match=r"expects input \(N, 3, H, W\)"):
        layer(torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match=r"expects input"):
        layer(torch.randn(3, 5, 5))
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        WinogradConv2d(3, 4, padding=0)(torch.randn(1, 3, 2, 2))


@pytest.mark.parametrize("m", [2, 4, 6])
def test_fresh_layer_is_conv_equivalent(m: int) -> None:
    """reset_parameters initialises a spatial kernel and transforms it, so U lies in the image of g -> G g G^T."""
    layer = WinogradConv2d(3, 4, m=m, padding=1)
    assert layer.weight.shape == (4, 3, m + 2, m + 2)
    assert layer.weight.permute(2, 3, 0, 1).is_contiguous()  # position-major layout
    t = get_transforms(m, torch.float64)
    g = torch.linalg.pinv(t.G) @ layer.weight.double() @ torch.linalg.pinv(t.G).T
    torch.testing.assert_close(t.G @ g @ t.G.T, layer.weight.double(), rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 3, 7, 6)
    ref = F.conv2d(x, g.float(), layer.bias, padding=1)
    assert rel_err(layer(x), ref) <= TOL[m]
    bound = 1.0 / 27**0.5
    assert layer.bias is not None and layer.bias.abs().max() <= bound


def test_from_conv_copies_flags() -> None:
    conv = nn.Conv2d(3, 4, 3, padding="same", bias=False).eval()
    conv.weight.requires_grad_(False)
    layer = WinogradConv2d.from_conv(conv, m=4, route="phase", backend="torch")
    assert layer.padding == (1, 1) and layer.bias is None and not layer.training
    assert not layer.weight.requires_grad
    assert layer.route is Route.PHASE and layer.m == 4
    x = torch.randn(1, 3, 6, 6)
    assert rel_err(layer(x), conv(x)) <= TOL[4]
    valid_conv = nn.Conv2d(3, 4, 3, padding="valid")
    valid = WinogradConv2d.from_conv(valid_conv)
    assert valid.padding == (0, 0)
    assert valid(x).shape == (1, 4, 4, 4)
    assert rel_err(valid(x), valid_conv(x)) <= TOL[2]
    assert "bias=False" in repr(layer) and "route=phase" in repr(layer)


# ----------------------------------------------------------------------------------------------- from_conv refusals
class _MyConv(nn.Conv2d):
    pass


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (nn.Conv2d(3, 4, 3, stride=2, padding=1), r"stride is \(2, 2\), not \(1, 1\)"),
        (nn.Conv2d(3, 4, 5, padding=2), r"kernel_size is \(5, 5\), not \(3, 3\)"),
        (nn.Conv2d(3, 4, 3, dilation=2, padding=2), r"dilation is \(2, 2\), not \(1, 1\)"),
        (nn.Conv2d(4, 4, 3, groups=2, padding=1), r"groups is 2, not 1"),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), r"padding_mode is 'reflect', not 'zeros'"),
        (_MyConv(3, 4, 3, padding=1), r"_MyConv overrides nn.Conv2d's forward"),
        (nn.Linear(3, 4), r"Linear is not an nn.Conv2d"),
        (nn.Conv1d(3, 4, 3), r"Conv1d is not an nn.Conv2d"),
    ],
)
def test_from_conv_refuses(module: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=r"cannot convert \w+ to WinogradConv2d: " + match):
        WinogradConv2d.from_conv(module)


# ----------------------------------------------------------------------------------------------- masks
def _masked_pair(route: str, m: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = WinogradConv2d.from_conv(conv, m=m, route=route)
    mask = torch.rand(layer.weight.shape) > 0.5
    layer.set_mask(mask)
    return layer, mask


@pytest.mark.parametrize("route", ["auto", "bgemm", "sparse", "phase", "unrolled"])
@pytest.mark.parametrize("m", [2, 4])
def test_mask_semantics(route: str, m: int) -> None:
    layer, mask = _masked_pair(route, m)
    assert layer.mask is not None and torch.equal(layer.mask, mask)
    assert layer.mask.dtype == torch.bool
    assert torch.equal(layer.effective_weight(), layer.weight * mask)
    hw = (2, 2) if route == "unrolled" else (7, 5)
    x = torch.randn(2, 3, *hw, requires_grad=True)

    # (a) same output as an unmasked layer holding weight * mask
    dense = copy.deepcopy(layer)
    dense.set_mask(None)
    assert dense.mask is None
    with torch.no_grad():
        dense.weight.copy_(layer.weight * mask)
    y = layer(x)
    torch.testing.assert_close(y, dense(x), rtol=0, atol=0)
    # ... and it differs from the unmasked layer (the mask is really applied)
    unmasked = copy.deepcopy(layer)
    unmasked.set_mask(None)
    assert rel_err(unmasked(x), y) > 1e-3

    # (b) pruned entries receive exactly zero gradient, kept ones generally do not
    layer.zero_grad()
    y.square().sum().backward()
    grad = layer.weight.grad
    assert grad is not None
    assert torch.all(grad[~mask] == 0)
    assert grad[mask].abs().sum() > 0

    # (c) the values stored at pruned entries do not matter
    with torch.no_grad():
        layer.weight[~mask] = torch.randn(int((~mask).sum())) * 100
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    assert "sparsity=" in repr(layer)


def test_set_mask_validation() -> None:
    layer = WinogradConv2d(3, 4, m=2)
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        layer.set_mask(torch.ones(4, 3, 3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        layer.set_mask(torch.ones(4, 3, 4, 4))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        layer.set_mask(torch.ones(4, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        layer.set_mask([[True]])  # type: ignore[arg-type]
    assert layer.mask is None
    layer.set_mask(torch.ones(4, 3, 4, 4, dtype=torch.bool))
    assert layer.mask is not None and "mask" in layer.state_dict()
    layer.set_mask(None)
    assert layer.mask is None and "mask" not in layer.state_dict()


# ----------------------------------------------------------------------------------------------- state dicts
def _small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 3, padding=(0, 1)), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1, bias=False),
    )


def test_state_dict_round_trip_model(tmp_path) -> None:
    torch.manual_seed(1)
    model = _small_model()
    rep = winogradize(model, m=2, skip_first=False)
    assert len(rep.converted) == 3
    for layer in (model[0], model[4]):
        layer.set_mask(torch.rand(layer.weight.shape) > 0.3)
    with torch.no_grad():  # make the model differ from any freshly built one
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    x = torch.randn(2, 3, 9, 7)
    y = model(x)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)

    fresh = _small_model()
    winogradize(fresh, m=2, skip_first=False)
    assert not torch.equal(fresh(x), y)
    fresh.load_state_dict(torch.load(path))
    assert torch.equal(fresh(x), y)
    assert fresh[0].mask is not None and torch.equal(fresh[0].mask, model[0].mask)
    assert fresh[2].mask is None
    assert fresh[4].mask is not None and torch.equal(fresh[4].mask, model[4].mask)
    for name in ("0", "4"):
        lay = fresh.get_submodule(name)
        assert lay.mask.permute(2, 3, 0, 1).is_contiguous()
        assert lay.weight.permute(2, 3, 0, 1).is_contiguous()


@pytest.mark.parametrize("route", ["bgemm", "phase"])
def test_state_dict_mask_restored_and_removed(tmp_path, route: str) -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    masked = WinogradConv2d.from_conv(conv, m=4, route=route)
    mask = torch.rand(masked.weight.shape) > 0.5
    masked.set_mask(mask)
    plain = WinogradConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), m=4, route=route)
    x = torch.randn(1, 3, 8, 8)
    y_masked, y_plain = masked(x), plain(x)
    torch.save(masked.state_dict(), tmp_path / "masked.pt")
    torch.save(plain.state_dict(), tmp_path / "plain.pt")

    # masked state dict -> unmasked fresh layer: mask restored
    fresh = WinogradConv2d(3, 4, m=4, route=route)
    assert fresh.mask is None
    fresh.load_state_dict(torch.load(tmp_path / "masked.pt"))
    assert fresh.mask is not None and torch.equal(fresh.mask, mask)
    assert torch.equal(fresh(x), y_masked)

    # unmasked state dict -> masked layer: mask removed
    other = WinogradConv2d(3, 4, m=4, route=route)
    other.set_mask(torch.zeros(other.weight.shape, dtype=torch.bool))
    other.load_state_dict(torch.load(tmp_path / "plain.pt"))
    assert other.mask is None
    assert torch.equal(other(x), y_plain)


# ----------------------------------------------------------------------------------------------- autocast / optimizer
@pytest.mark.parametrize("route", ["auto", "bgemm", "sparse", "phase", "unrolled"])
@pytest.mark.parametrize("m", [2, 4])
def test_autocast_bfloat16_computes_in_float32(route: str, m: int) -> None:
    conv = nn.Conv2d(4, 5, 3, padding=1)
    layer = WinogradConv2d.from_conv(conv, m=m, route=route)
    hw = (2, 2) if route == "unrolled" else (9, 6)
    x = torch.randn(2, 4, *hw)
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.conv2d(x, conv.weight, padding=1).dtype == torch.bfloat16  # autocast is really active
        y = layer(x)
    assert y.dtype == torch.float32
    assert rel_err(y, ref) <= TOL[m]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = layer(x.bfloat16())  # bf16 input is promoted to the weight's precision
    assert y2.dtype == torch.float32
    assert rel_err(y2, F.conv2d(x.bfloat16().float(), conv.weight, conv.bias, padding=1)) <= TOL[m]


@pytest.mark.parametrize("route", ["bgemm", "phase"])
def test_sgd_momentum_weight_decay_steps(route: str) -> None:
    torch.manual_seed(3)
    layer = WinogradConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), m=2, route=route)
    layer.set_mask(torch.rand(layer.weight.shape) > 0.4)
    before = layer.weight.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x = torch.randn(2, 3, 7, 7)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    assert not torch.equal(layer.weight, before)
    assert layer.weight.permute(2, 3, 0, 1).is_contiguous()
    phase = WinogradConv2d(3, 4, m=2, route="phase", backend="torch")
    phase.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert rel_err(layer(x), phase(x)) <= 1e-5
        # spatial reference of the masked weight: the effective U is generally not in the image of G g G^T,
        # so compare against the phase route (an independent formulation), and the dense reference in float64
        y64 = WinogradConv2d(3, 4, m=2, route="phase", backend="torch", dtype=torch.float64)
        y64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in layer.state_dict().items()})
        assert rel_err(layer(x), y64(x.double())) <= 1e-5


@pytest.mark.skipif(not native_available(), reason="native extension not loaded")
def test_native_and_torch_backends_agree_in_layer() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 10, 9, requires_grad=True)
    outs = []
    for be in ("native", "torch"):
        layer = WinogradConv2d.from_conv(conv, m=4, route="bgemm", backend=be)
        y = layer(x)
        dx, du, db = torch.autograd.grad(y, (x, layer.weight, layer.bias), torch.ones_like(y))
        outs.append((y, dx, du, db))
    for a, b in zip(*outs, strict=True):
        assert rel_err(a, b) <= 1e-5


def test_winograd_layout_helper() -> None:
    t = torch.randn(4, 3, 6, 6)
    lt = winograd_layout(t)
    assert torch.equal(lt, t) and lt.shape == t.shape
    assert lt.permute(2, 3, 0, 1).is_contiguous() and not lt.is_contiguous()


BACKENDS = ["auto", "torch", *(["native"] if native_available() else [])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("m", [2, 4])
def test_empty_batch_is_an_empty_output_with_gradients_like_conv2d(route: str, m: int, backend: str) -> None:
    # before: the phase route's backward raised (pixel_shuffle refuses a batch of 0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = WinogradConv2d.from_conv(conv, m=m, route=route, backend=backend)
    layer.set_mask(torch.rand_like(layer.weight) > 0.5)
    hw = (2, 2) if route == "unrolled" else (9, 7)
    x = torch.randn(0, 3, *hw, requires_grad=True)
    y, ref = layer(x), conv(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype and y.numel() == 0
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert layer.weight.grad is not None and torch.count_nonzero(layer.weight.grad) == 0
    with torch.no_grad():
        assert layer(x).shape == ref.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_pruned_weight_never_reaches_the_output(route: str, poison: float, backend: str) -> None:
    # before: weight * mask propagated NaN * 0 = NaN to every output of the layer
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = WinogradConv2d.from_conv(conv, m=2, route=route, backend=backend)
    mask = torch.ones_like(layer.weight, dtype=torch.bool)
    mask[:, 1] = False  # input channel 1 pruned at every position: the kept weights are conv's without channel 1
    mask[2] = False  # and filter 2
    layer.set_mask(mask)
    with torch.no_grad():
        layer.weight[~mask] = poison
    kept = conv.weight.detach().clone()
    kept[:, 1] = 0
    kept[2] = 0
    hw = (2, 2) if route == "unrolled" else (7, 6)
    x = torch.randn(2, 3, *hw, requires_grad=True)
    y = layer(x)
    ref = F.conv2d(x, kept, conv.bias, padding=1)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) <= TOL[2]
    dy = torch.randn_like(ref)
    dx, du = torch.autograd.grad(y, (x, layer.weight), dy)
    assert torch.isfinite(dx).all() and rel_err(dx, torch.autograd.grad(ref, x, dy)[0]) <= TOL[2]
    assert torch.count_nonzero(du[~mask]) == 0
    layer.zero_pruned_()  # the storage too: the pruned entries become exactly zero
    assert torch.count_nonzero(layer.weight.detach()[~mask]) == 0 and torch.isfinite(layer.weight).all()


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("route", ["auto", "bgemm", "sparse", "phase"])
def test_torch_jit_trace_computes_what_eager_does_on_new_inputs(route: str, backend: str) -> None:
    # before: tracing a native model under no_grad failed or replayed stale native buffers (NaN, garbage)
    torch.manual_seed(0)
    layers = [WinogradConv2d(3, 8, m=2, route=route, backend=backend), WinogradConv2d(8, 4, m=4, route=route,
                                                                                      backend=backend)]
    layers[1].set_mask(torch.rand_like(layers[1].weight) > 0.3)
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1]).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 3, 12, 12), check_trace=True)
        for _ in range(2):
            x = torch.randn(2, 3, 12, 12)
            assert rel_err(traced(x), model(x)) <= TOL[4]


@pytest.mark.filterwarnings("ignore:.*lru_cache.*")
def test_torch_compile_sees_plain_torch_ops() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = WinogradConv2d.from_conv(conv, m=2, route="bgemm")
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(compiled(x), conv(x)) <= TOL[2]
