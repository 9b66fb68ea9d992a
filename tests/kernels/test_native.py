"""Direct calls into ``lightning_winoprune.kernels._C``: bad inputs raise Python errors, edge cases compute right."""

from __future__ import annotations

import platform
import shutil
import subprocess
from collections.abc import Callable

import numpy as np
import pytest
import torch

from lightning_winoprune.kernels import native_available
from lightning_winoprune.winograd import (
    filter_transform,
    get_transforms,
    input_transform,
    input_transform_adjoint,
    output_transform,
    output_transform_adjoint,
    tile_geometry,
)

pytestmark = pytest.mark.skipif(not native_available(), reason="the native extension is not loaded")

if native_available():
    from lightning_winoprune.kernels import _C
else:  # pragma: no cover
    _C = None

M = 2
P = M + 2
N, C, K, H, W = 2, 3, 4, 5, 4
PAD = (1, 1)
GEOM = tile_geometry(H, W, PAD, M)  # Ho, Wo = 5, 4 -> th, tw = 3, 2
TH, TW = GEOM.tiles
T = N * TH * TW
HO, WO = GEOM.out_size


def _f32(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def _bt() -> np.ndarray:
    return get_transforms(M, torch.float32).BT.numpy().copy()


def _at() -> np.ndarray:
    return get_transforms(M, torch.float32).AT.numpy().copy()


def _g64() -> np.ndarray:
    return get_transforms(M, torch.float64).G.numpy().copy()


# name -> (function, valid positional args builder); the builders return fresh arrays each time
VALID: dict[str, Callable[[], list]] = {
    "filter_transform": lambda: [_f32(K, C, 3, 3), _g64(), np.zeros((K, C, P, P), np.float32)],
    "input_transform": lambda: [_f32(N, C, H, W), _bt(), *PAD, TH, TW, np.zeros((P * P, C, T), np.float32)],
    "input_transform_adjoint": lambda: [_f32(P * P, C, T), _bt(), *PAD, TH, TW, np.zeros((N, C, H, W), np.float32)],
    "output_transform": lambda: [_f32(P * P, K, T), _at(), _f32(K), TH, TW, np.zeros((N, K, HO, WO), np.float32)],
    "output_transform_adjoint": lambda: [_f32(N, K, HO, WO), _at(), TH, TW, np.zeros((P * P, K, T), np.float32)],
}
# positions of float32 array arguments (the ones that must be float32 C-contiguous)
F32_ARGS = {
    "filter_transform": [0, 2],
    "input_transform": [0, 1, 6],
    "input_transform_adjoint": [0, 1, 6],
    "output_transform": [0, 1, 2, 5],
    "output_transform_adjoint": [0, 1, 4],
}
ALL = list(VALID)


def _call(name: str, args: list) -> None:
    getattr(_C, name)(*args)


@pytest.mark.parametrize("name", ALL)
def test_valid_call_matches_torch(name: str) -> None:
    args = VALID[name]()
    _call(name, args)
    out = args[-1]
    assert np.isfinite(out).all() and np.abs(out).sum() > 0
    if name == "filter_transform":
        ref = filter_transform(torch.from_numpy(args[0]), M, "torch")
    elif name == "input_transform":
        ref = input_transform(torch.from_numpy(args[0]), M, GEOM, "torch")
    elif name == "input_transform_adjoint":
        ref = input_transform_adjoint(torch.from_numpy(args[0]), M, GEOM, (N, C, H, W), "torch")
    elif name == "output_transform":
        ref = output_transform(torch.from_numpy(args[0]), M, GEOM, N, torch.from_numpy(args[2]), "torch")
    else:
        ref = output_transform_adjoint(torch.from_numpy(args[0]), M, GEOM, "torch")
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-5, atol=1e-5)


def _f32_cases() -> list:
    return [pytest.param(n, i, id=f"{n}-arg{i}") for n in ALL for i in F32_ARGS[n]]


@pytest.mark.parametrize(("name", "pos"), _f32_cases())
def test_float64_instead_of_float32_is_type_error(name: str, pos: int) -> None:
    args = VALID[name]()
    args[pos] = args[pos].astype(np.float64)
    with pytest.raises(TypeError, match="must have dtype float32, got float64"):
        _call(name, args)


