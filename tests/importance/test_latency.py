"""``TorchLatencyTable`` (shapes, timings, cache, threads, errors), ``NativeLatencyTable`` and ``DictLatencyTable``."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_winoprune import WinogradConv2d
from lightning_winoprune.deploy import PackedWinogradConv
from lightning_winoprune.importance import (
    DENSE,
    Candidate,
    DictLatencyTable,
    LatencyTable,
    NativeLatencyTable,
    TorchLatencyTable,
)
from lightning_winoprune.kernels import _backend, native_available
from lightning_winoprune.pruning import Score, method_pattern, winograd_mask

BWSP = method_pattern("bwsp")
WSP = method_pattern("wsp-r")
needs_ext = pytest.mark.skipif(not native_available(), reason="the native extension is not loaded")


def small_table(layers: dict[str, WinogradConv2d] | None = None, **kwargs: object) -> TorchLatencyTable:
    layers = layers or {"a": WinogradConv2d(8, 16), "b": WinogradConv2d(16, 8, m=4)}
    return TorchLatencyTable(layers, {"a": (8, 8), "b": (8, 8)}, **{"batch_size": 2, "reps": 3, "warmup": 1, **kwargs})


def test_tiles_and_gemm_shapes():
    layers = {"a": WinogradConv2d(8, 16), "b": WinogradConv2d(16, 8, m=4)}
    table = small_table(layers)
    assert table.names == ["a", "b"]
    assert table.tiles("a") == 2 * 4 * 4 and table.tiles("b") == 2 * 2 * 2  # 8x8 output in 2x2 / 4x4 tiles
    assert table.gemm_shapes("a", DENSE) == [(16, 8)] * 16
    assert table.gemm_shapes("b", DENSE) == [(8, 16)] * 36
    assert table.gemm_shapes("a", Candidate("bwsp", 0.5, BWSP)) == [(8, 8)] * 16
    assert table.gemm_shapes("a", Candidate("bwsp", 0.9, BWSP)) == [(2, 8)] * 16  # round(0.9 * 16) = 14 pruned
    cols = table.gemm_shapes("a", Candidate("wsp-c", 0.5, method_pattern("wsp-c", unit=1).with_(scope="position")))
    assert cols == [(16, 4)] * 16
    unbalanced = table.gemm_shapes("a", Candidate("wsp", 0.5, WSP))
    assert sum(r for r, _ in unbalanced) == 16 * 8 and all(c == 8 for _, c in unbalanced)
    assert len({r for r, _ in unbalanced}) > 1  # rows kept differ between Winograd positions
    # row segments: the rows of equal work, ceil(kept / C)
    seg = table.gemm_shapes("b", Candidate("wsp", 0.5, method_pattern("abwsp", "wsp", unit=4, align=1)))
    _, result = winograd_mask(layers["b"].weight, 0.5, method_pattern("abwsp", "wsp", unit=4, align=1))
    assert seg == [(-(-int(k) // 16), 16) for k in result.mask.sum(dim=(1, 2))]
    assert table.gemm_shapes("b", Candidate("fp", 0.5, method_pattern("fp"))) == [(4, 16)] * 36


def test_timed_ops_follow_the_balance(monkeypatch):
    table = small_table()  # reps=3, warmup=1
    calls = {"bmm": 0, "mm": 0}
    for op in calls:
        original = getattr(torch, op)

        def counting(*args: object, _op: str = op, _original: object = original, **kwargs: object) -> object:
            calls[_op] += 1
            return _original(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(torch, op, counting)
    table.latency("a", DENSE)
    table.latency("a", Candidate("bwsp", 0.5, BWSP))
    assert calls == {"bmm": 8, "mm": 0}
    wsp = Candidate("wsp", 0.5, WSP)
    nonempty = sum(1 for r, c in table.gemm_shapes("a", wsp) if r and c)
    table.latency("a", wsp)
    assert calls == {"bmm": 8, "mm": 4 * nonempty} and 0 < nonempty <= 16


def test_latencies_positive_cached_and_cleared(monkeypatch):
    table = small_table()
    cands = [DENSE, Candidate("bwsp", 0.5, BWSP), Candidate("wsp", 0.5, WSP), Candidate("wsp", 1.0, WSP)]
    first = {c: table.latency("a", c) for c in cands}
    assert all(isinstance(v, float) and v > 0 and math.isfinite(v) for v in first.values())

    def no_measure(name: str, candidate: Candidate) -> float:
        raise AssertionError("measured again instead of using the cache")

    monkeypatch.setattr(table, "_measure", no_measure)
    assert {c: table.latency("a", c) for c in cands} == first
    table.clear()
    with pytest.raises(AssertionError, match="measured again"):
        table.latency("a", DENSE)


def test_rng_and_thread_count_untouched():
    threads = torch.get_num_threads()
    table = small_table(num_threads=1)
    state = torch.get_rng_state()
    table.latency("b", Candidate("wsp", 0.7, WSP))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads


def test_balanced_pruning_times_a_tenth_of_the_dense_work(monkeypatch):
    # What is timed, not how fast it ran: wall-clock ratios belong to the benchmarks (benchmarks/), where a loaded
    # CI machine cannot fail them for the wrong reason.
    layer = WinogradConv2d(128, 128)
    table = TorchLatencyTable({"conv": layer}, {"conv": (8, 8)}, batch_size=8, reps=2, warmup=0, num_threads=1)
    bwsp90 = Candidate("bwsp", 0.9, BWSP)  # round(0.9 * 128) = 115 of 128 rows pruned in every position
    assert table.gemm_shapes("conv", DENSE) == [(128, 128)] * 16
    assert table.gemm_shapes("conv", bwsp90) == [(13, 128)] * 16

    def work(shapes: list[tuple[int, int]]) -> int:
        return sum(r * c for r, c in shapes) * table.tiles("conv")

    assert work(table.gemm_shapes("conv", bwsp90)) / work(table.gemm_shapes("conv", DENSE)) == pytest.approx(13 / 128)
    timed: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    original = torch.bmm

    def spy(a: torch.Tensor, b: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        timed.append((tuple(a.shape), tuple(b.shape)))
        return original(a, b, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "bmm", spy)
    latencies = [table.latency("conv", DENSE), table.latency("conv", bwsp90)]
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in latencies)
    tiles = table.tiles("conv")
    assert dict.fromkeys(timed) == {((16, 128, 128), (16, 128, tiles)): None, ((16, 13, 128), (16, 128, tiles)): None}


def test_torch_table_errors():
    table = small_table()
    with pytest.raises(KeyError, match=r"unknown layer 'zz'; known layers: \['a', 'b'\]"):
        table.latency("zz", DENSE)
    with pytest.raises(KeyError, match="known layers"):
        table.gemm_shapes("zz", DENSE)
    layer = WinogradConv2d(4, 4)
    with pytest.raises(KeyError, match=r"no \(H, W\) for layers \['x'\]"):
        TorchLatencyTable({"x": layer}, {})
    with pytest.raises(ValueError, match="layers is empty"):
        TorchLatencyTable({}, {})
    with pytest.raises(TypeError, match="WinogradConv2d"):
        TorchLatencyTable({"x": torch.nn.Conv2d(4, 4, 3)}, {"x": (4, 4)})
    for kwargs in ({"batch_size": 0}, {"reps": 0}, {"warmup": -1}, {"num_threads": 0}, {"reps": 2.5}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            TorchLatencyTable({"x": layer}, {"x": (4, 4)}, **kwargs)  # type: ignore[arg-type]
    for size in ((4,), (0, 4), (4.0, 4)):
        with pytest.raises(ValueError, match="input size"):
            TorchLatencyTable({"x": layer}, {"x": size})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        TorchLatencyTable({"x": WinogradConv2d(4, 4, padding=0)}, {"x": (2, 2)})


def test_dict_table():
    bwsp = Candidate("bwsp", 0.5, BWSP)
    table = DictLatencyTable({("a", DENSE): 2.0, ("a", bwsp): 1, ("b", DENSE): 0.0})
    assert table.latency("a", DENSE) == 2.0 and table.latency("a", bwsp) == 1.0 and table.latency("b", DENSE) == 0.0
    assert table.names == ["a", "b"]
    assert isinstance(table, LatencyTable) and isinstance(small_table(), LatencyTable)
    with pytest.raises(KeyError, match=r"unknown layer 'c'; known layers: \['a', 'b'\]"):
        table.latency("c", DENSE)
    with pytest.raises(KeyError, match=r"layer 'b'.*known: \['dense'\]"):
        table.latency("b", bwsp)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite and >= 0"):
            DictLatencyTable({("a", DENSE): bad})
    with pytest.raises(TypeError, match="pairs"):
        DictLatencyTable({("a", "dense"): 1.0})  # type: ignore[dict-item]


# ------------------------------------------------------------------------------------------- NativeLatencyTable
@needs_ext
def test_native_table_times_the_whole_pruned_layer(monkeypatch):
    layer = WinogradConv2d(64, 64)
    table = NativeLatencyTable({"conv": layer}, {"conv": (16, 16)}, batch_size=4, reps=9, warmup=1, num_threads=1)
    assert isinstance(table, LatencyTable) and table.names == ["conv"]
    calls: list[tuple[PackedWinogradConv, tuple[int, ...]]] = []
    original = PackedWinogradConv.__call__

    def spy(self: PackedWinogradConv, x: torch.Tensor) -> torch.Tensor:
        calls.append((self, tuple(x.shape)))
        return original(self, x)

    monkeypatch.setattr(PackedWinogradConv, "__call__", spy)
    threads, state = torch.get_num_threads(), torch.get_rng_state()
    dense = table.latency("conv", DENSE)
    bwsp90 = table.latency("conv", Candidate("bwsp", 0.9, BWSP))  # ~6 of 64 rows: transforms remain
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), state)
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in (dense, bwsp90))
    # the whole layer on the native kernels: reps + warmup calls of one packed conv per candidate, on a full batch
    assert len(calls) == 2 * 10 and {shape for _, shape in calls} == {(4, 64, 16, 16)}
    packs = list(dict.fromkeys(p for p, _ in calls))
    assert len(packs) == 2 and all(p.backend.value == "native" and p.threads == 1 for p in packs)
    assert packs[0].kept_fraction == 1.0 and packs[1].kept_fraction == pytest.approx(
        1 - winograd_mask(layer.weight.detach(), 0.9, BWSP)[1].sparsity)
    # the work, not the wall clock (speed lives in benchmarks/): the pruned layer multiplies a tenth of the weights
    assert packs[1].kept_fraction == pytest.approx(6 / 64)
    # cached: nothing runs again
    assert table.latency("conv", DENSE) == dense and len(calls) == 20
    # importance-scored patterns are ranked by L2, unbalanced ones run too
    imp = table.latency("conv", Candidate("bwsp", 0.5, BWSP.with_(score=Score.IMPORTANCE)))
    wsp = table.latency("conv", Candidate("wsp", 0.5, WSP))
    assert imp > 0 and wsp > 0 and len(calls) == 40


def test_native_table_without_the_extension_fails_at_the_first_measurement(monkeypatch):
    monkeypatch.setattr(_backend, "_probe", lambda: (None, "disabled by the test"))
    table = NativeLatencyTable({"conv": WinogradConv2d(4, 4)}, {"conv": (4, 4)}, reps=1, warmup=0)
    with pytest.raises(RuntimeError, match=r"backend='native' was requested(?s:.*)disabled by the test"):
        table.latency("conv", DENSE)


def test_native_table_argument_errors_are_the_torch_tables():
    layer = WinogradConv2d(4, 4)
    with pytest.raises(ValueError, match="reps"):
        NativeLatencyTable({"x": layer}, {"x": (4, 4)}, reps=0)
    with pytest.raises(TypeError, match="WinogradConv2d"):
        NativeLatencyTable({"x": torch.nn.Conv2d(4, 4, 3)}, {"x": (4, 4)})
    with pytest.raises(KeyError, match="known layers"):
        NativeLatencyTable({"x": layer}, {"x": (4, 4)}).latency("zz", DENSE)
