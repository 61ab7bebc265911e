"""Evaluation metrics shared by the networks (numpy + faster-coco-eval/pycocotools; no torch, no devices).

* :func:`mask_iou` and :class:`InstanceIoU` — TAO MAL's per-instance mask IoU, class-averaged, with size bins
  by **box** area (pixels²): small (0, 32²], medium (32², 96²], large (96², ∞) — half-open like TAO's eval.
* :func:`coco_mask_ap` / :func:`coco_eval_stats` — COCO mask (or box) AP through ``COCOeval`` of
  faster-coco-eval (default) or pycocotools (``backend``; the spec's ``evaluate.coco_backend``).

A metric that is not defined on the data (a size bin, thing/stuff group or area range with nothing in it) is
``None`` — JSON ``null`` in ``metrics.json`` and ``status.json`` — next to the count it would rest on, never a
0.0 that reads like a bad score, nor NaN (not valid JSON).
* :func:`semantic_confusion` / :func:`miou_from_confusion` — semantic-segmentation mIoU and pixel accuracy.
* :class:`PanopticQuality` / :func:`panoptic_quality` — PQ/SQ/RQ with panopticapi's matching rules.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from networks.common.errors import ConfigError, DataError

__all__ = [
    "SIZE_BINS",
    "COCO_BACKENDS",
    "as_metrics",
    "defined_metrics",
    "format_metrics",
    "mask_iou",
    "size_bin",
    "InstanceIoU",
    "coco_eval_stats",
    "coco_mask_ap",
    "semantic_confusion",
    "miou_from_confusion",
    "PanopticQuality",
    "panoptic_quality",
]

# (name, lower exclusive, upper inclusive) in box-area pixels², as TAO MAL's evaluation bins.
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("small", 0.0, 32.0**2),
    ("medium", 32.0**2, 96.0**2),
    ("large", 96.0**2, float("inf")),
)


def as_metrics(values: Mapping[str, Any]) -> dict[str, float | int | None]:
    """``values`` as a ``module.kpi`` dict: ints stay ints (counts), other numbers become float, and None, NaN
    and ±inf become None (undefined; JSON null)."""
    out: dict[str, float | int | None] = {}
    for key, value in values.items():
        if value is None:
            out[key] = None
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            out[key] = int(value)
        else:
            value = float(value)
            out[key] = value if math.isfinite(value) else None
    return out


def defined_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``values`` that are defined (not None, finite), as floats: what a logger can take."""
    return {k: float(v) for k, v in as_metrics(values).items() if v is not None}


