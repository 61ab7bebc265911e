"""Mask2Former pictures: a (augmented) dataset sample, and the ground truth | prediction pair of one evaluated
image, drawn with the shared helpers of :mod:`networks.common.visualize` in label-map colours.

Class indices are the model's (1..C, 0 = ignore / no-object); see :mod:`networks.mask2former.data`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from networks.common.coco_io import ann_to_mask
from networks.common.visualize import Color, denormalize, overlay_masks, palette
from networks.mask2former.data import LabelMap

__all__ = ["draw_sample", "draw_segments", "ground_truth_segments", "sample_drawer"]


def _colors(label_map: LabelMap | None, num_classes: int) -> np.ndarray:
    return label_map.colors() if label_map is not None else np.asarray(palette(num_classes + 1), dtype=np.uint8)


def _name(label_map: LabelMap | None, class_index: int) -> str:
    return label_map.name(class_index) if label_map is not None else str(class_index)


def draw_segments(image: np.ndarray, masks: Sequence[np.ndarray], classes: Sequence[int],
                  label_map: LabelMap | None, num_classes: int, scores: Sequence[float] | None = None) -> np.ndarray:
    """``image`` (uint8 H×W×3 RGB) with one filled, outlined and labelled mask (bool H×W) per segment, in the
    colour of its class index; labels are the class names (with ``scores`` when given)."""
    table = _colors(label_map, num_classes)
    cols: list[Color] = [tuple(int(v) for v in table[min(int(c), len(table) - 1)]) for c in classes]
    labels = [_name(label_map, int(c)) + (f" {scores[k]:.2f}" if scores is not None else "")
              for k, c in enumerate(classes)]
    return overlay_masks(image, [np.asarray(m, dtype=bool) for m in masks], cols, labels=labels, alpha=0.45)


def draw_sample(sample: dict, label_map: LabelMap | None, pixel_mean: Sequence[float],
                pixel_std: Sequence[float], num_classes: int) -> np.ndarray:
    """The picture of one dataset sample as the model sees it (after augmentation): the un-normalised
    ``image`` with its target ``masks``/``labels`` (class indices)."""
    image = denormalize(sample["image"], pixel_mean, pixel_std)
    masks = sample["masks"].cpu().numpy() if isinstance(sample["masks"], torch.Tensor) else sample["masks"]
    classes = [int(c) for c in sample["labels"]]
    return draw_segments(image, list(masks), classes, label_map, num_classes)


def ground_truth_segments(gt: dict, mode: str, label_map: LabelMap | None
                          ) -> tuple[list[np.ndarray], list[int]]:
    """(masks, class indices) of an image's original-resolution ground truth (``Mask2FormerDataset.full_res_gt``):
    one mask per class present (``semantic``), per non-crowd segment (``panoptic``) or per instance."""
    def index(category_id: int) -> int | None:
        if label_map is None:
            return int(category_id)
        return label_map.class_index(category_id) if label_map.has_id(category_id) else None

    masks: list[np.ndarray] = []
    classes: list[int] = []
    if mode == "semantic":
        sem = np.asarray(gt["sem_seg"])
        for c in np.unique(sem):
            if c > 0:
                masks.append(sem == c)
                classes.append(int(c))
    elif mode == "panoptic":
        pan = np.asarray(gt["pan_ids"])
        for seg in gt["segments"]:
            c = index(seg["category_id"])
            m = pan == seg["id"]
            if c is not None and not seg.get("iscrowd") and m.any():
                masks.append(m)
                classes.append(c)
    else:
        h, w = int(gt["height"]), int(gt["width"])
        for ann in gt["instances"]:
            c = index(ann["category_id"])
            if c is not None and not ann.get("iscrowd"):
                masks.append(ann_to_mask(ann["segmentation"], h, w).astype(bool))
                classes.append(c)
    return masks, classes


def sample_drawer(cfg: Any, datamodule: Any):
    """``sample -> picture`` for ``tao dataset browse`` (label-map names and colours, ``dataset.pixel_mean/std``);
    a sample that failed with a user error raises it."""
    from networks.mask2former.data import raise_if_error

    ds = cfg.dataset
    num_classes = int(cfg.model.sem_seg_head.num_classes)

    def draw(sample: dict) -> np.ndarray:
        raise_if_error(sample)
        return draw_sample(sample, datamodule.label_map, ds.pixel_mean, ds.pixel_std, num_classes)

    return draw
