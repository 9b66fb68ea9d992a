"""``winogradize``: convert every eligible convolution of a model to :class:`WinogradConv2d`, in place."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from lightning_winoprune._utils import set_submodule
from lightning_winoprune.kernels._backend import Backend
from lightning_winoprune.winograd._layer import Route, WinogradConv2d, conv_ineligibility
from lightning_winoprune.winograd._transforms import check_m

__all__ = ["LayerDecision", "WinogradizeReport", "iter_winograd_layers", "winogradize"]

Action = Literal["converted", "skipped"]


@dataclass(frozen=True)
class LayerDecision:
    """What :func:`winogradize` did with one convolution.

    Attributes:
        name: Fully-qualified module name.
        action: ``"converted"`` or ``"skipped"``.
        reason: Why it was skipped (empty when converted).
        shape: ``(out_channels, in_channels, kh, kw)`` of the original convolution.

    """

    name: str
    action: Action
    reason: str
    shape: tuple[int, ...]


@dataclass
class WinogradizeReport:
    """Per-convolution decisions of one :func:`winogradize` call, in module order."""

    m: int
    decisions: list[LayerDecision] = field(default_factory=list)

    @property
    def converted(self) -> list[str]:
        """Names of the converted convolutions."""
        return [d.name for d in self.decisions if d.action == "converted"]

    @property
    def skipped(self) -> dict[str, str]:
        """Name -> reason for every convolution left as it was."""
        return {d.name: d.reason for d in self.decisions if d.action == "skipped"}

    def __len__(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        if not self.decisions:
            return f"winogradize(m={self.m}): the model has no nn.Conv2d; nothing converted."
        head = (
            f"winogradize(m={self.m}): converted {len(self.converted)} of {len(self.decisions)} convolutions"
            + ("" if self.converted else " (no eligible 3x3 stride-1 groups-1 conv: the model is unchanged)")
        )
        width = max(len(d.name) for d in self.decisions)
        rows = [f"  {d.name:<{width}}  {tuple(d.shape)!s:<18} {d.action}{': ' + d.reason if d.reason else ''}"
                for d in self.decisions]
        return "\n".join([head, *rows])

    def __rich__(self) -> object:
        from rich.table import Table

        table = Table(title=f"winogradize(m={self.m}): {len(self.converted)}/{len(self.decisions)} converted")
        for col in ("layer", "shape", "action", "reason"):
            table.add_column(col)
        for d in self.decisions:
            style = "green" if d.action == "converted" else "dim"
            table.add_row(d.name, str(tuple(d.shape)), d.action, d.reason, style=style)
        return table


def _compile(patterns: Iterable[str] | str | None, arg: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for pat in patterns:
        try:
            out.append(re.compile(pat))
        except re.error as err:
            raise ValueError(f"{arg} pattern {pat!r} is not a valid regular expression: {err}") from None
    return out


def winogradize(
    model: nn.Module,
    m: int = 2,
    skip_first: bool = True,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    route: Route | str = Route.AUTO,
    backend: Backend | str = Backend.AUTO,
) -> WinogradizeReport:
    """Replace every eligible ``nn.Conv2d`` of ``model`` by an equivalent :class:`WinogradConv2d`, in place.

    Eligible means 3x3, stride 1, dilation 1, groups 1, zero padding (see
    :func:`~lightning_winoprune.winograd.conv_ineligibility`). The converted model computes the same function.

    Args:
        model: The model to convert (modified in place).
        m: Output tile size of every converted layer.
        skip_first: Keep the first eligible convolution (in module order) dense, as the WSP paper does: it is the
            most sensitive to pruning.
        include: Regular expressions (``re.fullmatch`` on the fully-qualified name); when given, only matching
            convolutions are converted.
        exclude: Regular expressions; matching convolutions are never converted.
        route: Route of the converted layers, see :class:`~lightning_winoprune.winograd.Route`.
        backend: Kernel backend of the converted layers.

    Returns:
        A report of every ``nn.Conv2d`` found: converted, or skipped with the reason.

    """
    m = check_m(m)
    Route.parse(route)
    Backend.parse(backend)
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    report = WinogradizeReport(m=m)
    first_kept = not skip_first
    todo: list[tuple[str, nn.Conv2d]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, WinogradConv2d):
            report.decisions.append(LayerDecision(name, "skipped", "already a WinogradConv2d", tuple(mod.weight.shape)))
            continue
        if not isinstance(mod, nn.Conv2d):
            continue
        shape = tuple(mod.weight.shape)
        reason = conv_ineligibility(mod)
        if reason is None and mod is model:
            reason = "the model itself is the conv and cannot be replaced in place; use WinogradConv2d.from_conv"
        if reason is None and inc and not any(p.fullmatch(name) for p in inc):
            reason = "not matched by include"
        if reason is None and any(p.fullmatch(name) for p in exc):
            reason = "matched by exclude"
        if reason is None and not first_kept:
            first_kept = True
            reason = "first eligible conv kept dense (skip_first=True)"
        if reason is not None:
            report.decisions.append(LayerDecision(name, "skipped", reason, shape))
            continue
        todo.append((name, mod))
        report.decisions.append(LayerDecision(name, "converted", "", shape))
    for name, conv in todo:
        set_submodule(model, name, WinogradConv2d.from_conv(conv, m=m, route=route, backend=backend))
    return report


def iter_winograd_layers(model: nn.Module) -> Iterator[tuple[str, WinogradConv2d]]:
    """Yield ``(name, layer)`` for every :class:`WinogradConv2d` in ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, WinogradConv2d):
            yield name, mod
