"""Cost terms of DETR-style detectors for :class:`networks.ops.matcher.HungarianMatcher`.

Each factory returns ``fn(pred, target, cache) -> Tensor[Q, M]`` for one image (lower = better match):

* :func:`token_focal_cost` — Grounding DINO's class cost over text tokens: with ``p = sigmoid(pred_logits)``
  [Q, T], ``pos = α(1-p)^γ·(-log(p+ε))`` and ``neg = (1-α)p^γ·(-log(1-p+ε))``, the cost of query q for target t
  is ``(pos - neg)[q] · m_t`` where ``m_t`` is the positive-map row of t's class **normalised to sum 1**.
  The target dict holds ``labels`` [M] (indices into its own ``positive_map`` [C, T'] of 0/1 rows, T' ≤ T).
* :func:`box_l1_cost` — L1 distance between normalised cxcywh boxes ``pred_boxes`` [Q, 4] and ``boxes`` [M, 4].
* :func:`giou_cost` — negative generalised IoU of the same boxes converted to xyxy.

The default weights of Grounding DINO are class 1, box L1 5, GIoU 2 (:func:`grounding_dino_cost_terms`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from networks.ops.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from networks.ops.matcher import CostFn

__all__ = ["token_focal_cost", "box_l1_cost", "giou_cost", "grounding_dino_cost_terms", "target_token_map"]


def target_token_map(target: Mapping[str, Any], num_tokens: int, device=None, dtype=torch.float32,
                     normalize: bool = True) -> torch.Tensor:
    """[M, num_tokens] positive-map rows of the targets' classes (``positive_map[labels]``), right-padded
    with zeros (or cut) to ``num_tokens``; rows normalised to sum 1 when ``normalize`` (empty rows stay 0)."""
    pm = torch.as_tensor(target["positive_map"], device=device, dtype=dtype)
    labels = torch.as_tensor(target["labels"], device=device, dtype=torch.long)
    rows = pm[labels] if labels.numel() else pm.new_zeros(0, pm.shape[-1])
    if rows.shape[-1] < num_tokens:
        rows = torch.nn.functional.pad(rows, (0, num_tokens - rows.shape[-1]))
    rows = rows[:, :num_tokens]
    if normalize:
        rows = rows / rows.sum(-1, keepdim=True).clamp(min=1e-6)
    return rows


def token_focal_cost(alpha: float = 0.25, gamma: float = 2.0, logits_key: str = "pred_logits") -> CostFn:
    """Token-level focal class cost [Q, M] (see module doc); ``-inf`` logits (padding tokens) are harmless."""

    def cost(pred: Mapping[str, torch.Tensor], target: Mapping[str, Any], cache: dict) -> torch.Tensor:
        logits = pred[logits_key].float()
        p = logits.sigmoid()
        neg = (1 - alpha) * (p ** gamma) * (-(1 - p + 1e-8).log())
        pos = alpha * ((1 - p) ** gamma) * (-(p + 1e-8).log())
        m = target_token_map(target, logits.shape[-1], device=logits.device)
        return (pos - neg) @ m.T

    return cost


def box_l1_cost(boxes_key: str = "pred_boxes", target_key: str = "boxes") -> CostFn:
    """L1 distance [Q, M] between normalised cxcywh predicted and target boxes."""

    def cost(pred: Mapping[str, torch.Tensor], target: Mapping[str, Any], cache: dict) -> torch.Tensor:
        out = pred[boxes_key].float()
        tgt = torch.as_tensor(target[target_key], device=out.device, dtype=out.dtype)
        return torch.cdist(out, tgt.reshape(-1, 4), p=1)

    return cost


def giou_cost(boxes_key: str = "pred_boxes", target_key: str = "boxes") -> CostFn:
    """Negative generalised IoU [Q, M] of cxcywh boxes (converted to xyxy)."""

    def cost(pred: Mapping[str, torch.Tensor], target: Mapping[str, Any], cache: dict) -> torch.Tensor:
        out = pred[boxes_key].float()
        tgt = torch.as_tensor(target[target_key], device=out.device, dtype=out.dtype).reshape(-1, 4)
        return -generalized_box_iou(box_cxcywh_to_xyxy(out), box_cxcywh_to_xyxy(tgt))

    return cost


def grounding_dino_cost_terms(class_weight: float = 1.0, bbox_weight: float = 5.0, giou_weight: float = 2.0,
                              alpha: float = 0.25, gamma: float = 2.0) -> dict[str, tuple[float, CostFn]]:
    """``{"class": token focal, "bbox": L1, "giou": -GIoU}`` with Grounding DINO's ``set_cost_*`` weights."""
    return {
        "class": (class_weight, token_focal_cost(alpha, gamma)),
        "bbox": (bbox_weight, box_l1_cost()),
        "giou": (giou_weight, giou_cost()),
    }
