"""Bounding-box conversions and overlap measures shared by detectors, on top of ``torchvision.ops``.

Conventions: ``xyxy`` = ``(x0, y0, x1, y1)`` corners, ``cxcywh`` = ``(centre x, centre y, width, height)``,
``xywh`` = ``(x0, y0, width, height)`` (COCO).  All functions work in any unit (pixels or normalised
``[0, 1]``) as long as both operands use the same one; they never clip.  Boxes are the last tensor axis.

``box_area`` and ``masks_to_boxes`` are torchvision's (re-exported so callers have one import); the
conversions are named wrappers of ``torchvision.ops.box_convert``.
"""
from __future__ import annotations

import torch
from torchvision.ops import box_area, box_convert, masks_to_boxes
from torchvision.ops import generalized_box_iou as _tv_generalized_box_iou

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
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` xyxy → ``[..., 4]`` cxcywh (same unit)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def box_xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` xyxy → ``[..., 4]`` COCO xywh (same unit)."""
    return box_convert(boxes, "xyxy", "xywh")


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of xyxy boxes ``[N, 4]`` × ``[M, 4]`` → ``(iou [N, M], union [N, M])``.

    Intersections of disjoint boxes are 0; a zero union gives NaN (degenerate boxes are the caller's concern).
    Kept beside ``torchvision.ops.box_iou`` because that one does not return the union.
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
    when a box has x1 < x0 or y1 < y0 (inverted boxes make the enclosing area meaningless; torchvision does
    not check, DETR asserts).  Half-precision inputs are computed in float32 (torchvision's upcast).
    """
    if not bool((boxes1[:, 2:] >= boxes1[:, :2]).all()) or not bool((boxes2[:, 2:] >= boxes2[:, :2]).all()):
        raise ValueError("generalized_box_iou expects xyxy boxes with x1 >= x0 and y1 >= y0")
    return _tv_generalized_box_iou(boxes1, boxes2)