@pytest.mark.parametrize(("name", "pos"), _f32_cases())
def test_int_array_is_type_error(name: str, pos: int) -> None:
    args = VALID[name]()
    args[pos] = args[pos].astype(np.int32)
    with pytest.raises(TypeError, match="dtype float32"):
        _call(name, args)


@pytest.mark.parametrize(("name", "pos"), _f32_cases())
def test_list_instead_of_array_is_type_error(name: str, pos: int) -> None:
    args = VALID[name]()
    args[pos] = args[pos].tolist()
    with pytest.raises(TypeError, match="must be a numpy array of float32, got list"):
        _call(name, args)


def _non_contiguous(a: np.ndarray) -> np.ndarray:
    """A non-C-contiguous array of the same shape and values (Fortran order, or a strided view for 1-D)."""
    if a.ndim == 1:
        b = np.zeros(2 * a.shape[0], a.dtype)[::2]
        b[:] = a
    else:
        b = np.asfortranarray(a)
    if a.size > 1:
        assert not b.flags.c_contiguous
    return b


@pytest.mark.parametrize(("name", "pos"), _f32_cases())
def test_non_contiguous_is_type_error(name: str, pos: int) -> None:
    args = VALID[name]()
    args[pos] = _non_contiguous(args[pos])
    with pytest.raises(TypeError, match="must be C-contiguous"):
        _call(name, args)


@pytest.mark.parametrize("name", ["input_transform", "output_transform_adjoint"])
def test_transposed_view_is_type_error(name: str) -> None:
    args = VALID[name]()
    args[0] = args[0].transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2)  # same shape, non-contiguous strides
    assert not args[0].flags.c_contiguous
    with pytest.raises(TypeError, match="C-contiguous"):
        _call(name, args)


def test_filter_transform_G_must_be_float64() -> None:
    g, G, out = VALID["filter_transform"]()
    with pytest.raises(TypeError, match="G must have dtype float64, got float32"):
        _C.filter_transform(g, G.astype(np.float32), out)
    with pytest.raises(TypeError, match="G must be C-contiguous"):
        _C.filter_transform(g, np.asfortranarray(G), out)
    with pytest.raises(TypeError, match="G must be a numpy array of float64"):
        _C.filter_transform(g, G.tolist(), out)
    with pytest.raises(TypeError, match="got Tensor"):
        _C.filter_transform(torch.from_numpy(g), G, out)


BAD_OUT = {
    "filter_transform": (K, C, P, P + 1),
    "input_transform": (P * P, C, T + 1),
    "input_transform_adjoint": (N, C + 1, H, W),  # out defines the geometry: C must match dV
    "output_transform": (N, K + 1, HO, WO),  # out defines the geometry: K must match M
    "output_transform_adjoint": (P * P, K, T + 1),
}


@pytest.mark.parametrize("name", ALL)
def test_wrong_out_shape_is_value_error(name: str) -> None:
    args = VALID[name]()
    ndim = args[-1].ndim
    args[-1] = np.zeros(BAD_OUT[name], np.float32)
    with pytest.raises(ValueError, match="must have"):
        _call(name, args)
    args[-1] = np.zeros(BAD_OUT[name][:-1], np.float32)  # wrong ndim
    assert args[-1].ndim == ndim - 1
    with pytest.raises(ValueError, match="must"):
        _call(name, args)


