"""COCO AP backends: faster-coco-eval (default) and pycocotools give the same 12 stats, the default really is
faster-coco-eval, an unknown backend is refused, and each network's ``evaluate.coco_backend`` reaches the metric."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

import networks.common.metrics as metrics
from networks.common.coco_io import ann_to_mask, mask_to_rle
from networks.common.errors import ConfigError
from networks.common.metrics import COCO_BACKENDS, coco_eval_stats, coco_mask_ap
from networks.common.synthetic import generate

PARITY = 1e-12


# ------------------------------------------------------------------------------------------ result sets
def _gt_with_edge_cases(path) -> dict:
    """A synthetic split's GT plus an extra category that has no ground truth at all (precision -1 there)."""
    gt = json.loads(path.read_text())
    gt["categories"] = gt["categories"] + [{"id": 99, "name": "never-annotated", "supercategory": "shape"}]
    return gt


def _results(gt: dict, seed: int, polygons: bool = False) -> tuple[list[dict], dict]:
    """Perturbed detections of ``gt`` (segm RLE + bbox) and a description of the edge cases they contain.

    Per GT object (crowd regions included, so crowd matching is exercised): missed with p 0.15, else a shifted,
    possibly dilated mask with a jittered box, a wrong category with p 0.1, a score on a 0.05 grid (ties); plus
    duplicates and 0-3 false positives per image (the empty images too).  The second annotated image gets no
    detection, and the last category of ``gt`` with annotations gets none anywhere.
    """
    rng = np.random.default_rng(seed)
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    annotated = sorted({a["image_id"] for a in gt["annotations"]})
    no_dets_image = annotated[1]
    silent_cat = max(a["category_id"] for a in gt["annotations"])
    cats = sorted({a["category_id"] for a in gt["annotations"]} - {silent_cat})
    out: list[dict] = []

    def det(image_id: int, cat: int, mask: np.ndarray) -> dict:
        ys, xs = np.nonzero(mask)
        box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        box = [box[0] + rng.normal(0, 0.5), box[1] + rng.normal(0, 0.5), box[2] * rng.uniform(0.93, 1.07),
               box[3] * rng.uniform(0.93, 1.07)]
        return {"image_id": image_id, "category_id": int(cat), "score": round(float(rng.integers(1, 21)) * 0.05, 2),
                "segmentation": mask_to_rle(mask), "bbox": box}

    for a in gt["annotations"]:
        if a["image_id"] == no_dets_image or rng.random() < 0.15:
            continue
        h, w = sizes[a["image_id"]]
        m = ann_to_mask(a["segmentation"], h, w)
        m = np.roll(m, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
        if rng.random() < 0.3:
            m = m | np.roll(m, 2, axis=1)  # a fatter mask: lower IoU
        if not m.any():
            continue
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.choice(cats))
        if cat == silent_cat:
            cat = int(rng.choice(cats))
        out.append(det(a["image_id"], cat, m))
        if rng.random() < 0.15:
            out.append(dict(out[-1], score=round(out[-1]["score"] * 0.5, 3)))  # a duplicate
    for im in gt["images"]:
        if im["id"] == no_dets_image:
            continue
        h, w = sizes[im["id"]]
        for _ in range(int(rng.integers(0, 4))):
            x, y = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
            m = np.zeros((h, w), np.uint8)
            m[y:y + int(rng.integers(4, 60)), x:x + int(rng.integers(4, 60))] = 1
            out.append(det(im["id"], int(rng.choice(cats)), m))
    if polygons:  # polygons as results: converted to RLE by _prepare_results for both backends
        for r in out[::3]:
            x, y, bw, bh = (float(v) for v in r["bbox"])
            r["segmentation"] = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
    cases = {"no_dets_image": no_dets_image, "silent_cat": silent_cat,
             "empty_images": [im["id"] for im in gt["images"] if im["id"] not in set(annotated)],
             "crowd": sum(int(a.get("iscrowd", 0)) for a in gt["annotations"])}
    return out, cases


@pytest.fixture(scope="module")
def big_split(tmp_path_factory):
    """A second, larger synthetic val split (another seed) with COCO-style sizes of 128-160 px."""
    return generate(tmp_path_factory.mktemp("synth_big"), seed=11, num_train=1, num_val=40)["val"]


