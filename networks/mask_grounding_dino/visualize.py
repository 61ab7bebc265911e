"""Mask Grounding DINO pictures: a (augmented) dataset sample with its prompt, and the ground truth | prediction
pair of one evaluated image, drawn with the shared helpers of :mod:`networks.common.visualize`.

Target boxes are cxcywh normalised by the resized, unpadded image size; detections are xyxy pixels of the
original image (see :mod:`networks.mask_grounding_dino.data` and ``postprocess``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from networks.common.visualize import add_caption, denormalize, overlay_masks, palette

__all__ = ["draw_sample", "draw_instances", "target_instances", "eval_pair", "sample_drawer", "MAX_SHOWN"]

#: most predictions drawn per picture (highest scores first): evaluate's default conf_threshold is 0
MAX_SHOWN = 20


def draw_instances(image: np.ndarray, boxes: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[int],
                   names: Sequence[str], texts: Sequence[str] | None = None) -> np.ndarray:
    """``image`` with boxes (xyxy px), masks (bool H×W) and a label per instance (``texts``, default the prompt
    name ``names[labels[k]]``), coloured by prompt slot so a category has one colour in both panels."""
    colors = palette(max(len(names), 1))
    cols = [colors[int(lab) % len(colors)] for lab in labels]
    if texts is None:
        texts = [str(names[int(lab)]) if 0 <= int(lab) < len(names) else str(int(lab)) for lab in labels]
    return overlay_masks(image, [np.asarray(m, dtype=bool) for m in masks], cols,
                         boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4), labels=list(texts), alpha=0.4)


def target_instances(target: dict, hw: tuple[int, int], out_hw: tuple[int, int] | None = None
                     ) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """(boxes xyxy px, masks bool, labels) of a target on an image of size ``hw`` = (h, w), rescaled to
    ``out_hw`` when given (masks nearest).  Masks may be padded beyond ``hw``; the padding is cut off."""
    h, w = (int(v) for v in hw)
    H, W = (int(v) for v in (out_hw or hw))
    b = target["boxes"].detach().float().cpu().reshape(-1, 4)
    boxes = torch.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2,
                         b[:, 1] + b[:, 3] / 2], dim=1) * torch.tensor([W, H, W, H], dtype=torch.float32)
    m = target["masks"][:, :h, :w].detach().cpu()
    if m.shape[0] and (H, W) != (h, w):
        m = F.interpolate(m[:, None].float(), size=(H, W), mode="nearest")[:, 0]
    masks = [x.numpy() > 0 for x in m]
    return boxes.numpy(), masks, [int(v) for v in target["labels"].tolist()]


def draw_sample(sample: dict, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The picture of one dataset sample as the model sees it (after augmentation): the un-normalised image
    with its boxes, masks and phrase of each region, and the prompt (``names`` joined as the caption) below."""
    image = denormalize(sample["image"], mean, std)
    names = list(sample["names"])
    boxes, masks, labels = target_instances(sample["target"], image.shape[:2])
    out = draw_instances(image, boxes, masks, labels, names)
    return add_caption(out, "prompt: " + " . ".join(names) + " .", top=False)


def eval_pair(batch: dict, i: int, det: dict, phrases: Sequence[str], mean: Sequence[float],
              std: Sequence[float], max_shown: int = MAX_SHOWN) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, prediction) pictures of image ``i`` of an evaluation batch at its original resolution.

    ``det`` is the image's :func:`~networks.mask_grounding_dino.postprocess.postprocess` result (already above
    the evaluate conf threshold) and ``phrases`` its detection phrases; at most ``max_shown`` detections are
    drawn, highest score first, labelled ``"<phrase> <score>"``."""
    h, w = (int(v) for v in batch["image_sizes"][i])
    H0, W0 = (int(v) for v in batch["orig_sizes"][i])
    image = denormalize(batch["images"][i][:, :h, :w], mean, std)
    if (h, w) != (H0, W0):
        image = np.asarray(Image.fromarray(image).resize((W0, H0), Image.BILINEAR))
    names = list(batch["names"][i])
    boxes, masks, labels = target_instances(batch["targets"][i], (h, w), (H0, W0))
    left = draw_instances(image, boxes, masks, labels, names)
    scores = det["scores"].detach().float().cpu()
    order = torch.argsort(scores, descending=True)[: int(max_shown)].tolist()
    pred_masks = det["masks"].detach().cpu().numpy() if "masks" in det else None
    right = draw_instances(
        image, det["boxes"].detach().float().cpu().numpy()[order],
        [pred_masks[k] for k in order] if pred_masks is not None else [],
        [int(det["labels"][k]) for k in order], names,
        [f"{phrases[k]} {float(scores[k]):.2f}" for k in order])
    return left, right


def sample_drawer(cfg: Any, datamodule: Any):
    """``sample -> picture`` for ``tao dataset browse`` (``dataset.augmentation.input_mean/std``)."""
    aug = cfg.dataset.augmentation
    mean, std = list(aug.input_mean), list(aug.input_std)
    return lambda sample: draw_sample(sample, mean, std)
