"""Hungarian matching between a set of predictions and a set of targets, with pluggable cost terms.

:class:`HungarianMatcher` knows nothing about masks, boxes or classes: it is built from named cost terms
``{name: (weight, fn)}`` where ``fn(pred, target, cache) -> Tensor[Q, M]`` scores the Q predictions of **one
image** against its M targets (lower = better match).  Per image the matcher builds ``C = Σ weight · fn(...)``,
replaces non-finite entries, and solves the assignment with ``scipy.optimize.linear_sum_assignment``.

* ``pred`` is the model output for one image: every tensor of the batched output dict whose first dimension is
  the batch size, indexed at that image (e.g. ``pred_logits`` [Q, C+1], ``pred_masks`` [Q, h, w],
  ``pred_boxes`` [Q, 4]).  Other entries (lists such as ``aux_outputs``) are left out.
* ``target`` is that image's target dict as given (e.g. ``labels`` [M], ``masks`` [M, H, W], ``boxes`` [M, 4]).
* ``cache`` is a fresh dict per image shared by all terms, so terms that need common work (Mask2Former's mask
  BCE and dice costs use the *same* random points) compute it once.

Mask2Former's costs are built by :func:`mask2former_cost_terms`; a detector adds e.g. box L1 / GIoU terms or a
token-level focal class cost (Grounding DINO) simply as more entries.  Matching runs without autograd and in
float32 with autocast off, whatever the training precision.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from networks.ops.losses import pairwise_dice_loss, pairwise_sigmoid_ce_loss, pairwise_sigmoid_focal_loss
from networks.ops.point_sampling import extent_inside_grid, point_sample, random_points

__all__ = [
    "CostFn",
    "HungarianMatcher",
    "linear_sum_assignment",
    "class_prob_cost",
    "SampledMaskCost",
    "mask2former_cost_terms",
]

CostFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any], dict], torch.Tensor]


def linear_sum_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost assignment of a [Q, M] cost matrix → (row indices, column indices), int64 CPU tensors.

    Rows are sorted ascending.  If scipy rejects the matrix (infeasible), each column falls back to its
    cheapest row (which may repeat rows), as Grounding DINO's reference does.
    """
    from scipy.optimize import linear_sum_assignment as _lsa

    c = cost.detach().cpu().numpy()
    try:
        rows, cols = _lsa(c)
    except ValueError:
        cols = np.arange(c.shape[1])
        rows = c.argmin(axis=0) if c.shape[0] else np.zeros(0, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        rows, cols = rows[order], cols[order]
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """One-to-one matcher of predictions to targets, per image, from weighted cost terms.

    Args:
        cost_terms: ``{name: (weight, fn)}``; ``fn(pred, target, cache) -> [Q, M]``.  Terms with weight 0 are
            not evaluated.
        nonfinite_fill: value that replaces NaN/±inf entries of the summed cost (Grounding DINO uses 0).
    """

    def __init__(self, cost_terms: Mapping[str, tuple[float, CostFn]], nonfinite_fill: float = 0.0):
        super().__init__()
        if not cost_terms or all(w == 0 for w, _ in cost_terms.values()):
            raise ValueError("HungarianMatcher needs at least one cost term with a non-zero weight")
        self.cost_terms = dict(cost_terms)
        self.nonfinite_fill = float(nonfinite_fill)

    @staticmethod
    def _per_image(outputs: Mapping[str, Any], index: int, batch_size: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in outputs.items()
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch_size}

    @torch.no_grad()
    def cost_matrix(self, pred: Mapping[str, torch.Tensor], target: Mapping[str, Any]) -> torch.Tensor:
        """The summed cost [Q, M] of one image (float32, non-finite entries replaced)."""
        cache: dict = {}
        total = None
        for _, (weight, fn) in self.cost_terms.items():
            if weight == 0:
                continue
            term = fn(pred, target, cache).float() * float(weight)
            total = term if total is None else total + term
        return torch.nan_to_num(total, nan=self.nonfinite_fill, posinf=self.nonfinite_fill,
                                neginf=self.nonfinite_fill)

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Any], targets: list[Mapping[str, Any]]
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image: returns ``[(pred_idx [K], target_idx [K]), ...]`` (int64, CPU), K = min(Q, M)."""
        batch_size = len(targets)
        result = []
        ref = next(v for v in outputs.values() if isinstance(v, torch.Tensor))
        with torch.autocast(device_type=ref.device.type, enabled=False):
            for b in range(batch_size):
                pred = self._per_image(outputs, b, batch_size)
                cost = self.cost_matrix(pred, targets[b])
                if cost.numel() == 0:
                    empty = torch.zeros(0, dtype=torch.int64)
                    result.append((empty, empty.clone()))
                    continue
                result.append(linear_sum_assignment(cost))
        return result


def class_prob_cost(logits_key: str = "pred_logits", labels_key: str = "labels") -> CostFn:
    """Cost ``-softmax(logits)[:, label]``: [Q, C+1] logits × [M] class indices → [Q, M]."""

    def cost(pred: Mapping[str, torch.Tensor], target: Mapping[str, Any], cache: dict) -> torch.Tensor:
        prob = pred[logits_key].float().softmax(-1)
        return -prob[:, target[labels_key].to(prob.device)]

    return cost


class SampledMaskCost:
    """Mask costs on ``num_points`` random points shared by all predictions and targets of one image.

    Predicted mask logits ``pred[masks_key]`` [Q, h, w] and target masks ``target[target_key]`` [M, H, W] (any
    resolution; both cover the same padded image) are sampled at the same normalised points.  When the target
    dict holds ``extent_key`` (x_frac, y_frac), the points are drawn only in that valid (un-padded) region
    (pulled in by half a prediction cell, so interpolation never reads a padded cell).
    :meth:`bce`, :meth:`dice` and :meth:`focal` are cost functions for :class:`HungarianMatcher`.
    """

    def __init__(self, num_points: int, masks_key: str = "pred_masks", target_key: str = "masks",
                 extent_key: str = "valid_extent"):
        if num_points <= 0:
            raise ValueError("num_points must be positive")
        self.num_points = int(num_points)
        self.masks_key = masks_key
        self.target_key = target_key
        self.extent_key = extent_key

    def points(self, pred: Mapping[str, torch.Tensor], target: Mapping[str, Any], cache: dict
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred point logits [Q, P], target point values [M, P]), computed once per image via ``cache``."""
        key = ("sampled_mask_points", id(self))
        if key not in cache:
            out_mask = pred[self.masks_key].float()
            tgt_mask = target[self.target_key].to(device=out_mask.device, dtype=out_mask.dtype)
            extent = target.get(self.extent_key) if hasattr(target, "get") else None
            if extent is not None:
                extent = extent_inside_grid(torch.as_tensor(extent, dtype=out_mask.dtype).view(1, 2),
                                            tuple(out_mask.shape[-2:]))
            coords = random_points(1, self.num_points, valid_extent=extent, device=out_mask.device,
                                   dtype=out_mask.dtype)
            # all masks share the points: sample them as channels of one image (the interpolation weights are
            # computed once instead of once per mask; the values are the same)
            tgt_pts = point_sample(tgt_mask[None], coords)[0]
            out_pts = point_sample(out_mask[None], coords)[0]
            cache[key] = (out_pts, tgt_pts)
        return cache[key]

    def bce(self, pred, target, cache) -> torch.Tensor:
        """Mean sigmoid BCE cost [Q, M] (Mask2Former paper)."""
        out_pts, tgt_pts = self.points(pred, target, cache)
        return pairwise_sigmoid_ce_loss(out_pts, tgt_pts)

    def focal(self, pred, target, cache) -> torch.Tensor:
        """Mean sigmoid focal cost [Q, M] (α 0.25, γ 2; TAO's matcher)."""
        out_pts, tgt_pts = self.points(pred, target, cache)
        return pairwise_sigmoid_focal_loss(out_pts, tgt_pts)

    def dice(self, pred, target, cache) -> torch.Tensor:
        """Dice cost [Q, M]."""
        out_pts, tgt_pts = self.points(pred, target, cache)
        return pairwise_dice_loss(out_pts, tgt_pts)


def mask2former_cost_terms(class_weight: float, mask_weight: float, dice_weight: float, num_points: int,
                           mask_cost: str = "bce") -> dict[str, tuple[float, CostFn]]:
    """Mask2Former's matcher costs: ``{"class": -prob, "mask": point BCE (or focal), "dice": point dice}``.

    Expects ``pred_logits`` [Q, C+1], ``pred_masks`` [Q, h, w] per image and targets with ``labels`` [M] (class
    indices into the logits) and ``masks`` [M, H, W] (optionally ``valid_extent``).
    """
    masks = SampledMaskCost(num_points)
    if mask_cost not in ("bce", "focal"):
        raise ValueError(f"mask_cost must be 'bce' or 'focal', got {mask_cost!r}")
    return {
        "class": (class_weight, class_prob_cost()),
        "mask": (mask_weight, masks.bce if mask_cost == "bce" else masks.focal),
        "dice": (dice_weight, masks.dice),
    }