def _both(gt, results, iou_type):
    return {b: coco_eval_stats(gt, results, iou_type, backend=b) for b in COCO_BACKENDS}


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
@pytest.mark.parametrize("which, seed, polygons", [("synth", 0, False), ("synth", 1, True), ("big", 2, False)])
def test_backends_agree_to_1e12_on_all_12_stats(synth, big_split, which, seed, polygons, iou_type):
    gt = _gt_with_edge_cases((synth["val"] if which == "synth" else big_split)["annotations"])
    results, cases = _results(gt, seed, polygons)
    assert cases["crowd"] > 0 and cases["empty_images"], "the synthetic split lost its edge cases"
    assert all(r["image_id"] != cases["no_dets_image"] and r["category_id"] != cases["silent_cat"]
               for r in results)
    if iou_type == "bbox":
        results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    stats = _both(gt, results, iou_type)
    fast, ref = np.asarray(stats["faster_coco_eval"]), np.asarray(stats["pycocotools"])
    assert fast.shape == ref.shape == (12,)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=PARITY)
    assert 0.05 < ref[0] < 0.95  # a real, non-trivial AP: the parity is not 0 == 0


def test_segm_results_without_boxes_agree(synth):
    # Without 'bbox', loadRes derives the detection area from the mask (with one, from the box): both paths.
    gt = _gt_with_edge_cases(synth["train"]["annotations"])
    results, _ = _results(gt, 5)
    results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    stats = _both(gt, results, "segm")
    np.testing.assert_allclose(stats["faster_coco_eval"], stats["pycocotools"], rtol=0, atol=PARITY)


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_empty_results_same_as_before(synth, iou_type):
    path = synth["val"]["annotations"]
    stats = _both(path, [], iou_type)
    assert stats["faster_coco_eval"] == stats["pycocotools"]
    # no detections: 0 where the GT has objects, -1 where an area range has none (here: large, at 128-160 px)
    assert all(v in (0.0, -1.0) for v in stats["faster_coco_eval"]) and stats["faster_coco_eval"][0] == 0.0
    assert coco_mask_ap(path, [], iou_type)["AP"] == 0.0


# ---------------------------------------------------------------------------------------- backend choice
def test_default_backend_is_faster_coco_eval(synth, monkeypatch):
    import faster_coco_eval
    import pycocotools.cocoeval

    calls: list[str] = []
    real_fast = faster_coco_eval.COCOeval_faster

    class Fast(real_fast):
        def __init__(self, *a, **k):
            calls.append("faster_coco_eval")
            super().__init__(*a, **k)

    class Slow(pycocotools.cocoeval.COCOeval):
        def __init__(self, *a, **k):
            calls.append("pycocotools")
            super().__init__(*a, **k)

    monkeypatch.setattr(faster_coco_eval, "COCOeval_faster", Fast)
    monkeypatch.setattr(pycocotools.cocoeval, "COCOeval", Slow)
    path = synth["val"]["annotations"]
    results, _ = _results(json.loads(path.read_text()), 3)
    coco_eval_stats(path, results)
    coco_mask_ap(path, results, "bbox")
    assert calls == ["faster_coco_eval", "faster_coco_eval"]
    coco_mask_ap(path, results, backend="pycocotools")
    assert calls[-1] == "pycocotools"


@pytest.mark.parametrize("backend", ["", "pycoco", "faster-coco-eval", "FASTER_COCO_EVAL"])
def test_unknown_backend_is_a_config_error_naming_the_field(synth, backend):
    path = synth["val"]["annotations"]
    with pytest.raises(ConfigError, match=r"evaluate\.coco_backend.*faster_coco_eval, pycocotools"):
        coco_eval_stats(path, [], backend=backend)
    with pytest.raises(ConfigError, match=r"evaluate\.coco_backend"):
        coco_mask_ap(path, [], backend=backend)


def test_referring_map_backends_agree_and_refuse_unknown():
    from networks.common.referring_metrics import ReferringMetrics

    rng = np.random.default_rng(0)
    ref = ReferringMetrics()
    for i in range(12):
        g = np.zeros((40, 50), np.uint8)
        if i % 4:  # every fourth expression has no target
            y, x = int(rng.integers(0, 20)), int(rng.integers(0, 30))
            g[y:y + 15, x:x + 18] = 1
        p = np.roll(g, int(rng.integers(-3, 4)), axis=1) if i % 5 else np.zeros_like(g)
        if i == 4:
            p[5:20, 5:20] = 1  # a prediction on a no-target expression: a false positive
        ref.update(i, g, p, score=float(rng.random()))
    fast, slow = ref.compute(), ref.compute(coco_backend="pycocotools")
    assert fast["mAP"] == pytest.approx(slow["mAP"], abs=PARITY) and 0 < slow["mAP"] < 1
    assert fast["mAP50"] == pytest.approx(slow["mAP50"], abs=PARITY)
    with pytest.raises(ConfigError, match=r"evaluate\.coco_backend"):
        ref.compute(coco_backend="nope")


