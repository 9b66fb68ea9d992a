"""The callbacks under ``Trainer(precision="bf16-mixed")``: on the CPU, Lightning's ``torch.autocast("cpu",
dtype=torch.bfloat16)``.

Every Winograd method and every DEPrune method keeps its pruned weights (and their optimizer state) exactly zero,
a checkpoint resumes with bit-identical masks and float32 weights, ``LatencyValidation`` deploys and measures the
float32 model, and the ops run in the precision docs/pruning.md says: ``WinogradConv2d`` in float32 (autocast off
inside), plain convs (the depthwise convs DEPrune masks among them) in bfloat16.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from winograd_helpers import QUIET_FITS, winograd_layers

from lightning_winoprune import DEPrune, LatencyValidation, WinogradConv2d, WinogradPruning
from lightning_winoprune._io import load_checkpoint
from lightning_winoprune.data import DigitsDataModule
from lightning_winoprune.pruning import METHODS
from lightning_winoprune.pruning._depthwise import DW_BASELINES, DW_METHODS
from lightning_winoprune.recipes import ImageClassifier

pytestmark = [*QUIET_FITS, pytest.mark.usefixtures("quiet_single_thread")]
BF16 = {"precision": "bf16-mixed"}


class SmallNet(L.LightningModule):
    """A dense first conv (bfloat16 under autocast, as ``skip_first`` keeps it), then 3x3 stride-1 convs that
    become Winograd layers: their input arrives in bfloat16."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def make_trainer(callbacks: list, **overrides: Any) -> L.Trainer:
    kwargs: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 0,
        "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
        "enable_checkpointing": False, **BF16,
    }
    kwargs.update(overrides)
    return L.Trainer(callbacks=callbacks, **kwargs)


@pytest.fixture
def datamodule() -> DigitsDataModule:
    return DigitsDataModule(image_size=16, in_chans=1, batch_size=16)


@pytest.fixture(scope="module")
def data32() -> DigitsDataModule:
    """32x32: no stride-2 conv of a timm model sees a 1x1 map, where torch 2.14's bfloat16 weight gradient of a
    3x3 stride-2 conv is garbage (non-finite in about a third of the cases; docs/pruning.md, "Training in
    bfloat16")."""
    return DigitsDataModule(image_size=32, in_chans=1, batch_size=16)


def assert_pruned_exactly_zero(optimizer: torch.optim.Optimizer, weight: torch.Tensor, keep: torch.Tensor,
                               name: str) -> None:
    """The pruned entries of ``weight`` and of its optimizer state are exact zeros; the weight is float32."""
    assert weight.dtype == torch.float32, name
    assert torch.count_nonzero(weight.detach()[~keep]) == 0, name
    for key, value in optimizer.state[weight].items():
        if isinstance(value, torch.Tensor) and value.shape == weight.shape:
            assert torch.count_nonzero(value[~keep]) == 0, (name, key)


