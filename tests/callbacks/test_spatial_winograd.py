"""``WinogradPruning(method="spatial-winograd")``: validation, the two stages, spatial-domain training between
them, ``stages=1`` (a plain model whose Winograd zeros appear on conversion, plain checkpoints that load strictly
into the unconverted timm model, resume from them) and resume between the stages.

Same tiny timm ``resnet18`` on 16x16 digits as ``test_winograd_pruning.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from winograd_helpers import QUIET_FITS, one_intra_op_thread, winograd_layers  # noqa: F401 - an autouse fixture

from lightning_winoprune import WinogradPruning, load_pruned_checkpoint, winogradize
from lightning_winoprune.data import DigitsDataModule
from lightning_winoprune.pruning import SPATIAL_GROUPS, project_spatial, spatial_weight, zero_positions
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


class EpochStart(Callback):
    """Copies of the Winograd weights and masks at the start of epoch 0 (list it before or after the pruner)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.snap = {n: (m.weight.detach().clone(), None if m.mask is None else m.mask.clone())
                         for n, m in winograd_layers(pl_module).items()}


def test_stage_one_prunes_the_kernels_rings(datamodule):
    """Right after stage 1 (before any step) U is the transform of the kernels with their rings zeroed: not only
    the border positions are zero, the ring entries' share of the inner positions is gone too."""
    before, after = EpochStart(), EpochStart()
    cb = WinogradPruning(**{**SPATIAL, "stages": 1})
    make_trainer([before, cb, after], max_epochs=1, limit_train_batches=1).fit(make_module(), datamodule)
    ring = SPATIAL_GROUPS["ring"]
    for name, (u, mask) in after.snap.items():
        assert mask is not None
        pruned = ~mask[:, :, 0, 0]
        g0, g = spatial_weight(before.snap[name][0]), spatial_weight(u)
        assert torch.allclose(project_spatial(u), u, atol=1e-6), name
        assert float(g[pruned][:, ring].abs().max()) < 1e-6, name
        assert torch.allclose(g, torch.where(ring & pruned[:, :, None, None], 0.0, g0), atol=1e-5), name


#: Border positions (``i`` or ``j`` in ``{0, p-1}``) per Winograd tile: what a zero ring zeroes (docs/pruning.md).
BORDER_ZEROS = {2: (12, 16), 4: (20, 36)}


def ring_zero(conv: nn.Module) -> torch.Tensor:
    """``(K, C)``: the kernels whose eight outer entries are all exactly zero."""
    return (conv.weight.detach()[:, :, SPATIAL_GROUPS["ring"]] == 0).all(dim=-1)


@pytest.mark.parametrize("m", [2, 4])
def test_stage_one_only_gives_a_plain_model_whose_winograd_zeros_appear_on_conversion(datamodule, m):
    module = make_module()
    cb = WinogradPruning(**{**SPATIAL, "stages": 1, "m": m})
    make_trainer([cb], max_epochs=1).fit(module, datamodule)
    # (a) after the fit: an ordinary timm model, no WinogradConv2d left
    assert not winograd_layers(module) and cb.stage == 1
    convs = {n: module.get_submodule(n) for n in cb.layer_names}
    assert all(type(c) is nn.Conv2d for c in convs.values())
    rings = {n: ring_zero(c) for n, c in convs.items()}
    assert all(bool(r.any()) for r in rings.values())  # every layer has pruned kernels
    # (c) converting now, with either tile size: every pruned kernel has exactly zero Winograd weights at the border
    # positions (12 of 16 for F(2,3), 20 of 36 for F(4,3)); with the callback's m the sparsity is spatial_amount
    for m_conv, (n_zero, n_all) in BORDER_ZEROS.items():
        converted = copy.deepcopy(module)
        report = winogradize(converted, m=m_conv, skip_first=True)
        assert sorted(report.converted) == sorted(cb.layer_names)
        border = zero_positions(m_conv, SPATIAL_GROUPS["ring"])
        assert (int(border.sum()), border.numel()) == (n_zero, n_all)
        zeros = total = 0
        for name, layer in winograd_layers(converted).items():
            u = layer.weight.detach()[rings[name]]  # (pruned kernels, p, p)
            assert torch.count_nonzero(u[:, border]) == 0, (m_conv, name)
            # the other positions hold the centre weight: nonzero unless the whole kernel is zero
            assert bool((u[:, ~border] != 0).all()), (m_conv, name)
            zeros += u.shape[0] * n_zero
            total += layer.weight.numel()
        if m_conv == m:
            assert zeros / total == pytest.approx(0.4, abs=0.05)


