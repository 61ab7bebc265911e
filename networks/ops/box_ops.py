"""Bounding-box conversions and overlap measures shared by detectors.

Conventions: ``xyxy`` = ``(x0, y0, x1, y1)`` corners, ``cxcywh`` = ``(centre x, centre y, width, height)``,
``xywh`` = ``(x0, y0, width, height)`` (COCO).  All functions work in any unit (pixels or normalised
``[0, 1]``) as long as both operands use the same one; they never clip.  Boxes are the last tensor axis.
"""
from __future__ import annotations

import torch

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_xyxy_to_xywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "masks_to_boxes",
]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` cxcywh → ``[..., 4]`` xyxy (same unit)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` xyxy → ``[..., 4]`` cxcywh (same unit)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` xyxy → ``[..., 4]`` COCO xywh (same unit)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0, y0, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of ``[..., 4]`` xyxy boxes → ``[...]`` (negative extents give negative/zero products, not clipped)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of xyxy boxes ``[N, 4]`` × ``[M, 4]`` → ``(iou [N, M], union [N, M])``.

    Intersections of disjoint boxes are 0; a zero union gives NaN (degenerate boxes are the caller's concern).
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al., 2019) of xyxy boxes ``[N, 4]`` × ``[M, 4]`` → ``[N, M]``.

    Values lie in ``[-1, 1]``; GIoU = IoU − (enclosing area − union) / enclosing area.  Raises ``ValueError``
    when a box has x1 < x0 or y1 < y0 (inverted boxes make the enclosing area meaningless).
    """
    if not bool((boxes1[:, 2:] >= boxes1[:, :2]).all()) or not bool((boxes2[:, 2:] >= boxes2[:, :2]).all()):
        raise ValueError("generalized_box_iou expects xyxy boxes with x1 >= x0 and y1 >= y0")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy pixel boxes ``[N, 4]`` of binary masks ``[N, H, W]``.

    The box spans the extreme foreground pixel indices, i.e. ``x1``/``y1`` are the *index* of the last
    foreground column/row (DETR convention, not index + 1).  Empty masks give ``(0, 0, 0, 0)``.
    """
    if masks.numel() == 0:
        return torch.zeros((0, 4), device=masks.device, dtype=torch.float32)
    h, w = masks.shape[-2:]
    m = masks.bool()
    ys = torch.arange(h, dtype=torch.float32, device=masks.device)
    xs = torch.arange(w, dtype=torch.float32, device=masks.device)
    rows = m.any(-1)  # [N, H]
    cols = m.any(-2)  # [N, W]
    big = float(max(h, w))
    y0 = torch.where(rows, ys, big).amin(-1)
    y1 = torch.where(rows, ys, -1.0).amax(-1)
    x0 = torch.where(cols, xs, big).amin(-1)
    x1 = torch.where(cols, xs, -1.0).amax(-1)
    boxes = torch.stack((x0, y0, x1, y1), dim=-1)
    empty = ~rows.any(-1)
    return boxes.masked_fill(empty[:, None], 0.0)
