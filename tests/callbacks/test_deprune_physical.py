"""DEPrune(physical=True): pruned pointwise filters removed for real (torch-pruning), and the checkpoint round trip."""

import copy
import importlib.util
import sys

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_winoprune import DEPrune, load_pruned_checkpoint
from lightning_winoprune.recipes import ImageClassifier

needs_tp = pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None,
                              reason="needs torch-pruning (the test extra installs it)")

KW = {"dw_amount": 0.5, "pw_amount": 0.3, "pw_select": "importance", "calibration_batches": 1, "verbose": 0}


pytestmark = [pytest.mark.usefixtures("quiet_single_thread"),
              pytest.mark.filterwarnings("ignore:.*kept pruned filters of.*")]




def trainer(callbacks, **kw):
    return L.Trainer(callbacks=callbacks, max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)


def classifier(name):
    return ImageClassifier(name, num_classes=10, in_chans=1)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


class CaptureMasked(L.Callback):
    """A copy of the trained, masked, not yet shrunk network (``on_train_end`` runs before DEPrune's ``on_fit_end``)."""

    def on_train_end(self, trainer, pl_module):
        self.net = copy.deepcopy(pl_module.model)
        self.params = n_params(pl_module)


def silence_removed_channels(masked, removed, example):
    """Make the removed channels of the masked network ``masked`` output exact zeros, where they are dead (in place).

    A pruned filter's channel is not silent in the masked network: BatchNorm turns the zero conv output into its
    constant shift ``beta - gamma * mean / sqrt(var + eps)`` (and a pruned SE-reduce conv emits its bias), which the
    shrink drops with the channel. So the reference for the shrunk network is the masked one with those shifts zeroed:
    on every channel the shrink removed (found by replaying it on a copy with torch-pruning and mapping each removed
    index back to the layer's original channel) whose BatchNorm input is exactly zero, i.e. that only carries a pruned
    filter's output (forward hooks, so silencing propagates). A channel removed while it carried live values is left
    alone, so the comparison catches it.
    """
    import torch_pruning as tp

    shadow = copy.deepcopy(masked).eval()
    dg = tp.DependencyGraph().build_dependency(shadow, example_inputs=example, verbose=False)
    names = {m: n for n, m in shadow.named_modules()}
    original: dict[str, list[int]] = {}  # layer -> original index of each of its current output channels
    gone: dict[str, list[int]] = {}  # layer -> removed original output channels
    for name, idxs in removed:
        group = dg.get_pruning_group(shadow.get_submodule(name.removeprefix("model.")), tp.prune_conv_out_channels,
                                     idxs)
        for item in group.items:
            mod = item.dep.target.module
            if mod not in names or not dg.is_out_channel_pruning_fn(item.dep.handler):
                continue
            width = mod.num_features if isinstance(mod, nn.BatchNorm2d) else mod.out_channels
            current = original.setdefault(names[mod], list(range(width)))
            cut = set(item.idxs)
            gone.setdefault(names[mod], []).extend(current[i] for i in cut)
            original[names[mod]] = [c for i, c in enumerate(current) if i not in cut]
        group.prune()

    def silence(chans):
        def hook(mod, args, out):
            dead = chans[args[0][:, chans].abs().amax((0, 2, 3)) == 0]  # fed only by silent channels
            out[:, dead] = 0
        return hook

    with torch.no_grad():
        for n, chans in gone.items():
            mod, chans = masked.get_submodule(n), torch.tensor(chans)
            if isinstance(mod, nn.BatchNorm2d):
                mod.register_forward_hook(silence(chans))
            elif isinstance(mod, nn.Conv2d) and mod.bias is not None:  # a pruned filter's bias (SE reduce conv)
                mod.bias[chans[mod.weight[chans].flatten(1).abs().amax(1) == 0]] = 0


def test_missing_torch_pruning_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(MisconfigurationException, match=r"pip install 'lightning-winoprune\[physical\]'"):
        DEPrune(physical=True)
    DEPrune(physical=False)  # the default never imports it
    state = {"layer_names": [], "physical_done": True, "physical_removed": [("conv", [0])],
             "physical_input": ([1, 1, 8, 8], "float32")}
    with pytest.raises(MisconfigurationException, match="torch-pruning, which is not installed"):
        load_pruned_checkpoint(nn.Conv2d(1, 2, 1), {"callbacks": {"DEPrune{}": state}, "state_dict": {}})


def test_physical_must_be_bool():
    with pytest.raises(MisconfigurationException, match="physical must be a bool, got 'yes'"):
        DEPrune(physical="yes")