def test_stage_one_checkpoints_hold_the_plain_model(tmp_path: Path, datamodule):
    """(b) every checkpoint of a stages=1 fit, the final one included, is the spatial model: 3x3 kernels, no masks."""
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1)
    # (no callback hooks run for a weights-only checkpoint; another every_n_epochs: another state_key)
    weights_cb = ModelCheckpoint(dirpath=tmp_path / "weights", save_weights_only=True, every_n_epochs=2)
    module = make_module()
    cb = WinogradPruning(**{**SPATIAL, "stages": 1})
    make_trainer([cb, ckpt_cb, weights_cb], enable_checkpointing=True).fit(module, datamodule)
    paths = sorted(tmp_path.glob("*.ckpt")) + sorted((tmp_path / "weights").glob("*.ckpt"))
    assert len(paths) == 4  # epoch 0, epoch 1, last; the weights-only one of epoch 1
    final = module.state_dict()
    for path in paths:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state = ckpt["state_dict"]
        assert not any(k.endswith(".mask") for k in state), path.name
        make_module().load_state_dict(state, strict=True)  # the LightningModule, unconverted
        net = timm.create_model("resnet18", num_classes=10, in_chans=1, **TINY)
        net.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")},
                            strict=True)
        for name in cb.layer_names:
            assert bool(ring_zero(net.get_submodule(name.removeprefix("model."))).any()), (path.name, name)
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    # the final checkpoint is bit for bit the model the fit returns
    assert last.keys() == final.keys()
    assert all(torch.equal(last[k], final[k]) for k in final)
    # load_pruned_checkpoint rebuilds the pruned Winograd model (what deploy takes): converted with the checkpoint's
    # m, the border positions of the pruned kernels masked; the same function as the plain model
    loaded = load_pruned_checkpoint(make_module(), tmp_path / "last.ckpt").eval()
    border = zero_positions(2, SPATIAL_GROUPS["ring"])
    assert sorted(winograd_layers(loaded)) == sorted(cb.layer_names)
    for name, layer in winograd_layers(loaded).items():
        pruned = ring_zero(module.get_submodule(name))
        assert layer.mask is not None and torch.equal(~layer.mask, pruned[:, :, None, None] & border), name
        assert torch.count_nonzero(layer.weight.detach()[~layer.mask]) == 0, name
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), module.eval()(x), rtol=1e-4, atol=1e-4)


def test_resume_from_a_stage_one_checkpoint(tmp_path: Path, datamodule):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cb = WinogradPruning(**{**SPATIAL, "stages": 1})
    probe = EpochEnd()
    # stops after epoch 0 (max_steps): stage 1 done; the checkpoint holds the plain model
    make_trainer([cb, ckpt_cb, probe], enable_checkpointing=True, max_steps=2).fit(make_module(), datamodule)
    saved = probe.snaps[0]  # the state the checkpoint was written from (ModelCheckpoint runs last)
    assert cb.stage == 1 and len(cb.history) == 1
    assert not any(k.endswith(".mask") for k in torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"])

    class Restored(Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.current_epoch == 1:
                self.layers = {n: (m.weight.detach().clone(), m.mask) for n, m in winograd_layers(pl_module).items()}

    module2, cb2, restored = make_module(), WinogradPruning(**{**SPATIAL, "stages": 1}), Restored()
    make_trainer([cb2, restored]).fit(module2, datamodule, ckpt_path=tmp_path / "last.ckpt")
    # converted back on restore: the same masks bit for bit, U up to the round trip through the 3x3 kernels
    assert restored.layers.keys() == saved.keys()
    for name, (u, mask) in restored.layers.items():
        u0, mask0 = saved[name]
        assert mask is not None and mask0 is not None and torch.equal(mask, mask0), name
        assert torch.allclose(u, u0, rtol=1e-5, atol=1e-6), name
        assert torch.count_nonzero(u[~mask]) == 0, name
    assert cb2.stage == 1 and cb2.history == cb.history  # stage 1 is not run again
    assert not winograd_layers(module2)
    for name in cb2.layer_names:  # the ring pattern of stage 1 survived the second epoch
        mask0 = saved[name][1]
        assert mask0 is not None
        assert torch.equal(ring_zero(module2.get_submodule(name)), ~mask0[:, :, 0, 0]), name


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
