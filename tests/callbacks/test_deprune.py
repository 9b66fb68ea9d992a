import glob
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from wandb_helpers import offline_wandb_env, wandb_summary, wandb_timeout

from lightning_winoprune import DEPrune, WinogradConv2d, WinogradPruning, load_pruned_checkpoint
from lightning_winoprune._utils import is_depthwise
from lightning_winoprune.pruning import dr_column_masks
from lightning_winoprune.recipes import ImageClassifier

pytestmark = pytest.mark.usefixtures("quiet_single_thread")




def trainer(callbacks, max_epochs=1, **kw):
    return L.Trainer(callbacks=callbacks, max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=0,
                     logger=kw.pop("logger", False), enable_checkpointing=kw.pop("enable_checkpointing", False),
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def mobilenet(name="mobilenetv2_100"):
    return ImageClassifier(name, num_classes=10, in_chans=1, lr=0.01)


def masks_hold(module, names):
    for n in names:
        conv = module.get_submodule(n)
        assert torch.equal(conv.weight[~conv.weight_mask], torch.zeros_like(conv.weight[~conv.weight_mask])), n


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "dcp-x"}, r"method='dcp-x' is not valid; valid values are \['dcp', 'dcp-b', 'dcp-bh', 'channel'\]"),
        ({"dw_amount": 1.0}, r"dw_amount must be a number in \[0, 1\), got 1.0"),
        ({"pw_amount": -0.1}, r"pw_amount must be a number in \[0, 1\), got -0.1"),
        ({"tile": 0}, "tile must be a positive int, got 0"),
        ({"rounding": "sideways"}, r"rounding='sideways' is not valid; valid values are \['auto', 'down', 'up'\]"),
        ({"pw_select": "some"}, r"pw_select='some' is not valid; valid values are \['importance', 'all', 'none'\]"),
        ({"pw_fraction": 2}, r"pw_fraction must be a number in \[0, 1\], got 2"),
        ({"schedule": "gradual"}, "schedule='gradual' needs end_epoch"),
        ({"verbose": 3}, r"verbose=3 is not valid; valid values are \[0, 1, 2\]"),
        ({"calibration_batches": 0}, "calibration_batches must be a positive int, got 0"),
        ({"include": "("}, "include pattern '\\(' is not a valid regular expression"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        DEPrune(**kwargs)


def test_model_without_depthwise_conv_is_refused(data):
    module = ImageClassifier("resnet18", num_classes=10, in_chans=1, model_kwargs={"channels": (8, 16, 32, 64)})
    with pytest.raises(MisconfigurationException, match="found no depthwise conv"):
        trainer([DEPrune(verbose=0)]).fit(module, data)


def test_dcp_bh_on_mobilenetv2(data):
    module = mobilenet()
    cb = DEPrune(method="dcp-bh", dw_amount=0.5, pw_amount=0.3, tile=32, calibration_batches=1, verbose=0)
    builds = []
    masked_parameters = cb.masked_parameters
    cb.masked_parameters = lambda pl_module: builds.append(1) or masked_parameters(pl_module)  # type: ignore[method-assign]
    trainer([cb], max_epochs=2).fit(module, data)
    assert len(builds) == 2  # the masked list: at fit start and after the pruning step, not at each of the 4 steps
    dw = [n for n, k in cb.kinds.items() if k == "dw"]
    pw = [n for n, k in cb.kinds.items() if k == "pw"]
    assert dw and pw and all(is_depthwise(module.get_submodule(n)) for n in dw)
    # HSR: every sub-GEMM's pruned column count is a multiple of the tile; u/o chosen per layer by importance
    assert set(cb.dw_rounding.values()) == {"down", "up"} and set(cb.dw_rounding) == set(dw)
    for n in dw:
        for keep in dr_column_masks(module.get_submodule(n).weight_mask, 32):
            assert int((~keep).sum()) % 32 == 0, n
    # PW: the least important half of the pointwise convs lose ~30% of their filters, the others nothing
    assert len(cb.pw_pruned) == math.ceil(0.5 * len(pw))
    for n in pw:
        mask = module.get_submodule(n).weight_mask
        filters_pruned = (~mask).flatten(1).all(1)
        assert (~mask).flatten(1).any(1).equal(filters_pruned)  # whole filters only
        frac = filters_pruned.float().mean().item()
        assert (abs(frac - 0.3) < 0.02) if n in cb.pw_pruned else frac == 0.0
    assert cb.history[-1]["dw_sparsity"] > 0.3 and cb.history[-1]["pw_sparsity"] == pytest.approx(0.3, abs=0.01)
    masks_hold(module, cb.layer_names)  # a second epoch of SGD with momentum kept them at zero


def test_dcp_b_balances_every_sub_gemm(data):
    module = mobilenet()
    cb = DEPrune(method="dcp-b", dw_amount=0.6, pw_amount=0.0, verbose=0)
    trainer([cb]).fit(module, data)
    assert set(cb.kinds.values()) == {"dw"}  # pw_amount=0: no pointwise conv is touched
    for n in cb.layer_names:
        mask = module.get_submodule(n).weight_mask
        for keep in dr_column_masks(mask, 32):
            assert abs((~keep).float().mean().item() - 0.6) <= 0.5 / keep.numel() + 1e-9, n


def test_resume_and_load_for_inference(tmp_path, data):
    kw = {"method": "dcp-bh", "dw_amount": 0.5, "pw_amount": 0.3, "schedule": "gradual", "start_epoch": 0,
          "end_epoch": 1, "calibration_batches": 1, "verbose": 0}
    module = mobilenet()
    cb = DEPrune(**kw)
    trainer([cb, ModelCheckpoint(dirpath=tmp_path, save_last=True)], enable_checkpointing=True, max_epochs=2,
            max_steps=2).fit(module, data)  # stopped after epoch 0, as an interrupted run would be
    saved = {n: module.get_submodule(n).weight_mask.clone() for n in cb.layer_names}
    ckpt = tmp_path / "last.ckpt"

    class Capture(L.Callback):
        def on_train_start(self, tr, pl_module):
            self.masks = {n: pl_module.get_submodule(n).weight_mask.clone() for n in saved}

    module2, cb2, cap = mobilenet(), DEPrune(**kw), Capture()
    trainer([cb2, cap], max_epochs=2).fit(module2, data, ckpt_path=ckpt)
    assert all(torch.equal(cap.masks[n], saved[n]) for n in saved)  # bit-identical after restore
    assert cb2.dw_rounding == cb.dw_rounding and cb2.pw_pruned == cb.pw_pruned
    assert [h["epoch"] for h in cb2.history] == [0, 1]  # the schedule continued where it stopped
    masks_hold(module2, cb2.layer_names)

    fresh = load_pruned_checkpoint(mobilenet(), ckpt).eval()
    module.eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), module(x))


