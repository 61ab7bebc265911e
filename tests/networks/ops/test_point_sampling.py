"""Importance sampling of mask-loss points (networks.ops.point_sampling) against its definition, mask by mask."""
from __future__ import annotations

import torch

from networks.ops.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)


def test_uncertain_points_are_each_masks_own_most_uncertain_then_random_ones():
    logits = torch.randn(3, 1, 16, 20, generator=torch.Generator().manual_seed(0))
    extent = torch.tensor([[1.0, 1.0], [0.5, 0.75], [0.9, 0.3]])
    num_points, oversample, importance = 40, 3.0, 0.75

    torch.manual_seed(7)
    got = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, num_points, oversample,
                                                     importance, valid_extent=extent)

    # the same draws, one mask at a time: the 30 oversampled points with the highest -|logit|, then 10 fresh ones
    torch.manual_seed(7)
    drawn = torch.rand(3, 120, 2) * extent.view(-1, 1, 2)
    fresh = torch.rand(3, 10, 2) * extent.view(-1, 1, 2)
    for i in range(3):
        uncertainty = -point_sample(logits[i:i + 1], drawn[i:i + 1]).abs()[0, 0]
        best = drawn[i, torch.topk(uncertainty, 30).indices]
        assert torch.equal(got[i, :30], best), i
        assert torch.equal(got[i, 30:], fresh[i]), i
    inside = (got >= 0).all() and (got <= extent.view(-1, 1, 2)).all()
    assert got.shape == (3, 40, 2) and inside
