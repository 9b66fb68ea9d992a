"""SafeCheckpointIO: a Trainer's checkpoints written atomically and read with the allowlist."""

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_winoprune import SafeCheckpointIO, UntrustedCheckpointError


def _trainer(tmp_path, **kwargs):
    return L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, plugins=[SafeCheckpointIO(**kwargs)])


def test_checkpoints_save_atomically_and_resume(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit(BoringModel())
    path = tmp_path / "manual.ckpt"
    trainer.save_checkpoint(path)
    assert path.is_file() and not [p for p in tmp_path.rglob(".*.tmp")]
    resumed = _trainer(tmp_path)
    resumed.fit_loop.max_epochs = 2
    resumed.fit(BoringModel(), ckpt_path=path)
    assert resumed.current_epoch == 2


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resuming_from_a_hostile_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(UntrustedCheckpointError, match=r"SafeCheckpointIO\(trust=True\)"):
        _trainer(tmp_path).fit(BoringModel(), ckpt_path=tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_storage_options_are_refused(tmp_path):
    with pytest.raises(TypeError, match="takes no storage_options, got"):
        SafeCheckpointIO().save_checkpoint({}, tmp_path / "x.ckpt", storage_options={"a": 1})