@needs_tp
@pytest.mark.parametrize(
    ("name", "select"),
    [("mobilenetv2_100", "importance"), ("efficientnet_b0", "importance"), ("efficientnet_b0", "all")],
)
def test_shrink_through_residual_se_and_bn(name, select, data, tmp_path):
    module, cb, cap = classifier(name), DEPrune(physical=True, **{**KW, "pw_select": select}), CaptureMasked()
    tr = trainer([cb, cap])
    tr.fit(module, data)
    masked = cap.net

    # fewer parameters, recorded in the state
    assert cb.physical_done and cb.physical_removed
    before, after = cb.physical_params
    assert before == cap.params == n_params(classifier(name)) and after == n_params(module) < before
    print(f"{name} ({select}): {before:,} -> {after:,} parameters; {len(cb.physical_removed)} of "
          f"{len(cb.pw_pruned)} pruned pointwise convs shrunk, {len(cb.physical_skipped)} (partly) kept masked")

    # every pruned pointwise conv lost its pruned filters, but those kept (skipped, with a reason)
    removed = {n for n, _ in cb.physical_removed}
    assert removed <= set(cb.pw_pruned) and set(cb.physical_skipped) <= set(cb.pw_pruned)
    for pw in cb.pw_pruned:
        was, now = masked.get_submodule(pw.removeprefix("model.")), module.get_submodule(pw)
        pruned = int((~was.weight_mask.flatten(1).any(1)).sum())
        assert pruned > 0 and now.weight_mask.shape == now.weight.shape
        left = int((~now.weight_mask.flatten(1).any(1)).sum())
        lost = was.out_channels - now.out_channels
        if pw.endswith("se.conv_expand"):  # the gates of channels removed with a conv_pw go too, live or not
            assert lost >= pruned - left, pw
        else:
            assert lost == pruned - left, pw
        assert (left > 0) == (pw in cb.physical_skipped), pw

    # depthwise (and all other) masks follow the new shapes and still hold
    for n in cb.layer_names:
        conv = module.get_submodule(n)
        assert conv.weight_mask.shape == conv.weight.shape, n
        assert torch.equal(conv.weight[~conv.weight_mask], torch.zeros(int((~conv.weight_mask).sum()))), n

    # the coupled layers shrank with the pointwise convs: BN, depthwise conv, SE convs, residual partners
    for n in removed:
        block = module.get_submodule(n.rsplit(".", 1)[0].removesuffix(".se"))
        if n.endswith("conv_pw") and hasattr(block, "conv_pwl"):  # expansion conv of an inverted residual
            width = block.conv_pw.out_channels
            assert block.bn1.num_features == block.conv_dw.out_channels == block.bn2.num_features == width
            assert block.conv_pwl.in_channels == width
            if hasattr(block.se, "conv_reduce"):
                assert block.se.conv_reduce.in_channels == block.se.conv_expand.out_channels == width
        if n.endswith("se.conv_reduce"):
            assert block.se.conv_expand.in_channels == block.se.conv_reduce.out_channels
        if n.endswith("conv_pwl") and block.has_skip:  # every conv writing the residual stream shrank alike
            stage = module.get_submodule(n.rsplit(".", 2)[0])
            assert len({b.conv_pwl.out_channels for b in stage}) == 1
    if name == "mobilenetv2_100":
        assert any(n.endswith("conv_pwl") and module.get_submodule(n[:-9]).has_skip for n in removed)
    else:
        assert any(n.endswith("se.conv_reduce") for n in removed)
        assert any(n.endswith("se.conv_expand") for n in cb.physical_skipped)  # gates of live channels
        assert select == "importance" or any(n.endswith("conv_pw") for n in removed)

    # the shrunk network computes what the masked one does with the removed channels silenced (see
    # silence_removed_channels: in the masked network a pruned channel still carries BatchNorm's shift)
    x = torch.randn(2, 1, 16, 16)
    silence_removed_channels(masked, cb.physical_removed, x[:1])
    module.eval()
    masked.eval()
    with torch.no_grad():
        out, ref = module(x), masked(x)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))

    # the checkpoint written after fit rebuilds the shrunk model, bit for bit, into a LightningModule or the bare net
    path = tmp_path / "shrunk.ckpt"
    tr.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"][cb.state_key]
    assert state["physical_done"] and state["physical_removed"] == cb.physical_removed
    fresh = load_pruned_checkpoint(classifier(name), path).eval()
    bare = load_pruned_checkpoint(timm.create_model(name, num_classes=10, in_chans=1), path, prefix="model.").eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), out) and torch.equal(bare(x), out)
    assert n_params(fresh) == after

    # ... but is not one to resume a fit from: not into an unshrunk model, nor into a shrunk one (stale optimizer)
    with pytest.raises(MisconfigurationException, match=r"has shape .* it is for inference or export"):
        trainer([DEPrune(physical=True, **KW)]).fit(classifier(name), data, ckpt_path=path)
    with pytest.raises(MisconfigurationException, match="a fit cannot resume from it"):
        trainer([DEPrune(**KW)]).fit(load_pruned_checkpoint(classifier(name), path), data, ckpt_path=path)


@needs_tp
def test_state_round_trip_and_no_physical_by_default(data):
    module, cb = classifier("mobilenetv2_100"), DEPrune(**KW)
    shapes = {n: p.shape for n, p in module.named_parameters()}
    trainer([cb]).fit(module, data)
    assert not cb.physical_done and cb.physical_removed == [] and cb.state_dict()["physical_done"] is False
    assert {n: p.shape for n, p in module.named_parameters()} == shapes  # masks only

    module, cb = classifier("mobilenetv2_100"), DEPrune(physical=True, **KW)
    trainer([cb]).fit(module, data)
    restored = DEPrune(**KW)
    restored.load_state_dict(cb.state_dict())
    assert restored.physical_done and restored.physical_removed == cb.physical_removed
    assert restored.physical_skipped == cb.physical_skipped and restored.physical_input == ([1, 1, 16, 16], "float32")
    assert restored.physical_params == cb.physical_params
