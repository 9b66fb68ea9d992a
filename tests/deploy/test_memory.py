"""``keep_freed_memory``: freed activations stay in the process for reuse (glibc), a no-op elsewhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from lightning_winoprune.deploy import keep_freed_memory

# Allocates and frees a 64 MiB tensor, then prints how much of it the process still holds (resident, MiB).
_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from lightning_winoprune.deploy import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    page = os.sysconf("SC_PAGE_SIZE")
    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page / 2**20
    before = resident()
    x = torch.ones(16 * 2**20)  # 64 MiB, every page touched
    del x
    print(resident() - before)
""")


def _held_after_free(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


def _is_glibc() -> bool:
    import ctypes

    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@pytest.mark.skipif(not _is_glibc(), reason="glibc only (Linux)")
def test_freed_memory_is_kept_only_when_asked():
    assert _held_after_free("default") < 16  # glibc gives a freed 64 MiB block straight back
    assert _held_after_free("keep") > 48  # kept in the heap for the next call's activations


def test_it_reports_whether_it_applied():
    code = "from lightning_winoprune.deploy import keep_freed_memory as k; print(k(), k())"  # twice: idempotent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == [str(_is_glibc())] * 2, out.stderr[-2000:]


def test_other_systems_are_left_alone(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory() is False
