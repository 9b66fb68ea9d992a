"""Reading an offline W&B run back, for the callback tests (importable: pytest puts this folder on sys.path)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest


def wandb_records(path: Path) -> list[bytes]:
    """The protobuf records of a ``.wandb`` transaction log (a LevelDB-style log of 32 KiB blocks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    pos, chunk, records = 7, b"", []  # the 7-byte file header counts towards the first block
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        payload = data[pos + header : pos + header + length]
        pos += header + length
        if kind == 1:  # full
            records.append(payload)
        elif kind == 2:  # first
            chunk = payload
        elif kind == 3:  # middle
            chunk += payload
        elif kind == 4:  # last
            records.append(chunk + payload)
    return records


def wandb_updates(run_dir: Path, kind: str) -> list[tuple[tuple[str, ...], Any]]:
    """Every ``kind`` (``"summary"`` or ``"config"``) update of the run's ``.wandb`` log: (nested key path, value)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run_dir.glob("*.wandb")
    updates = []
    for raw in wandb_records(log):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != kind:
            continue
        for item in getattr(record, kind).update:
            updates.append((tuple(item.nested_key) or (item.key,), json.loads(item.value_json)))
    return updates


def _nested(updates: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for keys, value in updates:
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def wandb_summary(run_dir: Path) -> dict[str, Any]:
    """The run summary: from ``wandb-summary.json`` if offline mode wrote one, else replayed from the ``.wandb`` log."""
    summary_file = run_dir / "files" / "wandb-summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    return _nested(wandb_updates(run_dir, "summary"))


def wandb_config(run_dir: Path) -> dict[str, Any]:
    """The run config replayed from the ``.wandb`` log, nested."""
    return _nested(wandb_updates(run_dir, "config"))


def wandb_timeout(seconds: int):
    """``pytest.mark.timeout`` where pytest-timeout is installed (the marker is unknown, hence an error, elsewhere)."""
    if importlib.util.find_spec("pytest_timeout") is None:
        return lambda fn: fn
    return pytest.mark.timeout(seconds)


def offline_wandb_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point W&B at ``tmp_path``, offline and silent: nothing may need a network."""
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                       "WANDB_DATA_DIR": str(tmp_path / "data"), "WANDB_CONSOLE": "off",
                       "WANDB_DISABLE_GIT": "true", "WANDB_INIT_TIMEOUT": "90"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def wandb_config_updates(run_dir: Path) -> dict[tuple[str, ...], Any]:
    """Every config update of the ``.wandb`` log, keyed by its (nested) key path; e.g. custom charts land under
    ``("_wandb", "visualize", <logged key>)``."""
    return dict(wandb_updates(run_dir, "config"))