def test_resume_with_other_amounts_is_refused(tmp_path, data):
    kw = {"method": "dcp-bh", "dw_amount": 0.5, "pw_amount": 0.3, "schedule": "gradual", "start_epoch": 0,
          "end_epoch": 1, "calibration_batches": 1, "verbose": 0}
    trainer([DEPrune(**kw), ModelCheckpoint(dirpath=tmp_path, save_last=True)], enable_checkpointing=True,
            max_epochs=2, max_steps=2).fit(mobilenet(), data)
    for changed, bad, good in (({"dw_amount": 0.2}, "dw_amount=0.2", "dw_amount=0.5"),
                               ({"tile": 16}, "tile=16", "tile=32"),
                               ({"rounding": "up"}, "rounding='up'", "rounding='auto'")):
        cb2 = DEPrune(**{**kw, **changed})
        with pytest.raises(MisconfigurationException) as err:
            trainer([cb2], max_epochs=2).fit(mobilenet(), data, ckpt_path=tmp_path / "last.ckpt")
        msg = str(err.value)
        assert bad in msg and good in msg and "load_pruned_checkpoint" in msg, msg
        assert not cb2.history
    cb3 = DEPrune(**{**kw, "verbose": 2})  # harmless
    trainer([cb3], max_epochs=2).fit(mobilenet(), data, ckpt_path=tmp_path / "last.ckpt")
    assert [h["epoch"] for h in cb3.history] == [0, 1]


