"""The deployed model under load, in a process of its own: run by ``test_reliability.py``.

``python load_worker.py rss CALLS_A CALLS_B`` prints ``rss A_MIB B_MIB`` (resident memory after CALLS_A and after
CALLS_B calls); ``python load_worker.py fork`` runs the model, forks a ``multiprocessing`` child and a ``DataLoader``
worker that call it after ``torch.set_num_threads(1)``, and prints ``fork ok`` when their outputs equal the parent's.
A crash or a hang fails the calling test (it runs this with a timeout) instead of killing pytest.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import timm
import torch
from torch import nn

from lightning_winoprune import winogradize
from lightning_winoprune.deploy import deploy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deploy_helpers import prune, randomize_bn

SHAPE = (2, 1, 20, 20)


def build(name: str = "resnet18", seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A pruned tiny-input timm model (random BN statistics) and its deployed form (routes not timed)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, in_chans=1)
    if name.startswith("resnet"):
        winogradize(model, m=2)
    model = randomize_bn(prune(model), seed).eval()
    return model, deploy(model, torch.randn(SHAPE), tune=False, verbose=False, time_model=False)


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss(calls_a: int, calls_b: int) -> None:
    _, deployed = build()
    x = torch.randn(SHAPE)
    marks = {}
    with torch.no_grad():
        for i in range(1, calls_b + 1):
            deployed(x)
            if i in (calls_a, calls_b):
                marks[i] = resident_mib()
    print(f"rss {marks[calls_a]:.1f} {marks[calls_b]:.1f}", flush=True)


def _child(deployed: nn.Module, x: torch.Tensor, queue: mp.Queue) -> None:
    torch.set_num_threads(1)  # what DataLoader workers do: GNU OpenMP's pool does not survive fork
    with torch.no_grad():
        queue.put(deployed(x).numpy().tobytes())  # bytes: a shared-memory tensor would outlive the child


class _Calls(torch.utils.data.Dataset):
    def __init__(self, deployed: nn.Module, x: torch.Tensor) -> None:
        self.deployed, self.x = deployed, x

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        with torch.no_grad():
            return self.deployed(self.x)


def fork() -> None:
    _, deployed = build()
    x = torch.randn(SHAPE)
    with torch.no_grad():
        want = deployed(x)  # the parent has run the model (and its thread pools) before forking
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(deployed, x, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0, f"forked child exit code {child.exitcode}"
    assert got == want.numpy().tobytes(), "forked child's output differs from the parent's"
    loader = torch.utils.data.DataLoader(_Calls(deployed, x), batch_size=None, num_workers=1,
                                         multiprocessing_context="fork", timeout=60)
    for out in loader:
        assert torch.equal(out, want), "DataLoader worker's output differs from the parent's"
    print("fork ok", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "rss":
        rss(int(sys.argv[2]), int(sys.argv[3]))
    else:
        fork()
