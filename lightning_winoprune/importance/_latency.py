"""Per-layer latency of pruning candidates: the :class:`LatencyTable` protocol and two tables.

A latency table answers "how long does layer ``name`` take under candidate ``c``", in seconds. The budgeted policy
choice (:func:`~lightning_winoprune.importance.choose_under_budget`) only needs that question answered, so where the
numbers come from is pluggable:

* :class:`TorchLatencyTable` times, with torch ops in this process, the pruned BGEMM step each candidate leaves
  (one batched GEMM for balanced candidates, ``p*p`` GEMMs otherwise).
* :class:`DictLatencyTable` wraps numbers measured elsewhere: by the user, or by the native sparse kernels (the
  planned ``LatencyValidation`` report). This is the extension point: any object with a matching ``latency``
  method is a :class:`LatencyTable` too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lightning_winoprune._utils import median_ms
from lightning_winoprune.deploy import PackedWinogradConv
from lightning_winoprune.importance._sensitivity import Candidate
from lightning_winoprune.pruning._engine import Block, Score
from lightning_winoprune.pruning._methods import winograd_view
from lightning_winoprune.winograd._layer import WinogradConv2d
from lightning_winoprune.winograd._tiles import tile_geometry

__all__ = ["DictLatencyTable", "LatencyTable", "NativeLatencyTable", "TorchLatencyTable"]


@runtime_checkable
class LatencyTable(Protocol):
    """Anything that gives the latency of one layer under one candidate."""

    def latency(self, name: str, candidate: Candidate) -> float:
        """Seconds layer ``name`` takes under ``candidate`` (non-negative).

        Raises:
            KeyError: If the table does not know the layer or the candidate.

        """
        ...


def _unknown_layer(name: str, known: object) -> KeyError:
    return KeyError(f"unknown layer {name!r}; known layers: {known}")


class DictLatencyTable:
    """A latency table from given numbers, ``{(layer name, candidate): seconds}``.

    Use it for latencies measured elsewhere: by hand, by another tool, or by the native kernels' ``LatencyValidation``
    report. It is also a cache of a :class:`TorchLatencyTable`:
    ``DictLatencyTable({(n, c): torch_table.latency(n, c) for n, cs in candidates.items() for c in cs})``.

    Args:
        table: ``(name, candidate) -> seconds``; every value finite and non-negative.

    Raises:
        ValueError: If a latency is negative or not finite.
        TypeError: If a key is not a ``(str, Candidate)`` pair.

    """

    def __init__(self, table: Mapping[tuple[str, Candidate], float]) -> None:
        self._table: dict[str, dict[Candidate, float]] = {}
        for key, value in table.items():
            if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str)
                    and isinstance(key[1], Candidate)):
                raise TypeError(f"keys must be (layer name, Candidate) pairs, got {key!r}")
            seconds = float(value)
            if not math.isfinite(seconds) or seconds < 0:
                raise ValueError(f"latency of {key[0]!r} / {key[1].label} must be finite and >= 0, got {value!r}")
            self._table.setdefault(key[0], {})[key[1]] = seconds

    @property
    def names(self) -> list[str]:
        """The layers the table knows."""
        return list(self._table)

    def latency(self, name: str, candidate: Candidate) -> float:
        """Seconds layer ``name`` takes under ``candidate``.

        Raises:
            KeyError: If the layer or the candidate is not in the table (the message lists the known ones).

        """
        if name not in self._table:
            raise _unknown_layer(name, self.names)
        row = self._table[name]
        if candidate not in row:
            raise KeyError(f"no latency for layer {name!r} under {candidate!r}; known: {[c.label for c in row]}")
        return row[candidate]


def _median_seconds(fn: Callable[[], object], reps: int, warmup: int, sync: Callable[[], None]) -> float:
    return median_ms({"fn": fn}, reps, warmup, sync=sync)["fn"] / 1e3


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class TorchLatencyTable:
    """Latencies timed with torch ops in this process: the pruned BGEMM step of each candidate.

    For a Winograd layer with ``K`` outputs, ``C`` inputs, tile ``p`` and ``T = batch_size * tiles`` input tiles,
    the BGEMM step is ``p*p`` products ``U[xi] (K x C) @ V[xi] (C x T)``. A candidate's representative mask
    (:meth:`Candidate.keep_mask` of the layer's weight when first asked: the pattern's own score, so the mask the
    callback applies; ``score="importance"`` patterns rank with the layer's ``importance`` when given, by L2
    otherwise) leaves each matrix ``xi`` a ``rows_xi x cols_xi`` dense-equivalent GEMM (see
    :meth:`gemm_shapes`), and what is timed is:

    * ``"dense"``: one ``torch.bmm`` ``(p*p, K, C) @ (p*p, C, T)``;
    * balanced candidates (:attr:`Candidate.balanced`: ``"bwsp"``, ``position``-scoped patterns, filter pruning):
      one ``torch.bmm`` ``(p*p, rows, cols) @ (p*p, cols, T)`` with the largest per-matrix shape;
    * unbalanced ones (``"wsp"``, ...): ``p*p`` separate ``torch.mm``, each with its own matrix's shape.

    Each latency is the median of ``reps`` timings after ``warmup`` untimed runs, with preallocated outputs, on the
    layer's device (synchronised on CUDA), with ``num_threads`` CPU threads; results are cached per
    ``(name, candidate)`` (:meth:`clear` empties the cache). Operands are drawn from a private generator, so the
    global RNG is untouched. This models the GEMM work only (no transforms), which is what pruning changes.

    Args:
        layers: Name -> :class:`~lightning_winoprune.winograd.WinogradConv2d`.
        input_sizes: Name -> ``(H, W)`` of that layer's input (every layer needs one).
        batch_size: Images per batch, ``N`` in ``T = N * tiles``.
        reps: Timed runs per latency.
        warmup: Untimed runs before them.
        num_threads: CPU threads while timing (torch's thread count is set for the measurement and restored);
            ``None`` uses the current one. On a loaded machine, multi-threaded timings of small GEMMs are dominated
            by threads waiting for a core; ``1`` is far more repeatable there.
        importance: Name -> per-element saliency of the layer's weight, for ``score="importance"`` patterns (the
            callback passes its Taylor saliency, so the table times the masks it applies).

    Raises:
        KeyError: If a layer has no input size.
        TypeError: If a layer is not a :class:`~lightning_winoprune.winograd.WinogradConv2d`.
        ValueError: On an empty ``layers``, a bad size, ``batch_size``, ``reps`` or ``warmup``.

    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        input_sizes: Mapping[str, tuple[int, int]],
        batch_size: int = 1,
        reps: int = 20,
        warmup: int = 3,
        num_threads: int | None = None,
        importance: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if not layers:
            raise ValueError("layers is empty: pass at least one {name: WinogradConv2d}")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.reps = _check_int("reps", reps, 1)
        self.warmup = _check_int("warmup", warmup, 0)
        self.num_threads = None if num_threads is None else _check_int("num_threads", num_threads, 1)
        missing = [name for name in layers if name not in input_sizes]
        if missing:
            raise KeyError(f"input_sizes has no (H, W) for layers {missing}")
        self._layers: dict[str, WinogradConv2d] = {}
        self._tiles: dict[str, int] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        for name, layer in layers.items():
            if not isinstance(layer, WinogradConv2d):
                raise TypeError(f"layer {name!r} must be a WinogradConv2d, got {type(layer).__name__}")
            size = tuple(input_sizes[name])
            if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
                raise ValueError(f"input size of layer {name!r} must be a pair of positive ints, got {size!r}")
            th, tw = tile_geometry(size[0], size[1], layer.padding, layer.m).tiles
            self._layers[name] = layer
            self._tiles[name] = th * tw
            self._sizes[name] = (int(size[0]), int(size[1]))
        self._cache: dict[tuple[str, Candidate], float] = {}
        self._importance = dict(importance or {})

    @property
    def names(self) -> list[str]:
        """The layers the table knows."""
        return list(self._layers)

    def _layer(self, name: str) -> WinogradConv2d:
        if name not in self._layers:
            raise _unknown_layer(name, self.names)
        return self._layers[name]

    def tiles(self, name: str) -> int:
        """``T``: input tiles of one batch for layer ``name`` (``batch_size * th * tw``)."""
        self._layer(name)
        return self.batch_size * self._tiles[name]

    def gemm_shapes(self, name: str, candidate: Candidate) -> list[tuple[int, int]]:
        """Dense-equivalent ``(rows, cols)`` of every matrix ``U[xi]`` under ``candidate``'s representative mask.

        Row-wise blocks (``row``, ``row_segment``, ``filter``) keep ``C`` columns and ``ceil(kept / C)`` rows,
        column-wise ones (``column``, ``column_segment``) ``K`` rows and ``ceil(kept / K)`` columns, where ``kept``
        is the matrix's kept-entry count (exact for whole rows and columns; for segments, the rows of equal work).
        Element pruning only shrinks a matrix by the rows and columns it empties completely.

        Raises:
            KeyError: If the layer is unknown.

        """
        layer = self._layer(name)
        k, c, p = layer.out_channels, layer.in_channels, layer.p
        pattern = candidate.pattern
        if pattern is None:
            return [(k, c)] * (p * p)
        view = winograd_view(self.keep_mask(name, candidate)).cpu()  # (p*p, K, C)
        kept = view.sum(dim=(1, 2)).tolist()
        if pattern.block in (Block.ROW, Block.ROW_SEGMENT, Block.FILTER):
            return [(-(-int(n) // c), c) for n in kept]
        if pattern.block in (Block.COLUMN, Block.COLUMN_SEGMENT):
            return [(k, -(-int(n) // k)) for n in kept]
        rows = view.any(dim=2).sum(dim=1).tolist()
        cols = view.any(dim=1).sum(dim=1).tolist()
        return [(int(r), int(q)) for r, q in zip(rows, cols, strict=True)]

    def keep_mask(self, name: str, candidate: Candidate) -> torch.Tensor:
        """The representative keep-mask of ``candidate`` on layer ``name``'s weight (all ones for dense).

        :meth:`Candidate.keep_mask` with the layer's ``importance`` (``score="importance"`` patterns without one
        rank by L2).

        Raises:
            KeyError: If the layer is unknown.

        """
        layer = self._layer(name)
        weight = layer.weight.detach()
        pattern = candidate.pattern
        if pattern is None:
            return torch.ones_like(weight, dtype=torch.bool)
        importance = self._importance.get(name)
        if pattern.score is Score.IMPORTANCE and importance is None:
            candidate = Candidate(candidate.policy, candidate.amount, pattern.with_(score=Score.L2))
        mask = candidate.keep_mask(weight, importance if pattern.score is Score.IMPORTANCE else None)
        assert mask is not None
        return mask

    def latency(self, name: str, candidate: Candidate) -> float:
        """Median seconds of layer ``name``'s BGEMM step under ``candidate`` (cached).

        Raises:
            KeyError: If the layer is unknown (the message lists the known ones).

        """
        key = (name, candidate)
        if key not in self._cache:
            previous = torch.get_num_threads()
            if self.num_threads is not None:
                torch.set_num_threads(self.num_threads)
            try:
                self._cache[key] = self._measure(name, candidate)
            finally:
                if self.num_threads is not None:
                    torch.set_num_threads(previous)
        return self._cache[key]

    def clear(self) -> None:
        """Forget every cached latency (e.g. after the weights changed enough to move unbalanced masks)."""
        self._cache.clear()

    def _measure(self, name: str, candidate: Candidate) -> float:
        layer = self._layer(name)
        shapes = self.gemm_shapes(name, candidate)
        t = self.tiles(name)
        device = layer.weight.device
        gen = torch.Generator(device=device).manual_seed(0)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

        fn: Callable[[], object]
        with torch.no_grad():
            if candidate.balanced:
                rows = max(r for r, _ in shapes)
                cols = max(q for _, q in shapes)
                a, b = rand(len(shapes), rows, cols), rand(len(shapes), cols, t)
                out = torch.empty(len(shapes), rows, t, device=device, dtype=torch.float32)
                fn = lambda: torch.bmm(a, b, out=out)  # noqa: E731
            else:
                gemms = [(rand(r, q), rand(q, t), torch.empty(r, t, device=device, dtype=torch.float32))
                         for r, q in shapes if r > 0 and q > 0]

                def run_mms() -> None:
                    for a_i, b_i, out_i in gemms:
                        torch.mm(a_i, b_i, out=out_i)

                fn = run_mms
            return _median_seconds(fn, self.reps, self.warmup, sync)


class NativeLatencyTable(TorchLatencyTable):
    """Latencies of the whole pruned layer on the native CPU kernels: what the model will really run.

    Each candidate's representative mask (as for :class:`TorchLatencyTable`) is packed into a
    :class:`~lightning_winoprune.deploy.PackedWinogradConv` and the full layer (input transform, the compacted
    GEMMs, output transform) is timed on a random ``(batch_size, C, H, W)`` input, so transforms and panel
    padding count too. Same arguments and caching as :class:`TorchLatencyTable`; ``num_threads`` is also the
    kernels' thread count.

    Raises:
        RuntimeError: At the first measurement, if the native extension is unavailable.

    """

    def _measure(self, name: str, candidate: Candidate) -> float:
        layer = self._layer(name)
        weight = layer.weight.detach().float().cpu()
        mask = None if candidate.pattern is None else self.keep_mask(name, candidate).cpu()
        bias = None if layer.bias is None else layer.bias.detach().float().cpu()
        packed = PackedWinogradConv(weight, mask, layer.m, layer.padding, bias, backend="native",
                                    threads=self.num_threads or -1)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(self.batch_size, layer.in_channels, *self._sizes[name], generator=gen)
        with torch.no_grad():
            return _median_seconds(lambda: packed(x), self.reps, self.warmup, lambda: None)
