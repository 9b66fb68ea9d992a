"""What :func:`~lightning_winoprune.deploy.deploy` did: a :class:`LayerRoute` per layer, the :class:`DeployReport`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from lightning_winoprune.deploy._routes import DeployRoute

__all__ = ["DeployMismatchError", "DeployReport", "LayerRoute"]


class DeployMismatchError(RuntimeError):
    """The deployed model's output differs from the model's by more than the tolerance."""


@dataclass
class LayerRoute:
    """How one conv of the deployed model runs, and what every candidate route measured.

    Attributes:
        name: Module name of the conv in the model.
        kind: ``"winograd"`` (a :class:`~lightning_winoprune.winograd.WinogradConv2d`), ``"depthwise"`` (a
            DEPrune-masked depthwise conv), ``"conv"`` (any other conv) or ``"pool"`` (an ``nn.MaxPool2d``, on the
            native pooling kernel where that is faster).
        shape: ``"C->K HxW"`` of its input, with the kernel and stride.
        route: The chosen route.
        folded: The BatchNorm folded into it, or ``""``.
        act: The activation fused into it.
        times_ms: Median ms of every candidate that was timed (empty with ``tune=False``).
        errors: Relative max error of every candidate against the layer's recorded output.
        dense_ms: Median ms of the layer's dense route (oneDNN or ``F.conv2d`` with the same shape and activation),
            the reference of ``speedup``; ``None`` when not timed.
        note: Why a candidate was left out or a fallback happened.

    """

    name: str
    kind: str
    shape: str
    route: DeployRoute
    folded: str = ""
    act: str = "none"
    times_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    dense_ms: float | None = None
    note: str = ""

    @property
    def ms(self) -> float | None:
        """Median ms of the chosen route, when timed."""
        return self.times_ms.get(self.route)

    @property
    def speedup(self) -> float | None:
        """Dense route / chosen route."""
        if self.ms is None or self.dense_ms is None or self.ms <= 0:
            return None
        return self.dense_ms / self.ms


@dataclass
class DeployReport:
    """What :func:`deploy` did: one :class:`LayerRoute` per conv, and the whole-model check and times.

    Attributes:
        layers: One row per conv, in forward order.
        batch_size: The example input's batch size.
        input_size: Its ``(H, W)``.
        threads: CPU threads used for timing.
        tuned: Whether routes were chosen by measurement.
        max_error: Relative max error of the deployed model's output against the model's.
        tolerance: The allowed error.
        model_ms: Median ms of the deployed model (``None`` unless timed).
        original_ms: Median ms of the model as given, on torch eager (``None`` unless timed).
        notes: Fallbacks and warnings, one line each.
        precision: ``"fp32"``, or ``"bf16"`` when bfloat16 routes were allowed (bfloat16 is a different precision:
            ``max_error`` and ``top1_agreement`` say how far the deployed model's output moved).
        top1_agreement: Fraction of the example batch whose arg-max class the deployed model keeps, for a model
            with ``(N, classes)`` outputs (``None`` otherwise).

    """

    layers: list[LayerRoute]
    batch_size: int
    input_size: tuple[int, int]
    threads: int
    tuned: bool
    max_error: float
    tolerance: float
    model_ms: float | None = None
    original_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    precision: str = "fp32"
    top1_agreement: float | None = None

    @property
    def routes(self) -> dict[str, str]:
        """Layer name -> chosen route."""
        return {r.name: r.route for r in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {**{k: v for k, v in asdict(self).items() if k != "layers"},
                "layers": [{**asdict(r), "ms": r.ms, "speedup": r.speedup} for r in self.layers]}

    def table(self) -> Table:
        """The routes as a rich table."""
        title = (f"Deployed routes (batch {self.batch_size}, {self.input_size[0]}x{self.input_size[1]}, "
                 f"{self.threads} threads{', tuned' if self.tuned else ''}, precision {self.precision})")
        t = Table(title=title, title_style="bold")
        for col in ("layer", "shape", "fused", "route", "ms", "dense ms", "speedup", "candidates (ms)"):
            t.add_column(col, justify="left" if col in ("layer", "shape", "fused", "route", "candidates (ms)")
                         else "right")
        for r in self.layers:
            fused = "+".join(x for x in (r.folded and "bn", "" if r.act == "none" else r.act) if x)
            cands = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r.times_ms.items(), key=lambda kv: kv[1]))
            t.add_row(r.name, r.shape, fused, r.route, "-" if r.ms is None else f"{r.ms:.3f}",
                      "-" if r.dense_ms is None else f"{r.dense_ms:.3f}",
                      "-" if r.speedup is None else f"{r.speedup:.2f}x", cands)
        t.add_section()
        whole = "-"
        if self.model_ms is not None and self.original_ms is not None:
            whole = f"{self.original_ms / self.model_ms:.2f}x"
        t.add_row("whole model", "as given (eager) / deployed", "", "",
                  "-" if self.model_ms is None else f"{self.model_ms:.3f}",
                  "-" if self.original_ms is None else f"{self.original_ms:.3f}", whole,
                  f"max error {self.max_error:.1e} (tolerance {self.tolerance:.0e})"
                  + ("" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.1%}"))
        return t

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        console = Console(width=160, record=True, file=None, force_terminal=False)
        with console.capture() as cap:
            console.print(self.table())
            for note in self.notes:
                console.print(f"note: {note}")
        return cap.get()
