"""Every W&B mode runs the recipe end to end, each in its own ``winoprune fit`` process, with no network."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SMOKE = ["--trainer.max_epochs", "2", "--pruning.start_epoch", "1", "--model.lr_milestones", "[1]",
         "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
         "--data.image_size", "16", "--data.batch_size", "8", "--pruning.calibration_batches", "1",
         "--pruning.verbose", "0", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
         "false", "--latency.input_size", "16", "--latency.repeats", "1", "--latency.warmup", "0",
         "--latency.verbose", "0"]


def _fit(tmp_path: Path, mode: str | None, *extra: str) -> subprocess.CompletedProcess:
    """``winoprune fit --config resnet18_abwsp`` (smoke size) in ``tmp_path``, W&B writing only below it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"NETRC": str(tmp_path / "no-netrc"), "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
                "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data"),
                "WANDB_DISABLE_GIT": "true", "WANDB_CONSOLE": "off", "WANDB_INIT_TIMEOUT": "90",
                "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    if mode is not None:
        env["WANDB_MODE"] = mode
    code = "import sys; from lightning_winoprune.recipes._cli import main; main(sys.argv[1:])"
    args = ["fit", "--config", "resnet18_abwsp", *SMOKE, "--trainer.default_root_dir", "runs", *extra]
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def _wandb_files(tmp_path: Path) -> list[Path]:
    return [p for p in tmp_path.rglob("*") if "wandb" in p.name and p.name != "wandb-cfg"]


def _check_fit(done: subprocess.CompletedProcess, tmp_path: Path) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "winoprune summary: resnet18_abwsp" in done.stdout
    assert list(tmp_path.rglob("pruned-epoch=1.ckpt")) and list(tmp_path.rglob("pruned-epoch=1.pt2"))


@pytest.mark.parametrize("mode", ["offline", "dryrun", None])
def test_offline_modes_write_a_run_to_sync_later(mode, tmp_path):
    done = _fit(tmp_path, mode)  # None: no WANDB_MODE and no credentials, so the CLI picks offline
    _check_fit(done, tmp_path)
    (run,) = (tmp_path / "runs" / "resnet18_abwsp" / "wandb").glob("offline-run-*")
    assert list(run.glob("*.wandb")) and (run / "files" / "config.yaml").is_file()
    assert f"upload the W&B run with: wandb sync runs/resnet18_abwsp/wandb/{run.name}" in done.stdout


def test_online_without_credentials_warns_and_writes_offline(tmp_path):
    done = _fit(tmp_path, "online")
    _check_fit(done, tmp_path)
    assert "WANDB_MODE=online but no W&B credentials were found" in done.stderr
    assert len(list((tmp_path / "runs" / "resnet18_abwsp" / "wandb").glob("offline-run-*"))) == 1


def test_disabled_runs_the_job_with_no_wandb_files_and_says_tracking_is_off(tmp_path):
    done = _fit(tmp_path, "disabled")
    _check_fit(done, tmp_path)
    assert "W&B tracking" in done.stdout and "off (WANDB_MODE=disabled" in done.stdout
    assert not _wandb_files(tmp_path), _wandb_files(tmp_path)
    assert "wandb sync" not in done.stdout


def test_no_logger_runs_the_job_with_no_wandb_files(tmp_path):
    done = _fit(tmp_path, None, "--trainer.logger=false")
    _check_fit(done, tmp_path)
    assert not _wandb_files(tmp_path) and "W&B" not in done.stdout
