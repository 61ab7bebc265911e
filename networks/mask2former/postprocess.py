"""Mask2Former post-processing: semantic, panoptic and instance results from class logits and mask logits.

Two stages.  :func:`head_outputs` turns a batch of model outputs into TAO's export outputs at the network input
resolution (the tensors an exported ONNX graph ends with, :data:`HEAD_OUTPUTS`); :func:`finish_image` turns one
image's slice of those tensors into its results at the original resolution.  Evaluate and inference run both
stages for a PyTorch model and only the second for an ONNX file, so the two runtimes share every step after
the graph boundary.  The logit-level functions below (:func:`semantic_inference`, :func:`panoptic_inference`,
:func:`instance_inference`) are the same rules on raw logits, for callers that hold them.

Inputs per image: ``mask_cls`` [Q, C+1] class logits (**index 0 = no-object**, TAO layout) and ``mask_pred``
[Q, H, W] mask logits, usually already brought to the original image resolution by :func:`to_image_size`.
Class indices in the outputs are the model's 1..C (``label_map.category_id`` turns them into dataset ids).

Differences from TAO (docs/compat.md): panoptic keeps a query only if its arg-max class is **not** no-object
(the original's test; TAO only thresholds the best real-class score) — except in :func:`finish_image`, whose
inputs (TAO's export outputs) do not carry the no-object probability, so it applies TAO's test; instance results
are restricted to thing classes when the label map has stuff classes (as the original in panoptic-enabled runs).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "HEAD_OUTPUTS",
    "head_outputs",
    "crop_resize",
    "finish_image",
    "to_image_size",
    "semantic_probs",
    "semantic_inference",
    "panoptic_keep",
    "panoptic_inference",
    "panoptic_merge",
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
    return crop_resize(x[0], image_hw, orig_hw)


def crop_resize(x: torch.Tensor, image_hw: tuple[int, int], orig_hw: tuple[int, int]) -> torch.Tensor:
    """Maps [N, Hp, Wp] over a padded input → float [N, H0, W0]: crop the top-left ``image_hw``, then resize
    bilinearly (``align_corners=False``) to ``orig_hw`` unless it already has that size."""
    h, w = int(image_hw[0]), int(image_hw[1])
    if x.shape[0] == 0:
        return x.new_zeros((0, int(orig_hw[0]), int(orig_hw[1])), dtype=torch.float32)
    x = x[:, :h, :w].float()
    if (h, w) != (int(orig_hw[0]), int(orig_hw[1])):
        x = F.interpolate(x[None], size=(int(orig_hw[0]), int(orig_hw[1])), mode="bilinear", align_corners=False)[0]
    return x


#: TAO's export outputs per ``model.mode``, in graph order (see :func:`head_outputs`).
HEAD_OUTPUTS: dict[str, list[str]] = {
    "semantic": ["pred_masks"],
    "instance": ["pred_masks", "pred_scores", "pred_classes"],
    "panoptic": ["prob_masks", "pred_masks", "pred_scores", "pred_classes"],
}


def head_outputs(mode: str, pred_logits: torch.Tensor, pred_masks: torch.Tensor, input_hw: Any,
                 topk: int) -> tuple[torch.Tensor, ...]:
    """TAO's export post-processor: model outputs of a batch → tensors named by ``HEAD_OUTPUTS[mode]``.

    ``pred_logits`` [B, Q, C+1] (index 0 = no-object), ``pred_masks`` [B, Q, h, w] logits, upsampled bilinearly
    to ``input_hw`` first.  ``semantic``: class probabilities [B, C, H, W] (:func:`semantic_probs`).
    ``instance``: top-k {0, 1} masks [B, K, H, W], scores (class probability × mean mask probability inside the
    mask) [B, K], 0-based classes [B, K].  ``panoptic``: ``score · sigmoid`` and ``sigmoid`` masks [B, Q, H, W],
    best real-class probability [B, Q] and its 0-based class [B, Q].  Traceable (the ONNX export runs it).
    """
    logits = pred_logits
    masks = F.interpolate(pred_masks, size=input_hw, mode="bilinear", align_corners=False)
    if mode == "semantic":
        return (semantic_probs(logits, masks),)
    if mode == "instance":
        scores, query, cls0 = instance_topk(logits, topk)
        H, W = masks.shape[-2:]
        index = query[:, :, None, None].expand(-1, -1, H, W)
        selected = torch.gather(masks, 1, index)
        binary = (selected > 0).to(selected.dtype)
        mask_scores = (selected.sigmoid() * binary).flatten(2).sum(-1) / (binary.flatten(2).sum(-1) + 1e-6)
        return binary, scores * mask_scores, cls0
    probs = logits.float().softmax(-1)[..., 1:]
    scores, cls0 = probs.max(-1)
    sig = masks.sigmoid()
    return scores[:, :, None, None] * sig, sig, scores, cls0


def eval_extras(mode: str, pred_logits: torch.Tensor, pred_masks: torch.Tensor, input_hw: Any,
                object_mask_threshold: float, semantic: bool = True) -> dict[str, torch.Tensor]:
    """What the PyTorch runtime adds to :func:`head_outputs` (see :func:`finish_image`): in ``panoptic``,
    ``keep`` [B, Q] (:func:`panoptic_keep`); in ``panoptic``/``instance`` with ``semantic`` (evaluation),
    ``semantic_probs`` [B, C, H, W] at ``input_hw``.  Nothing in ``semantic`` mode, whose export output is that
    map."""
    extras: dict[str, torch.Tensor] = {}
    if mode == "panoptic":
        extras["keep"] = panoptic_keep(pred_logits, object_mask_threshold)
    if semantic and mode != "semantic":
        masks = F.interpolate(pred_masks, size=input_hw, mode="bilinear", align_corners=False)
        extras["semantic_probs"] = semantic_probs(pred_logits, masks)
    return extras


def finish_image(mode: str, head: dict[str, torch.Tensor], image_hw: tuple[int, int], orig_hw: tuple[int, int],
                 *, num_classes: int, object_mask_threshold: float, overlap_threshold: float, topk: int,
                 thing_classes: torch.Tensor | None = None, semantic: bool = True) -> dict[str, Any]:
    """One image's results at the original resolution from its slice of :func:`head_outputs` (no batch axis;
    maps over the padded input, of which ``image_hw`` top-left is the image, resized to ``orig_hw``).

    ``head`` may carry two tensors the export outputs lack, which the PyTorch runtime adds (:func:`eval_extras`):
    ``semantic_probs`` [C, H, W] (TAO's class-probability map, which its mIoU uses in every mode) and ``keep`` [Q]
    (the original Mask2Former panoptic test: arg-max class not no-object).  Without them (an ONNX graph of
    ``panoptic``/``instance``) the semantic map comes from the mode's own masks and the panoptic test is TAO's.

    Keys: ``semantic`` int64 [H0, W0] class index 1..C (only when ``semantic``: argmax of ``semantic_probs``, or
    in ``panoptic`` and ``instance`` without it, of the sum of the mode's masks weighted by their score, by their
    class); ``panoptic`` int32 id map and ``segments`` (as :func:`panoptic_inference`; a query is kept by
    ``keep`` when given, else when its best real-class probability exceeds ``object_mask_threshold``, TAO's
    test); ``instances``
    ``{"masks" bool [K, H0, W0], "scores" [K], "labels" [K] 1..C}`` (``thing_classes``: only those, when given;
    at most ``topk``).
    """
    out: dict[str, Any] = {}
    if semantic:
        if mode == "semantic":
            probs = head["pred_masks"]
        elif "semantic_probs" in head:
            probs = head["semantic_probs"]
        else:
            weighted = head["prob_masks"] if mode == "panoptic" else \
                head["pred_masks"].float() * head["pred_scores"][:, None, None]
            probs = weighted.new_zeros((num_classes, *weighted.shape[-2:]), dtype=torch.float32)
            probs.index_add_(0, head["pred_classes"].long(), weighted.float())
        out["semantic"] = crop_resize(probs, image_hw, orig_hw).argmax(0) + 1
    if mode == "panoptic":
        scores, classes = head["pred_scores"].float(), head["pred_classes"].long() + 1
        keep = head["keep"] if "keep" in head else scores > object_mask_threshold
        prob = crop_resize(head["prob_masks"][keep], image_hw, orig_hw)
        sig = crop_resize(head["pred_masks"][keep], image_hw, orig_hw)
        out["panoptic"], out["segments"] = panoptic_merge(scores[keep], classes[keep], prob, sig,
                                                          overlap_threshold, thing_classes, orig_hw)
    elif mode == "instance":
        masks, scores, cls0 = head["pred_masks"][:topk], head["pred_scores"][:topk].float(), \
            head["pred_classes"][:topk].long()
        if thing_classes is not None:
            keep = thing_classes.to(cls0.device)[cls0]
            masks, scores, cls0 = masks[keep], scores[keep], cls0[keep]
        out["instances"] = {"masks": crop_resize(masks, image_hw, orig_hw) >= 0.5, "scores": scores,
                            "labels": cls0 + 1}
    return out


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
    scores, labels = mask_cls.float().softmax(-1).max(-1)
    keep = panoptic_keep(mask_cls, object_mask_threshold)
    sig = mask_pred[keep].float().sigmoid()
    return panoptic_merge(scores[keep], labels[keep], scores[keep].view(-1, 1, 1) * sig, sig, overlap_threshold,
                          thing_classes, tuple(mask_pred.shape[-2:]))


def panoptic_merge(scores: torch.Tensor, classes: torch.Tensor, prob_masks: torch.Tensor, masks: torch.Tensor,
                   overlap_threshold: float, thing_classes: torch.Tensor | None, hw: tuple[int, int]
                   ) -> tuple[torch.Tensor, list[dict]]:
    """The panoptic merge of the kept queries: ``scores`` [K], class indices ``classes`` [K] (1..C),
    ``prob_masks`` [K, H, W] (score · mask probability) and ``masks`` [K, H, W] (mask probability) →
    (segment-id map int32 [H, W], segments_info) as :func:`panoptic_inference` describes."""
    H, W = int(hw[0]), int(hw[1])
    cur_scores, cur_classes, cur_masks = scores, classes, masks
    panoptic_seg = torch.zeros((H, W), dtype=torch.int32, device=masks.device)
    segments: list[dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments
    cur_mask_ids = prob_masks.argmax(0)
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
