"""Hungarian matcher: hand-built cases, pluggable cost terms, non-finite costs, empty targets."""
from __future__ import annotations

import math

import pytest
import torch

from networks.ops.matcher import (
    HungarianMatcher,
    SampledMaskCost,
    class_prob_cost,
    linear_sum_assignment,
    mask2former_cost_terms,
)


def _pairs(result):
    return sorted(zip(result[0].tolist(), result[1].tolist(), strict=False))


def test_linear_sum_assignment_hand_case():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = linear_sum_assignment(cost)
    # optimum: (0,1)=1, (1,0)=2, (2,2)=2 -> 5
    assert _pairs((rows, cols)) == [(0, 1), (1, 0), (2, 2)]
    assert rows.dtype == torch.int64


def test_class_cost_picks_most_probable_queries():
    logits = torch.full((1, 4, 4), -10.0)  # Q=4, C+1=4 (index 0 = no-object)
    logits[0, 0, 0] = 10  # query 0: no-object
    logits[0, 1, 3] = 10  # query 1: class 3
    logits[0, 2, 1] = 10  # query 2: class 1
    logits[0, 3, 2] = 10  # query 3: class 2
    matcher = HungarianMatcher({"class": (1.0, class_prob_cost())})
    out = matcher({"pred_logits": logits}, [{"labels": torch.tensor([1, 3])}])
    assert _pairs(out[0]) == [(1, 1), (2, 0)]


def test_mask_costs_recover_a_permutation():
    torch.manual_seed(0)
    H = W = 16
    gt = torch.zeros(3, H, W, dtype=torch.bool)
    gt[0, :8, :8] = True
    gt[1, 8:, :] = True
    gt[2, :8, 8:] = True
    perm = [2, 0, 1]  # query q predicts gt[perm[q]]
    pred = torch.stack([(gt[p].float() * 2 - 1) * 10 for p in perm])[None]
    logits = torch.zeros(1, 3, 4)
    matcher = HungarianMatcher(mask2former_cost_terms(2.0, 5.0, 5.0, num_points=256))
    out = matcher({"pred_logits": logits, "pred_masks": pred}, [{"labels": torch.tensor([1, 2, 3]), "masks": gt}])
    assert _pairs(out[0]) == [(q, perm[q]) for q in range(3)]


def test_sampled_points_stay_in_valid_extent():
    cost = SampledMaskCost(num_points=500)
    pred = {"pred_masks": torch.zeros(2, 8, 8)}
    # target is 1 only in the right half, which the valid extent excludes -> all sampled target values are 0
    masks = torch.zeros(1, 32, 32)
    masks[:, :, 17:] = 1
    cache: dict = {}
    _, tgt_pts = cost.points(pred, {"masks": masks, "valid_extent": torch.tensor([0.5, 1.0])}, cache)
    assert tgt_pts.max().item() == 0.0
    assert tgt_pts.shape == (1, 500)


def test_extra_cost_terms_plug_in():
    """A detector adds box costs as more entries; the matcher does not change."""
    boxes_pred = torch.tensor([[[0.1, 0.1, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]])

    def l1(pred, target, cache):
        return torch.cdist(pred["pred_boxes"], target["boxes"], p=1)

    matcher = HungarianMatcher({"bbox": (5.0, l1), "unused": (0.0, lambda *a: 1 / 0)})
    out = matcher({"pred_boxes": boxes_pred, "aux_outputs": []},
                  [{"boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.1, 0.1, 0.2, 0.2]])}])
    assert _pairs(out[0]) == [(0, 1), (1, 0)]


def test_cache_shared_between_terms():
    calls = []

    def first(pred, target, cache):
        cache["x"] = torch.ones(2, 1)
        calls.append("a")
        return cache["x"]

    def second(pred, target, cache):
        calls.append("b")
        return cache["x"] * 0

    HungarianMatcher({"a": (1.0, first), "b": (1.0, second)})({"pred_logits": torch.zeros(1, 2, 3)},
                                                               [{"labels": torch.tensor([1])}])
    assert calls == ["a", "b"]


def test_nonfinite_costs_are_replaced_by_the_fill_value():
    raw = torch.tensor([[math.nan, 1.0], [0.0, math.inf]])

    def cost(pred, target, cache):
        return raw.clone()

    pred = {"x": torch.zeros(1, 2)}
    zero = HungarianMatcher({"c": (1.0, cost)}, nonfinite_fill=0.0)
    assert torch.equal(zero.cost_matrix({}, {}), torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    assert _pairs(zero(pred, [{}])[0]) == [(0, 0), (1, 1)]  # total 0 beats the anti-diagonal's 1
    ten = HungarianMatcher({"c": (1.0, cost)}, nonfinite_fill=10.0)
    assert torch.equal(ten.cost_matrix({}, {}), torch.tensor([[10.0, 1.0], [0.0, 10.0]]))
    assert _pairs(ten(pred, [{}])[0]) == [(0, 1), (1, 0)]
    # -inf is filled too: kept, it would make (0, 0) irresistible
    raw = torch.tensor([[-math.inf, 1.0], [0.0, 2.0]])
    assert torch.equal(ten.cost_matrix({}, {}), torch.tensor([[10.0, 1.0], [0.0, 2.0]]))
    assert _pairs(ten(pred, [{}])[0]) == [(0, 1), (1, 0)]


def test_empty_targets_and_batch():
    matcher = HungarianMatcher(mask2former_cost_terms(2.0, 5.0, 5.0, num_points=64))
    outputs = {"pred_logits": torch.randn(2, 5, 4), "pred_masks": torch.randn(2, 5, 8, 8)}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)},
               {"labels": torch.tensor([1, 2]), "masks": torch.rand(2, 32, 32) > 0.5}]
    out = matcher(outputs, targets)
    assert len(out[0][0]) == 0 and len(out[1][0]) == 2
    assert len(set(out[1][0].tolist())) == 2


def test_requires_a_weighted_term():
    with pytest.raises(ValueError):
        HungarianMatcher({"a": (0.0, class_prob_cost())})
