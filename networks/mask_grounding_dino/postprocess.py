"""Post-processing of Mask Grounding DINO outputs into per-image detections at the original image size (§5).

Class scores come from token probabilities: ``sigmoid(pred_logits)`` [Q, T] times the **row-normalised**
positive map of the prompt's categories [C, T] → [Q, C].  The top ``num_select`` (query, category) pairs over
all Q·C scores are kept (a query may appear with several categories, as TAO), then — beyond TAO's evaluation
path — detections scoring below ``conf_threshold`` are dropped and per-category NMS at ``nms_threshold``
(torchvision; 0 disables) is applied.  Boxes (normalised cxcywh of the un-padded resized image) become xyxy
pixels of the original image.  Masks (stride-4 logits of the padded input) are upsampled ×4 bilinearly to the
padded size, cropped to the resized image, resized bilinearly to the original size and thresholded at 0.5
probability.  Masks always stay aligned with their detections, whatever the thresholds (TAO drops masks when
``conf_threshold > 0``, which breaks its segm evaluation).

With the ReLA branch (outputs ``no_targets`` / ``union_mask_logits``, §5.3): an image whose no-target logits
argmax to 1 gets an empty prediction (``no_target`` True); otherwise, after top-k, detections whose instance
mask lies mostly outside the predicted union mask are dropped (IoI filter,
:func:`~networks.mask_grounding_dino.rela.union_ioi_keep`, ``ioi_threshold``; 0 disables) before the
confidence threshold and NMS.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from networks.mask_grounding_dino.rela import union_ioi_keep
from networks.mask_grounding_dino.text import decode_phrase, normalize_rows
from networks.ops.box_ops import box_cxcywh_to_xyxy

__all__ = ["class_scores", "select_topk", "masks_to_image", "postprocess", "detection_phrases", "no_target_flags"]


def class_scores(logits: torch.Tensor, pos_map: torch.Tensor) -> torch.Tensor:
    """[Q, C] category scores of one image: ``sigmoid(logits [Q, T]) @ normalise(pos_map [C, T'])ᵀ``
    (the map is zero-padded or cut to T)."""
    T = logits.shape[-1]
    pm = pos_map.to(device=logits.device, dtype=torch.float32)
    if pm.shape[-1] < T:
        pm = F.pad(pm, (0, T - pm.shape[-1]))
    return logits.float().sigmoid() @ normalize_rows(pm[:, :T]).T


def select_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of the flattened [Q, C] scores → (scores [k], query indices [k], category indices [k])."""
    Q, C = scores.shape
    k = min(int(k), Q * C)
    top, idx = scores.flatten().topk(k)
    return top, torch.div(idx, C, rounding_mode="floor"), idx % C


def masks_to_image(mask_logits: torch.Tensor, padded_hw: tuple[int, int], image_hw: tuple[int, int],
                   orig_hw: tuple[int, int]) -> torch.Tensor:
    """Stride-4 mask logits [K, h, w] → probabilities [K, H0, W0] at the original size (see module doc)."""
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros(0, int(orig_hw[0]), int(orig_hw[1]))
    x = F.interpolate(mask_logits[:, None].float(), size=tuple(int(v) for v in padded_hw), mode="bilinear",
                      align_corners=False)
    x = x[:, :, :int(image_hw[0]), :int(image_hw[1])]
    x = F.interpolate(x, size=tuple(int(v) for v in orig_hw), mode="bilinear", align_corners=False)
    return x[:, 0].sigmoid()


def no_target_flags(outputs: dict[str, Any]) -> torch.Tensor | None:
    """Bool ``[B]``: the ReLA no-target logits ``[B, 2]`` argmax to 1; None for a model without the branch."""
    nt = outputs.get("no_targets")
    return None if nt is None else nt.argmax(-1) == 1


def postprocess(outputs: dict[str, Any], pos_maps: Sequence[torch.Tensor], image_sizes: Sequence[Sequence[int]],
                orig_sizes: Sequence[Sequence[int]], padded_hw: Sequence[int], num_select: int = 300,
                conf_threshold: float = 0.0, nms_threshold: float = 0.0, with_masks: bool = True,
                ioi_threshold: float = 0.0) -> list[dict[str, torch.Tensor]]:
    """Detections per image: ``scores`` [K], ``labels`` [K] (index into that image's prompt categories),
    ``queries`` [K], ``boxes`` [K, 4] xyxy pixels of the original image, (``with_masks``) ``masks``
    [K, H0, W0] bool, and ``no_target`` (0-d bool; True ⇒ K = 0 because the ReLA branch says the prompt has no
    target).  ``pos_maps[i]`` is image i's 0/1 positive map [C_i, T']; sizes are (h, w); ``padded_hw`` is the
    model input size.  ``ioi_threshold`` applies only when the outputs carry ``union_mask_logits``."""
    logits = outputs["pred_logits"]
    boxes_all = outputs["pred_boxes"]
    stride4 = outputs.get("pred_masks")
    if isinstance(stride4, torch.Tensor) and stride4.dim() == 5:
        stride4 = stride4[:, :, 0]
    masks_all = stride4 if with_masks else None
    no_target = no_target_flags(outputs)
    union = outputs.get("union_mask_logits")
    results = []
    for i in range(logits.shape[0]):
        scores = class_scores(logits[i], pos_maps[i])
        top, query, label = select_topk(scores, num_select)
        H0, W0 = (int(v) for v in orig_sizes[i])
        scale = torch.tensor([W0, H0, W0, H0], dtype=torch.float32, device=logits.device)
        boxes = box_cxcywh_to_xyxy(boxes_all[i, query].float()) * scale
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W0)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H0)
        flag = bool(no_target[i]) if no_target is not None else False
        if flag:
            keep = torch.zeros_like(top, dtype=torch.bool)
            top, query, label, boxes = top[keep], query[keep], label[keep], boxes[keep]
        elif union is not None and ioi_threshold > 0 and isinstance(stride4, torch.Tensor):
            keep = union_ioi_keep(stride4[i, query], union[i], float(ioi_threshold))
            top, query, label, boxes = top[keep], query[keep], label[keep], boxes[keep]
        if conf_threshold > 0:
            keep = top >= float(conf_threshold)
            top, query, label, boxes = top[keep], query[keep], label[keep], boxes[keep]
        if nms_threshold > 0 and top.numel():
            k = batched_nms(boxes, top, label, float(nms_threshold))
            k = k.sort().values  # keep the score order of top-k
            top, query, label, boxes = top[k], query[k], label[k], boxes[k]
        det = {"scores": top, "labels": label, "queries": query, "boxes": boxes,
               "no_target": torch.tensor(flag, device=logits.device)}
        if masks_all is not None:
            det["masks"] = masks_to_image(masks_all[i, query], padded_hw, image_sizes[i], (H0, W0)) > 0.5
        results.append(det)
    return results


def detection_phrases(det: dict[str, torch.Tensor], logits: torch.Tensor, input_ids: torch.Tensor,
                      pos_map: torch.Tensor, names: Sequence[str], tokenizer, text_threshold: float) -> list[str]:
    """Phrase of each detection of one image: the words of its category whose token probability exceeds
    ``text_threshold`` (all of the category name when ``text_threshold`` is 0 or no token passes it)."""
    out = []
    probs = logits.float().sigmoid()
    for q, c in zip(det["queries"].tolist(), det["labels"].tolist(), strict=True):
        phrase = ""
        if text_threshold > 0:
            phrase = decode_phrase(probs[q], input_ids, pos_map[c], tokenizer, text_threshold)
        out.append(phrase or str(names[c]))
    return out
