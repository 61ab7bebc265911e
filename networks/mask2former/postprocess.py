"""Mask2Former post-processing: semantic, panoptic and instance results from class logits and mask logits.

Inputs per image: ``mask_cls`` [Q, C+1] class logits (**index 0 = no-object**, TAO layout) and ``mask_pred``
[Q, H, W] mask logits, usually already brought to the original image resolution by :func:`to_image_size`.
Class indices in the outputs are the model's 1..C (``label_map.category_id`` turns them into dataset ids).

Differences from TAO (docs/compat.md): panoptic keeps a query only if its arg-max class is **not** no-object
(the original's test; TAO only thresholds the best real-class score); instance results are restricted to thing
classes when the label map has stuff classes (as the original in panoptic-enabled runs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "to_image_size",
    "semantic_probs",
    "semantic_inference",
    "panoptic_keep",
    "panoptic_inference",
    "instance_topk",
    "instance_inference",
]


def to_image_size(mask_pred: torch.Tensor, padded_hw: tuple[int, int], image_hw: tuple[int, int],
                  orig_hw: tuple[int, int]) -> torch.Tensor:
    """Mask logits [Q, h, w] over the padded input → [Q, H0, W0] over the original image.

    Upsamples bilinearly to the padded input size ``padded_hw``, crops the un-padded ``image_hw`` (top-left),
    then resizes bilinearly to ``orig_hw`` (the image file's size).  ``align_corners=False`` throughout.
    """
    if mask_pred.shape[0] == 0:
        return mask_pred.new_zeros((0, *orig_hw), dtype=torch.float32)
    x = F.interpolate(mask_pred[None].float(), size=tuple(padded_hw), mode="bilinear", align_corners=False)
    x = x[:, :, : image_hw[0], : image_hw[1]]
    if tuple(image_hw) != tuple(orig_hw):
        x = F.interpolate(x, size=tuple(orig_hw), mode="bilinear", align_corners=False)
    return x[0]


def semantic_probs(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Per-class scores ``Σ_q softmax(cls)[q, 1:] · sigmoid(mask)[q]``: [..., Q, C+1] × [..., Q, H, W] → [..., C, H, W].

    Channel k is class index k+1.  Leading batch dimensions are allowed.
    """
    probs = mask_cls.float().softmax(-1)[..., 1:]
    return torch.einsum("...qc,...qhw->...chw", probs, mask_pred.float().sigmoid())


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Class-index map int64 [H, W] (values 1..C) of one image: argmax of :func:`semantic_probs` + 1."""
    return semantic_probs(mask_cls, mask_pred).argmax(0) + 1


def panoptic_keep(mask_cls: torch.Tensor, object_mask_threshold: float) -> torch.Tensor:
    """bool [Q]: queries whose arg-max class is not no-object (index 0) with probability > the threshold.

    Only these queries can produce panoptic segments, so callers may upsample just their masks.
    """
    scores, labels = mask_cls.float().softmax(-1).max(-1)
    return labels.ne(0) & (scores > object_mask_threshold)


def panoptic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor, object_mask_threshold: float,
                       overlap_threshold: float, thing_classes: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, list[dict]]:
    """Panoptic segmentation of one image → (segment-id map int32 [H, W] (0 = void), segments_info).

    A query is kept when its arg-max class (over all C+1) is not no-object and its probability exceeds
    ``object_mask_threshold``.  Pixels go to the kept query with the highest ``score · sigmoid(mask)``; a query
    whose visible part is below ``overlap_threshold`` of its own (sigmoid ≥ .5) mask is dropped.  Stuff classes
    (``thing_classes[k]`` False for class index k+1) are merged into one segment per class.  Segment ids start
    at 1.  ``segments_info`` entries: ``{"id", "category" (class index 1..C), "isthing", "score", "area"}``.
    """
    H, W = mask_pred.shape[-2:]
    scores, labels = mask_cls.float().softmax(-1).max(-1)
    keep = panoptic_keep(mask_cls, object_mask_threshold)
    cur_scores, cur_classes = scores[keep], labels[keep]
    cur_masks = mask_pred[keep].float().sigmoid()
    panoptic_seg = torch.zeros((H, W), dtype=torch.int32, device=mask_pred.device)
    segments: list[dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments
    cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_segment: dict[int, int] = {}
    segment_id = 0
    for k in range(cur_classes.shape[0]):
        cls = int(cur_classes[k])
        isthing = True if thing_classes is None else bool(thing_classes[cls - 1])
        owned = cur_mask_ids == k
        own = cur_masks[k] >= 0.5
        mask = owned & own
        mask_area, orig_area, area = int(owned.sum()), int(own.sum()), int(mask.sum())
        if mask_area == 0 or orig_area == 0 or area == 0:
            continue
        if mask_area / orig_area < overlap_threshold:
            continue
        if not isthing and cls in stuff_segment:
            sid = stuff_segment[cls]
            panoptic_seg[mask] = sid
            seg = next(s for s in segments if s["id"] == sid)
            seg["area"] += area
            seg["score"] = max(seg["score"], float(cur_scores[k]))
            continue
        segment_id += 1
        if not isthing:
            stuff_segment[cls] = segment_id
        panoptic_seg[mask] = segment_id
        segments.append({"id": segment_id, "category": cls, "isthing": isthing, "score": float(cur_scores[k]),
                         "area": area})
    # Merged stuff may have overwritten pixels of earlier segments; recount so areas match the map.
    if segments:
        counts = torch.bincount(panoptic_seg.flatten().long(), minlength=segment_id + 1)
        for s in segments:
            s["area"] = int(counts[s["id"]])
        segments = [s for s in segments if s["area"] > 0]
    return panoptic_seg, segments


def instance_topk(mask_cls: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (query, class) pairs by real-class probability: [B, Q, C+1] → (scores [B, K], query [B, K],
    class [B, K] 0-based (class index − 1)), K = min(topk, Q·C), sorted by descending score."""
    probs = mask_cls.float().softmax(-1)[..., 1:]
    B, Q, C = probs.shape
    k = min(int(topk), Q * C)
    scores, idx = probs.flatten(1).topk(k, dim=1, sorted=True)
    query = torch.div(idx, C, rounding_mode="floor")
    return scores, query, idx - query * C


def instance_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor, topk: int,
                       thing_classes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Instance segmentation of one image: ``{"masks" bool [K, H, W], "scores" [K], "labels" int64 [K] (1..C)}``.

    The top ``topk`` (query, class) pairs by class probability; mask = logit > 0; score = class probability ×
    mean mask probability inside the mask.  With ``thing_classes`` [C] only thing classes are kept.
    ``mask_pred`` may be at any resolution; only the selected queries are read.
    """
    scores, query, cls0 = (t[0] for t in instance_topk(mask_cls[None], topk))
    if thing_classes is not None:
        keep = thing_classes.to(cls0.device)[cls0]
        scores, query, cls0 = scores[keep], query[keep], cls0[keep]
    masks = mask_pred[query].float()
    binary = masks > 0
    flat = binary.flatten(1).float()
    mask_scores = (masks.sigmoid().flatten(1) * flat).sum(1) / (flat.sum(1) + 1e-6)
    return {"masks": binary, "scores": scores * mask_scores, "labels": cls0 + 1}
