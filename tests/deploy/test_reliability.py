"""The deployed model under load: many threads, long runs, forks, two models in one process, and fuzzed inputs.

The long-running, forking and fuzzing checks run in a subprocess (``load_worker.py``, ``fuzz_worker.py``) with a
timeout, so a crash or a hang fails the test instead of taking pytest down with it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lightning_winoprune.kernels import native_available

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from load_worker import SHAPE, build  # noqa: E402

needs_ext = pytest.mark.skipif(not native_available(), reason="the native extension is not loaded")


def _worker(script: str, *args: str, timeout: int = 600) -> str:
    out = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"exit code {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout.strip().splitlines()[-1]


def _hammer(deployed: torch.nn.Module, inputs: list[torch.Tensor], want: list[torch.Tensor], calls: int,
            errors: list[str], tid: int) -> None:
    with torch.no_grad():
        for rep in range(calls):
            i = (rep + tid) % len(inputs)
            if not torch.equal(deployed(inputs[i]), want[i]):
                errors.append(f"thread {tid} call {rep} input {i}")


def _run_threads(jobs: list[tuple]) -> list[str]:
    errors: list[str] = []
    threads = [threading.Thread(target=_hammer, args=(*job, errors, tid)) for tid, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in 600 s"
    return errors


@needs_ext
def test_eight_threads_times_500_calls_are_bit_identical_to_one_thread():
    _, deployed = build()
    inputs = [torch.randn(SHAPE) for _ in range(3)]
    with torch.no_grad():
        want = [deployed(x) for x in inputs]
    errors = _run_threads([(deployed, inputs, want, 500)] * 8)
    assert not errors, f"{len(errors)} of 4000 calls differ, first: {errors[:3]}"


@needs_ext
def test_two_deployed_models_in_one_process_do_not_disturb_each_other():
    _, resnet = build("resnet18", seed=1)
    _, mobilenet = build("mobilenetv2_100", seed=2)
    x = [torch.randn(SHAPE) for _ in range(2)]
    with torch.no_grad():
        alone = {"r": [resnet(t) for t in x], "m": [mobilenet(t) for t in x]}
        for rep in range(20):  # interleaved on one thread
            for key, model in (("r", resnet), ("m", mobilenet)):
                assert torch.equal(model(x[rep % 2]), alone[key][rep % 2]), f"{key} call {rep} interleaved"
    errors = _run_threads([(resnet, x, alone["r"], 100), (mobilenet, x, alone["m"], 100)] * 2)
    assert not errors, f"{len(errors)} calls differ, first: {errors[:3]}"


@needs_ext
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_rss_after_5000_calls_is_within_5_percent_of_rss_after_500():
    line = _worker("load_worker.py", "rss", "500", "5000")
    first, last = (float(v) for v in re.fullmatch(r"rss ([\d.]+) ([\d.]+)", line).groups())
    assert last <= 1.05 * first, f"RSS grew from {first:.1f} MiB after 500 calls to {last:.1f} MiB after 5,000"


@needs_ext
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork start method")
def test_a_forked_child_and_a_dataloader_worker_can_call_the_model():
    assert _worker("load_worker.py", "fork", timeout=300) == "fork ok"


@needs_ext
@pytest.mark.parametrize(("target", "cases"), [("ops", 1500), ("deploy", 300)])
def test_fuzzed_inputs_are_right_or_refused_in_one_line(target, cases):
    """Every case either matches the reference or is a one-line ValueError / TypeError (``fuzz_worker.py``)."""
    line = _worker("fuzz_worker.py", target, str(cases))
    found = re.fullmatch(r"fuzz: (\d+) cases, (\d+) refused, (\d+) without a second-shape check", line)
    assert found, line
    ran, refused, single = (int(v) for v in found.groups())
    assert ran >= cases, f"only {ran} of {cases} cases ran"
    assert refused < ran, "every case was refused: the fuzz tests nothing"
    assert single <= (ran - refused) // 2, f"{single} of {ran - refused} deployed cases had no second-shape check"
