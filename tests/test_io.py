"""Safe checkpoint loading and atomic writes (lightning_winoprune._io)."""

import os
import subprocess
import sys

import pytest
import torch

from lightning_winoprune import CheckpointError, UntrustedCheckpointError, load_pruned_checkpoint
from lightning_winoprune._io import atomic_save, atomic_write, load_checkpoint


class _Payload:
    """Unpickling this runs ``touch MARKER``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callbacks": {"WinogradPruning": {}}, "x": _Payload(marker)}, path)
    return path, marker


def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_the_code_never_runs(evil):
    path, marker = evil
    with pytest.raises(UntrustedCheckpointError, match=r"evil\.ckpt' was refused: its pickle needs posix\.system.*"
                                                       r"trust=True"):
        load_checkpoint(path)
    with pytest.raises(UntrustedCheckpointError, match="trust=True"):
        load_pruned_checkpoint(torch.nn.Conv2d(1, 1, 3), path)
    assert not marker.exists()


def test_trust_is_an_explicit_opt_in(evil):
    path, marker = evil
    load_checkpoint(path, trust=True)
    assert marker.exists()


def test_the_deploy_command_refuses_it_in_one_line_and_the_code_never_runs(evil):
    path, marker = evil
    done = subprocess.run([sys.executable, "-c", "from lightning_winoprune.recipes._cli import main; main()", "deploy",
                           str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and not marker.exists()
    assert len(done.stderr.strip().splitlines()) == 1 and "--trust-checkpoint" in done.stderr


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(os.urandom(3000)), "not a zip archive"),
    (lambda p: p.write_text("state_dict: {}\n"), "not a zip archive"),
    (lambda p: (torch.save({"a": torch.zeros(3)}, p), p.write_bytes(p.read_bytes()[:200])), "not a zip archive"),
    (lambda p: torch.save([torch.zeros(3)], p), "holds a list, not a Lightning checkpoint"),
])
def test_bad_files_give_one_line_naming_the_file(make, message, tmp_path):
    path = tmp_path / "bad.ckpt"
    make(path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_our_checkpoint_contents_load_without_trust(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1, 2])
    ckpt = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()],
            "lr_schedulers": [sched.state_dict()], "hyper_parameters": {"model_name": "resnet18", "lr": 0.1},
            "callbacks": {"WinogradPruning{}": {"layer_names": ["a"], "m": 2, "shape": torch.Size([2, 3])}}}
    atomic_save(tmp_path / "ok.ckpt", lambda f: torch.save(ckpt, f))
    loaded = load_checkpoint(tmp_path / "ok.ckpt")
    assert loaded["lr_schedulers"][0]["milestones"] == sched.state_dict()["milestones"]


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "report.json"
    with atomic_write(target, "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_write(target, "w") as f:
        f.write("new, half")
        raise RuntimeError("mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["report.json"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # what open() gives, not mkstemp's private mode
    with pytest.raises(ValueError, match="mode must be 'wb' or 'w', got 'a'"), atomic_write(target, "a"):
        pass
