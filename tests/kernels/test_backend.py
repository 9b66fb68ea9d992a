"""Backend parsing and resolution, and the WINOPRUNE_DISABLE_EXT fallback (in a subprocess: the probe is cached)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lightning_winoprune
from lightning_winoprune.kernels import (
    DISABLE_ENV_VAR,
    Backend,
    _backend,
    extension_status,
    native_available,
    resolve_backend,
)

needs_native = pytest.mark.skipif(not native_available(), reason="the native extension is not loaded")


def test_backend_enum() -> None:
    assert [b.value for b in Backend] == ["auto", "native", "torch"]
    assert Backend.parse("native") is Backend.NATIVE
    assert Backend.parse(Backend.TORCH) is Backend.TORCH
    assert Backend.AUTO == "auto"  # str enum
    assert lightning_winoprune.Backend is Backend


@pytest.mark.parametrize("bad", ["bad", "NATIVE", "", "cuda"])
def test_backend_parse_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match=r"backend=.* is not valid; valid values are \['auto', 'native', 'torch'\]"):
        Backend.parse(bad)
    with pytest.raises(ValueError, match="valid values"):
        resolve_backend(bad, torch.zeros(1))


def test_resolve_torch_always_torch() -> None:
    assert resolve_backend("torch", torch.zeros(2)) is Backend.TORCH
    assert resolve_backend(Backend.TORCH, torch.zeros(2, dtype=torch.float64)) is Backend.TORCH
    assert resolve_backend("torch", torch.zeros(2, dtype=torch.int64)) is Backend.TORCH


def test_resolve_auto_falls_back_for_non_float32() -> None:
    assert resolve_backend("auto", torch.zeros(2, dtype=torch.float64)) is Backend.TORCH
    assert resolve_backend("auto", torch.zeros(2, dtype=torch.bfloat16)) is Backend.TORCH
    assert resolve_backend("auto", torch.zeros(2), torch.zeros(2, dtype=torch.float64)) is Backend.TORCH


@needs_native
def test_resolve_with_extension_loaded() -> None:
    assert resolve_backend("auto", torch.zeros(2, 3)) is Backend.NATIVE
    assert resolve_backend("auto", torch.zeros(2), torch.zeros(3)) is Backend.NATIVE
    assert resolve_backend("native", torch.zeros(2)) is Backend.NATIVE
    with pytest.raises(ValueError, match=r"backend='native' needs CPU float32 tensors, got \['cpu/torch.float64'\]"):
        resolve_backend("native", torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="CPU float32"):
        resolve_backend("native", torch.zeros(2), torch.zeros(2, dtype=torch.float16))
    assert extension_status().startswith("loaded from ")
    assert "OpenMP" in extension_status()
    assert _backend.native_module() is _backend._probe()[0]


def test_status_and_availability_are_consistent() -> None:
    assert native_available() == (_backend._probe()[0] is not None)
    assert isinstance(extension_status(), str) and extension_status()
    assert lightning_winoprune.native_available is native_available


def test_disable_env_var_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe honours the env var; the cache is cleared before and after so other tests see the real state."""
    monkeypatch.setenv(DISABLE_ENV_VAR, "1")
    monkeypatch.setattr(_backend, "_warned", False)
    _backend._probe.cache_clear()
    try:
        assert not native_available()
        assert extension_status() == f"disabled by {DISABLE_ENV_VAR}=1"
        with pytest.raises(RuntimeError, match="extension is unavailable: disabled by"):
            resolve_backend("native", torch.zeros(1))
        with pytest.warns(RuntimeWarning, match="native kernels are unavailable") as rec:
            assert resolve_backend("auto", torch.zeros(1)) is Backend.TORCH
            assert resolve_backend("auto", torch.zeros(1)) is Backend.TORCH
        assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    finally:
        _backend._probe.cache_clear()


_SCRIPT = textwrap.dedent(
    """
    import json, warnings
    import torch
    import torch.nn.functional as F
    from torch import nn

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        import lightning_winoprune as lw
        from lightning_winoprune.kernels import Backend, native_available, resolve_backend
        from lightning_winoprune.winograd import input_transform, tile_geometry

        out = {"available": native_available(), "status": lw.extension_status()}
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 4, 3, padding=1)
        x = torch.randn(2, 3, 9, 7, requires_grad=True)
        ref = conv(x)
        errs = []
        for call in range(2):
            for route in ("bgemm", "auto"):
                layer = lw.WinogradConv2d.from_conv(conv, m=2, route=route)
                y = layer(x)
                errs.append(((y - ref).abs().max() / ref.abs().max()).item())
                y.sum().backward()
        out["errs"] = errs
        out["resolved"] = resolve_backend("auto", torch.zeros(1)).value
        geom = tile_geometry(9, 7, (1, 1), 2)
        v = input_transform(x.detach(), 2, geom)
        out["v_shape"] = list(v.shape)
        try:
            resolve_backend("native", torch.zeros(1))
            out["native_error"] = None
        except RuntimeError as err:
            out["native_error"] = str(err)
    out["runtime_warnings"] = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    print("RESULT" + json.dumps(out))
    """
)


def _run(env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop(DISABLE_ENV_VAR, None)
    if env_value is not None:
        env[DISABLE_ENV_VAR] = env_value
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_disable_env_var_subprocess() -> None:
    out = _run("1")
    assert out["available"] is False
    assert out["status"] == f"disabled by {DISABLE_ENV_VAR}=1"
    assert out["resolved"] == "torch"
    assert len(out["errs"]) == 4 and max(out["errs"]) <= 1e-5
    assert out["v_shape"] == [16, 3, 2 * 5 * 4]
    assert out["native_error"] is not None and "disabled by" in out["native_error"]
    # exactly one RuntimeWarning, however many ops fell back
    assert len(out["runtime_warnings"]) == 1, out["runtime_warnings"]
    assert "native kernels are unavailable" in out["runtime_warnings"][0]
    assert "Falling back to the slower torch path" in out["runtime_warnings"][0]


@needs_native
def test_env_var_off_values_keep_native_subprocess() -> None:
    out = _run("0")
    assert out["available"] is True
    assert out["resolved"] == "native"
    assert max(out["errs"]) <= 1e-5
    assert out["native_error"] is None
    assert out["runtime_warnings"] == []
