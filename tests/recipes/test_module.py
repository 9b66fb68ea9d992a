"""``ImageClassifier`` from config: weights from a file, multistep LR, top-5 accuracy; the recipe callbacks."""

from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_winoprune.callbacks import PruningCallback
from lightning_winoprune.data import DigitsDataModule
from lightning_winoprune.recipes import FitSummary, ImageClassifier, PrunedCheckpoint
from lightning_winoprune.recipes._callbacks import _val_accuracy

SMALL = {"channels": (8, 16, 32, 64)}  # a narrow resnet18: the same structure, fast


def small(**kwargs):
    kwargs.setdefault("model_kwargs", SMALL)
    return ImageClassifier("resnet18", **kwargs)


def same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: str = "\0") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in sa.items() if not k.startswith(skip))


@pytest.mark.parametrize("form", ["bare", "lightning", "wrapped", "ddp"])
def test_checkpoint_path_loads_every_usual_file_form(tmp_path, form):
    src = small(num_classes=10, in_chans=1)
    state = src.model.state_dict()
    obj = {"bare": state, "lightning": {"state_dict": src.state_dict(), "epoch": 3},
           "wrapped": {"model": state}, "ddp": {f"module.{k}": v for k, v in state.items()}}[form]
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    dst = small(num_classes=10, in_chans=1, checkpoint_path=str(path))
    assert same_weights(src.model, dst.model)
    assert dst.hparams["checkpoint_path"] == str(path)


def test_checkpoint_path_adapts_head_and_stem(tmp_path):
    src = timm.create_model("resnet18", num_classes=1000, in_chans=3, **SMALL)  # an "ImageNet" model
    torch.save(src.state_dict(), tmp_path / "in1k.pt")
    with pytest.warns(UserWarning, match="classifier head"):
        dst = small(num_classes=10, in_chans=1, checkpoint_path=str(tmp_path / "in1k.pt"))
    assert same_weights(src, dst.model, skip="fc.") is False  # the stem changed shape, see below
    body = {k: v for k, v in src.state_dict().items() if not k.startswith(("fc.", "conv1."))}
    assert all(torch.equal(v, dst.model.state_dict()[k]) for k, v in body.items())
    assert dst.model.fc.out_features == 10
    # timm's adaptation of an RGB stem to one channel: the sum over the input channels
    assert torch.allclose(dst.model.conv1.weight, src.conv1.weight.sum(dim=1, keepdim=True))


def test_checkpoint_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        small(checkpoint_path=str(tmp_path / "missing.pt"))
    other = timm.create_model("resnet18", num_classes=10, in_chans=1, channels=(8, 16, 32, 128))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"do not fit .*layer4"):
        small(checkpoint_path=str(tmp_path / "other.pt"))
    state = small().model.state_dict()
    state.pop("layer1.0.conv1.weight")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"missing keys \['layer1.0.conv1.weight'\]"):
        small(checkpoint_path=str(tmp_path / "partial.pt"))
    torch.save({"epoch": 1}, tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        small(checkpoint_path=str(tmp_path / "nothing.pt"))


def test_schedule_validation_and_multistep():
    with pytest.raises(ValueError, match="needs lr_milestones"):
        small(lr_schedule="multistep")
    with pytest.raises(ValueError, match="increasing epochs"):
        small(lr_schedule="multistep", lr_milestones=[4, 2])
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        small(num_classes=0)
    mod = small(lr=0.1, lr_schedule="multistep", lr_milestones=[2, 3], lr_gamma=0.1)
    config = mod.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001])


class Metrics(Callback):
    def on_validation_end(self, trainer, pl_module):
        self.metrics = dict(trainer.callback_metrics)


def test_top5_is_logged_with_more_than_five_classes_and_dense_probe_matches_val_acc(quiet_single_thread):
    data = DigitsDataModule(image_size=16, batch_size=16)
    mod = small(num_classes=10, in_chans=1)
    probe = Metrics()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[probe], num_sanity_val_steps=0)
    trainer.fit(mod, datamodule=data)
    assert {"val/acc", "val/acc_top5"} <= set(probe.metrics)
    assert {"train/acc", "train/acc_top5"} <= set(trainer.callback_metrics)
    assert float(probe.metrics["val/acc_top5"]) >= float(probe.metrics["val/acc"])
    # FitSummary's own measurement (used when there is no validation before the prune point) equals val/acc
    assert _val_accuracy(trainer, mod) == pytest.approx(float(probe.metrics["val/acc"]))
    assert "val_acc_top5" not in small(num_classes=5).metrics


def test_fit_summary_records_and_restores():
    fit = FitSummary()
    fit.val_history, fit.dense_acc, fit.dense_epoch = {0: 0.5, 1: 0.75}, 0.5, 0
    again = FitSummary()
    again.load_state_dict(fit.state_dict())
    assert again.val_history == {0: 0.5, 1: 0.75} and again.last_val_acc == 0.75
    assert (again.dense_acc, again.dense_epoch) == (0.5, 0)


class DecliningModule(L.LightningModule):
    """Validation accuracy 0.9, 0.8, 0.7, ...: the dense epochs always look best."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 0.9 - 0.1 * self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class NoOpPruning(PruningCallback):
    def prune(self, trainer, pl_module, target):
        self.history.append({"epoch": trainer.current_epoch, "target": target})

    def masked_parameters(self, pl_module):
        return []


@pytest.mark.parametrize("schedule", [{"schedule": "one_shot", "start_epoch": 2},
                                      {"schedule": "gradual", "start_epoch": 1, "end_epoch": 2}])
def test_pruned_checkpoint_never_keeps_an_epoch_before_the_last_pruning_step(tmp_path, schedule,
                                                                             quiet_single_thread):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    pruned = PrunedCheckpoint(dirpath=tmp_path / "pruned", monitor="val/acc", mode="max", save_last=True)
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", monitor="val/acc", mode="max")
    pruner = NoOpPruning(0.5, **schedule)
    trainer = L.Trainer(max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[pruner, pruned, plain], num_sanity_val_steps=0)
    trainer.fit(DecliningModule(), loader, loader)
    assert [h["epoch"] for h in pruner.history][-1] == 2
    assert Path(plain.best_model_path).name == "epoch=0-step=2.ckpt"  # what a plain ModelCheckpoint would keep
    assert Path(pruned.best_model_path).name == "epoch=2-step=6.ckpt"
    assert float(pruned.best_model_score) == pytest.approx(0.7)
    assert sorted(p.name for p in (tmp_path / "pruned").iterdir()) == ["epoch=2-step=6.ckpt", "last.ckpt"]
