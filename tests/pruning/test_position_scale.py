import pytest
import torch

from lightning_winoprune.pruning import method_pattern, position_scale, winograd_mask, winograd_view
from lightning_winoprune.winograd import WinogradConv2d, filter_transform, get_transforms


@pytest.mark.parametrize("m", [2, 4, 6])
def test_position_scale_is_the_transform_norm_product(m):
    t = get_transforms(m, torch.float64)
    s = position_scale(m, torch.float64).view(m + 2, m + 2)
    for i in range(m + 2):
        for j in range(m + 2):
            want = t.BT[i].norm() * t.BT[j].norm() * t.AT[:, i].norm() * t.AT[:, j].norm()
            assert s[i, j].item() == pytest.approx(want.item())


def test_scaled_ranking_is_invariant_to_the_toom_cook_normalisation():
    # G -> D^-1 G, B^T -> D B^T computes the same convolution with U' = U / (d_i d_j); the scaled view is unchanged
    torch.manual_seed(0)
    u = torch.randn(9, 7, 4, 4, dtype=torch.float64)
    d = torch.rand(4, dtype=torch.float64) * 3 + 0.2
    u2 = u / torch.outer(d, d)
    s = position_scale(2, torch.float64).view(4, 4)
    for method in ("wsp-r", "wsp-c", "wwp", "bwsp"):
        a, _ = winograd_mask(u * s, 0.6, method_pattern(method))
        b, _ = winograd_mask(u2 * (s * torch.outer(d, d)), 0.6, method_pattern(method))
        assert torch.equal(a, b), method
        c, _ = winograd_mask(u, 0.6, method_pattern(method), position_scaled=True)
        assert torch.equal(a, c), method


def test_raw_l2_empties_inner_positions_first():
    # U transformed from ordinary spatial kernels: the inner positions carry G's 1/2 factors twice, so a layer-wide
    # L2 ranking removes them first (what made raw WSP-R collapse before fine-tuning in the accuracy benchmark)
    torch.manual_seed(0)
    u = filter_transform(torch.randn(64, 64, 3, 3), 2)
    raw, _ = winograd_mask(u, 0.2, method_pattern("wsp-r"))
    scaled, _ = winograd_mask(u, 0.2, method_pattern("wsp-r"), position_scaled=True)
    pruned_raw = 1 - winograd_view(raw).float().mean((1, 2)).view(4, 4)
    pruned_scaled = 1 - winograd_view(scaled).float().mean((1, 2)).view(4, 4)
    assert pruned_raw[1:3, 1:3].min() > 0.5 and pruned_raw[[0, 0, 3, 3], [0, 3, 0, 3]].max() < 0.1
    assert pruned_scaled[1:3, 1:3].max() < 0.1  # the inner positions feed all 4 outputs of a tile: kept


def test_scaled_score_is_the_output_energy_of_a_block():
    # zeroing row k of U[xi] changes the output by s[xi]^2 * |U[xi, k, :]|^2 per tile (i.i.d. unit input)
    torch.manual_seed(0)
    k, c, size, n = 4, 6, 16, 64
    layer = WinogradConv2d(c, k, m=2, padding=0, bias=False)
    x = torch.randn(n, c, size + 2, size + 2, dtype=torch.float32)
    tiles = n * (size // 2) ** 2
    s = position_scale(2)
    with torch.no_grad():
        y = layer(x)
        for xi, row in ((0, 1), (5, 2), (6, 0), (15, 3)):
            mask = torch.ones_like(layer.weight, dtype=torch.bool)
            mask[row, :, xi // 4, xi % 4] = False
            layer.set_mask(mask)
            energy = (layer(x) - y).square().sum().item() / tiles
            layer.set_mask(None)
            want = (s[xi] * layer.weight[row, :, xi // 4, xi % 4].norm()).square().item()
            assert energy == pytest.approx(want, rel=0.15), (xi, energy, want)
