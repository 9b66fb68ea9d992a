import json

import pytest
import torch

from lightning_winoprune import WinogradConv2d
from lightning_winoprune.recipes import ImageClassifier, run_demo
from lightning_winoprune.recipes._demo import main


def test_demo_runs_end_to_end_and_converts_exactly(tmp_path):
    summary = run_demo("resnet18", m=2, dense_epochs=1, finetune_epochs=1, image_size=16, batch_size=32,
                       out=tmp_path, limit_batches=3)
    assert summary["converted_layers"] == 12  # every 3x3 stride-1 conv of resnet18 but the first
    assert summary["conversion_rel_error"] < 1e-5
    # converting changes nothing: the accuracy right after conversion equals the dense one
    assert summary["converted_test_acc"] == pytest.approx(summary["dense_test_acc"], abs=1e-6)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    state = torch.load(summary["state_dict"])
    assert any(k.endswith("conv1.weight") and v.shape[-1] == 4 for k, v in state.items())


def test_demo_cli_parses_and_rejects_bad_m(tmp_path):
    with pytest.raises(SystemExit):
        main(["--m", "3", "--out", str(tmp_path)])


def test_classifier_validates_and_trains_winograd_weights():
    with pytest.raises(ValueError, match="lr_schedule='warm' is not valid"):
        ImageClassifier("resnet18", lr_schedule="warm")
    with pytest.raises(ValueError, match="lr must be > 0"):
        ImageClassifier("resnet18", lr=0.0)
    mod = ImageClassifier("resnet18", num_classes=10, in_chans=1)
    from lightning_winoprune import winogradize

    winogradize(mod.model)
    layers = [m for m in mod.modules() if isinstance(m, WinogradConv2d)]
    assert layers and all(any(p is m.weight for p in mod.parameters()) for m in layers)
