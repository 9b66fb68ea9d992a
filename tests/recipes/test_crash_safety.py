"""A ``winoprune fit`` killed with SIGKILL mid-epoch, mid-checkpoint and mid-deploy: every file under its final name
loads, and resuming from the newest checkpoint ends with the masks of an uninterrupted run."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_winoprune._io import load_checkpoint

WORKER = Path(__file__).with_name("crash_worker.py")


def _run(out: Path, kill: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), str(out), kill, *extra], capture_output=True, text=True,
                          timeout=600)


def _final_files(out: Path) -> list[Path]:
    """Every checkpoint and artifact under its final name (temporary files start with a dot)."""
    return sorted(p for p in out.rglob("*") if p.suffix in (".ckpt", ".pt2") and not p.name.startswith("."))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = _run(out, "none")
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "masks.pt")


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["mid-epoch", "checkpoint-save", "deploy"])
def test_a_killed_fit_leaves_loadable_files_and_resumes_to_the_same_masks(kill, uninterrupted, tmp_path):
    killed = _run(tmp_path, kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    files = _final_files(tmp_path)
    assert files, "the run was killed before it wrote anything"
    progress = {}
    for path in files:
        if path.suffix == ".ckpt":
            ckpt = load_checkpoint(path)
            assert "state_dict" in ckpt
            progress[path] = (ckpt["epoch"], ckpt["global_step"])
        else:
            torch.export.load(str(path))
    if kill == "deploy":  # the .pt2 was being written: it is not there at all, never half of it
        assert not any(p.suffix == ".pt2" for p in files)
        assert any(p.name.endswith(".pt2.tmp") or ".pt2." in p.name for p in tmp_path.rglob(".*"))
    newest = max(progress, key=progress.__getitem__)
    # checkpoint-save dies writing the second file of epoch 0 (last.ckpt): the first one is the newest
    assert progress[newest][0] == {"mid-epoch": 1, "checkpoint-save": 0, "deploy": 4}[kill]
    resumed = _run(tmp_path, "none", "--ckpt_path", str(newest))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    masks = torch.load(tmp_path / "masks.pt")
    assert masks.keys() == uninterrupted.keys() and len(masks) == 12
    for name, mask in masks.items():
        assert torch.equal(mask, uninterrupted[name]), name
