"""The latency report: per-layer rows, a whole-model row, and its views (rich table, JSON, PNG, loggers)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from lightning_winoprune._io import atomic_write

__all__ = ["GpuLatency", "LayerLatency", "LatencyReport", "ModelLatency"]


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


@dataclass
class LayerLatency:
    """Median latencies (ms) of one pruned layer, every alternative timed side by side on the same input.

    Attributes:
        name: Module name in the model.
        kind: ``"winograd"`` (a 3x3 stride-1 conv in the Winograd domain) or ``"depthwise"`` (a DEPrune layer).
        shape: ``"C->K HxW"`` of the input, plus the Winograd tile (``F(2,3)``) or the kernel and stride.
        kept: Fraction of weights kept by the mask (Winograd-domain weights for Winograd layers).
        torch_ms: PyTorch's dense conv (``F.conv2d``), the user's alternative.
        dense_winograd_ms: Our dense Winograd kernel (``None`` for depthwise layers).
        pruned_ms: Our pruned kernel: compacted Winograd panels, or the kept-taps depthwise kernel.
        fp_equivalent_ms: A dense PyTorch conv with ``kept`` of the output filters (channels for depthwise): what
            filter pruning at the same ratio would run.
        csr_ms: The WWP baseline, the same mask as element-sparse CSR (``None`` for depthwise layers).
        max_error: Max abs difference of the pruned kernel's output from the PyTorch reference, relative to the
            reference's max abs value.
        work: Multiply-adds the pruned kernel runs relative to the dense Winograd GEMMs (``None`` for depthwise).
        balanced: Whether every Winograd position keeps the same GEMM shape.

    """

    name: str
    kind: str
    shape: str
    kept: float
    torch_ms: float
    dense_winograd_ms: float | None
    pruned_ms: float
    fp_equivalent_ms: float
    csr_ms: float | None
    max_error: float
    work: float | None = None
    balanced: bool | None = None

    @property
    def speedup(self) -> float:
        """PyTorch dense conv / our pruned kernel."""
        return self.torch_ms / self.pruned_ms

    @property
    def dense_winograd_speedup(self) -> float | None:
        """PyTorch dense conv / our dense Winograd."""
        return _ratio(self.torch_ms, self.dense_winograd_ms)

    @property
    def fp_speedup(self) -> float:
        """PyTorch dense conv / the FP-equivalent smaller conv."""
        return self.torch_ms / self.fp_equivalent_ms

    @property
    def csr_speedup(self) -> float | None:
        """PyTorch dense conv / the WWP CSR path."""
        return _ratio(self.torch_ms, self.csr_ms)


@dataclass
class ModelLatency:
    """Median latencies (ms) of the whole model.

    Attributes:
        torch_dense_ms: The model with every Winograd layer back as a dense ``nn.Conv2d`` and no masks: the dense
            PyTorch model a user would otherwise deploy.
        torch_pruned_ms: The model as trained (Winograd layers on their PyTorch path).
        native_ms: The deployed pruned model (:func:`~lightning_winoprune.deploy`): what a user ships.
        max_error: Relative max error of the deployed model's logits against the model as trained.
        dense_deployed_ms: The dense model through the same :func:`~lightning_winoprune.deploy` pipeline (BN folded,
            fastest dense route per conv): the best dense deployment here.
        dense_bf16_ms: The dense model deployed with ``precision="bf16"`` (``None`` on CPUs without bfloat16
            kernels): the dense bfloat16 model a user could pick instead.
        native_bf16_ms: The pruned model deployed with ``precision="bf16"``.
        bf16_max_error: Relative max error of the bfloat16 pruned model's output against the model as trained.
        bf16_note: Why the bfloat16 row is missing on a CPU that has bfloat16 kernels (its deploy check refused the
            bfloat16 model), or ``""``.

    """

    torch_dense_ms: float
    torch_pruned_ms: float
    native_ms: float
    max_error: float
    dense_deployed_ms: float | None = None
    dense_bf16_ms: float | None = None
    native_bf16_ms: float | None = None
    bf16_max_error: float | None = None
    bf16_note: str = ""

    @property
    def bf16_speedup(self) -> float | None:
        """Dense bfloat16 deployment / pruned bfloat16 deployment (``None`` where bfloat16 was not measured)."""
        if self.dense_bf16_ms is None or self.native_bf16_ms is None:
            return None
        return self.dense_bf16_ms / self.native_bf16_ms

    @property
    def best_dense_ms(self) -> float:
        """The faster of the dense model on torch eager and the deployed dense model."""
        if self.dense_deployed_ms is None:
            return self.torch_dense_ms
        return min(self.torch_dense_ms, self.dense_deployed_ms)

    @property
    def speedup(self) -> float:
        """The headline: best dense deployment / deployed pruned model."""
        return self.best_dense_ms / self.native_ms

    @property
    def eager_speedup(self) -> float:
        """Dense model on torch eager / deployed pruned model."""
        return self.torch_dense_ms / self.native_ms


@dataclass
class GpuLatency:
    """GPU medians (ms) of one Winograd layer: compacted batched GEMMs via torch against cuDNN's dense conv."""

    name: str
    cudnn_ms: float
    compacted_ms: float

    @property
    def speedup(self) -> float:
        """Speedup: cuDNN time / compacted-bmm time."""
        return self.cudnn_ms / self.compacted_ms


