"""Metrics: mask IoU and TAO MAL's binned class-mean IoU, COCO AP parity with pycocotools, semantic mIoU, PQ."""
from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from networks.common.coco_io import ann_to_mask, load_panoptic_png, mask_to_rle
from networks.common.metrics import (
    InstanceIoU,
    PanopticQuality,
    as_metrics,
    coco_eval_stats,
    coco_mask_ap,
    mask_iou,
    miou_from_confusion,
    panoptic_quality,
    semantic_confusion,
    size_bin,
)


# ------------------------------------------------------------------ instance IoU
def test_mask_iou_uses_tao_epsilon():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12, abs=1e-6)
    assert mask_iou(a, a) == pytest.approx(1.0, abs=1e-6)
    assert mask_iou(b & False, b & False) == 0.0


@pytest.mark.parametrize(
    "area, expected",
    [(0, None), (1, "small"), (1024, "small"), (1024.001, "medium"), (9216, "medium"), (9216.5, "large"), (1e12, "large")],
)
def test_size_bin_edges_are_half_open(area, expected):
    assert size_bin(area) == expected


def test_instance_iou_is_class_balanced_and_binned():
    m = InstanceIoU()
    m.update(1.0, 1, 32 * 32)  # small
    m.update(0.0, 1, 32 * 32 + 1)  # medium
    m.update(0.0, 1, 96 * 96)  # medium
    m.update(0.5, 2, 96 * 96 + 1)  # large
    out = m.compute()
    assert out["mIoU"] == pytest.approx(((1 + 0 + 0) / 3 + 0.5) / 2)
    assert out["mIoU_small"] == pytest.approx(1.0)
    assert out["mIoU_medium"] == pytest.approx(0.0)
    assert out["mIoU_large"] == pytest.approx(0.5)
    assert (out["num_instances"], out["num_small"], out["num_medium"], out["num_large"]) == (4, 1, 2, 1)
    # Merge (ranks) and state round trip give the same numbers.
    a, b = InstanceIoU(), InstanceIoU()
    a.update(1.0, 1, 32 * 32)
    a.update(0.0, 1, 32 * 32 + 1)
    b.update(0.0, 1, 96 * 96)
    b.update(0.5, 2, 96 * 96 + 1)
    assert InstanceIoU.from_state(a.merge(b).state()).compute() == out


def test_instance_iou_empty_bins_are_null_with_count_zero():
    m = InstanceIoU()
    assert m.compute()["mIoU"] is None and m.compute()["num_instances"] == 0
    m.update(0.7, 3, 50 * 50)
    m.update(0.0, 3, 40 * 40)  # a real 0.0 IoU stays 0.0: only an empty bin is null
    out = m.compute()
    assert out["mIoU_small"] is None and out["num_small"] == 0
    assert out["mIoU_large"] is None and out["num_large"] == 0
    assert out["mIoU_medium"] == pytest.approx(0.35) and out["num_medium"] == 2
    m.update(0.0, 3, 10 * 10)
    assert m.compute()["mIoU_small"] == 0.0 and m.compute()["num_small"] == 1
    assert json.loads(json.dumps(out, allow_nan=False)) == out  # valid JSON: null, never NaN


def test_as_metrics_turns_nan_into_null_and_keeps_counts():
    out = as_metrics({"a": float("nan"), "b": np.float32(0.5), "n": np.int64(3), "c": None, "d": float("inf")})
    assert out == {"a": None, "b": 0.5, "n": 3, "c": None, "d": None} and isinstance(out["n"], int)


