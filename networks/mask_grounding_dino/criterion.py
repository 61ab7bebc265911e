"""Mask Grounding DINO set criterion (§4 of the reference): matching, token focal, box and mask losses.

Inputs follow the model contract:

* ``outputs``: ``pred_logits`` [B, Q, T] (contrastive token logits, ``-inf`` on padding), ``pred_boxes``
  [B, Q, 4] (normalised cxcywh), ``pred_masks`` (stride-4 logits; either all queries [B, Q, (1,) h, w] or, in
  training, a list per image of the **matched** queries [(1,) n_i, (1,) h, w] in match order), and optionally
  ``aux_outputs`` (list of the same per intermediate decoder layer) and ``interm_outputs`` (encoder proposals:
  logits and boxes only).  A layer dict may carry ``mask_indices`` (the matches the model used for its masks);
  otherwise the matcher runs again (same inputs → same matches).
* ``targets``: per image ``labels`` [M] (indices into that image's ``positive_map`` [C, T'] of 0/1 token rows),
  ``boxes`` [M, 4] normalised cxcywh, ``masks`` [M, H, W] on the padded input canvas.
* ``text_mask`` [B, L] bool: real tokens (the tokenizer's attention mask); only these token slots are scored.

Losses (unweighted; :func:`loss_weights` gives the weights the module applies in one place):

* ``loss_ce``: sigmoid focal (``focal_alpha``, ``focal_gamma``) between logits and the 0/1 target map (the
  matched target's positive-map row, zeros for unmatched queries) over real tokens, summed and divided by the
  number of matched queries in the local batch (≥ 1), as TAO.
* ``loss_bbox`` / ``loss_giou``: L1 and 1 − GIoU of matched boxes, summed / ``num_boxes`` (the GT count averaged
  over ranks, ≥ 1).
* ``loss_mask`` / ``loss_dice``: on matched masks against GT masks padded to a multiple of 8 and subsampled at
  stride 4 with offset 2; focal (α 0.25, γ 2) averaged over pixels and dice with +1 smoothing, each summed /
  ``num_boxes``.
* Aux layers get the same terms with suffix ``_<i>``; encoder outputs ``loss_ce/bbox/giou_interm`` (no masks).
  Unlike TAO, aux/interm class targets use each layer's own matches (TAO re-indexes them cumulatively).
* ReLA (``"rela"`` in ``losses`` and the model has the branch; final outputs only, §4.6):
  ``loss_rela_nt`` = cross-entropy of ``no_targets`` [B, 2] against 1 for an image whose expression has no target
  (``target["empty"]``, else no boxes), class weights [0.9, 1.1];
  ``loss_rela_union_mask`` = 0.9/1.1 BCE (:func:`~networks.mask_grounding_dino.rela.fg_bg_bce`) of
  ``union_mask_logits`` [B, 2, h, w] against :func:`~networks.mask_grounding_dino.rela.cpp_pooling` of the GT
  union mask (OR of the instance masks on the canvas padded to a multiple of 8; all zero for an empty image),
  each cell weighted by its fraction of valid (un-padded) pixels;
  ``loss_rela_minimap`` = the same BCE of ``minimaps`` [B, R, 2] laid out on the ``find_grid(R, H, W)`` grid
  against the union mask pooled to that grid (weight 1).  Images without a target get no Hungarian match, so
  their other terms see zero matched queries (no crash; ``loss_ce`` still pushes their token scores down).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from networks.ops.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from networks.ops.detection_costs import grounding_dino_cost_terms, target_token_map
from networks.ops.losses import dice_loss, sigmoid_focal_loss
from networks.ops.matcher import HungarianMatcher

from .rela import BG_WEIGHT, FG_WEIGHT, cpp_pooling, fg_bg_bce, find_grid

__all__ = ["build_matcher", "MaskGDinoCriterion", "loss_weights", "token_sigmoid_focal_loss", "num_boxes_of",
           "is_empty_target", "union_targets", "RELA_LOSSES"]

#: ReLA loss terms and the ``model`` coefficient of each
RELA_LOSSES = {"loss_rela_nt": "rela_nt_loss_coef", "loss_rela_minimap": "rela_minimap_loss_coef",
               "loss_rela_union_mask": "rela_union_mask_loss_coef"}

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def build_matcher(model_cfg: Any) -> HungarianMatcher:
    """Hungarian matcher with ``set_cost_class/bbox/giou`` (α 0.25, γ 2 as TAO's matcher)."""
    return HungarianMatcher(grounding_dino_cost_terms(float(model_cfg.set_cost_class),
                                                      float(model_cfg.set_cost_bbox),
                                                      float(model_cfg.set_cost_giou)))


def loss_weights(model_cfg: Any, num_aux: int) -> dict[str, float]:
    """``{loss name: weight}`` for the final layer, ``num_aux`` aux layers and the encoder (interm) outputs."""
    base = {
        "loss_ce": float(model_cfg.cls_loss_coef),
        "loss_bbox": float(model_cfg.bbox_loss_coef),
        "loss_giou": float(model_cfg.giou_loss_coef),
        "loss_mask": float(model_cfg.mask_loss_coef),
        "loss_dice": float(model_cfg.dice_loss_coef),
    }
    weights = dict(base)
    for i in range(num_aux):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    coef = float(model_cfg.interm_loss_coef)
    box_coef = 0.0 if model_cfg.no_interm_box_loss else coef
    weights["loss_ce_interm"] = base["loss_ce"] * coef
    weights["loss_bbox_interm"] = base["loss_bbox"] * box_coef
    weights["loss_giou_interm"] = base["loss_giou"] * box_coef
    if "rela" in list(getattr(model_cfg, "loss_types", []) or []):
        weights.update({k: float(getattr(model_cfg, c)) for k, c in RELA_LOSSES.items()})
    return weights


def is_empty_target(target: Mapping[str, Any]) -> bool:
    """Whether an image/expression has no target: ``target["empty"]`` when given, else it has no boxes."""
    if "empty" in target:
        return bool(target["empty"])
    return len(target["labels"]) == 0


def union_targets(targets: Sequence[Mapping[str, Any]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(GT union masks, valid-pixel masks), both ``[B, H, W]`` float on a canvas padded to a multiple of 8.

    The union is the OR of ``target["masks"]`` [M, H_i, W_i] (zeros for an image with no target); valid pixels
    are the top-left ``target["size"]`` (h, w) region (the whole mask canvas when ``size`` is absent)."""
    shapes = [tuple(torch.as_tensor(t["masks"]).shape[-2:]) for t in targets]
    H = max(h for h, _ in shapes)
    W = max(w for _, w in shapes)
    H, W = H + (-H) % 8, W + (-W) % 8
    union = torch.zeros(len(targets), H, W, device=device)
    valid = torch.zeros_like(union)
    for i, t in enumerate(targets):
        m = torch.as_tensor(t["masks"], device=device)
        h, w = shapes[i]
        if m.shape[0] and not is_empty_target(t):
            union[i, :h, :w] = (m > 0).any(0).float()
        vh, vw = (int(v) for v in t.get("size", (h, w)))
        valid[i, :vh, :vw] = 1.0
    return union, valid


def token_sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                             alpha: float, gamma: float) -> torch.Tensor:
    """Sum of sigmoid focal loss over the ``valid`` entries; logits/target [B, Q, T], valid bool [B, Q, T]."""
    return tv_sigmoid_focal_loss(logits[valid].float(), target[valid].float(), alpha=alpha, gamma=gamma,
                                 reduction="sum")


def num_boxes_of(targets: Sequence[Mapping[str, Any]], device, across_ranks: bool = True) -> torch.Tensor:
    """Number of GT boxes, at least 1; with ``across_ranks`` averaged over ranks (all-reduced when a process group
    exists: DETR's training rule, so every rank's gradient has the same scale)."""
    n = torch.as_tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if across_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        n = n / torch.distributed.get_world_size()
    return n.clamp(min=1.0)


def _squeeze_masks(m: torch.Tensor) -> torch.Tensor:
    """[(1,) n, (1,) h, w] → [n, h, w]."""
    if m.dim() == 5:
        m = m[0]
    if m.dim() == 4:
        m = m[:, 0] if m.shape[1] == 1 else m[0]
    return m


class MaskGDinoCriterion(nn.Module):
    """Computes the unweighted loss terms (see module doc) for final, aux and interm outputs."""

    def __init__(self, matcher: HungarianMatcher, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 losses: Sequence[str] = ("labels", "boxes", "masks")):
        super().__init__()
        self.matcher = matcher
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.losses = tuple(losses)

    def match(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> Indices:
        """Matches of one layer: ``[(query idx, target idx)]`` per image (used by the model for its masks)."""
        layer = {k: v for k, v in outputs.items() if k in ("pred_logits", "pred_boxes")}
        return self.matcher(layer, list(targets))

    # -- single terms ---------------------------------------------------------------------------------
    def loss_labels(self, outputs, targets, indices: Indices, text_mask: torch.Tensor | None) -> dict:
        logits = outputs["pred_logits"]
        B, Q, T = logits.shape
        target = torch.zeros_like(logits, dtype=torch.float32)
        for b, (src, tgt) in enumerate(indices):
            if len(src):
                rows = target_token_map(targets[b], T, device=logits.device, normalize=False)
                target[b, src.to(logits.device)] = rows[tgt.to(logits.device)]
        if text_mask is None:
            valid_tokens = torch.isfinite(logits[:, :1, :]).expand(B, 1, T)
        else:
            valid_tokens = torch.zeros(B, T, dtype=torch.bool, device=logits.device)
            L = min(T, text_mask.shape[1])
            valid_tokens[:, :L] = text_mask[:, :L].to(logits.device).bool()
            valid_tokens = valid_tokens[:, None, :]
        valid = valid_tokens.expand(B, Q, T)
        n_matched = max(sum(len(s) for s, _ in indices), 1)
        loss = token_sigmoid_focal_loss(logits, target, valid, self.focal_alpha, self.focal_gamma) / n_matched
        return {"loss_ce": loss}

    def loss_boxes(self, outputs, targets, indices: Indices, num_boxes: torch.Tensor) -> dict:
        pred = outputs["pred_boxes"]
        src = torch.cat([pred[b, s.to(pred.device)] for b, (s, _) in enumerate(indices)]) \
            if indices else pred.new_zeros(0, 4)
        tgt = torch.cat([torch.as_tensor(targets[b]["boxes"], device=pred.device, dtype=pred.dtype)
                         .reshape(-1, 4)[t.to(pred.device)] for b, (_, t) in enumerate(indices)]) \
            if indices else pred.new_zeros(0, 4)
        if src.numel() == 0:
            zero = pred.sum() * 0.0
            return {"loss_bbox": zero, "loss_giou": zero}
        l1 = F.l1_loss(src.float(), tgt.float(), reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src.float()),
                                              box_cxcywh_to_xyxy(tgt.float())))
        return {"loss_bbox": l1, "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_rela(self, outputs, targets) -> dict:
        """The three ReLA terms of the final outputs (see module doc); {} when the model has no branch."""
        nt = outputs.get("no_targets")
        if nt is None:
            return {}
        union_logits = outputs["union_mask_logits"]
        minimaps = outputs["minimaps"]
        dev = nt.device
        is_nt = torch.tensor([is_empty_target(t) for t in targets], dtype=torch.long, device=dev)
        loss_nt = F.cross_entropy(nt.float(), is_nt, weight=torch.tensor([BG_WEIGHT, FG_WEIGHT], device=dev))
        union, valid = union_targets(targets, dev)
        size = tuple(union_logits.shape[-2:])
        cell_weight = cpp_pooling(valid, size)[:, 1]
        loss_union = fg_bg_bce(union_logits, cpp_pooling(union, size), cell_weight)
        b, r, _ = minimaps.shape
        rows, cols = find_grid(r, union.shape[-2], union.shape[-1])
        grid = minimaps.reshape(b, rows, cols, 2).permute(0, 3, 1, 2)
        loss_minimap = fg_bg_bce(grid, cpp_pooling(union, (rows, cols)))
        return {"loss_rela_nt": loss_nt, "loss_rela_minimap": loss_minimap, "loss_rela_union_mask": loss_union}

    def loss_masks(self, outputs, targets, indices: Indices, num_boxes: torch.Tensor) -> dict:
        pm = outputs.get("pred_masks")
        if pm is None:
            return {}
        preds = []
        if isinstance(pm, torch.Tensor):
            full = pm[:, :, 0] if pm.dim() == 5 else pm
            for b, (s, _) in enumerate(indices):
                preds.append(full[b, s.to(full.device)])
        else:
            for b in range(len(indices)):
                preds.append(_squeeze_masks(pm[b]))
        ref = preds[0] if preds else None
        if ref is None or sum(p.shape[0] for p in preds) == 0:
            zero = (pm.sum() if isinstance(pm, torch.Tensor) else sum(p.sum() for p in pm)) * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        src = torch.cat(preds)
        gts = []
        for b, (_, t) in enumerate(indices):
            m = torch.as_tensor(targets[b]["masks"], device=src.device)
            H, W = m.shape[-2:]
            m = F.pad(m.float(), (0, (-W) % 8, 0, (-H) % 8))
            gts.append(m[t.to(src.device)][:, 2::4, 2::4])
        tgt = torch.cat(gts)
        if src.shape[-2:] != tgt.shape[-2:]:
            h, w = tgt.shape[-2:]
            sh, sw = src.shape[-2:]
            if sh >= h and sw >= w:
                src = src[:, :h, :w]
            else:
                src = F.interpolate(src[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        src = src.flatten(1).float()
        tgt = tgt.flatten(1).to(src.dtype)
        return {"loss_mask": sigmoid_focal_loss(src, tgt, num_boxes),
                "loss_dice": dice_loss(src, tgt, num_boxes)}

    # -- all terms ------------------------------------------------------------------------------------
    def _layer(self, outputs, targets, text_mask, num_boxes, with_masks: bool) -> dict:
        indices = outputs.get("mask_indices")
        if indices is None:
            indices = outputs.get("indices")
        if indices is None:
            indices = self.match(outputs, targets)
        losses: dict[str, torch.Tensor] = {}
        if "labels" in self.losses:
            losses.update(self.loss_labels(outputs, targets, indices, text_mask))
        if "boxes" in self.losses:
            losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        if with_masks and "masks" in self.losses:
            losses.update(self.loss_masks(outputs, targets, indices, num_boxes))
        return losses

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]],
                text_mask: torch.Tensor | None = None, with_masks: bool = True,
                across_ranks: bool = True) -> dict[str, torch.Tensor]:
        """All unweighted loss terms; ``with_masks=False`` skips mask terms (validation, as TAO).
        ``across_ranks=False`` normalises by this batch's own box count (evaluation: the loss of a batch is then
        the same whatever the number of processes and whichever batch another rank holds)."""
        num_boxes = num_boxes_of(targets, outputs["pred_logits"].device, across_ranks)
        losses = self._layer(outputs, targets, text_mask, num_boxes, with_masks)
        if "rela" in self.losses:  # final outputs only (§4.6); also in validation, so val/loss includes them
            losses.update(self.loss_rela(outputs, targets))
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            losses.update({f"{k}_{i}": v for k, v in
                           self._layer(aux, targets, text_mask, num_boxes, with_masks).items()})
        interm = outputs.get("interm_outputs")
        if interm is not None:
            losses.update({f"{k}_interm": v for k, v in
                           self._layer(interm, targets, text_mask, num_boxes, False).items()})
        return losses
