"""What the deploy test modules share: pruned layers, BatchNorm statistics far from the identity, the error."""

from __future__ import annotations

import torch
from torch import nn

from lightning_winoprune import WinogradConv2d
from lightning_winoprune._utils import MASK_ATTR, is_depthwise
from lightning_winoprune.pruning._depthwise import depthwise_mask


def randomize_bn(model: nn.Module, gen: torch.Generator | int) -> nn.Module:
    """BatchNorm statistics far from the identity, so that a wrong fold shows."""
    gen = torch.Generator().manual_seed(gen) if isinstance(gen, int) else gen
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            mod.bias.data.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)
    return model


def prune_winograd(model: nn.Module, amount: float = 0.7) -> nn.Module:
    """Magnitude-prune every WinogradConv2d."""
    for mod in model.modules():
        if isinstance(mod, WinogradConv2d):
            score = mod.weight.detach().abs()
            mod.set_mask(score > score.flatten().kthvalue(max(1, int(amount * score.numel()))).values)
            mod.zero_pruned_()
    return model


def prune_depthwise(model: nn.Module, amount: float = 0.7) -> nn.Module:
    """DEPrune-mask (DCP-BH) every depthwise conv."""
    for mod in model.modules():
        if is_depthwise(mod):
            mask = depthwise_mask(mod.weight.detach(), amount, "dcp-bh").mask
            mod.register_buffer(MASK_ATTR, mask)
            with torch.no_grad():
                mod.weight.mul_(mask)
    return model


def prune(model: nn.Module, amount: float = 0.7) -> nn.Module:
    """Magnitude-prune every WinogradConv2d and DEPrune-mask every depthwise conv."""
    return prune_depthwise(prune_winograd(model, amount), amount)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's max absolute value."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())
