"""The ``winoprune::conv2d_act`` op's cache of oneDNN-blocked weights: same results as ``F.conv2d``, never stale."""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

import lightning_winoprune  # noqa: F401  (registers the winoprune:: ops)
from lightning_winoprune.deploy import _ops

pytestmark = pytest.mark.skipif(not _ops.onednn_available(), reason="no oneDNN in this torch build")


def conv_act(x, w, b, stride=1, pad=1, groups=1, act=1):
    return torch.ops.winoprune.conv2d_act(x, w, b, stride, stride, pad, pad, groups, act)


def reference(x, w, b, stride=1, pad=1, groups=1):
    return F.relu(F.conv2d(x, w, b, stride, pad, 1, groups))


@pytest.mark.parametrize(("stride", "groups"), [(1, 1), (2, 1), (2, 2)])
def test_cached_weight_gives_conv2d_results_every_call(stride, groups):
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 6 // groups, 3, 3, generator=gen), torch.randn(8, generator=gen)
    x = torch.randn(2, 6, 11, 9, generator=gen)
    for _ in range(3):  # the first call packs, the later ones hit the cache
        torch.testing.assert_close(conv_act(x, w, b, stride, groups=groups), reference(x, w, b, stride, groups=groups),
                                   rtol=1e-5, atol=1e-5)
    assert id(w) in _ops._PACKED


def test_an_in_place_change_of_the_weight_is_seen():
    """load_state_dict copies into the same tensor: the blocked copy must be made again, not reused."""
    gen = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(4, 3, 3, 3, generator=gen), torch.randn(4, generator=gen), torch.randn(1, 3, 8, 8,
                                                                                                 generator=gen)
    conv_act(x, w, b)
    w.copy_(torch.randn(4, 3, 3, 3, generator=gen))
    torch.testing.assert_close(conv_act(x, w, b), reference(x, w, b), rtol=1e-5, atol=1e-5)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    conv.weight.requires_grad_(False)
    conv_act(x, conv.weight, conv.bias)
    conv.load_state_dict({"weight": torch.randn(4, 3, 3, 3, generator=gen), "bias": conv.bias.detach()})
    torch.testing.assert_close(conv_act(x, conv.weight, conv.bias), reference(x, conv.weight, conv.bias),
                               rtol=1e-5, atol=1e-5)


def test_input_shapes_each_get_a_blocked_copy_and_the_entry_goes_with_the_weight():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(5, 4, 3, 3, generator=gen)
    for n, h in [(1, 7), (3, 7), (1, 12), (2, 5), (4, 6), (1, 7)]:  # more shapes than are kept: the oldest goes
        x = torch.randn(n, 4, h, h, generator=gen)
        torch.testing.assert_close(conv_act(x, w, None), reference(x, w, None), rtol=1e-5, atol=1e-5)
    assert len(_ops._PACKED[id(w)][2]) == _ops._PACKED_SHAPES
    key = id(w)
    del w
    gc.collect()
    assert key not in _ops._PACKED


def test_weights_that_cannot_be_cached_run_unpacked():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 6, 6, generator=gen)
    with torch.inference_mode():  # an inference tensor has no version counter
        w = torch.randn(4, 3, 3, 3, generator=gen)
        torch.testing.assert_close(conv_act(x, w, None), reference(x, w, None), rtol=1e-5, atol=1e-5)
    assert id(w) not in _ops._PACKED
    trained = torch.randn(4, 3, 3, 3, generator=gen, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(conv_act(x, trained, None), reference(x, trained, None), rtol=1e-5, atol=1e-5)
    assert id(trained) not in _ops._PACKED


def test_many_threads_with_many_weights_always_get_their_own_results():
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(6, 5, 3, 3, generator=gen) for _ in range(4)]
    inputs = [torch.randn(n, 5, 9, 9, generator=gen) for n in (1, 2)]
    expected = {(i, j): reference(x, w, None) for i, w in enumerate(weights) for j, x in enumerate(inputs)}
    errors: list[str] = []

    def worker(tid: int) -> None:
        for rep in range(30):
            i, j = (tid + rep) % len(weights), rep % len(inputs)
            if not torch.allclose(conv_act(inputs[j], weights[i], None), expected[i, j], rtol=1e-5, atol=1e-5):
                errors.append(f"thread {tid} rep {rep}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))  # re-raises a worker's exception
    assert not errors


def test_outputs_are_contiguous_nchw_like_the_fake_kernel_says():
    """oneDNN writes a channels-last output for a blocked weight; the op returns NCHW, as torch.compile expects."""
    x, w = torch.randn(2, 8, 6, 6), torch.randn(16, 8, 3, 3)
    for _ in range(2):
        assert conv_act(x, w, None).is_contiguous()


@pytest.mark.parametrize("act", [0, 1, 2, 3, 4])
def test_activate_fresh_works_in_place_unless_autograd_records(act):
    y = torch.randn(2, 3, 4, 4)
    expected = _ops.apply_activation(y.clone(), act)
    out = _ops.activate_fresh(y, act)
    torch.testing.assert_close(out, expected)
    assert out.data_ptr() == y.data_ptr()  # in place: no second pass over fresh memory
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    fresh = z * 1.0
    out = _ops.activate_fresh(fresh, act)
    out.sum().backward()  # out of place, so autograd sees the activation's input intact
    torch.testing.assert_close(out, _ops.apply_activation(z.detach(), act))
    assert z.grad is not None
