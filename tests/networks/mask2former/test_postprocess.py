"""Mask2Former post-processing: semantic/panoptic/instance rules, full-resolution resize, PQ of a perfect result."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from networks.common.metrics import panoptic_quality
from networks.mask2former.postprocess import (
    instance_inference,
    panoptic_inference,
    semantic_inference,
    semantic_probs,
    to_image_size,
)

S = 10.0  # logit scale of "certain"


def _query(C, cls, score_logit=S):
    row = torch.full((C + 1,), -S)
    row[cls] = score_logit
    return row


def test_semantic_probs_match_loop():
    g = torch.Generator().manual_seed(0)
    cls, masks = torch.randn(4, 6, generator=g), torch.randn(4, 3, 5, generator=g)
    out = semantic_probs(cls, masks)
    p = cls.softmax(-1)[:, 1:]
    ref = sum(p[q][:, None, None] * masks[q].sigmoid()[None] for q in range(4))
    assert out.shape == (5, 3, 5) and torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(semantic_inference(cls, masks), ref.argmax(0) + 1)
    assert semantic_probs(cls[None], masks[None]).shape == (1, 5, 3, 5)


def test_panoptic_filters_no_object_queries():
    C = 3
    masks = torch.full((3, 8, 8), -S)
    masks[0, :4] = S   # query 0: class 1, top half
    masks[1, 4:] = S   # query 1: no-object (its best *real* class is still > threshold without the test)
    masks[2, :, :2] = S
    cls = torch.stack([_query(C, 1), _query(C, 0), _query(C, 2, score_logit=-S)])
    cls[1, 0], cls[1, 2] = S, S - 0.1  # arg-max is no-object; real class 2 prob ≈ 0.475 > 0.4 (TAO keeps it)
    cls[2] = torch.zeros(C + 1)  # uniform: 0.25 < threshold
    pan, segs = panoptic_inference(cls, masks, 0.4, 0.5)
    assert [s["category"] for s in segs] == [1]
    assert (pan[:4] == 1).all() and (pan[4:] == 0).all()


def test_panoptic_merges_stuff_and_applies_overlap():
    C = 3  # classes 1, 2 things; 3 stuff
    thing = torch.tensor([True, True, False])
    masks = torch.full((4, 8, 8), -S)
    masks[0, :, :4] = S       # stuff class 3, left ...
    masks[0, :2, :2] = 0.0    # ... unsure where the thing is
    masks[0, 6:, :2] = 0.0    # ... and in the bottom-left corner
    masks[1, :, 4:] = S       # stuff class 3, right -> merged with query 0
    masks[2, :2, :2] = S      # thing class 1
    masks[3, :, :] = S        # thing class 2 everywhere, score .55: wins only the bottom-left corner (4/64 px)
    q3 = torch.full((C + 1,), -S)
    q3[0], q3[2] = 0.0, 0.2
    cls = torch.stack([_query(C, 3), _query(C, 3), _query(C, 1), q3])
    pan, segs = panoptic_inference(cls, masks, 0.4, 0.5, thing)
    cats = sorted((s["category"], s["isthing"]) for s in segs)
    assert cats == [(1, True), (3, False)]  # class 2 dropped by overlap_threshold, class 3 merged
    stuff = next(s for s in segs if s["category"] == 3)
    thing_seg = next(s for s in segs if s["category"] == 1)
    assert stuff["area"] == 56 and thing_seg["area"] == 4
    assert (pan[6:, :2] == 0).all()
    assert set(torch.unique(pan).tolist()) == {0, stuff["id"], thing_seg["id"]}
    assert min(s["id"] for s in segs) == 1
    _, without_overlap = panoptic_inference(cls, masks, 0.4, 0.0, thing)
    assert 2 in [s["category"] for s in without_overlap]


def test_instance_topk_scores_and_thing_filter():
    C = 3
    masks = torch.full((2, 6, 6), -S)
    masks[0, :3] = S
    masks[1, :, :3] = S
    cls = torch.stack([_query(C, 1), _query(C, 3)])
    out = instance_inference(cls, masks, topk=2)
    assert out["labels"].tolist() == [1, 3] or out["labels"].tolist() == [3, 1]
    assert out["masks"].shape == (2, 6, 6) and out["masks"].dtype == torch.bool
    assert (out["scores"] > 0.99).all()
    only_things = instance_inference(cls, masks, topk=2, thing_classes=torch.tensor([True, True, False]))
    assert 3 not in only_things["labels"].tolist()
    assert len(instance_inference(cls, masks, topk=100)["scores"]) == 6  # K = min(topk, Q*C)


def test_to_image_size_crops_padding_then_resizes():
    pred = torch.zeros(1, 8, 8)
    pred[0, :4, :6] = 1.0   # valid region at 1/4 res: 16x24 input px of a 32x32 padded input
    pred[0, 4:, :] = -50.0  # garbage in the padding
    out = to_image_size(pred, (32, 32), (16, 24), (32, 48))
    assert out.shape == (1, 32, 48)
    # padding enters only through the half cell of bilinear support at the border (as in TAO and the original)
    assert torch.allclose(out[:, :26, :42], torch.ones(1, 26, 42))


def test_pq_is_one_when_prediction_equals_gt():
    C = 3
    thing = torch.tensor([True, True, False])
    gt_ids = np.zeros((8, 8), dtype=np.int64)
    gt_ids[:, :] = 7          # stuff "ground" (class 3)
    gt_ids[:3, :3] = 11       # thing class 1
    gt_ids[5:, 5:] = 12       # thing class 2
    gt_segments = [{"id": 7, "category_id": 30, "iscrowd": 0}, {"id": 11, "category_id": 10, "iscrowd": 0},
                   {"id": 12, "category_id": 20, "iscrowd": 0}]
    to_cat = {1: 10, 2: 20, 3: 30}
    masks = torch.stack([torch.from_numpy(gt_ids == sid).float() * 2 * S - S for sid in (7, 11, 12)])
    cls = torch.stack([_query(C, 3), _query(C, 1), _query(C, 2)])
    pan, segs = panoptic_inference(cls, masks, 0.4, 0.5, thing)
    pred_segments = [{"id": s["id"], "category_id": to_cat[s["category"]]} for s in segs]
    cats = [{"id": 10, "isthing": 1}, {"id": 20, "isthing": 1}, {"id": 30, "isthing": 0}]
    res = panoptic_quality([(gt_ids, gt_segments)], [(pan.numpy(), pred_segments)], cats)
    assert res["PQ"] == pytest.approx(1.0) and res["PQ_th"] == pytest.approx(1.0) and res["PQ_st"] == pytest.approx(1.0)
