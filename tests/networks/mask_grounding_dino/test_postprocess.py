"""Post-processing (TAO §5): token → class scores, top-k, pixel boxes, masks at the original size, thresholds."""
from __future__ import annotations

import torch

from networks.mask_grounding_dino.postprocess import class_scores, masks_to_image, postprocess, select_topk


def test_class_scores_use_normalised_positive_map():
    logits = torch.full((2, 8), -30.0)
    logits[0, 1] = 30.0  # query 0 certain about token 1
    logits[1, 3] = 30.0  # query 1 sure about one of the two tokens of category 1
    pm = torch.zeros(2, 6)
    pm[0, 1] = 1
    pm[1, 3:5] = 1
    s = class_scores(logits, pm)
    assert torch.allclose(s, torch.tensor([[1.0, 0.0], [0.0, 0.5]]), atol=1e-6)


def test_select_topk_over_queries_and_classes():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.7]])
    top, q, c = select_topk(scores, 3)
    assert torch.allclose(top, torch.tensor([0.9, 0.8, 0.7])) and q.tolist() == [0, 1, 1] and c.tolist() == [1, 0, 1]


def _outputs():
    logits = torch.full((1, 3, 8), -30.0)
    logits[0, 0, 1] = 5.0
    logits[0, 1, 1] = 4.0
    logits[0, 2, 3] = 3.0
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.52, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]]])
    masks = torch.full((1, 3, 1, 8, 8), -10.0)
    masks[0, 0, 0, 2:6, 2:6] = 10.0
    masks[0, 2, 0, 0:2, 0:2] = 10.0
    return {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks}


def _pm():
    pm = torch.zeros(2, 8)
    pm[0, 1] = 1
    pm[1, 3] = 1
    return pm


def test_boxes_in_original_pixels_and_masks_resized():
    # padded input 32x32, resized image 32x24 (h, w), original 64x48
    det, = postprocess(_outputs(), [_pm()], [(32, 24)], [(64, 48)], (32, 32), num_select=6)
    i = det["queries"].tolist().index(0)
    assert torch.allclose(det["boxes"][i], torch.tensor([12.0, 16.0, 36.0, 48.0]))
    assert det["masks"].shape == (6, 64, 48) and det["masks"].dtype == torch.bool
    m = det["masks"][i]
    ys, xs = torch.nonzero(m, as_tuple=True)
    # stride-4 cells 2..5 → padded pixels ~8..24, ×2 to the original
    assert abs(ys.min().item() - 16) <= 3 and abs(ys.max().item() - 47) <= 3 and abs(xs.min().item() - 16) <= 3


def test_conf_threshold_keeps_masks_aligned():
    det, = postprocess(_outputs(), [_pm()], [(32, 32)], [(32, 32)], (32, 32), num_select=6, conf_threshold=0.96)
    assert len(det["scores"]) == len(det["masks"]) == len(det["boxes"]) == 2
    assert (det["scores"] >= 0.96).all()
    assert set(det["queries"].tolist()) == {0, 1} and set(det["labels"].tolist()) == {0}


def test_nms_per_class():
    det, = postprocess(_outputs(), [_pm()], [(32, 32)], [(32, 32)], (32, 32), num_select=6, conf_threshold=0.5,
                       nms_threshold=0.5)
    # queries 0 and 1 overlap with the same class: the weaker one is suppressed
    assert det["queries"].tolist() == [0, 2] and det["labels"].tolist() == [0, 1]
    none, = postprocess(_outputs(), [_pm()], [(32, 32)], [(32, 32)], (32, 32), num_select=6, conf_threshold=0.5)
    assert none["queries"].tolist() == [0, 1, 2]


def test_masks_to_image_empty():
    assert masks_to_image(torch.zeros(0, 4, 4), (16, 16), (16, 12), (30, 20)).shape == (0, 30, 20)