def test_output_larger_than_tiles_is_value_error() -> None:
    mm, at, b, th, tw, _ = VALID["output_transform"]()
    with pytest.raises(ValueError, match="does not fit"):
        _C.output_transform(mm, at, b, th, tw, np.zeros((N, K, HO, TW * M + 1), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        _C.output_transform(mm, at, b, th, tw, np.zeros((N, K, TH * M + 1, WO), np.float32))


def test_wrong_input_shapes_are_value_errors() -> None:
    x, bt, pt, pl, th, tw, out = VALID["input_transform"]()
    with pytest.raises(ValueError, match="x must be 4-D"):
        _C.input_transform(x[0], bt, pt, pl, th, tw, out)
    with pytest.raises(ValueError, match="out must have shape"):
        _C.input_transform(x, bt, pt, pl, th + 1, tw, out)
    dv, bt, pt, pl, th, tw, dx = VALID["input_transform_adjoint"]()
    with pytest.raises(ValueError, match="dV must have shape"):
        _C.input_transform_adjoint(dv[:, :, :-1].copy(), bt, pt, pl, th, tw, dx)
    mm, at, b, th, tw, y = VALID["output_transform"]()
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        _C.output_transform(mm, at, np.zeros(K + 1, np.float32), th, tw, y)
    with pytest.raises(ValueError, match="M must have shape"):
        _C.output_transform(mm[:, :, :-1].copy(), at, b, th, tw, y)
    dy, at, th, tw, dm = VALID["output_transform_adjoint"]()
    with pytest.raises(ValueError, match="does not fit"):
        _C.output_transform_adjoint(dy, at, 1, tw, dm)
    with pytest.raises(ValueError, match="dy must be 4-D"):
        _C.output_transform_adjoint(dy[0], at, th, tw, dm)
    g, G, u = VALID["filter_transform"]()
    with pytest.raises(ValueError, match=r"g must end in \(3, 3\)"):
        _C.filter_transform(np.zeros((2, 3, 4), np.float32), G, u)
    with pytest.raises(ValueError, match=r"G must be \(p, 3\)"):
        _C.filter_transform(g, np.zeros((5, 3)), u)
    with pytest.raises(ValueError, match="G must have shape"):
        _C.filter_transform(g, np.zeros((4, 4)), u)
    with pytest.raises(ValueError, match="out must have g's shape"):
        _C.filter_transform(g, G, np.zeros((K, C + 1, P, P), np.float32))
    with pytest.raises(ValueError, match="out must have g's shape"):
        _C.filter_transform(g, get_transforms(4, torch.float64).G.numpy(), u)  # p = 6 but out is (.., 4, 4)


@pytest.mark.parametrize("name", ["input_transform", "input_transform_adjoint"])
@pytest.mark.parametrize("shape", [(5, 5), (3, 3), (4, 6), (4,)])
def test_bad_bt_is_value_error(name: str, shape: tuple[int, ...]) -> None:
    args = VALID[name]()
    args[1] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="BT must"):
        _call(name, args)


@pytest.mark.parametrize("name", ["output_transform", "output_transform_adjoint"])
@pytest.mark.parametrize("shape", [(3, 5), (2, 5), (3, 4), (4,)])
def test_bad_at_is_value_error(name: str, shape: tuple[int, ...]) -> None:
    args = VALID[name]()
    args[1] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="AT must"):
        _call(name, args)


@pytest.mark.parametrize("name", ["input_transform", "input_transform_adjoint"])
@pytest.mark.parametrize(("pt", "pl"), [(-1, 1), (1, -1), (-3, -3)])
def test_negative_padding_is_value_error(name: str, pt: int, pl: int) -> None:
    args = VALID[name]()
    args[2], args[3] = pt, pl
    with pytest.raises(ValueError, match="padding must be >= 0"):
        _call(name, args)


@pytest.mark.parametrize("name", ALL[1:])
@pytest.mark.parametrize(("th", "tw"), [(0, 1), (1, 0), (-1, 2)])
def test_zero_or_negative_tiles_is_value_error(name: str, th: int, tw: int) -> None:
    args = VALID[name]()
    i = 4 if name.startswith("input") else (3 if name == "output_transform" else 2)
    args[i], args[i + 1] = th, tw
    with pytest.raises(ValueError, match="tile counts must be >= 1"):
        _call(name, args)


@pytest.mark.parametrize("name", ALL)
def test_read_only_out_is_value_error(name: str) -> None:
    args = VALID[name]()
    args[-1].setflags(write=False)
    with pytest.raises(ValueError, match="out must be writable"):
        _call(name, args)


def test_non_integer_scalars_are_type_errors() -> None:
    x, bt, pt, pl, th, tw, out = VALID["input_transform"]()
    with pytest.raises(TypeError):
        _C.input_transform(x, bt, "1", pl, th, tw, out)
    with pytest.raises(TypeError):
        _C.input_transform(x, bt, pt, pl, None, tw, out)


