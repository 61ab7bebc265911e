"""Mask2Former set criterion: Hungarian matching, then class cross-entropy and point-sampled mask BCE + dice.

This is the paper's loss (Cheng et al., 2022): mask losses on ``train_num_points`` points per matched mask,
chosen by importance sampling (``oversample_ratio``, ``importance_sample_ratio``).  TAO instead uses a dense
sigmoid focal loss on the 1/4-resolution maps and leaves those fields unused (docs/compat.md).  The class axis
keeps **TAO's layout: index 0 = no-object**, so TAO checkpoints (and their ``criterion.empty_weight``) load.

Points are drawn only inside each image's valid (un-padded) region, so padding never contributes to a loss.
The criterion returns *unweighted* terms; the LightningModule applies the weights in one place.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from networks.ops.losses import dice_loss, sigmoid_ce_loss
from networks.ops.matcher import HungarianMatcher
from networks.ops.point_sampling import (
    calculate_uncertainty,
    extent_inside_grid,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

__all__ = ["Mask2FormerCriterion", "loss_weights"]


def loss_weights(class_weight: float, mask_weight: float, dice_weight: float, num_aux: int) -> dict[str, float]:
    """``{loss_ce, loss_mask, loss_dice}`` and their ``_i`` aux copies (i < num_aux) → weight."""
    base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    out = dict(base)
    for i in range(num_aux):
        out.update({f"{k}_{i}": v for k, v in base.items()})
    return out


class Mask2FormerCriterion(nn.Module):
    """Loss terms of one Mask2Former forward pass.

    Args:
        num_classes: number of real classes C (logits have C+1 entries, index 0 = no-object).
        matcher: a :class:`HungarianMatcher` (see :func:`networks.ops.matcher.mask2former_cost_terms`).
        no_object_weight: cross-entropy weight of index 0.
        num_points, oversample_ratio, importance_sample_ratio: mask-loss point sampling.
        deep_supervision: also compute the terms for every ``aux_outputs`` entry (each re-matched).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, no_object_weight: float, num_points: int,
                 oversample_ratio: float, importance_sample_ratio: float, deep_supervision: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[0] = no_object_weight
        # Persistent so that TAO checkpoints (which carry criterion.empty_weight) load without surprises.
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, logits: torch.Tensor, targets: list[dict], indices) -> torch.Tensor:
        """Weighted cross-entropy over all queries; unmatched queries target index 0 (no-object)."""
        B, Q, _ = logits.shape
        target_classes = torch.zeros((B, Q), dtype=torch.int64, device=logits.device)
        for b, (src, tgt) in enumerate(indices):
            if len(src):
                target_classes[b, src.to(logits.device)] = targets[b]["labels"].to(logits.device)[tgt.to(logits.device)]
        return F.cross_entropy(logits.float().transpose(1, 2), target_classes, weight=self.empty_weight.float())

    def loss_masks(self, pred_masks: torch.Tensor, targets: list[dict], indices, num_masks: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(BCE, dice) on ``num_points`` importance-sampled points per matched mask, inside the valid region."""
        src_list, tgt_list, extents = [], [], []
        for b, (src, tgt) in enumerate(indices):
            if not len(src):
                continue
            src_list.append(pred_masks[b, src.to(pred_masks.device)])
            tgt_masks = targets[b]["masks"]
            tgt_list.append(tgt_masks[tgt.to(tgt_masks.device)])
            ext = targets[b].get("valid_extent")
            ext = torch.ones(2) if ext is None else torch.as_tensor(ext, dtype=torch.float32)
            extents.append(ext.view(1, 2).expand(len(src), 2))
        if not src_list:
            zero = pred_masks.sum() * 0.0
            return zero, zero.clone()
        src = torch.cat(src_list)[:, None].float()
        tgt = torch.cat(tgt_list).to(device=src.device, dtype=src.dtype)[:, None]
        extent = extent_inside_grid(torch.cat(extents).to(device=src.device, dtype=src.dtype),
                                    tuple(src.shape[-2:]))
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src, calculate_uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio,
                valid_extent=extent)
            point_labels = point_sample(tgt, coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src, coords, align_corners=False).squeeze(1)
        return sigmoid_ce_loss(point_logits, point_labels, num_masks), dice_loss(point_logits, point_labels, num_masks)

    def _terms(self, outputs: dict[str, Any], targets: list[dict], num_masks: torch.Tensor, suffix: str
               ) -> dict[str, torch.Tensor]:
        indices = self.matcher({"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]},
                               targets)
        ce = self.loss_labels(outputs["pred_logits"], targets, indices)
        bce, dice = self.loss_masks(outputs["pred_masks"], targets, indices, num_masks)
        return {f"loss_ce{suffix}": ce, f"loss_mask{suffix}": bce, f"loss_dice{suffix}": dice}

    def num_masks(self, targets: list[dict], device: torch.device) -> torch.Tensor:
        """Target masks in the global batch (all-reduced mean over ranks), at least 1."""
        n = torch.as_tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n)
            n = n / torch.distributed.get_world_size()
        return torch.clamp(n, min=1.0)

    def forward(self, outputs: dict[str, Any], targets: list[dict]) -> dict[str, torch.Tensor]:
        """Unweighted loss terms ``loss_ce``, ``loss_mask``, ``loss_dice`` (+ ``_i`` per aux output).

        ``outputs``: ``pred_logits`` [B, Q, C+1], ``pred_masks`` [B, Q, h, w] logits, optional ``aux_outputs``.
        ``targets``: per image ``labels`` int64 [N] in 1..C, ``masks`` bool [N, H, W] over the padded image,
        optional ``valid_extent`` (w/W, h/H).
        """
        num_masks = self.num_masks(targets, outputs["pred_logits"].device)
        losses = self._terms(outputs, targets, num_masks, "")
        if self.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs") or []):
                losses.update(self._terms(aux, targets, num_masks, f"_{i}"))
        return losses
