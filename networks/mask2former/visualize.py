"""Mask2Former pictures: a (augmented) dataset sample, and the ground truth | prediction pair of one evaluated
image, drawn with the shared helpers of :mod:`networks.common.visualize` in label-map colours.

Class indices are the model's (1..C, 0 = ignore / no-object); see :mod:`networks.mask2former.data`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from networks.common.coco_io import ann_to_mask
from networks.common.visualize import Color, denormalize, overlay_masks, palette
from networks.mask2former.data import LabelMap
from networks.mask2former.postprocess import (
    instance_inference,
    panoptic_inference,
    panoptic_keep,
    semantic_inference,
    to_image_size,
)

__all__ = ["draw_sample", "draw_segments", "ground_truth_segments", "predicted_segments", "eval_pair",
           "sample_drawer"]


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


def predicted_segments(mask_cls: torch.Tensor, mask_pred: torch.Tensor, padded_hw: tuple[int, int],
                       image_hw: tuple[int, int], orig_hw: tuple[int, int], model_cfg: Any,
                       label_map: LabelMap | None) -> tuple[list[np.ndarray], list[int], list[float] | None]:
    """(masks, class indices, scores or None) of one image's prediction at the original resolution, by
    ``model_cfg.mode``: the semantic map split by class; the panoptic segments; the instances whose score
    exceeds ``object_mask_threshold`` (as the inference overlays)."""
    mode = model_cfg.mode
    thing = None
    if label_map is not None and label_map.has_stuff():
        thing = torch.as_tensor(label_map.thing_classes(), device=mask_cls.device)
    if mode == "panoptic":
        keep = panoptic_keep(mask_cls, model_cfg.object_mask_threshold)
        masks = to_image_size(mask_pred[keep], padded_hw, image_hw, orig_hw)
        pan, segs = panoptic_inference(mask_cls[keep], masks, model_cfg.object_mask_threshold,
                                       model_cfg.overlap_threshold, thing)
        pan_np = pan.cpu().numpy()
        return ([pan_np == s["id"] for s in segs], [int(s["category"]) for s in segs],
                [float(s["score"]) for s in segs])
    masks = to_image_size(mask_pred, padded_hw, image_hw, orig_hw)
    if mode == "semantic":
        sem = semantic_inference(mask_cls, masks).cpu().numpy()
        classes = [int(c) for c in np.unique(sem)]
        return [sem == c for c in classes], classes, None
    inst = instance_inference(mask_cls, masks, model_cfg.test_topk_per_image, thing)
    out_m, out_c, out_s = [], [], []
    for m, s, lab in zip(inst["masks"], inst["scores"].tolist(), inst["labels"].tolist(), strict=True):
        if s > float(model_cfg.object_mask_threshold):
            out_m.append(m.cpu().numpy())
            out_c.append(int(lab))
            out_s.append(float(s))
    return out_m, out_c, out_s


def eval_pair(batch: dict, i: int, outputs: dict, model_cfg: Any, label_map: LabelMap | None,
              pixel_mean: Sequence[float], pixel_std: Sequence[float], num_classes: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, prediction) pictures of image ``i`` of an evaluation ``batch`` (see ``data.collate``) at
    its original resolution; the image is the un-normalised network input resized back."""
    h, w = (int(v) for v in batch["image_sizes"][i])
    H0, W0 = (int(v) for v in batch["orig_sizes"][i])
    image = denormalize(batch["images"][i][:, :h, :w], pixel_mean, pixel_std)
    if (h, w) != (H0, W0):
        image = np.asarray(Image.fromarray(image).resize((W0, H0), Image.BILINEAR))
    gt_masks, gt_classes = ground_truth_segments(batch["gts"][i], model_cfg.mode, label_map)
    left = draw_segments(image, gt_masks, gt_classes, label_map, num_classes)
    masks, classes, scores = predicted_segments(outputs["pred_logits"][i], outputs["pred_masks"][i],
                                                tuple(batch["images"].shape[-2:]), (h, w), (H0, W0), model_cfg,
                                                label_map)
    right = draw_segments(image, masks, classes, label_map, num_classes, scores)
    return left, right


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