@dataclass
class LatencyReport:
    """What :func:`~lightning_winoprune.measure_latency` measured; prints as a rich table, writes JSON and a PNG.

    Attributes:
        layers: One row per pruned layer.
        model: The whole-model row (``None`` when not measured).
        gpu: GPU rows when CUDA is available, else empty.
        batch_size: Images per timed batch.
        input_size: ``(H, W)`` of the model input.
        threads: CPU threads used by every alternative.
        isa: Instruction set the native kernels ran (``None`` on the torch fallback).
        repeats: Timed runs per median.
        environment: Versions and machine facts.
        json_path: Where :meth:`to_json` last wrote.
        png_path: Where :meth:`plot` last wrote.

    """

    layers: list[LayerLatency]
    model: ModelLatency | None
    batch_size: int
    input_size: tuple[int, int]
    threads: int
    isa: str | None
    repeats: int
    gpu: list[GpuLatency] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    json_path: Path | None = None
    png_path: Path | None = None

    # ----------------------------------------------------------------------------------------- summaries
    @property
    def layer_speedup(self) -> float | None:
        """Total PyTorch dense time of the pruned layers / their total pruned-kernel time."""
        if not self.layers:
            return None
        return sum(r.torch_ms for r in self.layers) / sum(r.pruned_ms for r in self.layers)

    def latencies(self) -> dict[str, float]:
        """Per layer, the pruned kernel's median in seconds."""
        return {r.name: r.pruned_ms / 1e3 for r in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data, speedup ratios included."""
        rows = []
        for r in self.layers:
            row = asdict(r)
            row.update(speedup=r.speedup, dense_winograd_speedup=r.dense_winograd_speedup, fp_speedup=r.fp_speedup,
                       csr_speedup=r.csr_speedup)
            rows.append(row)
        model = None
        if self.model is not None:
            model = {**asdict(self.model), "speedup": self.model.speedup, "eager_speedup": self.model.eager_speedup,
                     "best_dense_ms": self.model.best_dense_ms, "bf16_speedup": self.model.bf16_speedup}
        return {
            "batch_size": self.batch_size,
            "input_size": list(self.input_size),
            "threads": self.threads,
            "isa": self.isa,
            "repeats": self.repeats,
            "layer_speedup": self.layer_speedup,
            "layers": rows,
            "model": model,
            "gpu": [{**asdict(g), "speedup": g.speedup} for g in self.gpu],
            "environment": self.environment,
        }

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` to ``path`` (parents created); returns the path."""
        path = Path(path)
        with atomic_write(path, "w") as f:  # a run killed mid-write leaves the previous report, never half a file
            f.write(json.dumps(self.to_dict(), indent=2))
        self.json_path = path
        return path

    def table(self) -> Table:
        """The report as a rich table: medians in ms and speedups over PyTorch's dense conv."""
        title = (f"Latency (median of {self.repeats}, batch {self.batch_size}, {self.input_size[0]}x"
                 f"{self.input_size[1]}, {self.threads} threads, ISA {self.isa or 'torch fallback'})")
        t = Table(title=title, title_style="bold")
        for col in ("layer", "shape", "kept", "torch ms", "dense wino", "pruned", "FP-equiv", "WWP CSR", "speedup",
                    "err"):
            t.add_column(col, justify="left" if col in ("layer", "shape") else "right")
        for r in self.layers:
            t.add_row(
                r.name, r.shape, f"{r.kept:.2f}", _fmt_ms(r.torch_ms),
                f"{_fmt_ms(r.dense_winograd_ms)} ({_fmt_x(r.dense_winograd_speedup)})",
                _fmt_ms(r.pruned_ms), f"{_fmt_ms(r.fp_equivalent_ms)} ({_fmt_x(r.fp_speedup)})",
                f"{_fmt_ms(r.csr_ms)} ({_fmt_x(r.csr_speedup)})", f"[bold]{_fmt_x(r.speedup)}[/bold]",
                f"{r.max_error:.1e}",
            )
        if self.layers:
            t.add_section()
            t.add_row("pruned layers", "", "", _fmt_ms(sum(r.torch_ms for r in self.layers)), "",
                      _fmt_ms(sum(r.pruned_ms for r in self.layers)), "", "", f"[bold]{_fmt_x(self.layer_speedup)}",
                      "")
        if self.model is not None:
            mdl = self.model
            t.add_row("whole model", "dense eager / as trained", "", _fmt_ms(mdl.torch_dense_ms),
                      _fmt_ms(mdl.torch_pruned_ms), _fmt_ms(mdl.native_ms), "", "", _fmt_x(mdl.eager_speedup),
                      f"{mdl.max_error:.1e}")
            if mdl.dense_deployed_ms is not None:
                ratio = _fmt_x(_ratio(mdl.dense_deployed_ms, mdl.native_ms))
                t.add_row("whole model", "deployed: dense / pruned", "", _fmt_ms(mdl.dense_deployed_ms), "",
                          _fmt_ms(mdl.native_ms), "", "", f"[bold]{ratio}", "")
            if mdl.dense_bf16_ms is not None and mdl.native_bf16_ms is not None:
                t.add_row("whole model", "bfloat16: dense / pruned", "", _fmt_ms(mdl.dense_bf16_ms), "",
                          _fmt_ms(mdl.native_bf16_ms), "", "", _fmt_x(mdl.bf16_speedup),
                          "-" if mdl.bf16_max_error is None else f"{mdl.bf16_max_error:.1e}")
            elif mdl.bf16_note:
                t.add_row("whole model", "bfloat16: not deployed", "", "", "", "", "", "", "", "")
                t.caption = f"bfloat16 row: {mdl.bf16_note}"
        for g in self.gpu:
            t.add_row(f"GPU {g.name}", "cuDNN / compacted bmm", "", _fmt_ms(g.cudnn_ms), "", _fmt_ms(g.compacted_ms),
                      "", "", _fmt_x(g.speedup), "")
        return t

    def __rich__(self) -> Table:
        return self.table()

    # ----------------------------------------------------------------------------------------- plot
    def plot(self, path: str | Path) -> Path:
        """A PNG bar chart of per-layer speedups over PyTorch's dense conv (log scale, 1x marked)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = [r.name for r in self.layers] + (["whole model"] if self.model else [])
        series: dict[str, list[float | None]] = {
            "pruned (ours)": [*(r.speedup for r in self.layers), *([self.model.speedup] if self.model else [])],
            "dense Winograd (ours)": [r.dense_winograd_speedup for r in self.layers] + ([None] if self.model else []),
            "FP-equivalent conv": [r.fp_speedup for r in self.layers] + ([None] if self.model else []),
            "WWP CSR": [r.csr_speedup for r in self.layers] + ([None] if self.model else []),
        }
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names) + 3), 4.2))
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j, v in enumerate(values) if v is not None]
            ys = [v for v in values if v is not None]
            ax.bar(xs, ys, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        finite = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v) and v > 0]
        if finite:
            ax.set_ylim(min(0.5, min(finite) / 1.3), max(2.0, max(finite) * 1.3))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup over PyTorch dense conv")
        ax.set_title(f"batch {self.batch_size}, {self.input_size[0]}x{self.input_size[1]}, {self.threads} threads, "
                     f"ISA {self.isa or 'torch'}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_write(path) as f:
            fig.savefig(f, dpi=110, format="png")
        plt.close(fig)
        self.png_path = path
        return path