def format_metrics(values: Mapping[str, Any]) -> str:
    """``"mIoU=0.7500, mIoU_small=null, num_small=0"`` for log lines."""
    def one(v: Any) -> str:
        if v is None:
            return "null"
        return str(v) if isinstance(v, int) else f"{v:.4f}"

    return ", ".join(f"{k}={one(v)}" for k, v in as_metrics(values).items())


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two same-shape masks (nonzero = foreground): ``|pred∩gt| / (|pred∪gt| + 1e-6)`` as in TAO MAL.

    Two empty masks give 0.0 (TAO's epsilon convention), not 1.0.
    """
    p = np.asarray(pred) > 0
    g = np.asarray(gt) > 0
    if p.shape != g.shape:
        raise ValueError(f"mask_iou: shapes differ, pred {p.shape} vs gt {g.shape}")
    inter = np.count_nonzero(p & g)
    union = np.count_nonzero(p | g)
    return float(inter / (union + 1e-6))


def size_bin(box_area: float) -> str | None:
    """Name of the size bin of a box area (pixels²), or None for areas ≤ 0 (counted only in the overall mean)."""
    for name, lo, hi in SIZE_BINS:
        if lo < box_area <= hi:
            return name
    return None


class InstanceIoU:
    """Accumulates per-instance IoUs and reports TAO MAL's class-balanced mean IoU.

    ``compute()`` returns ``mIoU`` = mean over categories with ≥ 1 instance of that category's mean instance IoU,
    and ``mIoU_small/medium/large`` = the same restricted to one box-area bin.  A bin (or the whole set) with no
    instance reports None (undefined, JSON null); ``num_instances``/``num_small``/``num_medium``/``num_large``
    say how many instances each value rests on.  Instances of different ranks can be combined with :meth:`merge`.
    """

    def __init__(self) -> None:
        # (category_id, bin or "all") -> [sum of IoU, count]
        self._acc: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0])

    def update(self, iou: float, category_id: int, box_area: float) -> None:
        """Add one instance: its mask IoU, category id and box area (w·h in original-image pixels²)."""
        cat = int(category_id)
        for key in ((cat, "all"), (cat, size_bin(float(box_area)))):
            if key[1] is None:
                continue
            slot = self._acc[key]
            slot[0] += float(iou)
            slot[1] += 1

    def merge(self, other: InstanceIoU) -> InstanceIoU:
        """Add another accumulator's instances into this one (e.g. gathered from other ranks); returns self."""
        for key, (s, n) in other._acc.items():
            slot = self._acc[key]
            slot[0] += s
            slot[1] += n
        return self

    def state(self) -> list[tuple[int, str, float, int]]:
        """Plain ``(category_id, bin, iou_sum, count)`` rows, e.g. for ``all_gather_object``."""
        return [(c, b, s, n) for (c, b), (s, n) in sorted(self._acc.items())]

    @classmethod
    def from_state(cls, rows: Iterable[Sequence[Any]]) -> InstanceIoU:
        """Rebuild an accumulator from :meth:`state` rows."""
        obj = cls()
        for c, b, s, n in rows:
            obj._acc[(int(c), str(b))] = [float(s), int(n)]
        return obj

    def _mean(self, bin_name: str) -> tuple[float | None, int]:
        per_class = [s / n for (c, b), (s, n) in self._acc.items() if b == bin_name and n > 0]
        count = sum(n for (c, b), (s, n) in self._acc.items() if b == bin_name)
        return (float(np.mean(per_class)) if per_class else None), int(count)

    def compute(self) -> dict[str, float | int | None]:
        """``{"mIoU", "mIoU_small", "mIoU_medium", "mIoU_large", "num_instances", "num_small", ...}``.

        An mIoU whose count is 0 is None.
        """
        miou, n = self._mean("all")
        out: dict[str, float | int | None] = {"mIoU": miou}
        counts = {"num_instances": n}
        for name, _, _ in SIZE_BINS:
            value, count = self._mean(name)
            out[f"mIoU_{name}"] = value
            counts[f"num_{name}"] = count
        out.update(counts)
        return out

    def reset(self) -> None:
        """Forget all instances."""
        self._acc.clear()


# --------------------------------------------------------------------------------------------- COCO AP
#: The COCO evaluators ``evaluate.coco_backend`` selects between; the first is the default.
COCO_BACKENDS: tuple[str, ...] = ("faster_coco_eval", "pycocotools")


def _silent(*_args: Any, **_kwargs: Any) -> None:
    """A ``print_function`` for faster-coco-eval that says nothing (its default logs every stage)."""


def _coco_api(backend: str) -> tuple[Any, Any]:
    """``(COCO class, COCOeval factory)`` of ``backend``; an unknown name is a ConfigError naming the spec key.

    Both backends implement the same COCOeval algorithm; faster-coco-eval runs the matching and accumulation
    in C++ (and the mask IoUs on a thread pool), which is what makes a 5k-image evaluation cheap.
    """
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        def evaluator(coco_gt: Any, coco_dt: Any, iou_type: str) -> Any:
            return COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=_silent)

        return COCO, evaluator
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, lambda coco_gt, coco_dt, iou_type: COCOeval(coco_gt, coco_dt, iouType=iou_type)
    raise ConfigError("evaluate.coco_backend", f"unknown COCO evaluation backend {backend!r}",
                      f"use one of {', '.join(COCO_BACKENDS)}")


