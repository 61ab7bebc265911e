"""MAL post-processing: paste crop probabilities back into the image, binarise, and write pseudo-labels.

Coordinates: ``ext_box`` is the integer crop window ``[x0, y0, x1, y1)`` in original-image pixels (it may leave
the image); ``image_hw`` is ``(H, W)``; boxes from COCO are ``[x, y, w, h]`` pixels.  Masks are full-image
``H×W`` arrays; probabilities are float32 in [0, 1].

The pseudo-label file is the input COCO JSON with *every* annotation kept, in order and with its fields, plus a
compressed-RLE ``segmentation``, ``area`` (mask pixels) and ``score`` (mean probability inside the mask).  It is
written atomically.  The per-annotation prediction records exchanged with ``module.py``:

* full form (from ``predict_step``): ``{"ann_id": int, "image_id": int, "prob": float32 H×W, ["mask": bool
  H×W], ["iou": float]}`` — without ``mask`` the probability is binarised with :func:`bin_threshold`;
* compact form (:func:`encode_prediction`): ``{"ann_id", "image_id", "segmentation" (RLE), "area", "score",
  ["iou"]}`` — recommended inside ``predict_step`` so full-size maps are not kept for a whole dataset.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from networks.common.coco_io import mask_to_rle
from networks.common.io import atomic_path

__all__ = [
    "SIZE_BINS",
    "paste_back",
    "bin_threshold",
    "clip_to_box",
    "encode_prediction",
    "write_pseudo_labels",
    "resolve_label_dump_path",
    "write_overlays",
]

_log = logging.getLogger("tao")

#: Upper bounds (pixels², inclusive) of the small and medium box-area bins used for thresholds; TAO's
#: evaluation bins are half-open (0, 1024], (1024, 9216], (9216, inf).
SIZE_BINS = (32.0 ** 2, 96.0 ** 2)


def paste_back(prob: torch.Tensor, ext_boxes: torch.Tensor | np.ndarray, image_hw: torch.Tensor | np.ndarray,
               ) -> list[np.ndarray]:
    """Full-image probability maps from crop probabilities (TAO eval step 3).

    ``prob`` [N,S,S] (or [N,1,S,S]) in crop space; ``ext_boxes`` [N,4] int crop windows; ``image_hw`` [N,2].
    Each map is bilinearly resized (align_corners=False) to the window size ``(y1-y0, x1-x0)`` and written into
    a zero ``H×W`` canvas at the window, clipped to the image (out-of-image parts are dropped, no wrap-around).
    Returns N float32 numpy arrays.
    """
    if prob.dim() == 4:
        prob = prob[:, 0]
    boxes = np.asarray(torch.as_tensor(ext_boxes).detach().cpu(), dtype=np.int64)
    hws = np.asarray(torch.as_tensor(image_hw).detach().cpu(), dtype=np.int64)
    out = []
    for i in range(prob.shape[0]):
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        h, w = int(hws[i][0]), int(hws[i][1])
        canvas = np.zeros((h, w), dtype=np.float32)
        eh, ew = y1 - y0, x1 - x0
        sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if eh > 0 and ew > 0 and sy1 > sy0 and sx1 > sx0:
            resized = F.interpolate(prob[i][None, None].float(), size=(eh, ew), mode="bilinear",
                                    align_corners=False)[0, 0]
            canvas[sy0:sy1, sx0:sx1] = resized[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0].detach().cpu().numpy()
        out.append(canvas)
    return out


def bin_threshold(area: float, mask_thres: Sequence[float]) -> float:
    """Binarisation threshold for a box of ``area`` pixels² (original image): ``mask_thres`` has one value (all
    sizes) or three (small ≤ 32², medium ≤ 96², large).  Degenerate areas (≤ 0) use the small threshold."""
    thres = [float(t) for t in mask_thres]
    if len(thres) == 1:
        thres = thres * 3
    if len(thres) != 3:
        raise ValueError(f"mask_thres must have 1 or 3 values, got {len(thres)}")
    if area <= SIZE_BINS[0]:
        return thres[0]
    if area <= SIZE_BINS[1]:
        return thres[1]
    return thres[2]


def clip_to_box(mask: np.ndarray, bbox_xywh: Sequence[float]) -> np.ndarray:
    """Zero ``mask`` (H×W) outside the one-pixel-grown box rows ``int(y)..int(y+h)``, cols ``int(x)..int(x+w)``
    (inclusive; the same box the model's box mask covers).  Returns a new bool array."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    x0, y0 = max(int(x), 0), max(int(y), 0)
    x1, y1 = int(x + max(w, 0.0)) + 1, int(y + max(h, 0.0)) + 1
    out = np.zeros(mask.shape, dtype=bool)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = np.asarray(mask[y0:y1, x0:x1], dtype=bool)
    return out


def encode_prediction(pred: dict[str, Any], bbox_xywh: Sequence[float], mask_thres: Sequence[float] = (0.1,),
                      ) -> dict[str, Any]:
    """Compact record of one full-form prediction: RLE ``segmentation`` (clipped to the grown box), ``area``
    (mask pixels), ``score`` (mean probability inside the mask, 0 for an empty mask), plus ids and ``iou``."""
    prob = np.asarray(pred["prob"], dtype=np.float32)
    if "mask" in pred and pred["mask"] is not None:
        mask = np.asarray(pred["mask"]) > 0
    else:
        _, _, w, h = (float(v) for v in bbox_xywh)
        mask = prob > bin_threshold(max(w, 0.0) * max(h, 0.0), mask_thres)
    mask = clip_to_box(mask, bbox_xywh)
    area = int(mask.sum())
    rec = {
        "ann_id": int(pred["ann_id"]),
        "image_id": int(pred["image_id"]) if "image_id" in pred else None,
        "segmentation": mask_to_rle(mask),
        "area": area,
        "score": float(prob[mask].mean()) if area else 0.0,
    }
    if pred.get("iou") is not None:
        rec["iou"] = float(pred["iou"])
    return rec


def write_pseudo_labels(input_json: dict, predictions: Iterable[dict[str, Any]], out_path: str | os.PathLike,
                        *, mask_thres: Sequence[float] = (0.1,)) -> dict[str, Any]:
    """Write ``input_json`` with a predicted mask on every annotation to ``out_path`` (atomically).

    ``predictions`` may mix the full and compact forms (module docstring); the first record per ``ann_id``
    wins (DDP may pad with duplicates).  Every other field of every annotation (``id``, ``bbox``,
    ``iscrowd``, ``category_id``, ...) and every other top-level key is preserved, as is the annotation order.
    An annotation with no prediction gets an empty mask and is counted in ``summary["missing"]``.
    Returns ``{"path", "annotations", "images", "missing", "empty"}``.
    """
    by_id: dict[int, dict] = {}
    for pred in predictions:
        by_id.setdefault(int(pred["ann_id"]), pred)
    out = {k: v for k, v in input_json.items() if k != "annotations"}
    images = {img["id"]: img for img in input_json.get("images", [])}
    anns, missing, empty = [], 0, 0
    for ann in input_json.get("annotations", []):
        new = dict(ann)
        pred = by_id.get(int(ann["id"]))
        img = images[ann["image_id"]]
        h, w = int(img["height"]), int(img["width"])
        if pred is None:
            missing += 1
            rec = {"segmentation": mask_to_rle(np.zeros((h, w), dtype=np.uint8)), "area": 0, "score": 0.0}
        elif "segmentation" in pred and "prob" not in pred:
            rec = pred
        else:
            rec = encode_prediction(pred, ann["bbox"], mask_thres)
        if list(rec["segmentation"]["size"]) != [h, w]:
            raise ValueError(f"prediction for annotation {ann['id']} has size {rec['segmentation']['size']}, "
                             f"image {img['id']} is {h}x{w}")
        new["segmentation"] = rec["segmentation"]
        new["area"] = int(rec["area"])
        new["score"] = float(rec["score"])
        if rec.get("iou") is not None:
            new["iou"] = float(rec["iou"])
        empty += int(new["area"] == 0)
        anns.append(new)
    out["annotations"] = anns
    if missing:
        _log.warning("MAL inference: %d of %d annotations had no prediction and were written with an empty mask",
                     missing, len(anns))
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(out, fh)
    return {"path": str(out_path), "annotations": len(anns), "images": len(out.get("images", [])),
            "missing": missing, "empty": empty}


def resolve_label_dump_path(label_dump_path: str, run_dir: str | os.PathLike) -> Path:
    """``inference.label_dump_path`` made concrete: absolute paths are kept, relative ones live in ``run_dir``."""
    p = Path(os.path.expanduser(str(label_dump_path)))
    return p if p.is_absolute() else Path(run_dir) / p


def write_overlays(coco_out: dict, img_root: str | os.PathLike, out_dir: str | os.PathLike, num: int,
                   ) -> list[Path]:
    """Overlay PNGs (image + pseudo-masks + boxes) for the first ``num`` images of ``coco_out`` that have
    annotations, written atomically to ``out_dir/<image stem>.png``; returns the paths written."""
    from networks.common import visualize
    from networks.common.coco_io import ann_to_mask
    from networks.mal.visualize import image_and_boxes

    if num <= 0:
        return []
    by_image: dict[Any, list[dict]] = {}
    for ann in coco_out.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    cats = {c["id"]: c.get("name", str(c["id"])) for c in coco_out.get("categories", [])}
    written: list[Path] = []
    out_dir = Path(out_dir)
    for img in coco_out.get("images", []):
        if len(written) >= num:
            break
        anns = by_image.get(img["id"])
        if not anns:
            continue
        rgb, boxes = image_and_boxes(img_root, img["file_name"], anns)
        h, w = rgb.shape[:2]
        masks = [ann_to_mask(a["segmentation"], h, w).astype(bool) for a in anns]
        labels = [f"{cats.get(a['category_id'], a['category_id'])} {a.get('score', 0.0):.2f}" for a in anns]
        dest = out_dir / f"{Path(img['file_name']).stem}_{img['id']}.png"
        visualize.save_png(dest, visualize.overlay_masks(rgb, masks, boxes=boxes, labels=labels))
        written.append(dest)
    return written


def box_fill_miou(ann_path: str) -> float:
    """TAO's mIoU of the trivial baseline that fills each (one-pixel-grown) box: what MAL must beat.

    Reads the COCO file at ``ann_path`` (which needs ``segmentation``), scores a box-filled mask per
    annotation against its ground-truth mask, class-averaged per instance like the MAL metric.
    """
    from networks.common.coco_io import ann_to_mask
    from networks.common.metrics import InstanceIoU, mask_iou
    from networks.mal.data import load_records

    records, _ = load_records(ann_path, field="val", need_segmentation=True, need_annotations=True)
    acc = InstanceIoU()
    for r in records:
        gt = ann_to_mask(r.segmentation, r.height, r.width)
        pred = np.zeros_like(gt)
        x0, y0, x1, y1 = r.xyxy
        pred[int(y0):int(y1) + 1, int(x0):int(x1) + 1] = 1
        acc.update(mask_iou(pred, gt), r.compact_category_id, (x1 - x0) * (y1 - y0))
    return acc.compute()["mIoU"]
