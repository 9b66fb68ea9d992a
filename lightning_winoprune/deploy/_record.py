"""The record step of :func:`~lightning_winoprune.deploy.deploy`: one hooked forward pass, every conv's chain.

A chain is a conv with the BatchNorm that only it feeds and the activation that only that BatchNorm (or the conv)
feeds: the modules that fold and fuse into one deployed layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_winoprune.deploy._ops import Activation
from lightning_winoprune.winograd._layer import WinogradConv2d

__all__ = ["Chain", "activation_of", "bn_act", "record"]

#: Activation modules that fuse into a conv's output stage.
_ACTIVATIONS: dict[type[nn.Module], Activation] = {
    nn.ReLU: Activation.RELU, nn.ReLU6: Activation.RELU6, nn.SiLU: Activation.SILU, nn.Hardswish: Activation.HARDSWISH,
}


def _is_conv(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Conv2d, WinogradConv2d))


def activation_of(mod: nn.Module | None) -> Activation | None:
    """The fusable activation ``mod`` is (its exact type, not a subclass), or ``None``."""
    return None if mod is None else _ACTIVATIONS.get(type(mod))


def bn_act(bn: nn.Module) -> nn.Module | None:
    """The activation module inside a timm ``BatchNormAct2d``-style BatchNorm (``None`` for a plain one)."""
    act = getattr(bn, "act", None)
    return act if isinstance(act, nn.Module) and not isinstance(act, nn.Identity) else None


def _foldable(bn: nn.Module, channels: int) -> bool:
    """An eval-mode BatchNorm with running statistics (without them eval still normalises by the batch)."""
    return (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.num_features == channels
            and bn.running_mean is not None and bn.running_var is not None)


@dataclass
class Chain:
    """A conv with the BatchNorm and activation that only it feeds; the fold step fills ``weight``/``mask``/``bias``."""

    name: str
    conv: nn.Module
    x: torch.Tensor  # its recorded input
    ref: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # the recorded output of the chain's last module
    bn_name: str = ""
    bn: nn.BatchNorm2d | None = None
    act_name: str = ""  # a separate activation module to drop ("" when fused inside the BatchNorm or none)
    act: Activation = Activation.NONE
    keep_bn_act: nn.Module | None = None  # an unfusable activation inside a BatchNormAct module: it stays
    weight: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # folded: U for a Winograd layer, else w
    mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None


@dataclass
class _Trace:
    """What the hooks saw: every recorded call, the outputs, each conv's first input, the call counts."""

    calls: list[tuple[nn.Module, list[tuple[int, int]], int, int]]  # module, [(id, version)], out id, out version
    outputs: dict[int, torch.Tensor]
    conv_inputs: dict[int, torch.Tensor]
    count: dict[int, int]
    consumers: dict[int, list[int]] = field(default_factory=dict)

    def follow(self, i: int) -> int | None:
        """The one recorded reader of call i's output, past pass-through Identities, if it reads it unmodified."""
        tensor, version = self.calls[i][2], self.calls[i][3]
        readers = [j for j in self.consumers.get(tensor, []) if j != i]
        while readers and isinstance(self.calls[readers[0]][0], nn.Identity) and self.calls[readers[0]][2] == tensor:
            readers = readers[1:]
        if not readers:
            return None
        j = readers[0]
        if dict(self.calls[j][1]).get(tensor) != version:  # modified in between (an in-place op the hooks missed)
            return None
        inplace = self.calls[j][2] == tensor
        if not inplace and any(not isinstance(self.calls[r][0], nn.Identity) for r in readers[1:]):
            return None
        return j

    def single(self, j: int | None) -> nn.Module | None:
        """The module of call ``j`` when it ran once and its output was recorded."""
        if j is None or j not in self.outputs:
            return None
        mod = self.calls[j][0]
        return mod if self.count[id(mod)] == 1 else None


def _trace(model: nn.Module, x: torch.Tensor) -> tuple[_Trace, torch.Tensor]:
    """Run ``model(x)`` with hooks on every conv, BatchNorm and leaf module."""
    trace = _Trace([], {}, {}, {})
    keep: list[torch.Tensor] = []  # keeps recorded tensors alive so their ids stay unique
    pending: dict[int, list[list[tuple[int, int]]]] = {}

    def pre_hook(mod: nn.Module, inp: tuple[Any, ...]) -> None:
        tensors = [t for t in inp if isinstance(t, torch.Tensor)]
        keep.extend(tensors)
        pending.setdefault(id(mod), []).append([(id(t), t._version) for t in tensors])
        if _is_conv(mod) and tensors:
            trace.conv_inputs.setdefault(id(mod), tensors[0].detach().clone())

    def hook(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        ins = pending[id(mod)].pop()
        trace.count[id(mod)] = trace.count.get(id(mod), 0) + 1
        is_tensor = isinstance(out, torch.Tensor)
        if is_tensor:
            keep.append(out)
            trace.outputs[len(trace.calls)] = out.detach().clone()
        trace.calls.append((mod, ins, id(out) if is_tensor else -1, out._version if is_tensor else -1))

    recorded = [m for m in model.modules()
                if _is_conv(m) or isinstance(m, nn.BatchNorm2d) or not any(True for _ in m.children())]
    handles = [m.register_forward_pre_hook(pre_hook) for m in recorded]
    handles += [m.register_forward_hook(hook) for m in recorded]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    for i, (_, ins, _, _) in enumerate(trace.calls):
        for t, _ in ins:
            trace.consumers.setdefault(t, []).append(i)
    return trace, y


def _link(trace: _Trace, i: int, chain: Chain, names: dict[int, str]) -> Chain:
    """Extend the chain of conv call ``i`` by the BatchNorm and the activation that only it feeds."""
    last = i
    j = trace.follow(last)
    bn = trace.single(j)
    if j is not None and bn is not None and _foldable(bn, chain.conv.out_channels):  # type: ignore[arg-type]
        chain.bn_name, chain.bn, last = names[id(bn)], bn, j  # type: ignore[assignment]
        chain.ref = trace.outputs[last]
        inner = bn_act(bn)
        if inner is not None:
            if activation_of(inner) is None:
                chain.keep_bn_act = inner
            else:
                chain.act = activation_of(inner)  # type: ignore[assignment]
            return chain
    j = trace.follow(last)
    act = trace.single(j)
    if j is not None and activation_of(act) is not None:
        chain.act_name, chain.act = names[id(act)], activation_of(act)  # type: ignore[assignment]
        chain.ref = trace.outputs[j]
    return chain


def record(model: nn.Module, x: torch.Tensor) -> tuple[list[Chain], torch.Tensor]:
    """One forward pass with hooks: every conv's chain (conv -> BatchNorm -> activation) and the model's output.

    A link is made only where the next module reads the very tensor the previous one wrote, unmodified (its version
    counter unchanged: an in-place residual add in between breaks the link), and nothing else that was recorded reads
    it (pass-through ``nn.Identity`` modules aside). What the hooks cannot see (a functional op reading the same
    tensor) is caught by the deployed model's output check. A conv called more than once gets no chain.
    """
    names = {id(m): n for n, m in model.named_modules()}
    trace, y = _trace(model, x)
    chains = []
    for i, (mod, _, _, _) in enumerate(trace.calls):
        if _is_conv(mod) and trace.count[id(mod)] == 1 and id(mod) in trace.conv_inputs:
            chain = Chain(names[id(mod)], mod, trace.conv_inputs[id(mod)], trace.outputs.get(i, torch.empty(0)))
            chains.append(_link(trace, i, chain, names))
    return chains, y