def _quiet_coco(dataset: dict, coco_cls: Any):
    """``dataset`` indexed by the backend's ``coco_cls`` without its progress prints."""
    coco = coco_cls()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _prepare_gt(gt_json: dict | str | os.PathLike, field: str) -> dict:
    if isinstance(gt_json, dict):
        gt = copy.deepcopy(gt_json)
    else:
        from networks.common.coco_io import load_coco

        gt = load_coco(gt_json, field=field)
    from networks.common.coco_io import ann_to_rle, rle_area

    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in gt.get("images", [])}
    for ann in gt.get("annotations", []):
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            # COCOeval needs areas for its size ranges; derive them like COCO does (mask area, else box area).
            h, w = sizes.get(ann.get("image_id"), (None, None))
            if "segmentation" in ann and h and w:
                ann["area"] = rle_area(ann_to_rle(ann["segmentation"], h, w))
            elif "bbox" in ann:
                ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    return gt


def _prepare_results(results: Sequence[dict], iou_type: str, sizes: dict) -> list[dict]:
    from networks.common.coco_io import ann_to_rle

    out = []
    for i, r in enumerate(results):
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise DataError(f"results[{i}]", f"missing key '{key}'")
        if iou_type == "segm" and "segmentation" not in r:
            raise DataError(f"results[{i}]", "missing key 'segmentation' (needed for iou_type='segm')")
        if iou_type == "bbox" and "bbox" not in r:
            raise DataError(f"results[{i}]", "missing key 'bbox' (needed for iou_type='bbox')")
        r = dict(r)
        seg = r.get("segmentation")
        if isinstance(seg, dict) and isinstance(seg.get("counts"), str):
            r["segmentation"] = {"size": seg["size"], "counts": seg["counts"].encode("utf-8")}
        elif seg is not None and not (isinstance(seg, dict) and isinstance(seg.get("counts"), bytes)):
            # Polygons / uncompressed RLE: loadRes only understands compressed RLE for segm results.
            h, w = sizes.get(r["image_id"], (None, None))
            if h is None:
                raise DataError(f"results[{i}]", f"image id {r['image_id']} is not in the ground-truth file")
            r["segmentation"] = ann_to_rle(seg, h, w, where=f"results[{i}].segmentation")
        out.append(r)
    return out


def coco_eval_stats(
    gt_json: dict | str | os.PathLike,
    results: Sequence[dict],
    iou_type: str = "segm",
    *,
    field: str = "gt_json",
    backend: str = "faster_coco_eval",
) -> list[float]:
    """The 12-number ``COCOeval.stats`` array (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl).

    ``gt_json`` is a COCO instances dict or a path to one; ``results`` are COCO result records
    (``image_id``, ``category_id``, ``score`` and ``segmentation`` — compressed RLE with str or bytes counts,
    polygons or uncompressed RLE — or ``bbox`` xywh).  Empty ``results`` are evaluated as "no detections"
    (0 where the GT has objects, -1 where a size range has none).  The array is COCOeval's own, -1 included;
    :func:`coco_mask_ap` turns -1 into None.  ``field`` names ``gt_json`` in errors.

    ``backend`` (the spec's ``evaluate.coco_backend``) is ``"faster_coco_eval"`` (default) or
    ``"pycocotools"``; both get the same prepared GT and results and give the same numbers (parity to 1e-12 is
    tested); anything else is a :class:`ConfigError`.
    """
    coco_cls, make_eval = _coco_api(backend)
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    gt = _prepare_gt(gt_json, field)
    coco_gt = _quiet_coco(gt, coco_cls)
    known = set(coco_gt.getImgIds())
    unknown = sorted({r["image_id"] for r in results if "image_id" in r} - known, key=str)
    if unknown:
        raise DataError("results", f"image ids {unknown[:5]} are not in the ground-truth file",
                        "predictions must use the GT 'images[].id' values")
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    res = _prepare_results(results, iou_type, sizes)
    with contextlib.redirect_stdout(io.StringIO()):
        if res:
            coco_dt = coco_gt.loadRes(res)
        else:
            empty = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt = _quiet_coco(empty, coco_cls)
        ev = make_eval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # faster-coco-eval may append extra summaries (AR50, AR75) after the 12 standard ones; keep the contract.
    return [float(v) for v in ev.stats[:12]]


