"""ReLA / GRES region-query branch of Mask Grounding DINO (reference §3.9) and its loss helpers (§4.6).

The branch predicts, for the whole referring expression, whether it has **no target** and the **union mask** of
everything it refers to, from ``num_region_queries`` learnable region queries in a Mask2Former-like decoder.

What feeds it in this model (TAO's newer ``mask_groundingdino.py`` that wires it could not be recovered, so the
choice is ours):

* ``srcs``: the encoder memory (after image–text fusion) reshaped back to its levels; the levels are given
  finest-first (strides 8, 16, 32, 64), reversed and the last three kept — strides 32, 16, 8 — and used
  round-robin by the decoder layers (coarse → fine), as §3.9 and Mask2Former.  Their position embeddings are the
  encoder's (sine + ``transformer.level_embed``).  Padded pixels are never attended.
* ``mask_features``: the top-down fused stride-8 map of the mask head (``MaskHeadConv.fused``: memory levels
  8/16/32 merged, ``hidden_dim`` channels), i.e. the same pixel features the instance masks are built from; so
  union-mask logits are at stride 8 of the padded input.
* ``lang_feat``: the enhanced text features from the feature enhancer ``[B, T, d]`` with the text padding mask.

Tensors are batch-first ``[B, Q, d]`` at the branch boundary; the shared Mask2Former sub-layers
(:mod:`networks.ops.transformer_layers`) work sequence-first internally.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from networks.ops.layers import MLP
from networks.ops.transformer_layers import CrossAttentionLayer, FFNLayer, SelfAttentionLayer

__all__ = ["RelaBranch", "find_grid", "cpp_pooling", "fg_bg_bce", "union_ioi_keep"]

#: BCE weights of the background / foreground channels and the CE class weights [has target, no target] (§4.6)
BG_WEIGHT, FG_WEIGHT = 0.9, 1.1


class RelaBranch(nn.Module):
    """Region queries → per-layer minimaps, union-mask logits and no-target logits.

    ``forward(srcs, poss, pads, mask_features, lang, lang_pad)``:

    * ``srcs`` / ``poss``: 3 maps ``[B, d, h_l, w_l]`` (coarse → fine) and their position embeddings;
    * ``pads``: 3 bool ``[B, h_l, w_l]`` (True = padding) or None;
    * ``mask_features``: ``[B, d, h, w]`` (stride 8);
    * ``lang`` ``[B, T, d]``, ``lang_pad`` ``[B, T]`` bool (True = padding token).

    Returns ``{"minimaps": [B, Q, 2], "no_targets": [B, 2], "union_mask_logits": [B, 2, h, w]}`` of the last
    layer plus ``"layers"``: the same dicts of every layer (``num_layers`` in all).  Channel 0 is background /
    "has a target", channel 1 foreground / "no target".

    Each layer: masked cross-attention to level ``i % 3`` (the mask is the previous prediction's
    ``region_embed · mask_features`` resized to that level, sigmoid < 0.5 = blocked, detached; a query blocked
    everywhere sees the whole valid level) → at layer 0 only, language cross-attention added with the gate
    ``sigmoid(lang_weight)·0.1`` (``lang_weight`` init 0) → self-attention → FFN.  Heads on ``LN(q)``:
    ``region_embed`` MLP(d, d, d, 3), ``minimap`` Linear(d → 2), ``no_target`` MLP(d, d, 2, 2) averaged over
    queries; union-mask logits = ``(minimapᵀ · region_embed) · mask_features``.
    """

    def __init__(self, hidden_dim: int, num_queries: int, nheads: int, dim_feedforward: int, num_layers: int,
                 num_levels: int = 3):
        super().__init__()
        d = hidden_dim
        self.num_queries = num_queries
        self.num_heads = nheads
        self.num_layers = num_layers
        self.num_levels = num_levels
        self.query_feat = nn.Embedding(num_queries, d)
        self.query_embed = nn.Embedding(num_queries, d)
        self.cross_attention_layers = nn.ModuleList(CrossAttentionLayer(d, nheads) for _ in range(num_layers))
        self.self_attention_layers = nn.ModuleList(SelfAttentionLayer(d, nheads) for _ in range(num_layers))
        self.ffn_layers = nn.ModuleList(FFNLayer(d, dim_feedforward) for _ in range(num_layers))
        self.lang_attn = nn.MultiheadAttention(d, nheads)
        self.lang_weight = nn.Parameter(torch.zeros(1))
        self.decoder_norm = nn.LayerNorm(d)
        self.region_embed = MLP(d, d, d, 3)
        self.minimap_embed = nn.Linear(d, 2)
        self.no_target_embed = MLP(d, d, 2, 2)

    def _heads(self, q: torch.Tensor, mask_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predictions of one layer from sequence-first queries ``[Q, B, d]``."""
        x = self.decoder_norm(q).transpose(0, 1)  # [B, Q, d]
        region = self.region_embed(x)
        minimap = self.minimap_embed(x)
        union_embed = minimap.transpose(1, 2) @ region  # [B, 2, d]
        return {"minimaps": minimap,
                "no_targets": self.no_target_embed(x).mean(1),
                "union_mask_logits": torch.einsum("bkc,bchw->bkhw", union_embed, mask_features),
                "region_masks": torch.einsum("bqc,bchw->bqhw", region, mask_features)}

    def _attn_mask(self, region_masks: torch.Tensor, size: tuple[int, int], pad: torch.Tensor | None) -> torch.Tensor:
        """``[B·heads, Q, h·w]`` bool (True = blocked) from the previous region masks, batch-major heads."""
        m = F.interpolate(region_masks, size=size, mode="bilinear", align_corners=False)
        blocked = (m.sigmoid() < 0.5).flatten(2)
        if pad is not None:
            pad_f = pad.flatten(1)[:, None, :].expand_as(blocked)
            blocked = blocked | pad_f
            # a query that would attend nowhere (NaN) sees the whole valid level instead
            full = blocked.all(-1, keepdim=True)
            blocked = (blocked & ~full) | (pad_f & full)  # bool algebra, not torch.where (no bool Where in ORT)
        else:
            blocked = blocked & ~blocked.all(-1, keepdim=True)
        return blocked.repeat_interleave(self.num_heads, dim=0).detach()

    def forward(self, srcs: Sequence[torch.Tensor], poss: Sequence[torch.Tensor],
                pads: Sequence[torch.Tensor | None], mask_features: torch.Tensor, lang: torch.Tensor,
                lang_pad: torch.Tensor | None) -> dict:
        b = mask_features.shape[0]
        sizes = [tuple(s.shape[-2:]) for s in srcs]
        mem = [s.flatten(2).permute(2, 0, 1) for s in srcs]  # [hw, B, d]
        pos = [p.flatten(2).permute(2, 0, 1).to(s.dtype) for p, s in zip(poss, srcs, strict=True)]
        query_pos = self.query_embed.weight[:, None].expand(-1, b, -1)
        q = self.query_feat.weight[:, None].expand(-1, b, -1)
        lang_seq = lang.transpose(0, 1)
        pred = self._heads(q, mask_features)
        layers = []
        for i in range(self.num_layers):
            lvl = i % self.num_levels
            attn = self._attn_mask(pred["region_masks"], sizes[lvl], pads[lvl])
            q = self.cross_attention_layers[i](q, mem[lvl], attn, pos[lvl], query_pos)
            if i == 0:
                la = self.lang_attn(q + query_pos, lang_seq, lang_seq, key_padding_mask=lang_pad,
                                    need_weights=False)[0]
                q = q + self.lang_weight.sigmoid() * 0.1 * la
            q = self.self_attention_layers[i](q, query_pos)
            q = self.ffn_layers[i](q)
            pred = self._heads(q, mask_features)
            layers.append({k: v for k, v in pred.items() if k != "region_masks"})
        return {**layers[-1], "layers": layers}