# --------------------------------------------------------------------------- the spec field, per network
def _cfg(net: str, backend: str | None):
    import importlib

    from tao_cli.spec import load_spec

    config = importlib.import_module(f"networks.{net}.config")
    overrides = ["evaluate.checkpoint=m.pth"] + ([f"evaluate.coco_backend={backend}"] if backend else [])
    return load_spec(config.ExperimentConfig, None, None, overrides, mandatory=False)


@pytest.mark.parametrize("net", ["mal", "mask2former", "mask_grounding_dino"])
def test_spec_field_default_options_and_refusal(net):
    assert _cfg(net, None).evaluate.coco_backend == "faster_coco_eval"
    assert _cfg(net, "pycocotools").evaluate.coco_backend == "pycocotools"
    with pytest.raises(ConfigError, match=r"evaluate\.coco_backend"):
        _cfg(net, "detectron2")


@pytest.fixture
def backend_spy(monkeypatch):
    """Every backend name the COCO AP functions are asked for, in order."""
    seen: list[str] = []
    real = metrics._coco_api

    def spy(backend):
        seen.append(backend)
        return real(backend)

    monkeypatch.setattr(metrics, "_coco_api", spy)
    return seen


def _one_object_records():
    gt = np.zeros((20, 20), np.uint8)
    gt[5:15, 5:15] = 1
    return gt, mask_to_rle(gt)


def test_mal_evaluate_uses_the_spec_backend(tmp_path, backend_spy):
    from networks.common.context import RunContext
    from networks.mal.module import MALModule

    cfg = _cfg("mal", "pycocotools")
    cfg.model.arch = "vit-deit-tiny/16"
    OmegaConf.update(cfg, "model.mask_head_hidden_channel", 16)
    OmegaConf.update(cfg, "model.mask_head_out_channel", 16)
    module = MALModule(cfg, RunContext(action="evaluate", run_dir=tmp_path))
    _, rle = _one_object_records()
    rec = {"image_id": 1, "category_id": 3, "compact_category_id": 1, "iscrowd": 0, "bbox": [5, 5, 10, 10],
           "box_area": 100.0, "iou": 1.0, "hw": [20, 20], "pred": rle, "gt": rle, "score": 0.9, "ann_id": 1}
    kpi = module.compute_kpi([rec])
    assert backend_spy == ["pycocotools"] and kpi["AP"] == pytest.approx(1.0)


def test_mask2former_instance_evaluate_uses_the_spec_backend(backend_spy):
    from networks.mask2former.module import Mask2FormerModule

    cfg = _cfg("mask2former", "pycocotools")
    cfg.model.mode = "instance"
    _, rle = _one_object_records()
    rec = {"conf": (np.array([0]), np.array([1])), "image": {"id": 1, "height": 20, "width": 20},
           "dets": [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": rle}],
           "gt_instances": [{"image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle,
                             "bbox": [5, 5, 10, 10], "area": 100}]}
    fake = SimpleNamespace(cfg=cfg, _eval_records={1: rec}, num_classes=2, _trainer=None, onnx=None,
                           _categories=lambda: [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b"}])
    Mask2FormerModule._finish_eval(fake)
    assert backend_spy == ["pycocotools"] and fake.kpi["AP"] == pytest.approx(1.0)


def test_mask_grounding_dino_evaluate_uses_the_spec_backend(tmp_path, backend_spy):
    from networks.mask_grounding_dino.module import MaskGDinoModule

    cfg = _cfg("mask_grounding_dino", "pycocotools")
    _, rle = _one_object_records()
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 20}],
          "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle,
                           "bbox": [5, 5, 10, 10], "area": 100}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    det = {"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": rle, "bbox": [5, 5, 10, 10]}
    fake = SimpleNamespace(cfg=cfg, _records={1: [det]}, _val_loss={}, _trainer=None, _referring=None, onnx=None)
    MaskGDinoModule._finish_eval(fake, {"json_file": str(tmp_path / "gt.json")})
    assert backend_spy == ["pycocotools", "pycocotools"]  # bbox, then segm
    assert fake.kpi["segm_val_mAP"] == pytest.approx(1.0) and fake.kpi["bbox_val_mAP"] == pytest.approx(1.0)