def test_schedule_that_cannot_complete_is_refused(data):
    with pytest.raises(MisconfigurationException, match=r"start_epoch=1 is not before max_epochs=1"):
        trainer([DEPrune(start_epoch=1, verbose=0)], max_epochs=1).fit(mobilenet(), data)


class Mixed(L.LightningModule):
    """Dense 3x3 stride-1 convs (WinogradPruning's) and a depthwise-separable block (DEPrune's) in one model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.dense = nn.Conv2d(16, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.dense(torch.relu(self.stem(x))))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.head(x.mean((2, 3)))

    def training_step(self, batch, idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def test_winograd_pruning_and_deprune_in_one_trainer(data):
    module = Mixed()
    wino = WinogradPruning(method="bwsp", amount=0.5, verbose=0)
    dep = DEPrune(method="dcp-b", dw_amount=0.5, pw_amount=0.25, pw_select="all", tile=8, verbose=0)
    trainer([wino, dep], max_epochs=2).fit(module, data)
    assert wino.layer_names == ["dense"] and isinstance(module.dense, WinogradConv2d)
    assert set(dep.layer_names) == {"dw", "pw"}  # the converted dense conv is not DEPrune's
    assert abs(module.dense.sparsity - 0.5) < 0.05
    assert torch.equal(module.dense.weight[~module.dense.mask], torch.zeros(int((~module.dense.mask).sum())))
    masks_hold(module, dep.layer_names)
    assert wino.state_key != dep.state_key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "efficientnet_b0"])
def test_other_families_end_to_end(name, data):
    module = mobilenet(name)
    cb = DEPrune(dw_amount=0.5, pw_amount=0.3, calibration_batches=1, verbose=0)
    trainer([cb]).fit(module, data)
    assert any(k == "dw" for k in cb.kinds.values()) and cb.pw_pruned
    assert cb.history[-1]["dw_sparsity"] > 0.2
    masks_hold(module, cb.layer_names)


@wandb_timeout(120)
def test_wandb_offline_run_gets_deprune_metrics_and_table(tmp_path, data, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    offline_wandb_env(monkeypatch, tmp_path)
    module = mobilenet()
    cb = DEPrune(method="dcp-bh", dw_amount=0.5, pw_amount=0.3, calibration_batches=1, verbose=0)
    try:
        trainer([cb], logger=WandbLogger(offline=True, save_dir=str(tmp_path), project="t")).fit(module, data)
    finally:
        wandb.finish()
        wandb.teardown()  # finish() may return before the offline log is flushed; teardown waits for the service
    (run_dir,) = (Path(p) for p in glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    summary = wandb_summary(run_dir)
    assert summary["deprune/dw_sparsity"] == pytest.approx(cb.history[0]["dw_sparsity"])
    assert summary["deprune/pw_sparsity"] == pytest.approx(cb.history[0]["pw_sparsity"])
    dw = [n for n, k in cb.kinds.items() if k == "dw"]
    for name in dw:
        keeps = dr_column_masks(module.get_submodule(name).weight_mask, 32)
        assert summary[f"deprune/real_dw/{name}"] == pytest.approx(min(float((~k).float().mean()) for k in keeps))
    table = summary["deprune/layers"]
    content = json.loads((run_dir / "files" / table["path"]).read_text())
    col = content["columns"].index("DW-Pat. / PW")
    patterns = {row[0]: row[col] for row in content["data"]}
    assert {patterns[n] for n in dw} == {"u", "o"}  # the paper's DW-Pat. column, chosen per layer


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_pruned_depthwise_weight_is_absent(poison):
    # before: DEPrune zeroed pruned weights with weight * mask, and NaN * 0 = NaN reached every output of the channel
    from lightning_winoprune.pruning._shrink import register_mask_buffer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8))
    conv = net[0]
    register_mask_buffer(conv)
    mask = torch.rand_like(conv.weight) > 0.5
    conv.weight_mask.copy_(mask)
    kept = torch.where(mask, conv.weight.detach(), 0.0)
    with torch.no_grad():
        conv.weight[~mask] = poison
    cb = DEPrune(verbose=0)
    cb.layer_names, cb.kinds = ["0"], {"0": "dw"}
    cb.enforce(net)  # what on_fit_start does after a restore
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(net(x), torch.nn.functional.conv2d(x, kept, conv.bias, padding=1, groups=8))