# --------------------------------------------------------------------------------------------------------------
# loss helpers (§4.6) and the IoI filter (§5.3)
# --------------------------------------------------------------------------------------------------------------

def find_grid(num_queries: int, height: int, width: int) -> tuple[int, int]:
    """Grid ``(rows, cols)`` with ``rows · cols = num_queries`` whose aspect ``rows : cols`` is closest to
    ``height : width`` (compared in log space, so 2:1 and 1:2 are equally far from 1:1; ties → fewer rows).
    Region query ``k`` is cell ``(k // cols, k % cols)``."""
    if num_queries < 1:
        raise ValueError(f"num_queries must be positive, got {num_queries}")
    target = math.log(height / width)
    best = None
    for rows in range(1, num_queries + 1):
        if num_queries % rows:
            continue
        cols = num_queries // rows
        cost = abs(math.log(rows / cols) - target)
        if best is None or cost < best[0] - 1e-12:
            best = (cost, rows, cols)
    return best[1], best[2]


def cpp_pooling(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cell-wise pooling of binary masks ``[B, H, W]`` → ``[B, 2, h, w]`` = (background, foreground) fraction of
    each of the ``h × w`` non-overlapping cells.

    When ``H`` or ``W`` is not a multiple of ``h`` / ``w`` the mask is first nearest-resized to the next
    multiple (``ceil(H/h)·h``, ``ceil(W/w)·w``) so every cell has the same number of pixels.
    """
    h, w = int(size[0]), int(size[1])
    m = mask.float()
    H, W = m.shape[-2:]
    if H % h or W % w:
        H2, W2 = math.ceil(H / h) * h, math.ceil(W / w) * w
        m = F.interpolate(m[:, None], size=(H2, W2), mode="nearest")[:, 0]
        H, W = H2, W2
    fg = m.reshape(m.shape[0], h, H // h, w, W // w).mean(dim=(2, 4))
    return torch.stack((1 - fg, fg), dim=1)


def fg_bg_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``0.9 · BCE(bg logits, bg fraction) + 1.1 · BCE(fg logits, fg fraction)`` on ``[B, 2, ...]`` tensors
    (channel 0 background, 1 foreground), each the mean over cells of ``weight · bce`` (``weight`` [B, ...] per
    cell, default 1)."""
    logits = logits.float()
    target = target.to(logits.dtype)
    out = logits.new_zeros(())
    for ch, cw in ((0, BG_WEIGHT), (1, FG_WEIGHT)):
        out = out + cw * F.binary_cross_entropy_with_logits(logits[:, ch], target[:, ch], weight=weight)
    return out


def union_ioi_keep(mask_logits: torch.Tensor, union_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """IoI filter of one image (§5.3): which instance masks lie mostly inside the predicted union mask.

    ``mask_logits`` ``[K, h4, w4]`` instance logits (stride 4), ``union_logits`` ``[2, h, w]``.  The union mask
    is the argmax (foreground where channel 1 wins), bilinearly resized to ``h4 × w4`` and kept where positive;
    an instance is ``mask_logits > 0``; it is kept when ``|instance ∩ union| / |instance| > threshold``
    (an empty instance has IoI 0).  ``threshold ≤ 0`` keeps everything.  Returns bool ``[K]``.
    """
    k = mask_logits.shape[0]
    if threshold <= 0 or k == 0:
        return torch.ones(k, dtype=torch.bool, device=mask_logits.device)
    union = (union_logits[1] > union_logits[0]).float()
    union = F.interpolate(union[None, None], size=mask_logits.shape[-2:], mode="bilinear",
                          align_corners=False)[0, 0] > 0
    inst = mask_logits > 0
    inter = (inst & union[None]).flatten(1).sum(1).float()
    area = inst.flatten(1).sum(1).float()
    return inter / area.clamp(min=1) > threshold
