"""MAL losses: dice / MIL hand values, mean-field invariants and equivalence with TAO's unfold formulation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from networks.mal.criterion import MeanField, dice_loss_squared, mal_losses, mil_loss


def test_dice_hand_values():
    ones = torch.ones(1, 4)
    # 1 - 2·4 / ((4 + 0.001) + (4 + 0.001))
    assert dice_loss_squared(ones, ones).item() == pytest.approx(1 - 8 / 8.002, abs=1e-7)
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    assert dice_loss_squared(a, b).item() == pytest.approx(1.0)
    half = torch.full((2, 3, 3), 0.5)
    out = dice_loss_squared(half, torch.ones(2, 3, 3))
    assert out.shape == (2,)
    # Σab = 4.5, Σa² = 2.25, Σb² = 9
    assert out[0].item() == pytest.approx(1 - 9 / (2.251 + 9.001), abs=1e-6)


def test_mil_loss_values():
    target = torch.zeros(2, 8, 8)
    target[:, 2:5, 3:7] = 1
    same = mil_loss(target, target)
    assert same.shape == (2,)
    assert torch.all(same < 1e-3) and torch.all(same > 0)  # +0.002 in the denominators
    zeros = mil_loss(torch.zeros(2, 8, 8), target)
    assert torch.allclose(zeros, torch.full((2,), 2.0))
    # only the projections matter: a cross inside the box has the same row/column maxima as the box
    cross = torch.zeros(2, 8, 8)
    cross[:, 3, 3:7] = 1
    cross[:, 2:5, 4] = 1
    assert torch.allclose(mil_loss(cross, target), same)


def _tao_mean_field(image, init, box, k, zeta, n, lo, hi):
    """TAO's formulation verbatim in maths: unfold-based affinity and product-form update (reference)."""
    b, h, w = init.shape
    feat = image.float() + 10
    unfold = torch.nn.Unfold(k, padding=k // 2)
    uf = unfold(feat).reshape(b, 3, k * k, h * w)
    kernel = torch.exp(-(((uf - feat.reshape(b, 3, 1, h * w)) ** 2) / (2 * zeta ** 2)).sum(1))
    s = (init * box).clamp(lo, hi)
    for _ in range(n):
        x = torch.cat([1 - s[:, None], s[:, None]], 1)
        ux = unfold(-torch.log(x)).reshape(b, 2, k * k, h * w)
        agg = torch.exp(-(ux * kernel[:, None]).sum(2))
        agg[:, 1:] = agg[:, 1:] * box.reshape(b, 1, h * w)
        out = (agg / (1e-6 + agg.sum(1, keepdim=True))).clamp(lo, hi)
        s = out[:, 1].reshape(b, h, w)
    return s


@pytest.mark.parametrize("k,n", [(3, 1), (3, 5), (5, 3)])
def test_mean_field_matches_tao_formulation(k, n):
    g = torch.Generator().manual_seed(k * 10 + n)
    image = torch.randn(2, 3, 12, 10, generator=g) * 0.2
    init = torch.rand(2, 12, 10, generator=g)
    box = torch.zeros(2, 12, 10)
    box[:, 2:10, 1:8] = 1
    box[:, 2, 1:8] = 0.5  # fractional edge, as after bilinear resizing
    mf = MeanField(k, 0.1, n, 0.1, 0.9)
    ours = mf.refine(image, init, box)
    ref = _tao_mean_field(image, init, box, k, 0.1, n, 0.1, 0.9)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.equal(mf(image, init, box), (ref > 0.5).float())


def test_mean_field_invariants():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 3, 16, 16, generator=g)
    init = torch.rand(3, 16, 16, generator=g)
    mf = MeanField(3, 0.1, 30, 0.1, 0.9)
    assert torch.all(mf(image, init, torch.zeros(3, 16, 16)) == 0)
    box = torch.zeros(3, 16, 16)
    box[:, 4:12, 5:11] = 1
    out = mf(image, torch.ones(3, 16, 16), box)
    assert torch.all(out[box == 0] == 0)
    assert out.sum() > 0
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    # colour edges cut the affinity: in a half bright / half dark box, foreground seeded on the bright half
    # stays there (away from the box border, which erodes by one pixel per iteration) and never crosses over
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0
    init = torch.zeros(1, 16, 16)
    init[..., 8:] = 1.0
    big = torch.zeros(1, 16, 16)
    big[:, 2:14, 2:14] = 1
    out = MeanField(3, 0.1, 2)(image, init, big)
    assert torch.all(out[0, :, :8] == 0) and torch.all(out[0, 5:11, 9:12] == 1)


def test_mean_field_is_fp32_and_gradient_free():
    image = torch.randn(1, 3, 8, 8, requires_grad=True)
    init = torch.rand(1, 8, 8, requires_grad=True)
    out = MeanField(3, 0.1, 3)(image.half().float(), init, torch.ones(1, 8, 8))
    assert out.dtype == torch.float32 and not out.requires_grad
    with pytest.raises(ValueError):
        MeanField(4)


def test_mal_losses_warmup_and_gradients():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 1, 8, 8, generator=g, requires_grad=True)
    t = torch.randn(2, 1, 8, 8, generator=g)
    image = torch.randn(2, 3, 32, 32, generator=g)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 4:20] = 1
    mf = MeanField(3, 0.1, 5)
    kw = dict(loss_mil_weight=4.0, loss_crf_weight=0.5, loss_mil_step=10, loss_crf_step=40)
    full = mal_losses(s, t, image, mask, mf, epoch=1, step_in_epoch=0, **kw)
    zero = mal_losses(s, t, image, mask, mf, epoch=0, step_in_epoch=0, **kw)
    half = mal_losses(s, t, image, mask, mf, epoch=0, step_in_epoch=5, **kw)
    assert zero["loss_mil"].item() == 0 and zero["loss_crf"].item() == 0
    assert half["loss_mil"].item() == pytest.approx(full["loss_mil"].item() / 2, rel=1e-5)
    assert half["loss_crf"].item() == pytest.approx(full["loss_crf"].item() * 5 / 40, rel=1e-5)
    # MIL value: weight · Σ_b mil / (B + 1e-4) on the bilinearly resized box mask
    target = F.interpolate(mask, size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    expect = 4.0 * mil_loss(torch.sigmoid(s.detach())[:, 0], target).sum() / (2 + 1e-4)
    assert full["loss_mil"].item() == pytest.approx(expect.item(), rel=1e-6)
    (full["loss_mil"] + full["loss_crf"]).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert not math.isnan(full["loss_crf"].item())
