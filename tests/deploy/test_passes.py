"""``deploy``'s passes, each run alone on a small model: record, fold, fuse, route, pack, pools, precision, check,
report."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_winoprune import WinogradConv2d
from lightning_winoprune.deploy import DeployMismatchError, DeployRoute, PackedWinogradConv
from lightning_winoprune.deploy._packed_bf16 import Bf16Model, bf16_refusal
from lightning_winoprune.deploy._passes import (
    PASSES,
    DeployOptions,
    DeployState,
    check_pass,
    fold_pass,
    fuse_pass,
    pack_pass,
    pools_pass,
    precision_pass,
    record_pass,
    report_pass,
    route_pass,
    run_passes,
)
from lightning_winoprune.deploy._record import Chain
from lightning_winoprune.deploy._routes import Precision, candidates, rule_route
from lightning_winoprune.kernels import Backend, native_available

needs_ext = pytest.mark.skipif(not native_available(), reason="the native extension is not loaded")


class Net(nn.Module):
    """conv -> BN -> ReLU; a Winograd layer -> BN (+ residual, so its ReLU stays); a max-pool; a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.wino = WinogradConv2d(8, 8, m=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        y = self.act2(self.bn2(self.wino(y)) + y)
        return self.head(self.pool(y))


@pytest.fixture
def net() -> Net:
    gen = torch.Generator().manual_seed(0)
    model = Net()
    for bn in (model.bn, model.bn2):
        bn.running_mean.copy_(torch.rand(8, generator=gen) - 0.5)
        bn.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
        bn.weight.data.copy_(torch.rand(8, generator=gen) + 0.5)
    score = model.wino.weight.detach().abs()
    model.wino.set_mask(score > score.flatten().kthvalue(int(0.6 * score.numel())).values)
    model.wino.zero_pruned_()
    return model.eval()


def state_for(model: nn.Module, **options) -> DeployState:
    backend = Backend.NATIVE if native_available() else Backend.TORCH
    opts = DeployOptions(**{"tune": False, "time_model": False, "backend": backend, **options})
    return DeployState(model, copy.deepcopy(model), torch.randn(2, 3, 12, 12), opts)


def chain(state: DeployState, name: str) -> Chain:
    return next(c for c in state.chains if c.name == name)


def test_pass_names_in_order():
    assert [name for name, _ in PASSES] == ["record", "fold", "fuse", "route", "pack", "pools", "precision", "check",
                                            "report"]
    with pytest.raises(ValueError, match=r"until='nope' is not valid; valid values are \['record'"):
        run_passes(state_for(nn.Identity()), until="nope")


def test_record_links_only_what_a_conv_alone_feeds(net):
    state = record_pass(state_for(net))
    torch.testing.assert_close(state.reference, net(state.x))
    first, wino, head = chain(state, "conv"), chain(state, "wino"), chain(state, "head")
    assert (first.bn_name, first.act_name, first.act.value) == ("bn", "act", "relu")
    assert (wino.bn_name, wino.act_name) == ("bn2", "")  # the residual add reads bn2's output before act2
    assert head.bn is None and head.x.shape == (2, 8, 6, 6)  # its recorded input is the pool's output
    torch.testing.assert_close(first.ref, net.act(net.bn(net.conv(state.x))))


def test_record_skips_a_batchnorm_without_running_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    state = record_pass(state_for(model))
    assert state.chains[0].bn is None  # eval mode still normalises by the batch: nothing to fold


def test_fold_gives_the_conv_and_batchnorm_function(net):
    state = fold_pass(record_pass(state_for(net)))
    first = chain(state, "conv")
    y = F.conv2d(first.x, first.weight, first.bias, padding=1)
    torch.testing.assert_close(y, net.bn(net.conv(first.x)), rtol=1e-5, atol=1e-5)
    wino = chain(state, "wino")
    assert torch.equal(wino.mask, net.wino.mask)  # scaling U's rows keeps the Winograd mask
    assert bool((wino.weight[~wino.mask] == 0).all())


def test_fold_off_unlinks_batchnorm_and_activation(net):
    state = fold_pass(record_pass(state_for(net, fold_bn=False)))
    first = chain(state, "conv")
    assert first.bn is None and first.act_name == "" and first.bias is None
    torch.testing.assert_close(first.weight, net.conv.weight.detach())


def test_fuse_off_keeps_the_activation_module(net):
    state = fuse_pass(fold_pass(record_pass(state_for(net, fuse_activation=False))))
    first = chain(state, "conv")
    assert first.act.value == "none" and first.act_name == "" and first.bn_name == "bn"


@needs_ext
def test_route_without_tuning_takes_the_rule_and_checks_every_candidate(net):
    state = route_pass(fuse_pass(fold_pass(record_pass(state_for(net)))))
    rows = {r.name: r for r in state.rows}
    assert rows["wino"].route is DeployRoute.WINOGRAD and isinstance(state.chosen["wino"], PackedWinogradConv)
    assert rows["head"].route is DeployRoute.GEMM  # a 1x1 stride-1 conv
    assert all(err <= 1e-4 for r in state.rows for err in r.errors.values())
    factories, _ = candidates(chain(state, "wino"), -1, Backend.NATIVE)
    assert set(factories) == {DeployRoute.WINOGRAD, DeployRoute.CSR}  # pruned: no dense equivalent
    assert rule_route({DeployRoute.EAGER: nn.Identity(), DeployRoute.ONEDNN: nn.Identity()}) is DeployRoute.ONEDNN


@needs_ext
def test_route_with_tuning_picks_the_fastest_timed_candidate(net):
    state = route_pass(fuse_pass(fold_pass(record_pass(state_for(net, tune=True, repeats=2, warmup=0)))))
    for row in state.rows:
        if len(row.times_ms) > 1:
            assert row.route == min(row.times_ms, key=row.times_ms.__getitem__)
            assert row.dense_ms is not None


@needs_ext
def test_pack_installs_the_chosen_modules_and_drops_what_they_absorbed(net):
    state = pack_pass(route_pass(fuse_pass(fold_pass(record_pass(state_for(net))))))
    work = state.work
    assert isinstance(work.bn, nn.Identity) and isinstance(work.act, nn.Identity) and isinstance(work.bn2, nn.Identity)
    assert isinstance(work.act2, nn.ReLU)  # not fused: the residual add comes first
    assert work.wino is state.chosen["wino"]
    torch.testing.assert_close(work(state.x), net(state.x), rtol=1e-4, atol=1e-4)


@needs_ext
def test_pools_moves_an_exact_max_pool_to_the_native_kernel(net):
    state = pools_pass(pack_pass(route_pass(fuse_pass(fold_pass(record_pass(state_for(net)))))))
    pool_row = next(r for r in state.rows if r.kind == "pool")
    assert pool_row.route is DeployRoute.NATIVE and type(state.work.pool).__name__ == "NativeMaxPool2d"
    torch_state = pools_pass(state_for(net, backend=Backend.TORCH))
    assert not any(r.kind == "pool" for r in torch_state.rows)


def test_precision_leaves_a_float32_model_alone(net):
    state = run_passes(state_for(net), until="pools")
    work = state.work
    assert precision_pass(state).work is work


@pytest.mark.skipif(bf16_refusal() is not None, reason=f"no bfloat16 kernels here: {bf16_refusal()}")
def test_precision_puts_a_bfloat16_model_behind_its_boundary(net):
    state = run_passes(state_for(net, precision=Precision.BF16), until="pools")
    assert not any(r.kind == "pool" for r in state.rows)  # the native pool is float32 NCHW: pools stay in torch
    state = precision_pass(state)
    assert isinstance(state.work, Bf16Model)
    kinds = {type(m).__name__: m for m in state.work.modules()}
    assert kinds["PackedWinogradConvBf16"].bias.dtype == torch.float32  # added in float32 by the kernel
    assert kinds["DenseConv"].weight.dtype == torch.bfloat16
    out = state.work(state.x)
    assert out.dtype == torch.float32 and check_pass(state).error <= state.tol == 5e-2


def test_check_catches_a_wrong_module_and_report_summarises(net):
    state = run_passes(state_for(net, backend=Backend.TORCH), until="pools")
    check_pass(state)
    assert state.error <= state.tol == 1e-4
    report = report_pass(state).report
    assert report is not None and report.routes == {r.name: r.route for r in state.rows}
    assert str(report.layers[0].route) in ("eager", "onednn")  # routes print as their value
    with torch.no_grad():
        for buf in state.work.head.buffers():
            buf.mul_(2)
    with pytest.raises(DeployMismatchError, match="deployed model's output differs"):
        check_pass(state)