def coco_mask_ap(
    gt_json: dict | str | os.PathLike,
    results: Sequence[dict],
    iou_type: str = "segm",
    *,
    field: str = "gt_json",
    backend: str = "faster_coco_eval",
) -> dict[str, float]:
    """COCO AP: ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` as fractions in [0, 1].

    None where COCOeval reports -1 (no ground truth in that area range: undefined, not 0).  See
    :func:`coco_eval_stats` (``backend`` included).
    """
    stats = coco_eval_stats(gt_json, results, iou_type, field=field, backend=backend)
    return {k: (None if v < 0 else v) for k, v in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), stats[:6],
                                                      strict=False)}


# --------------------------------------------------------------------------------------- semantic mIoU
def semantic_confusion(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    ignore_index: int = 255,
    conf: np.ndarray | None = None,
    *,
    reduce_zero_label: bool = False,
) -> np.ndarray:
    """Confusion matrix ``int64 [C, C]`` (rows = GT class, columns = predicted class) of two label maps.

    Pixels whose GT equals ``ignore_index`` or where either label is outside ``[0, num_classes)`` are skipped.
    ``reduce_zero_label`` first maps GT 0 → ignored and k → k − 1 (ADE-style maps where 0 is "unlabelled", as
    TAO Mask2Former's evaluation does); ``pred`` is then expected 0-based.  Pass the previous matrix as
    ``conf`` to accumulate over images (it is updated in place and returned).
    """
    p = np.asarray(pred).astype(np.int64).ravel()
    g = np.asarray(gt).astype(np.int64).ravel()
    if reduce_zero_label:
        g = np.where((g == 0) | (g == ignore_index), ignore_index, g - 1)
    if p.shape != g.shape:
        raise ValueError(f"semantic_confusion: shapes differ, pred {np.shape(pred)} vs gt {np.shape(gt)}")
    c = int(num_classes)
    valid = (g != ignore_index) & (g >= 0) & (g < c) & (p >= 0) & (p < c)
    counts = np.bincount(g[valid] * c + p[valid], minlength=c * c).reshape(c, c)
    if conf is None:
        return counts
    conf += counts
    return conf


def miou_from_confusion(conf: np.ndarray) -> dict[str, Any]:
    """``{"mIoU", "pixel_accuracy", "per_class_iou"}`` from a confusion matrix (rows GT, columns prediction).

    IoU_c = TP / (TP + FP + FN).  Classes absent from both GT and prediction get ``None`` in ``per_class_iou``
    and are excluded from the mean; an empty matrix gives mIoU = pixel_accuracy = 0.0.
    """
    m = np.asarray(conf, dtype=np.float64)
    tp = np.diag(m)
    union = m.sum(0) + m.sum(1) - tp
    present = union > 0
    iou = np.zeros_like(tp)
    iou[present] = tp[present] / union[present]
    total = m.sum()
    return {
        "mIoU": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "per_class_iou": [float(v) if ok else None for v, ok in zip(iou, present, strict=False)],
    }


# ---------------------------------------------------------------------------------------- panoptic PQ
_OFFSET = 256 * 256 * 256
_VOID = 0


