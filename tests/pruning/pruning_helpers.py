"""Helpers shared by the pruning tests (importable: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch


def random_weights(shape: tuple[int, ...], seed: int, kind: str) -> torch.Tensor:
    """Random weights; ``int`` gives small integers (exact scores, many ties), ``const`` all ones."""
    g = torch.Generator().manual_seed(seed)
    if kind == "int":
        return torch.randint(-2, 3, shape, generator=g).float()
    if kind == "const":
        return torch.ones(shape)
    return torch.randn(shape, generator=g)
