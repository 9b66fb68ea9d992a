"""What the WinogradPruning test modules share: one intra-op thread, and the model's Winograd layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_winoprune import WinogradConv2d


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """These models are tiny: intra-op threads only add overhead, and contention on shared CI cores (2-5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: Lightning's chatter in tiny fits; the modules' ``pytestmark``.
QUIET_FITS = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*val_dataloader.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided.*"),
    pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended.*"),
]


def winograd_layers(module: nn.Module) -> dict[str, WinogradConv2d]:
    return {n: m for n, m in module.named_modules() if isinstance(m, WinogradConv2d)}