# ------------------------------------------------------------------ semantic mIoU
def test_semantic_miou_hand_example():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 0, 1, 0], [0, 1, 1, 1], [2, 0, 3, 0]])
    conf = semantic_confusion(pred, gt, num_classes=4, ignore_index=255)
    # class 0: TP 3, FP 2 (gt1->0, gt2->0), FN 1 -> 3/6; class 1: TP 3, FP 1, FN 1 -> 3/5; class 2: 1/2;
    # class 3: never in GT or prediction (the 3 lies on an ignored pixel) -> excluded.
    res = miou_from_confusion(conf)
    assert res["per_class_iou"][:3] == pytest.approx([0.5, 0.6, 0.5])
    assert res["per_class_iou"][3] is None
    assert res["mIoU"] == pytest.approx((0.5 + 0.6 + 0.5) / 3)
    assert res["pixel_accuracy"] == pytest.approx(7 / 10)
    # Accumulation over two images equals one call on the concatenation.
    acc = semantic_confusion(pred, gt, 4, 255)
    semantic_confusion(pred, gt, 4, 255, conf=acc)
    np.testing.assert_array_equal(acc, 2 * conf)
    assert miou_from_confusion(np.zeros((3, 3)))["mIoU"] == 0.0


# ------------------------------------------------------------------ COCO AP
def _direct_cocoeval(gt_path, results, iou_type="segm"):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats)


def _gt_as_predictions(gt):
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    out = []
    for a in gt["annotations"]:
        if a["iscrowd"]:
            continue
        h, w = sizes[a["image_id"]]
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                    "segmentation": mask_to_rle(ann_to_mask(a["segmentation"], h, w)), "bbox": a["bbox"]})
    return out


def test_coco_ap_of_ground_truth_is_one(synth):
    path = synth["val"]["annotations"]
    gt = json.loads(path.read_text())
    res = coco_mask_ap(path, _gt_as_predictions(gt))
    assert res["AP50"] == pytest.approx(1.0) and res["AP"] == pytest.approx(1.0)
    assert set(res) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def test_coco_ap_equals_direct_pycocotools(synth):
    path = synth["val"]["annotations"]
    gt = json.loads(path.read_text())
    rng = np.random.default_rng(0)
    preds = []
    for p in _gt_as_predictions(gt):
        if rng.random() < 0.2:
            continue  # missed
        h, w = p["segmentation"]["size"]
        m = ann_to_mask(p["segmentation"], h, w)
        m = np.roll(m, int(rng.integers(-3, 4)), axis=int(rng.integers(2)))  # shifted mask
        cat = p["category_id"] if rng.random() < 0.85 else 1 + (p["category_id"] % 3)
        preds.append({**p, "category_id": cat, "score": float(rng.random()), "segmentation": mask_to_rle(m)})
    ours = coco_eval_stats(path, preds)
    assert ours == pytest.approx(_direct_cocoeval(path, preds), abs=0)
    assert 0.0 < ours[0] < 1.0
    boxes = [{k: v for k, v in p.items() if k != "segmentation"} for p in preds]
    assert coco_eval_stats(gt, boxes, "bbox") == pytest.approx(_direct_cocoeval(path, boxes, "bbox"), abs=0)


def test_coco_ap_empty_results(synth):
    res = coco_mask_ap(synth["val"]["annotations"], [])
    assert all(v in (0.0, None) for v in res.values()) and res["AP"] == 0.0 and res["AP50"] == 0.0