def test_none_bias_is_allowed() -> None:
    mm, at, _, th, tw, y = VALID["output_transform"]()
    _C.output_transform(mm, at, None, th, tw, y)
    ref = output_transform(torch.from_numpy(mm), M, GEOM, N, None, "torch")
    torch.testing.assert_close(torch.from_numpy(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize(
    ("n", "c", "h", "w", "pad"), [(1, 1, 1, 1, (1, 1)), (1, 1, 3, 3, (0, 0)), (1, 2, 1, 4, (1, 0))]
)
def test_minimal_shapes_agree_with_torch(m: int, n: int, c: int, h: int, w: int, pad: tuple[int, int]) -> None:
    geom = tile_geometry(h, w, pad, m)
    th, tw = geom.tiles
    p = m + 2
    x = torch.randn(n, c, h, w)
    torch.testing.assert_close(input_transform(x, m, geom, "native"), input_transform(x, m, geom, "torch"),
                               rtol=1e-5, atol=1e-5)
    dv = torch.randn(p * p, c, n * th * tw)
    torch.testing.assert_close(input_transform_adjoint(dv, m, geom, (n, c, h, w), "native"),
                               input_transform_adjoint(dv, m, geom, (n, c, h, w), "torch"), rtol=1e-5, atol=1e-4)
    mm = torch.randn(p * p, 1, n * th * tw)
    b = torch.randn(1)
    torch.testing.assert_close(output_transform(mm, m, geom, n, b, "native"),
                               output_transform(mm, m, geom, n, b, "torch"), rtol=1e-5, atol=1e-4)
    dy = torch.randn(n, 1, *geom.out_size)
    torch.testing.assert_close(output_transform_adjoint(dy, m, geom, "native"),
                               output_transform_adjoint(dy, m, geom, "torch"), rtol=1e-5, atol=1e-4)
    g = torch.randn(1, c, 3, 3)
    torch.testing.assert_close(filter_transform(g, m, "native"), filter_transform(g, m, "torch"))


def test_input_adjoint_overwrites_out() -> None:
    """The adjoint scatter-adds into ``out`` after zeroing it: stale contents must not leak into the result."""
    dv, bt, pt, pl, th, tw, dx = VALID["input_transform_adjoint"]()
    _C.input_transform_adjoint(dv, bt, pt, pl, th, tw, dx)
    first = dx.copy()
    dx[...] = 1e6
    _C.input_transform_adjoint(dv, bt, pt, pl, th, tw, dx)
    np.testing.assert_array_equal(dx, first)


def test_module_attributes() -> None:
    assert isinstance(_C.openmp, bool)
    assert _C.max_threads() >= 1
    for name in ALL:
        assert callable(getattr(_C, name))
    from lightning_winoprune.deploy import Activation

    # one table of activations: the extension's codes are the Python enum's order
    assert tuple(_C.activation_names) == tuple(a.value for a in Activation)
    assert [a.code for a in Activation] == list(range(len(_C.activation_names)))


@pytest.mark.skipif(shutil.which("objdump") is None or platform.machine() not in ("x86_64", "AMD64"),
                    reason="needs binutils' objdump on x86-64")
def test_extension_is_portable_baseline_x86_64():
    """No AVX code outside the runtime-dispatched ISA namespaces, so the module loads on any x86-64 CPU."""
    import re

    import lightning_winoprune.kernels._C as ext

    dis = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", ext.__file__], capture_output=True, text=True,
                         check=True).stdout
    current, dispatched, leaked = "?", set(), set()
    for line in dis.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            current = header.group(1)
        elif "ymm" in line or "zmm" in line:
            (dispatched if re.search(r"isa_avx(2|512)::", current) else leaked).add(current)
    assert not leaked, f"AVX instructions outside the dispatched namespaces (was -march added?): {sorted(leaked)[:5]}"
    assert any("isa_avx512::" in f for f in dispatched) and any("isa_avx2::" in f for f in dispatched), (
        "the AVX2 / AVX-512 kernels were not found: is the symbol table stripped?")