def _as_id_map(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 3:
        from networks.common.coco_io import rgb2id

        a = rgb2id(a)
    if a.ndim != 2:
        raise ValueError(f"panoptic id map must be H×W (ids) or H×W×3 (RGB), got shape {a.shape}")
    if a.dtype.kind not in "biu" or a.dtype == np.uint64:
        a = a.astype(np.int64)
    return a  # any narrower integer map as it is: update() widens while combining the two (no extra copies)


class PanopticQuality:
    """Panoptic quality accumulated image by image with panopticapi's ``pq_compute`` rules.

    Per image: a GT and a predicted segment match when they share a category, the GT is not crowd, and
    IoU > 0.5, where the union excludes the predicted pixels lying on GT VOID (id 0).  Unmatched non-crowd GT
    segments are FN.  An unmatched prediction is ignored when more than half of it lies on VOID plus the
    (last listed) GT crowd segment of its category; otherwise it is FP.  GT areas come from ``segments_info``
    ``area`` when given (as panopticapi), else from the map; predicted areas always from the map.
    """

    def __init__(self, categories: Sequence[dict]):
        """``categories``: dicts with ``id``, ``isthing`` (0/1, default 1) and optionally ``name``."""
        self.categories = {int(c["id"]): dict(c) for c in categories}
        self.reset()

    def reset(self) -> None:
        """Forget all images."""
        self.stats = {cid: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0} for cid in self.categories}

    def update(self, gt_map: np.ndarray, gt_segments: Sequence[dict], pred_map: np.ndarray,
               pred_segments: Sequence[dict], *, image: str | int = "") -> None:
        """Add one image: id maps (``H×W`` ids or ``H×W×3`` RGB) and their ``segments_info`` lists."""
        gt_ids = _as_id_map(gt_map)
        pred_ids = _as_id_map(pred_map)
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(f"image {image}: GT map {gt_ids.shape} and prediction map {pred_ids.shape} differ")
        gt_segs = {int(s["id"]): dict(s) for s in gt_segments}
        pred_segs = {int(s["id"]): dict(s) for s in pred_segments}

        # One pass over the pixels: the (GT id, prediction id) pair counts.  Each segment's area is the sum of
        # its pairs, so no separate np.unique of either map is needed (the sorts are the cost of an update).
        joint = np.multiply(gt_ids, _OFFSET, dtype=np.int64)
        joint += pred_ids
        labels, counts = np.unique(joint, return_counts=True)
        gt_of, pred_of = np.divmod(labels, _OFFSET)
        inter: dict[tuple[int, int], int] = {}
        gt_counts: dict[int, int] = defaultdict(int)
        pred_counts: dict[int, int] = defaultdict(int)
        for g, p, c in zip(gt_of.tolist(), pred_of.tolist(), counts.tolist(), strict=True):
            inter[(g, p)] = c
            gt_counts[g] += c
            pred_counts[p] += c

        for sid, seg in gt_segs.items():
            seg.setdefault("iscrowd", 0)
            if "area" not in seg:
                seg["area"] = gt_counts.get(sid, 0)

        unseen = set(pred_segs)
        for label in sorted(pred_counts):
            if label not in pred_segs:
                if label == _VOID:
                    continue
                raise DataError(f"prediction for image {image}",
                                f"segment id {label} is in the map but not in segments_info")
            pred_segs[label]["area"] = pred_counts[label]
            unseen.discard(label)
            if int(pred_segs[label]["category_id"]) not in self.categories:
                raise DataError(f"prediction for image {image}",
                                f"segment {label} has unknown category_id {pred_segs[label]['category_id']}")
        if unseen:
            raise DataError(f"prediction for image {image}",
                            f"segments {sorted(unseen)} are in segments_info but not in the map")

        gt_matched: set[int] = set()
        pred_matched: set[int] = set()
        for (g, p), n in inter.items():
            if g not in gt_segs or p not in pred_segs:
                continue
            gs, ps = gt_segs[g], pred_segs[p]
            if gs["iscrowd"] == 1 or int(gs["category_id"]) != int(ps["category_id"]):
                continue
            union = ps["area"] + gs["area"] - n - inter.get((_VOID, p), 0)
            iou = n / union
            if iou > 0.5:
                st = self.stats[int(gs["category_id"])]
                st["tp"] += 1
                st["iou"] += iou
                gt_matched.add(g)
                pred_matched.add(p)

        crowd_by_cat: dict[int, int] = {}
        for g, gs in gt_segs.items():
            if g in gt_matched:
                continue
            cat = int(gs["category_id"])
            if gs["iscrowd"] == 1:
                crowd_by_cat[cat] = g
                continue
            if cat not in self.stats:
                raise DataError(f"ground truth for image {image}", f"segment {g} has unknown category_id {cat}")
            self.stats[cat]["fn"] += 1

        for p, ps in pred_segs.items():
            if p in pred_matched or ps.get("area", 0) == 0:
                continue
            cat = int(ps["category_id"])
            n = inter.get((_VOID, p), 0)
            if cat in crowd_by_cat:
                n += inter.get((crowd_by_cat[cat], p), 0)
            if n / ps["area"] > 0.5:
                continue
            self.stats[cat]["fp"] += 1

    def merge(self, other: PanopticQuality) -> PanopticQuality:
        """Add another accumulator's counts (same categories) into this one; returns self."""
        for cid, st in other.stats.items():
            mine = self.stats.setdefault(cid, {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})
            for k in mine:
                mine[k] += st[k]
        return self

    def compute(self) -> dict[str, Any]:
        """``{"PQ","SQ","RQ","PQ_th","SQ_th","RQ_th","PQ_st","SQ_st","RQ_st","N","N_th","N_st","per_class"}``.

        Values are fractions in [0, 1]; averages run over categories with TP+FP+FN > 0 (panopticapi); a group
        with no such category (``N_st == 0`` when the data has no stuff classes) has None.  ``per_class`` lists ``{"id","name","isthing","PQ","SQ","RQ","TP","FP","FN"}`` for those categories.
        """
        per_class = []
        groups: dict[str, list[tuple[float, float, float]]] = {"": [], "_th": [], "_st": []}
        for cid in sorted(self.stats):
            st = self.stats[cid]
            tp, fp, fn = st["tp"], st["fp"], st["fn"]
            if tp + fp + fn == 0:
                continue
            denom = tp + 0.5 * fp + 0.5 * fn
            pq = st["iou"] / denom
            sq = st["iou"] / tp if tp else 0.0
            rq = tp / denom
            isthing = int(self.categories.get(cid, {}).get("isthing", 1))
            groups[""].append((pq, sq, rq))
            groups["_th" if isthing else "_st"].append((pq, sq, rq))
            per_class.append({"id": cid, "name": self.categories.get(cid, {}).get("name", str(cid)),
                              "isthing": isthing, "PQ": pq, "SQ": sq, "RQ": rq, "TP": tp, "FP": fp, "FN": fn})
        out: dict[str, Any] = {}
        for suffix, vals in groups.items():
            arr = np.asarray(vals, dtype=np.float64).reshape(-1, 3)
            means = arr.mean(0).tolist() if len(arr) else [None, None, None]
            for name, v in zip(("PQ", "SQ", "RQ"), means, strict=False):
                out[f"{name}{suffix}"] = v
            out[f"N{suffix}"] = len(vals)
        out["per_class"] = per_class
        return out


def panoptic_quality(
    gt_pan: Iterable[tuple[np.ndarray, Sequence[dict]]],
    pred_pan: Iterable[tuple[np.ndarray, Sequence[dict]]],
    categories: Sequence[dict],
) -> dict[str, Any]:
    """PQ/SQ/RQ (all, things, stuff) over paired images; each item is ``(id map or RGB, segments_info)``.

    See :class:`PanopticQuality` for the matching rules and :meth:`PanopticQuality.compute` for the keys.
    """
    pq = PanopticQuality(categories)
    for i, (g, p) in enumerate(zip(gt_pan, pred_pan, strict=True)):
        pq.update(g[0], g[1], p[0], p[1], image=i)
    return pq.compute()
