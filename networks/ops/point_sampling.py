"""Point sampling on mask logits (PointRend-style), as used by Mask2Former's matcher and losses.

Coordinates are **normalised (x, y) in [0, 1]** over the whole tensor being sampled (its padded extent), with
(0, 0) the top-left corner of the top-left pixel.  Because predictions (1/4 resolution) and targets (input
resolution) cover the same padded image, the same points index both.

A *valid extent* (x_frac, y_frac) in (0, 1] restricts sampling to the top-left rectangle
``[0, x_frac] × [0, y_frac]`` – the un-padded image when padding is added at the bottom/right – so padded pixels
never enter a loss.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "point_sample",
    "random_points",
    "calculate_uncertainty",
    "extent_inside_grid",
    "get_uncertain_point_coords_with_randomness",
]


def point_sample(input: torch.Tensor, point_coords: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Bilinearly sample ``input`` [N, C, H, W] at ``point_coords`` [N, P, 2] (x, y in [0, 1]) → [N, C, P].

    ``point_coords`` may also be [N, Hg, Wg, 2], giving [N, C, Hg, Wg].  Points outside the tensor read zeros.
    """
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    grid = 2.0 * point_coords.to(input.dtype) - 1.0
    output = F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    if add_dim:
        output = output.squeeze(3)
    return output


def random_points(
    num: int,
    num_points: int,
    *,
    valid_extent: torch.Tensor | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform random (x, y) points [num, num_points, 2] in [0, 1], or inside ``valid_extent`` [num, 2] when given."""
    coords = torch.rand(num, num_points, 2, device=device, dtype=dtype, generator=generator)
    if valid_extent is not None:
        coords = coords * valid_extent.to(device=coords.device, dtype=dtype).view(-1, 1, 2)
    return coords


def extent_inside_grid(valid_extent: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Shrink a valid extent [..., 2] (x, y fractions) so bilinear samples on a ``grid_hw`` map read only valid cells.

    A point in the last half cell before the border would interpolate with the first padded cell; where the
    extent is < 1 it is pulled back by half a cell of the (coarse) map.  Extents of 1 (no padding) are unchanged.
    """
    h, w = grid_hw
    half = valid_extent.new_tensor([0.5 / w, 0.5 / h])
    shrunk = torch.clamp(valid_extent - half, min=0.0)
    return torch.where(valid_extent < 1.0, torch.maximum(shrunk, half), valid_extent)


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of class-agnostic mask logits [R, 1, ...]: ``-|logit|`` (highest at the decision boundary)."""
    assert logits.shape[1] == 1, "calculate_uncertainty expects a single (class-agnostic) channel"
    return -torch.abs(logits)


def get_uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    valid_extent: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick ``num_points`` points per mask: the most uncertain of an oversampled random set, plus random ones.

    ``coarse_logits`` [N, 1, H, W].  ``int(num_points · oversample_ratio)`` random points are drawn (inside
    ``valid_extent`` [N, 2] when given); the ``int(importance_sample_ratio · num_points)`` with the highest
    ``uncertainty_func`` are kept and the rest are fresh random points.  Returns [N, num_points, 2] (x, y in [0, 1]).
    """
    assert oversample_ratio >= 1, "oversample_ratio must be >= 1"
    assert 0 <= importance_sample_ratio <= 1, "importance_sample_ratio must be in [0, 1]"
    num_boxes = coarse_logits.shape[0]
    device, dtype = coarse_logits.device, coarse_logits.dtype
    num_sampled = int(num_points * oversample_ratio)
    point_coords = random_points(num_boxes, num_sampled, valid_extent=valid_extent, device=device, dtype=dtype)
    point_logits = point_sample(coarse_logits, point_coords, align_corners=False)
    # Uncertainty is computed on the sampled (interpolated) logits, not by interpolating an uncertainty map:
    # interpolating -|logit| would put spurious maxima between two confident pixels of opposite sign.
    point_uncertainties = uncertainty_func(point_logits)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain, dim=1)[1]
    point_coords = torch.gather(point_coords, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        extra = random_points(num_boxes, num_random, valid_extent=valid_extent, device=device, dtype=dtype)
        point_coords = torch.cat([point_coords, extra], dim=1)
    return point_coords
