"""Matcher cost terms and the set criterion (TAO §4), incl. the aux/interm class-target fix."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from networks.mask_grounding_dino.config import ModelConfig
from networks.mask_grounding_dino.criterion import MaskGDinoCriterion, build_matcher, loss_weights
from networks.ops.detection_costs import box_l1_cost, giou_cost, token_focal_cost

T = 16


def _target(labels, boxes, pos_map, masks=None):
    t = {"labels": torch.tensor(labels), "boxes": torch.tensor(boxes, dtype=torch.float32),
         "positive_map": torch.tensor(pos_map, dtype=torch.float32)}
    if masks is not None:
        t["masks"] = masks
    return t


def _pos_map():
    pm = torch.zeros(2, T)
    pm[0, 1] = 1
    pm[1, 3:5] = 1
    return pm.tolist()


def _logits_for(pm, rows, Q):
    logits = torch.full((Q, T), -8.0)
    logits[:, 6:] = float("-inf")  # padding tokens
    for q, c in rows.items():
        logits[q][torch.tensor(pm[c]) > 0] = 8.0
    return logits


def test_token_focal_cost_matches_formula():
    torch.manual_seed(0)
    logits = torch.randn(5, T)
    pm = torch.tensor(_pos_map())
    tgt = _target([1, 0], [[0.5] * 4] * 2, pm.tolist())
    cost = token_focal_cost()( {"pred_logits": logits}, tgt, {})
    p = logits.sigmoid()
    pos = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log()
    neg = 0.75 * p ** 2 * -(1 - p + 1e-8).log()
    m = pm[[1, 0]] / pm[[1, 0]].sum(-1, keepdim=True)
    assert torch.allclose(cost, (pos - neg) @ m.T, atol=1e-6)


def test_box_costs():
    pred = {"pred_boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])}
    tgt = {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    l1 = box_l1_cost()(pred, tgt, {})
    assert torch.allclose(l1[:, 0], torch.tensor([0.0, 0.3 + 0.3 + 0.1 + 0.1]))
    g = giou_cost()(pred, tgt, {})
    assert abs(g[0, 0].item() + 1.0) < 1e-6 and g[1, 0] > -0.1


def _cfg():
    return OmegaConf.structured(ModelConfig)


def test_matcher_picks_the_right_queries():
    pm = _pos_map()
    boxes = [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]]
    logits = _logits_for(pm, {2: 1, 4: 0}, Q=6)[None]
    pred_boxes = torch.full((1, 6, 4), 0.5)
    pred_boxes[0, 2] = torch.tensor(boxes[0])
    pred_boxes[0, 4] = torch.tensor(boxes[1])
    matcher = build_matcher(_cfg())
    (src, tgt), = matcher({"pred_logits": logits, "pred_boxes": pred_boxes}, [_target([1, 0], boxes, pm)])
    assert dict(zip(src.tolist(), tgt.tolist(), strict=True)) == {2: 0, 4: 1}


def test_losses_near_zero_for_perfect_predictions():
    pm = _pos_map()
    boxes = [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.25, 0.25]]
    H = W = 32
    masks = torch.zeros(2, H, W, dtype=torch.uint8)
    masks[0, 4:12, 4:14] = 1
    masks[1, 14:30, 16:28] = 1
    tgt = _target([1, 0], boxes, pm, masks)
    logits = _logits_for(pm, {2: 1, 4: 0}, Q=6)[None]
    pred_boxes = torch.full((1, 6, 4), 0.5)
    pred_boxes[0, 2] = torch.tensor(boxes[0])
    pred_boxes[0, 4] = torch.tensor(boxes[1])
    gt4 = masks[:, 2::4, 2::4].float()
    pred_masks = torch.full((1, 6, 1, H // 4, W // 4), -20.0)
    pred_masks[0, 2, 0] = gt4[0] * 40 - 20
    pred_masks[0, 4, 0] = gt4[1] * 40 - 20
    text_mask = torch.zeros(1, 6, dtype=torch.bool)
    text_mask[:, :6] = True
    crit = MaskGDinoCriterion(build_matcher(_cfg()))
    losses = crit({"pred_logits": logits, "pred_boxes": pred_boxes, "pred_masks": pred_masks}, [tgt], text_mask)
    assert losses["loss_bbox"] < 1e-6 and losses["loss_giou"] < 1e-5
    assert losses["loss_ce"] < 1e-3 and losses["loss_mask"] < 1e-6 and losses["loss_dice"] < 0.1
    # the same masks given as the model's per-image list of matched queries (match order) give the same loss
    listed = crit({"pred_logits": logits, "pred_boxes": pred_boxes,
                   "pred_masks": [pred_masks[0, [2, 4]]], "mask_indices": [(torch.tensor([2, 4]), torch.tensor([0, 1]))]},
                  [tgt], text_mask)
    assert torch.allclose(listed["loss_dice"], losses["loss_dice"]) and torch.allclose(listed["loss_mask"], losses["loss_mask"])


def test_aux_class_targets_use_own_matches():
    """TAO re-indexes aux/interm class targets cumulatively; here each layer's loss equals the final-layer
    loss computed on that layer's own outputs."""
    pm = _pos_map()
    boxes = [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.25, 0.25]]
    tgt = _target([1, 0], boxes, pm)
    final_logits = _logits_for(pm, {2: 1, 4: 0}, Q=6)[None]
    aux_logits = _logits_for(pm, {5: 1, 0: 0}, Q=6)[None]  # another layer, other queries, swapped order
    fb = torch.full((1, 6, 4), 0.5)
    fb[0, 2], fb[0, 4] = torch.tensor(boxes[0]), torch.tensor(boxes[1])
    ab = torch.full((1, 6, 4), 0.5)
    ab[0, 5], ab[0, 0] = torch.tensor(boxes[0]), torch.tensor(boxes[1])
    crit = MaskGDinoCriterion(build_matcher(_cfg()), losses=("labels", "boxes"))
    out = {"pred_logits": final_logits, "pred_boxes": fb,
           "aux_outputs": [{"pred_logits": aux_logits, "pred_boxes": ab}],
           "interm_outputs": {"pred_logits": aux_logits, "pred_boxes": ab}}
    losses = crit(out, [tgt])
    alone = crit({"pred_logits": aux_logits, "pred_boxes": ab}, [tgt])
    assert torch.allclose(losses["loss_ce_0"], alone["loss_ce"]) and losses["loss_ce_0"] < 1e-3
    assert torch.allclose(losses["loss_ce_interm"], alone["loss_ce"])
    assert "loss_mask_interm" not in losses


def test_loss_weights():
    w = loss_weights(_cfg(), num_aux=2)
    assert (w["loss_ce"], w["loss_bbox"], w["loss_giou"], w["loss_mask"], w["loss_dice"]) == (2.0, 5.0, 2.0, 2.0, 5.0)
    assert w["loss_dice_1"] == 5.0 and "loss_dice_2" not in w
    assert (w["loss_ce_interm"], w["loss_bbox_interm"]) == (2.0, 5.0)
    c = _cfg()
    c.no_interm_box_loss = True
    assert loss_weights(c, 0)["loss_bbox_interm"] == 0.0


def test_empty_targets_give_finite_zero_box_losses():
    crit = MaskGDinoCriterion(build_matcher(_cfg()))
    tgt = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4),
           "positive_map": torch.zeros(2, T), "masks": torch.zeros(0, 32, 32, dtype=torch.uint8)}
    logits = torch.randn(1, 6, T, requires_grad=True)
    out = {"pred_logits": logits, "pred_boxes": torch.rand(1, 6, 4), "pred_masks": torch.randn(1, 6, 1, 8, 8)}
    losses = crit(out, [tgt])
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_bbox"] == 0
    losses["loss_ce"].backward()
    assert logits.grad is not None
