"""Mask losses vs naive per-element formulas, and pairwise (cost-matrix) versions vs the per-pair ones."""
from __future__ import annotations

import math

import pytest
import torch

from networks.ops.losses import (
    dice_loss,
    pairwise_dice_loss,
    pairwise_sigmoid_ce_loss,
    pairwise_sigmoid_focal_loss,
    sigmoid_ce_loss,
    sigmoid_focal_loss,
)


def _data(n=3, p=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64) * 3
    t = (torch.rand(n, p, generator=g, dtype=torch.float64) > 0.5).double()
    return x, t


def _sig(v):
    return 1 / (1 + math.exp(-v))


def _naive_bce(x, t):
    return -(t * math.log(_sig(x)) + (1 - t) * math.log(1 - _sig(x)))


def test_dice_matches_naive():
    x, t = _data()
    expected = 0.0
    for i in range(x.shape[0]):
        p = [_sig(v) for v in x[i].tolist()]
        inter = sum(a * b for a, b in zip(p, t[i].tolist(), strict=False))
        expected += 1 - (2 * inter + 1) / (sum(p) + t[i].sum().item() + 1)
    assert dice_loss(x, t, 2.0).item() == pytest.approx(expected / 2.0, rel=1e-10)


def test_sigmoid_ce_matches_naive():
    x, t = _data()
    expected = sum(sum(_naive_bce(a, b) for a, b in zip(x[i].tolist(), t[i].tolist(), strict=False)) / x.shape[1]
                   for i in range(x.shape[0]))
    assert sigmoid_ce_loss(x, t, 4.0).item() == pytest.approx(expected / 4.0, rel=1e-10)


@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_sigmoid_focal_matches_naive(alpha):
    x, t = _data()
    total = 0.0
    for i in range(x.shape[0]):
        row = 0.0
        for a, b in zip(x[i].tolist(), t[i].tolist(), strict=False):
            p = _sig(a)
            pt = p * b + (1 - p) * (1 - b)
            v = _naive_bce(a, b) * (1 - pt) ** 2
            if alpha >= 0:
                v *= alpha * b + (1 - alpha) * (1 - b)
            row += v
        total += row / x.shape[1]
    assert sigmoid_focal_loss(x, t, 3.0, alpha=alpha).item() == pytest.approx(total / 3.0, rel=1e-10)


def test_focal_matches_torchvision():
    tv = pytest.importorskip("torchvision.ops")
    x, t = _data(4, 30, seed=1)
    ref = tv.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2, reduction="none").mean(1).sum() / 5.0
    assert sigmoid_focal_loss(x, t, 5.0).item() == pytest.approx(ref.item(), rel=1e-10)


@pytest.mark.parametrize("pairwise, single", [
    (pairwise_dice_loss, dice_loss),
    (pairwise_sigmoid_ce_loss, sigmoid_ce_loss),
    (pairwise_sigmoid_focal_loss, sigmoid_focal_loss),
])
def test_pairwise_equals_per_pair(pairwise, single):
    x, _ = _data(3, 25, seed=2)
    _, t = _data(4, 25, seed=3)
    cost = pairwise(x, t)
    assert cost.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert cost[i, j].item() == pytest.approx(single(x[i:i + 1], t[j:j + 1], 1.0).item(), rel=1e-9)


def test_perfect_prediction_has_low_loss():
    t = (torch.rand(2, 100) > 0.5).float()
    x = (t * 2 - 1) * 20
    assert dice_loss(x, t, 2).item() < 1e-6
    assert sigmoid_ce_loss(x, t, 2).item() < 1e-6
