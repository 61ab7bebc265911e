"""Box conversions, IoU / GIoU values and masks_to_boxes."""
from __future__ import annotations

import pytest
import torch

from networks.ops.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    box_xyxy_to_xywh,
    generalized_box_iou,
    masks_to_boxes,
)


def test_conversions_round_trip_and_values():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [10.0, 20.0, 4.0, 6.0]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [8.0, 17.0, 12.0, 23.0]]))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    torch.testing.assert_close(box_xyxy_to_xywh(xyxy), torch.tensor([[0.4, 0.3, 0.2, 0.4], [8.0, 17.0, 4.0, 6.0]]))
    # leading batch axes are kept
    assert box_cxcywh_to_xyxy(torch.rand(2, 3, 4)).shape == (2, 3, 4)
    torch.testing.assert_close(box_area(xyxy), torch.tensor([0.08, 24.0]))


def test_iou_and_giou_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 4.0, 5.0, 5.0]])
    iou, union = box_iou(a, b)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 4.0, 5.0]]))
    giou = generalized_box_iou(a, b)
    # enclosing boxes: 3x3=9, 2x2=4, 5x5=25
    torch.testing.assert_close(giou, torch.tensor([[1 / 7 - (9 - 7) / 9, 1.0, 0.0 - (25 - 5) / 25]]))
    assert giou.shape == (1, 3)


def test_giou_rejects_inverted_boxes():
    with pytest.raises(ValueError):
        generalized_box_iou(torch.tensor([[2.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


def test_masks_to_boxes_extreme_indices_and_empty():
    m = torch.zeros(3, 10, 12, dtype=torch.bool)
    m[0, 2:5, 3:8] = True
    m[1, 9, 11] = True
    boxes = masks_to_boxes(m)
    torch.testing.assert_close(boxes, torch.tensor([[3.0, 2.0, 7.0, 4.0], [11.0, 9.0, 11.0, 9.0], [0.0, 0.0, 0.0, 0.0]]))
    assert masks_to_boxes(torch.zeros(0, 4, 4)).shape == (0, 4)