# ----------------------------------------------------------------------------------------------- WinogradPruning
@pytest.mark.parametrize("method", list(METHODS))
def test_every_winograd_method_keeps_exact_zeros_under_bf16_mixed(method, datamodule):
    module = SmallNet()
    extra = {"spatial_epochs": 1} if method == "spatial-winograd" else {}
    cb = WinogradPruning(method=method, amount=0.5, start_epoch=1, verbose=0, calibration_batches=1, **extra)
    trainer = make_trainer([cb], max_epochs=3)
    trainer.fit(module, datamodule)
    layers = winograd_layers(module)
    assert layers and set(cb.layer_names) == set(layers)
    assert cb.history and cb.history[0]["epoch"] == 1  # pruned with two epochs of bfloat16 training still to come
    assert all(torch.isfinite(p).all() for p in module.parameters())
    for name, layer in layers.items():
        assert layer.mask is not None and 0.3 < 1 - layer.mask.float().mean().item() < 0.7, name
        assert_pruned_exactly_zero(trainer.optimizers[0], layer.weight, layer.mask, name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = module.model[0](torch.randn(2, 1, 16, 16))
        assert first.dtype == torch.bfloat16  # the dense first conv runs in bfloat16 ...
        layer = next(iter(layers.values()))
        assert layer(first).dtype == torch.float32  # ... the Winograd layers do not, whatever their input


def test_resume_under_bf16_mixed_restores_masks_bit_identically(tmp_path, datamodule):
    kwargs = {"method": "bwsp", "amount": 0.6, "schedule": "gradual", "start_epoch": 0, "end_epoch": 2,
              "verbose": 0, "calibration_batches": 1}
    module, cb = SmallNet(), WinogradPruning(**kwargs)
    make_trainer([cb, ModelCheckpoint(dirpath=tmp_path, save_last=True)], enable_checkpointing=True,
                 max_epochs=3, max_steps=3).fit(module, datamodule)  # stops after epoch 0, like an interrupted run
    saved = {n: module.get_submodule(n).mask.clone() for n in cb.layer_names}
    ckpt = load_checkpoint(tmp_path / "last.ckpt")  # weights_only, with the package's allowlist
    assert all(t.dtype == torch.float32 for t in ckpt["state_dict"].values() if t.is_floating_point())

    class Capture(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.masks = {n: pl_module.get_submodule(n).mask.clone() for n in saved}

    module2, cb2, cap = SmallNet(), WinogradPruning(**kwargs), Capture()
    trainer2 = make_trainer([cb2, cap], max_epochs=3)
    trainer2.fit(module2, datamodule, ckpt_path=tmp_path / "last.ckpt")
    assert all(torch.equal(cap.masks[n], saved[n]) for n in saved)
    assert [h["epoch"] for h in cb2.history] == [0, 1, 2]
    for name in cb2.layer_names:
        layer = module2.get_submodule(name)
        assert not (~saved[name] & layer.mask).any(), name  # pruned before the restore stays pruned
        assert_pruned_exactly_zero(trainer2.optimizers[0], layer.weight, layer.mask, name)


# ------------------------------------------------------------------------------------------------------- DEPrune
@pytest.mark.parametrize("method", list(DW_METHODS + DW_BASELINES))
def test_every_deprune_method_keeps_exact_zeros_under_bf16_mixed(method, data32):
    module = ImageClassifier("mobilenetv2_050", num_classes=10, in_chans=1, lr=0.01)
    cb = DEPrune(method=method, dw_amount=0.5, pw_amount=0.3, start_epoch=1, calibration_batches=1, verbose=0)
    trainer = make_trainer([cb], max_epochs=2, limit_train_batches=2)
    trainer.fit(module, data32)
    assert cb.layer_names
    for name in cb.layer_names:
        conv = module.get_submodule(name)
        assert_pruned_exactly_zero(trainer.optimizers[0], conv.weight, conv.weight_mask, name)
    dw = next(module.get_submodule(n) for n, kind in cb.kinds.items() if kind == "dw")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = dw(torch.randn(1, dw.in_channels, 8, 8))
    assert y.dtype == torch.bfloat16  # a masked depthwise conv is a plain conv: bfloat16 under autocast


# --------------------------------------------------------------------------------------------- LatencyValidation
def test_latency_validation_deploys_the_float32_model_after_a_bf16_mixed_fit(data32, tmp_path):
    module = ImageClassifier("resnet18", num_classes=10, in_chans=1,
                             model_kwargs={"channels": (16, 32, 64, 128), "zero_init_last": False})
    pruning = WinogradPruning(method="bwsp", amount=0.7, verbose=0, calibration_batches=1)
    latency = LatencyValidation(output_dir=str(tmp_path), repeats=2, warmup=0, verbose=0)
    make_trainer([pruning, latency], max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(module, data32)
    report = latency.report
    assert report is not None and [r.name for r in report.layers] == pruning.layer_names
    assert all(r.max_error < 1e-4 for r in report.layers)  # the float32 deployed layers against the float32 model
    assert report.model is not None and report.model.max_error < 1e-4
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())
    assert all(isinstance(module.get_submodule(n), WinogradConv2d) for n in pruning.layer_names)
