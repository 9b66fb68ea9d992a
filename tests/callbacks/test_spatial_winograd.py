"""``WinogradPruning(method="spatial-winograd")``: validation, the two stages, spatial-domain training between
them, ``stages=1`` (a plain model whose Winograd zeros appear on conversion) and resume between the stages.

Same tiny timm ``resnet18`` on 16x16 digits as ``test_winograd_pruning.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from winograd_helpers import QUIET_FITS, one_intra_op_thread, winograd_layers  # noqa: F401 - an autouse fixture

from lightning_winoprune import WinogradPruning, winogradize
from lightning_winoprune.data import DigitsDataModule
from lightning_winoprune.pruning import SPATIAL_GROUPS, project_spatial, zero_positions
from lightning_winoprune.recipes import ImageClassifier

pytestmark = QUIET_FITS

TINY = {"channels": (16, 32, 64, 128)}
SPATIAL = {"method": "spatial-winograd", "amount": 0.6, "spatial_amount": 0.4, "spatial_epochs": 1, "verbose": 0,
           "calibration_batches": 1}


def make_module() -> ImageClassifier:
    return ImageClassifier("resnet18", num_classes=10, in_chans=1, model_kwargs=dict(TINY))


def make_trainer(callbacks: list[Callback], **overrides: Any) -> L.Trainer:
    kwargs: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 0,
        "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
        "enable_checkpointing": False,
    }
    kwargs.update(overrides)
    return L.Trainer(callbacks=callbacks, **kwargs)


@pytest.fixture
def datamodule() -> DigitsDataModule:
    return DigitsDataModule(image_size=16, in_chans=1, batch_size=16)


class EpochEnd(Callback):
    """Copies of the Winograd weights and masks at the end of every epoch."""

    def __init__(self) -> None:
        self.snaps: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.snaps[trainer.current_epoch] = {
            n: (m.weight.detach().clone(), None if m.mask is None else m.mask.clone())
            for n, m in winograd_layers(pl_module).items()
        }


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spatial_epochs": -1}, r"(?s)spatial_epochs=-1 is not valid; valid values are ints >= 0"),
        ({"spatial_epochs": 1.5}, r"(?s)spatial_epochs=1\.5 is not valid; valid values are ints >= 0"),
        ({"stages": 3}, r"stages=3 is not valid; valid values are \[1, 2\]"),
        ({"stages": True}, r"stages=True is not valid; valid values are \[1, 2\]"),
        ({"spatial_amount": 1.2}, r"spatial_amount must be a number in \[0, 1\), got 1\.2"),
        ({"gradient_scaling": "yes"}, r"gradient_scaling='yes' is not valid; valid values are \[True, False, None\]"),
        ({"method": "spatial-winograd", "schedule": "gradual", "end_epoch": 2},
         r"schedule='gradual' is not valid with method='spatial-winograd'.*valid values are \['one_shot'\]"),
        ({"method": "spatial-winograd", "latency_budget": 0.5},
         r"latency_budget=0\.5 is not valid with method='spatial-winograd'; valid values are \[None\]"),
        ({"method": "spatial-winograd", "amount": 0.3, "spatial_amount": 0.4},
         r"amount=0\.3 is below spatial_amount=0\.4.*valid values are amount >= spatial_amount"),
        ({"method": "spatial-winograd", "score": "l4"}, r"(?s)(?=.*'l4')(?=.*'l2-factor')(?=.*'l2-scaled')"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_constructor_rejects_bad_spatial_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        WinogradPruning(**kwargs)


def test_stages_are_the_schedule_and_join_the_resume_config():
    cb = WinogradPruning(method="spatial-winograd", start_epoch=1, spatial_epochs=2, amount=0.7, spatial_amount=0.3)
    assert cb.schedule.steps() == [(1, 0.3), (3, 0.7)] and cb.gradient_scaling and cb.score == "l2-factor"
    assert WinogradPruning(method="spatial-winograd", spatial_epochs=0).schedule.steps() == [(0, 0.7)]
    assert WinogradPruning(method="spatial-winograd", stages=1, spatial_amount=0.3).schedule.steps() == [(0, 0.3)]
    config = cb.mask_config()
    assert (config["spatial_amount"], config["spatial_epochs"], config["stages"]) == (0.3, 2, 2)
    assert "stages" not in WinogradPruning(method="bwsp").mask_config()


def test_a_stage_2_beyond_max_epochs_is_refused_in_setup(datamodule):
    cb = WinogradPruning(**SPATIAL)  # stage 2 at epoch 1
    with pytest.raises(MisconfigurationException, match=r"last step is at epoch 1.*max_epochs=1.*stop at 0\.400"):
        make_trainer([cb], max_epochs=1).fit(make_module(), datamodule)
    assert not cb.history  # refused in setup, before anything was converted or pruned


# ------------------------------------------------------------------------------------------------ the stages
def test_two_stages_train_spatially_then_prune_in_the_winograd_domain(datamodule):
    module = make_module()
    cb = WinogradPruning(**SPATIAL)
    probe = EpochEnd()
    make_trainer([cb, probe]).fit(module, datamodule)
    assert [round(h["target"], 3) for h in cb.history] == [0.4, 0.6] and cb.stage == 2
    ring = SPATIAL_GROUPS["ring"]
    for name, (u, mask) in probe.snaps[0].items():
        m = winograd_layers(module)[name].m
        border = zero_positions(m, ring)
        # after the spatial epoch: whole borders of whole kernels pruned, exact zeros, U the transform of kernels
        assert mask is not None and bool(mask[:, :, ~border].all())
        assert torch.count_nonzero(u[~mask]) == 0
        assert abs(1 - mask.float().mean().item() - 0.4) < 0.05, name
        assert torch.allclose(project_spatial(u), u, atol=1e-5), name
    for name, (u, mask) in probe.snaps[1].items():
        first = probe.snaps[0][name][1]
        assert mask is not None and first is not None
        assert not (~first & mask).any(), name  # stage-1 zeros stay pruned
        assert abs(1 - mask.float().mean().item() - 0.6) < 0.02, name
        assert torch.count_nonzero(u[~mask]) == 0


def test_stage_one_only_gives_a_plain_model_whose_winograd_zeros_appear_on_conversion(datamodule):
    module = make_module()
    cb = WinogradPruning(**{**SPATIAL, "stages": 1})
    make_trainer([cb], max_epochs=1).fit(module, datamodule)
    assert not winograd_layers(module) and cb.stage == 1
    convs = {n: module.get_submodule(n) for n in cb.layer_names}
    assert all(type(c) is nn.Conv2d for c in convs.values())
    rings = {n: (c.weight.detach()[:, :, SPATIAL_GROUPS["ring"]] == 0).all(dim=-1) for n, c in convs.items()}
    # converting now: the Winograd border positions of the kernels with zero rings are exactly zero
    report = winogradize(module, m=2, skip_first=True)
    assert sorted(report.converted) == sorted(cb.layer_names)
    border = zero_positions(2, SPATIAL_GROUPS["ring"])
    total = zeros = 0
    for name, layer in winograd_layers(module).items():
        u = layer.weight.detach()
        assert torch.count_nonzero(u[rings[name]][:, border]) == 0, name
        zeros += int((u == 0).sum())
        total += u.numel()
    assert zeros / total == pytest.approx(0.4, abs=0.05)


def test_resume_between_the_stages(tmp_path: Path, datamodule):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cb = WinogradPruning(**SPATIAL)
    # stops after epoch 0 (max_steps): stage 1 done, stage 2 still ahead
    make_trainer([cb, ckpt_cb], enable_checkpointing=True, max_steps=2).fit(make_module(), datamodule)
    assert cb.stage == 1 and len(cb.history) == 1
    module2 = make_module()
    cb2 = WinogradPruning(**SPATIAL)
    make_trainer([cb2]).fit(module2, datamodule, ckpt_path=tmp_path / "last.ckpt")
    assert cb2.stage == 2 and [h["epoch"] for h in cb2.history] == [0, 1]
    assert cb2.history[0] == cb.history[0]
    # another stage-1 amount is refused once stage 1 ran
    cb3 = WinogradPruning(**{**SPATIAL, "spatial_amount": 0.3})
    with pytest.raises(MisconfigurationException, match=r"spatial_amount=0\.4.*spatial_amount=0\.3"):
        make_trainer([cb3]).fit(make_module(), datamodule, ckpt_path=tmp_path / "last.ckpt")