def test_coco_ap_empty_area_range_is_null_not_minus_one():
    # One 10x10 object: only the "small" area range has ground truth; pycocotools says -1 for medium/large.
    gt = {"images": [{"id": 1, "height": 20, "width": 20}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 0,
                           "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}]}
    mask = np.zeros((20, 20), np.uint8)
    mask[2:12, 2:12] = 1
    res = coco_mask_ap(gt, [{"image_id": 1, "category_id": 1, "score": 1.0, "segmentation": mask_to_rle(mask)}])
    raw = coco_eval_stats(gt, [{"image_id": 1, "category_id": 1, "score": 1.0, "segmentation": mask_to_rle(mask)}])
    assert raw[4] == -1 and raw[5] == -1  # what pycocotools itself reports
    assert res["APm"] is None and res["APl"] is None
    assert res["APs"] == pytest.approx(res["AP"]) and res["AP"] > 0.5


def test_pq_group_without_categories_is_null():
    cats = [{"id": 1, "isthing": 1, "name": "a"}]  # no stuff class at all
    ids = np.zeros((4, 4), np.int64)
    ids[:2] = 7
    segs = [{"id": 7, "category_id": 1}]
    res = panoptic_quality([(ids, segs)], [(ids.copy(), [dict(s) for s in segs])], cats)
    assert res["PQ_th"] == pytest.approx(1.0) and res["N_th"] == 1
    assert res["PQ_st"] is None and res["SQ_st"] is None and res["N_st"] == 0


# ------------------------------------------------------------------ panoptic quality
def _load_panoptic(split):
    data = json.loads(split["panoptic_json"].read_text())
    items = [(load_panoptic_png(split["panoptic_dir"] / a["file_name"]), a["segments_info"]) for a in data["annotations"]]
    return data, items


def test_pq_is_one_for_ground_truth(synth):
    data, gt = _load_panoptic(synth["val"])
    res = panoptic_quality(gt, copy.deepcopy(gt), data["categories"])
    assert res["PQ"] == pytest.approx(1.0) and res["SQ"] == pytest.approx(1.0) and res["RQ"] == pytest.approx(1.0)
    assert res["PQ_th"] == pytest.approx(1.0) and res["PQ_st"] == pytest.approx(1.0)
    assert res["N_th"] == 3 and res["N_st"] == 2
    assert all(c["FP"] == 0 and c["FN"] == 0 for c in res["per_class"])


def test_pq_drops_when_a_segment_is_removed(synth):
    data, gt = _load_panoptic(synth["val"])
    pred = [(m.copy(), [dict(s) for s in segs]) for m, segs in gt]
    # Remove the first non-crowd thing segment found: its pixels become VOID in the prediction.
    for m, segs in pred:
        victim = next((s for s in segs if s["category_id"] in (1, 2, 3) and not s["iscrowd"]), None)
        if victim:
            m[m == victim["id"]] = 0
            segs.remove(victim)
            break
    res = panoptic_quality(gt, pred, data["categories"])
    cat = next(c for c in res["per_class"] if c["id"] == victim["category_id"])
    assert cat["FN"] == 1 and cat["FP"] == 0
    assert res["PQ"] < 1.0 and res["PQ_th"] < 1.0 and res["PQ_st"] == pytest.approx(1.0)


def test_pq_hand_example_void_and_crowd():
    cats = [{"id": 1, "isthing": 1, "name": "a"}, {"id": 2, "isthing": 0, "name": "b"}]
    gt = np.zeros((10, 20), np.int64)
    gt[:, :10] = 5  # thing, 100 px
    gt[:, 10:15] = 7  # crowd of class 1, 50 px
    gt[:, 15:] = 0  # VOID
    gt_segs = [{"id": 5, "category_id": 1, "iscrowd": 0}, {"id": 7, "category_id": 1, "iscrowd": 1}]
    pred = np.zeros_like(gt)
    pred[:, :8] = 1  # 80 px inside the thing -> IoU 0.8
    pred[:, 8:10] = 2  # small wrong-class piece on the thing -> FP of class 2
    pred[:, 10:20] = 3  # on crowd + VOID -> ignored
    pred_segs = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}, {"id": 3, "category_id": 1}]
    pq = PanopticQuality(cats)
    pq.update(gt, gt_segs, pred, pred_segs)
    res = pq.compute()
    a = next(c for c in res["per_class"] if c["id"] == 1)
    b = next(c for c in res["per_class"] if c["id"] == 2)
    assert (a["TP"], a["FP"], a["FN"]) == (1, 0, 0) and a["PQ"] == pytest.approx(0.8)
    assert (b["TP"], b["FP"], b["FN"]) == (0, 1, 0) and b["PQ"] == 0.0
    assert res["PQ"] == pytest.approx(0.4) and res["PQ_th"] == pytest.approx(0.8) and res["PQ_st"] == 0.0
    # Predicted pixels on VOID do not count in the union: pred covering the thing plus VOID still IoU 1.
    pred2 = gt.copy()
    pred2[:, 15:] = 5
    res2 = panoptic_quality([(gt, gt_segs)], [(pred2, [{"id": 5, "category_id": 1}, {"id": 7, "category_id": 1}])], cats)
    assert res2["PQ"] == pytest.approx(1.0)


