"""MAL pictures: a (augmented) training/eval sample, and the ground truth | prediction pairs of evaluated images,
drawn with the shared helpers of :mod:`networks.common.visualize`.

A MAL sample is one box crop (see :mod:`networks.mal.data`): the picture shows the crop with its box mask.
Evaluation records hold full-image RLE masks and COCO ``[x, y, w, h]`` boxes (``MALModule._eval_step``).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from networks.common.coco_io import ann_to_mask
from networks.common.sources import read_rgb
from networks.common.visualize import add_caption, denormalize, overlay_masks, palette, side_by_side
from networks.mal.data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["draw_sample", "eval_pairs", "sample_drawer"]


def image_and_boxes(img_root: str | os.PathLike, file_name: str, records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The image ``img_root/file_name`` as RGB ``uint8 [H, W, 3]`` and the records' COCO ``bbox`` (xywh, pixels)
    as xyxy ``float32 [N, 4]``."""
    rgb = np.asarray(read_rgb(Path(img_root) / file_name))
    boxes = np.array([[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]
                      for r in records], dtype=np.float32).reshape(-1, 4)
    return rgb, boxes


def _box_of(mask: np.ndarray) -> list[list[float]]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return []
    return [[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]]


def draw_sample(sample: dict, categories: dict[int, str] | None = None) -> np.ndarray:
    """Picture of one MAL sample as the network sees it.

    Train samples (``image`` student view, ``timage`` teacher view, ``mask`` crop box mask): the teacher and
    the student view side by side, each with the box mask.  Eval samples (``image``, ``boxmask``): the crop with
    its box mask.  The label is the category name from ``categories`` ({compact_category_id: name}) or the id.
    """
    key = "mask" if "mask" in sample else "boxmask"
    mask = np.asarray(sample[key].detach().cpu().numpy()[0] > 0.5)
    cid = int(sample["compact_category_id"])
    name = (categories or {}).get(cid, f"category {cid}")
    color = [palette(cid + 1)[cid]]

    def view(tensor) -> np.ndarray:
        rgb = denormalize(tensor, IMAGENET_MEAN, IMAGENET_STD)
        return overlay_masks(rgb, [mask], color, boxes=_box_of(mask), labels=[name], alpha=0.3)

    if "timage" in sample:
        return side_by_side(view(sample["timage"]), view(sample["image"]), ("teacher view", "student view"))
    return add_caption(view(sample["image"]), "eval crop")


def eval_pairs(records: Sequence[dict], images: Sequence[dict], img_root: str | os.PathLike, num: int,
               categories: dict[int, str] | None = None) -> Iterator[tuple[int, str, np.ndarray, np.ndarray]]:
    """``(image_id, file_name, ground truth, prediction)`` pictures for the first ``num`` images (in the order of
    the COCO ``images`` list) that have evaluation records; one colour per box in both panels, labels are the
    category name (and the instance IoU on the prediction side)."""
    by_image: dict[Any, list[dict]] = {}
    seen: set[int] = set()
    for r in records:
        if int(r["ann_id"]) not in seen:  # the distributed sampler pads with duplicates
            seen.add(int(r["ann_id"]))
            by_image.setdefault(r["image_id"], []).append(r)
    done = 0
    for img in images:
        if done >= num:
            break
        recs = by_image.get(img["id"])
        if not recs:
            continue
        rgb, boxes = image_and_boxes(img_root, img["file_name"], recs)
        h, w = rgb.shape[:2]
        cols = palette(len(recs))
        names = [(categories or {}).get(int(r["category_id"]), str(r["category_id"])) for r in recs]
        gts = [ann_to_mask(r["gt"], h, w).astype(bool) for r in recs]
        preds = [ann_to_mask(r["pred"], h, w).astype(bool) for r in recs]
        left = overlay_masks(rgb, gts, cols, boxes=boxes, labels=names, alpha=0.45)
        right = overlay_masks(rgb, preds, cols, boxes=boxes,
                              labels=[f"{n} IoU {float(r['iou']):.2f}" for n, r in zip(names, recs, strict=True)],
                              alpha=0.45)
        done += 1
        yield int(img["id"]), str(img["file_name"]), left, right


def sample_drawer(cfg: Any, datamodule: Any):
    """``sample -> picture`` for ``tao dataset browse``: :func:`draw_sample` with the category names of the
    split the datamodule loaded (compact ids, 1 + position in the JSON's ``categories``)."""
    coco = datamodule.coco.get("train") or datamodule.coco.get("val") or {}
    names = {i + 1: str(c.get("name", c.get("id"))) for i, c in enumerate(coco.get("categories", []))}
    return lambda sample: draw_sample(sample, names)
