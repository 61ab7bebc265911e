"""Referring (GRES) metrics on hand-made expressions: each case tells the right formula from a plausible wrong one."""
from __future__ import annotations

import numpy as np
import pytest

from networks.common.referring_metrics import ReferringMetrics, expression_iou, referring_metric_names


def _mask(n_on: int, shape=(10, 20), start: int = 0) -> np.ndarray:
    """A mask with pixels ``start .. start+n_on-1`` (row-major) set."""
    m = np.zeros(shape, dtype=bool)
    m.flat[start:start + n_on] = True
    return m


def _metrics(pairs, scores=None) -> dict:
    acc = ReferringMetrics()
    for k, (gt, pred) in enumerate(pairs):
        acc.update(k, gt, pred, None if scores is None else scores[k])
    return acc.compute()


def test_empty_gt_and_empty_prediction_is_iou_one():
    empty = _mask(0)
    assert expression_iou(empty, empty) == (1.0, 0, 0)  # not TAO MAL's eps convention (0.0)
    # a wrong empty/non-empty call is 0, whichever side is empty
    assert expression_iou(empty, _mask(5))[0] == 0.0
    assert expression_iou(_mask(5), empty)[0] == 0.0
    out = _metrics([(empty, empty), (_mask(10), _mask(5))])
    assert out["mIoU"] == pytest.approx((1.0 + 0.5) / 2)
    # the correct empty answer adds nothing to ΣI/ΣU
    assert out["overall_IoU"] == pytest.approx(5 / 10)


def test_ciou_is_sum_of_intersections_over_sum_of_unions_and_giou_the_mean():
    # A: small object, half found (I 5, U 10, IoU 0.5).  B: large object, found exactly (I = U = 100, IoU 1).
    pairs = [(_mask(10), _mask(5)), (_mask(100, start=50), _mask(100, start=50))]
    out = _metrics(pairs)
    assert out["mIoU"] == pytest.approx(0.75)            # mean of per-expression IoUs
    assert out["overall_IoU"] == pytest.approx(105 / 110)  # ΣI / ΣU, not the mean, not mean(I)/mean(U) of IoU
    assert out["overall_IoU"] != pytest.approx(out["mIoU"])
    # a spurious prediction on a no-target expression enlarges ΣU only
    out = _metrics(pairs + [(_mask(0), _mask(40, start=150))])
    assert out["overall_IoU"] == pytest.approx(105 / 150)
    assert out["mIoU"] == pytest.approx(1.5 / 3)


def test_t_acc_and_n_acc_use_their_own_denominators():
    e = _mask(0)
    pairs = [(_mask(10), _mask(3)),          # target, predicted (poorly): counts for T_acc
             (_mask(10), _mask(10)),         # target, predicted
             (_mask(10), e),                 # target, predicted empty
             (e, e),                         # no target, predicted empty
             (e, _mask(2))]                  # no target, predicted something
    out = _metrics(pairs)
    assert out["T_acc"] == pytest.approx(2 / 3)  # not 2/5 (over all) nor tied to IoU
    assert out["N_acc"] == pytest.approx(1 / 2)
    assert out["num_expressions"] == 5 and out["num_no_target"] == 2
    only_targets = _metrics(pairs[:3])
    assert only_targets["N_acc"] is None  # undefined, not 0 or 1
    assert _metrics(pairs[3:])["T_acc"] is None


def test_precision_at_k_counts_iou_at_or_above_the_threshold():
    pairs = [(_mask(10), _mask(7)),     # IoU 0.7 exactly
             (_mask(20), _mask(17)),    # 0.85
             (_mask(20), _mask(19)),    # 0.95
             (_mask(10), _mask(5))]     # 0.5
    out = _metrics(pairs)
    assert out["Pr@0.7"] == pytest.approx(3 / 4)  # ">=": a strict ">" would give 2/4
    assert out["Pr@0.8"] == pytest.approx(2 / 4)
    assert out["Pr@0.9"] == pytest.approx(1 / 4)
    # a correct no-target answer is an IoU-1 expression
    assert _metrics([(_mask(0), _mask(0)), (_mask(10), _mask(5))])["Pr@0.9"] == pytest.approx(1 / 2)


def test_mask_map_ranks_expressions_by_confidence():
    good = (_mask(30), _mask(30))
    assert _metrics([good, (_mask(30, start=40), _mask(30, start=40))], [0.9, 0.8])["mAP50"] == pytest.approx(1.0)
    # a confident prediction on a no-target expression ranks above the true positive: precision 1/2 at recall 1
    fp = (_mask(0), _mask(30, start=100))
    assert _metrics([good, fp], [0.5, 0.9])["mAP50"] == pytest.approx(0.5, abs=0.01)
    # ... and below it: no harm to AP
    assert _metrics([good, fp], [0.9, 0.5])["mAP50"] == pytest.approx(1.0)
    # IoU 0.7 is a hit at 0.5..0.7 only: mAP over .5:.95 is 5/10 of mAP50
    out = _metrics([(_mask(10), _mask(7))], [0.9])
    assert out["mAP50"] == pytest.approx(1.0) and out["mAP"] == pytest.approx(0.5)
    assert _metrics([(_mask(0), _mask(0))])["mAP"] is None  # nothing to find: undefined


def test_rows_survive_a_gather_and_names_are_stable():
    acc = ReferringMetrics()
    acc.update("a", _mask(10), _mask(5), 0.3, caption="the red square")
    other = ReferringMetrics()
    other.update("b", _mask(0), _mask(0))
    merged = ReferringMetrics.from_rows(acc.rows() + other.rows())
    assert len(merged) == 2 and merged.rows()[0]["caption"] == "the red square"
    assert list(merged.compute()) == referring_metric_names()