def test_coco_ap_accepts_polygon_results_and_rejects_unknown_images(synth):
    path = synth["val"]["annotations"]
    gt = json.loads(path.read_text())
    polys = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
              "segmentation": a["segmentation"]} for a in gt["annotations"] if isinstance(a["segmentation"], list)]
    assert polys
    rles = [{**p, "segmentation": mask_to_rle(ann_to_mask(p["segmentation"], *_size(gt, p["image_id"])))} for p in polys]
    assert coco_eval_stats(gt, polys) == coco_eval_stats(gt, rles)
    from networks.common.errors import DataError

    with pytest.raises(DataError, match="not in the ground-truth"):
        coco_mask_ap(gt, [{**rles[0], "image_id": 987654}])
    with pytest.raises(DataError, match="missing key 'score'"):
        coco_mask_ap(gt, [{k: v for k, v in rles[0].items() if k != "score"}])


def _size(gt, image_id):
    im = next(i for i in gt["images"] if i["id"] == image_id)
    return im["height"], im["width"]


def test_pq_matches_panopticapi_reference_numbers():
    """A fixture whose panopticapi results are published (mmdetection's panoptic evaluation test):
    PQ 67.869, SQ 80.898, RQ 83.333; things 60.453/79.996/75.0; stuff 82.701/82.701/100."""
    cats = [{"id": 0, "name": "person", "isthing": 1}, {"id": 1, "name": "dog", "isthing": 1},
            {"id": 2, "name": "wall", "isthing": 0}]
    gt = np.full((60, 80), 4, np.int64)
    for i, (x, y, w, h) in enumerate([(10, 10, 10, 40), (30, 10, 10, 40), (50, 10, 10, 5)]):
        gt[y : y + h, x : x + w] = i + 1
    gt_segs = [{"id": 1, "category_id": 0, "area": 400, "iscrowd": 0}, {"id": 2, "category_id": 0, "area": 400, "iscrowd": 0},
               {"id": 3, "category_id": 1, "area": 50, "iscrowd": 0}, {"id": 4, "category_id": 2, "area": 3950, "iscrowd": 0}]
    pred = np.full((60, 80), 100, np.int64)
    pred_segs = [{"id": 100, "category_id": 2}]
    for i, ((x, y, w, h), cat) in enumerate(zip([(11, 11, 10, 40), (38, 10, 10, 40), (51, 10, 10, 5)], [0, 0, 1], strict=True)):
        pred[y : y + h, x : x + w] = 1000 * (i + 1)
        pred_segs.append({"id": 1000 * (i + 1), "category_id": cat})
    res = panoptic_quality([(gt, gt_segs)], [(pred, pred_segs)], cats)
    got = [100 * res[k] for k in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")]
    assert got == pytest.approx([67.869, 80.898, 83.333, 60.453, 79.996, 75.0, 82.701, 82.701, 100.0], abs=1e-3)


def test_semantic_reduce_zero_label():
    gt = np.array([[0, 1, 2, 255]])
    pred = np.array([[1, 0, 0, 1]])
    conf = semantic_confusion(pred, gt, num_classes=2, ignore_index=255, reduce_zero_label=True)
    # GT 0 and 255 ignored; GT 1 -> class 0 (pred 0, correct); GT 2 -> class 1 (pred 0, wrong).
    assert conf.tolist() == [[1, 0], [1, 0]]
