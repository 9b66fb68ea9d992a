import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_masks_identical_on_two_cpu_ddp_ranks(tmp_path):
    script = Path(__file__).with_name("ddp_script.py")
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["masks"].keys() == r1["masks"].keys() and len(r0["masks"]) == 12
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name  # DDP kept the pruned weights in sync
        assert 0.3 < 1 - r0["masks"][name].float().mean().item() < 0.6
    # the policies came from all-reduced Taylor scores, identical on both ranks, both kinds present
    assert r0["policies"] == r1["policies"] and set(r0["policies"].values()) == {"wsp", "bwsp"}
    assert r0["importance"] == pytest.approx(r1["importance"])


@pytest.mark.slow
def test_deprune_masks_identical_on_two_cpu_ddp_ranks(tmp_path):
    script = Path(__file__).with_name("ddp_script.py")
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "deprune"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["masks"].keys() == r1["masks"].keys() and r0["masks"]
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
    # u/o and the pruned PW layers came from all-reduced Taylor scores: identical, and both directions used
    assert r0["policies"] == r1["policies"] and set(r0["policies"]["dw_rounding"].values()) == {"down", "up"}
    assert r0["importance"] == pytest.approx(r1["importance"])


@pytest.mark.slow
def test_spatial_winograd_masks_identical_on_two_cpu_ddp_ranks(tmp_path):
    script = Path(__file__).with_name("ddp_script.py")
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "spatial"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["masks"].keys() == r1["masks"].keys() and len(r0["masks"]) == 12
    for name in r0["masks"]:
        # both stages (Taylor saliencies all-reduced, masks broadcast) and the spatial training between them agree
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
        assert abs(1 - r0["masks"][name].float().mean().item() - 0.5) < 0.02