# ------------------------------------------------------------------- panoptic PQ (the same issue: 5k images)
def _pq_reference(gt, gt_segs, pred, pred_segs):
    """panopticapi's pq_compute rules written the slow, obvious way (one boolean mask per segment pair)."""
    stats: dict[int, list] = {}
    garea = {s["id"]: s.get("area", int((gt == s["id"]).sum())) for s in gt_segs}
    parea = {s["id"]: int((pred == s["id"]).sum()) for s in pred_segs}
    gm, pm = set(), set()
    for gs in gt_segs:
        for ps in pred_segs:
            if gs.get("iscrowd", 0) or gs["category_id"] != ps["category_id"]:
                continue
            inter = int(((gt == gs["id"]) & (pred == ps["id"])).sum())
            union = parea[ps["id"]] + garea[gs["id"]] - inter - int(((gt == 0) & (pred == ps["id"])).sum())
            if inter and inter / union > 0.5:
                st = stats.setdefault(gs["category_id"], [0.0, 0, 0, 0])
                st[0] += inter / union
                st[1] += 1
                gm.add(gs["id"])
                pm.add(ps["id"])
    crowd = {}
    for gs in gt_segs:
        if gs.get("iscrowd", 0):
            crowd[gs["category_id"]] = gs["id"]  # the last listed crowd segment of a category
        elif gs["id"] not in gm:
            stats.setdefault(gs["category_id"], [0.0, 0, 0, 0])[3] += 1
    for ps in pred_segs:
        if ps["id"] in pm:
            continue
        ignored = int(((gt == 0) & (pred == ps["id"])).sum())
        if ps["category_id"] in crowd:
            ignored += int(((gt == crowd[ps["category_id"]]) & (pred == ps["id"])).sum())
        if ignored / parea[ps["id"]] <= 0.5:
            stats.setdefault(ps["category_id"], [0.0, 0, 0, 0])[2] += 1
    return stats


@pytest.mark.parametrize("seed", range(16))
def test_panoptic_quality_one_pass_counting_matches_the_obvious_rules(seed):
    from networks.common.coco_io import id2rgb
    from networks.common.metrics import PanopticQuality

    rng = np.random.default_rng(seed)
    h, w = 24, 32
    gt = np.zeros((h, w), np.int64)
    gt_segs = []
    for k, sid in enumerate((1, 2, 300, 4000, 70000, 5_000_000, 16_000_000, 11, 12, 13)):  # ids up to RGB sizes
        y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        gt[y:y + int(rng.integers(3, 14)), x:x + int(rng.integers(3, 18))] = sid
        crowd = k in (1, 2) or rng.random() < 0.15  # two crowd regions of one class: the last listed one counts
        gt_segs.append({"id": sid, "category_id": 1 if k in (1, 2) else int(rng.integers(1, 4)), "iscrowd": int(crowd)})
    gt[:, : int(rng.integers(0, 4))] = 0  # VOID
    present = set(np.unique(gt).tolist())
    gt_segs = [s for s in gt_segs if s["id"] in present] + [{"id": 9, "category_id": 1}]  # listed, not drawn
    pred = np.roll(gt, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1)) % 1000 + 10
    pred[rng.random((h, w)) < 0.05] = 0  # a few unlabelled prediction pixels
    pred[: int(rng.integers(0, 6)), :] = 7  # an extra segment over the top rows
    pred_segs = [{"id": p, "category_id": int(rng.integers(1, 4))} for p in np.unique(pred).tolist() if p != 0]
    expected = _pq_reference(gt, gt_segs, pred, pred_segs)
    cats = [{"id": c, "isthing": int(c < 3)} for c in (1, 2, 3)]
    for gt_in, pred_in in ((gt, pred), (id2rgb(gt), pred.astype(np.uint16)), (gt.astype(np.uint64), id2rgb(pred)),
                           (gt.astype(np.int32), pred.astype(np.uint8) if pred.max() < 256 else pred)):
        pq = PanopticQuality(cats)
        pq.update(gt_in, copy_segs(gt_segs), pred_in, copy_segs(pred_segs))
        got = {c: [st["iou"], st["tp"], st["fp"], st["fn"]] for c, st in pq.stats.items()
               if st["tp"] or st["fp"] or st["fn"]}
        assert got.keys() == expected.keys()
        for c in got:
            assert got[c][1:] == expected[c][1:] and got[c][0] == pytest.approx(expected[c][0], abs=1e-12)


def copy_segs(segs):
    return [dict(s) for s in segs]
