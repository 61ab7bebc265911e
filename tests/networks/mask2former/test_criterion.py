"""Mask2Former criterion: matched perfect predictions, padding ignored, deep supervision keys, empty targets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from networks.mask2former.criterion import Mask2FormerCriterion, loss_weights
from networks.ops.matcher import HungarianMatcher, mask2former_cost_terms


def _criterion(num_points=2048, deep=True, no_object_weight=0.1):
    matcher = HungarianMatcher(mask2former_cost_terms(2.0, 5.0, 5.0, num_points))
    return Mask2FormerCriterion(4, matcher, no_object_weight, num_points, 3.0, 0.75, deep)


def _scene():
    H = W = 64
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, :32, :32] = True
    masks[1, 32:48, 16:60] = True
    return {"labels": torch.tensor([2, 4]), "masks": masks}


def _perfect_outputs(target, Q=5, C=4, scale=12.0):
    logits = torch.full((1, Q, C + 1), -scale)
    logits[0, :, 0] = scale  # every query says no-object ...
    pred = torch.full((1, Q, 16, 16), -scale)
    for q, (lab, m) in zip((3, 1), zip(target["labels"], target["masks"], strict=False), strict=False):  # ... except queries 3 and 1
        logits[0, q, 0] = -scale
        logits[0, q, lab] = scale
        small = F.interpolate(m[None, None].float(), size=(16, 16), mode="area")[0, 0]
        pred[0, q] = (small * 2 - 1) * scale
    return {"pred_logits": logits, "pred_masks": pred}


def test_perfect_prediction_has_near_zero_loss():
    torch.manual_seed(0)
    target = _scene()
    out = _perfect_outputs(target)
    losses = _criterion(deep=False)(out, [target])
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    assert losses["loss_ce"].item() < 1e-4
    assert losses["loss_dice"].item() < 0.15  # importance sampling concentrates on the boundaries
    assert losses["loss_mask"].item() < 0.2  # only boundary points are uncertain after 4x upsampling
    wrong = {"pred_logits": out["pred_logits"], "pred_masks": -out["pred_masks"]}
    worse = _criterion(deep=False)(wrong, [target])
    assert worse["loss_mask"].item() > 5 * losses["loss_mask"].item()
    assert worse["loss_dice"].item() > 0.5


def test_ce_uses_no_object_weight_on_index_0():
    crit = _criterion(deep=False, no_object_weight=0.25)
    assert crit.empty_weight.tolist() == [0.25, 1, 1, 1, 1]
    logits = torch.randn(1, 3, 5)
    target = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}
    losses = crit({"pred_logits": logits, "pred_masks": torch.randn(1, 3, 2, 2)}, [target])
    expected = F.cross_entropy(logits[0], torch.zeros(3, dtype=torch.int64))  # weights cancel in the mean
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0


def test_padding_does_not_change_the_loss():
    torch.manual_seed(0)
    target = _scene()
    target["masks"][:, :, 32:] = False
    target["valid_extent"] = torch.tensor([0.5, 1.0])  # right half is padding
    out = _perfect_outputs(target)
    torch.manual_seed(1)
    a = _criterion(deep=False)(out, [target])
    garbage = out["pred_masks"].clone()
    garbage[..., 8:] = torch.randn_like(garbage[..., 8:]) * 50
    torch.manual_seed(1)
    b = _criterion(deep=False)({"pred_logits": out["pred_logits"], "pred_masks": garbage}, [target])
    for k in a:
        assert b[k].item() == pytest.approx(a[k].item(), rel=1e-6), k


def test_deep_supervision_and_gradients():
    target = _scene()
    out = {"pred_logits": torch.randn(1, 5, 5, requires_grad=True),
           "pred_masks": torch.randn(1, 5, 16, 16, requires_grad=True)}
    out["aux_outputs"] = [{"pred_logits": torch.randn(1, 5, 5), "pred_masks": torch.randn(1, 5, 16, 16)}
                          for _ in range(2)]
    losses = _criterion()(out, [target])
    assert set(losses) == set(loss_weights(2, 5, 5, 2))
    total = sum(loss_weights(2, 5, 5, 2)[k] * v for k, v in losses.items())
    total.backward()
    assert out["pred_masks"].grad.abs().sum() > 0 and torch.isfinite(total)


def test_equals_hf_mask2former_loss():
    """Same random stream → same matching and the same loss values as transformers' Mask2FormerLoss
    (with the class axis rolled: HF keeps no-object last, we keep it at index 0)."""
    hf = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    from transformers import Mask2FormerConfig

    C, Q, P = 4, 6, 300
    config = Mask2FormerConfig(num_labels=C, train_num_points=P, oversample_ratio=3.0,
                               importance_sample_ratio=0.75, class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
                               no_object_weight=0.1)
    ref = hf.Mask2FormerLoss(config, weight_dict={})
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, Q, C + 1, generator=g)
    masks = torch.randn(2, Q, 12, 12, generator=g)
    aux = [{"pred_logits": torch.randn(2, Q, C + 1, generator=g), "pred_masks": torch.randn(2, Q, 12, 12, generator=g)}]
    targets = [{"labels": torch.tensor([1, 4, 2]), "masks": torch.rand(3, 48, 48, generator=g) > 0.6},
               {"labels": torch.tensor([3]), "masks": torch.rand(1, 48, 48, generator=g) > 0.3}]

    def roll(x):
        return torch.cat([x[..., 1:], x[..., :1]], dim=-1)

    torch.manual_seed(123)
    ours = _criterion(num_points=P)({"pred_logits": logits, "pred_masks": masks, "aux_outputs": aux}, targets)
    torch.manual_seed(123)
    theirs = ref(masks, roll(logits), [t["masks"].float() for t in targets], [t["labels"] - 1 for t in targets],
                 auxiliary_predictions=[{"masks_queries_logits": a["pred_masks"],
                                         "class_queries_logits": roll(a["pred_logits"])} for a in aux])
    for key, value in theirs.items():
        ours_key = key.replace("loss_cross_entropy", "loss_ce")
        assert ours[ours_key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    assert len(theirs) == len(ours) == 6
