"""Mask Grounding DINO network: Swin + BERT, feature enhancer, language-guided query selection,
cross-modality decoder, contrastive token classification, box refinement and a CondInst dynamic mask head.

State-dict names follow TAO's inner model (TAO Lightning keys minus ``model.model.``; IDEA GroundingDINO keys
with ``backbone.0.`` → ``backbone.0.body.``), so TAO/IDEA checkpoints load by a pure key remap
(:func:`load_pretrained`) and TAO's ``backbone_names`` (``backbone.0``, ``bert``) / ``linear_proj_names``
(``sampling_offsets``, ``reference_points``) select the same parameters.

Coordinates: images are NCHW, normalised RGB; ``pixel_mask`` is ``[B, H, W]`` bool with True = valid pixel,
content anchored top-left (padding bottom/right).  Boxes are ``cxcywh`` normalised by the **un-padded** image
size (the valid region of ``pixel_mask``).  Masks are logits at stride 4 of the padded input.

Deviations from TAO, on purpose:

* Final boxes of the last decoder layer use ``references[-2]`` (the reference box that was *input* to that
  layer), as IDEA GroundingDINO and HF do.  TAO's Mask-GDINO eval path uses ``references[-3]`` (off by one).
* The text-enhancer block mask is tiled batch-major per head (each sample keeps its own phrase mask); TAO/IDEA
  tile batch-outer, which mixes samples' masks when a batch holds different captions.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from networks.backbones.swin import SwinTransformer
from networks.backbones.swin_presets import SWIN_BACKBONES, swin_backbone
from networks.common.config import cfg_get
from networks.common.errors import ConfigError
from networks.common.weights import LoadReport, apply_state_dict, unwrap_state_dict
from networks.ops.layers import MLP
from networks.ops.ms_deform_attn import DeformableEncoderLayer, MSDeformAttn, init_deformable_transformer
from networks.ops.position_encoding import PositionEmbeddingSine

from .rela import RelaBranch
from .text_encoder import BertTextEncoder, resolve_text_encoder

__all__ = [
    "SWIN_BACKBONES",
    "MaskGDinoModel",
    "ContrastiveEmbed",
    "inverse_sigmoid",
    "sine_embed",
    "aligned_bilinear",
    "dynamic_mask_logits",
    "build_model",
    "rela_queries",
    "load_pretrained",
    "load_backbone_weights",
    "remap_checkpoint_keys",
]

log = logging.getLogger(__name__)

# Dynamic mask head constants (TAO): 2 relative coords + mask features → 8 → 8 → 1, mask features at stride 8.
_DYN_CHANNELS = 8
_MASK_FEAT_STRIDE = 8


# --------------------------------------------------------------------------------------------------------------
# small functions
# --------------------------------------------------------------------------------------------------------------

def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Logit of ``x`` clamped to ``[0, 1]``, with numerator and denominator floored at ``eps`` (TAO/DETR)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def sine_embed(coords: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of ``[..., n]`` coordinates → ``[..., n·num_feats]`` float32.

    Each coordinate c becomes ``c·2π / T^(2⌊i/2⌋/num_feats)`` for i < num_feats, with sin at even and cos at odd
    i.  For n ≥ 2 the first two blocks are swapped, giving the ``(y, x, w, h)`` order of DINO's
    ``gen_sineembed_for_position``; for n = 1 it is Grounding DINO's ``get_sine_pos_embed`` of text positions.
    """
    idx = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / num_feats)
    parts = []
    for c in coords.float().unbind(-1):
        p = c[..., None] * (2 * math.pi) / dim_t
        parts.append(torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2))
    if len(parts) >= 2:
        parts[0], parts[1] = parts[1], parts[0]
    return torch.cat(parts, dim=-1)


def aligned_bilinear(x: torch.Tensor, factor: int) -> torch.Tensor:
    """CondInst's corner-aligned ×``factor`` upsampling of ``[N, C, h, w]`` → ``[N, C, factor·h, factor·w]``.

    Pixel centres stay aligned with the input grid when both are seen as stride-``s`` and stride-``s/factor``
    maps: replicate-pad one row/column, resize to ``factor·h+1`` with ``align_corners=True``, shift by
    ``factor//2`` (replicate) and crop.
    """
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


def _dynamic_layout(feat_channels: int) -> tuple[list[int], list[int]]:
    """(weight sizes, bias sizes) of the 3 dynamic 1×1 convs ``(2+C)→8→8→1``."""
    c_in = feat_channels + 2
    return [c_in * _DYN_CHANNELS, _DYN_CHANNELS * _DYN_CHANNELS, _DYN_CHANNELS], [_DYN_CHANNELS, _DYN_CHANNELS, 1]


def dynamic_mask_logits(mask_feats: torch.Tensor, params: torch.Tensor, centres_px: torch.Tensor,
                        stride: int = _MASK_FEAT_STRIDE) -> torch.Tensor:
    """CondInst dynamic mask head for N instances per image.

    Args:
        mask_feats: ``[B, C, h, w]`` mask features at ``stride`` (8) of the padded input.
        params: ``[B, N, P]`` controller outputs, P = (C+2)·8 + 8·8 + 8 weights then 8 + 8 + 1 biases; each
            weight chunk is an ``(out, in)`` matrix in row-major order.
        centres_px: ``[B, N, 2]`` instance reference centres ``(x, y)`` in **input pixels** (unnormalised).
    Returns:
        ``[B, N, 1, 2h, 2w]`` mask logits at stride ``stride/2`` (4), via :func:`aligned_bilinear`.

    Input channels per instance: ``[x_ref − x_loc, y_ref − y_loc, features]`` where ``(x_loc, y_loc)`` are the
    feature-pixel centres ``(j·stride + stride//2, i·stride + stride//2)``; the three 1×1 convs have ReLU between.
    """
    b, c, h, w = mask_feats.shape
    n = params.shape[1]
    w_sizes, b_sizes = _dynamic_layout(c)
    chunks = params.split(w_sizes + b_sizes, dim=-1)
    c_in = c + 2
    weights = [chunks[0].reshape(b, n, _DYN_CHANNELS, c_in), chunks[1].reshape(b, n, _DYN_CHANNELS, _DYN_CHANNELS),
               chunks[2].reshape(b, n, 1, _DYN_CHANNELS)]
    biases = chunks[3:]
    dtype = mask_feats.dtype
    ys = torch.arange(h, device=mask_feats.device, dtype=dtype) * stride + stride // 2
    xs = torch.arange(w, device=mask_feats.device, dtype=dtype) * stride + stride // 2
    loc_y, loc_x = torch.meshgrid(ys, xs, indexing="ij")
    rel_x = centres_px[..., 0:1].to(dtype) - loc_x.reshape(1, 1, -1)  # [B, N, hw]
    rel_y = centres_px[..., 1:2].to(dtype) - loc_y.reshape(1, 1, -1)
    feats = mask_feats.reshape(b, 1, c, h * w).expand(b, n, c, h * w)
    x = torch.cat((rel_x[:, :, None], rel_y[:, :, None], feats), dim=2)  # [B, N, C+2, hw]
    for i, (wt, bs) in enumerate(zip(weights, biases, strict=True)):
        x = torch.matmul(wt, x) + bs[..., None]
        if i < 2:
            x = F.relu(x)
    logits = x.reshape(b * n, 1, h, w)
    return aligned_bilinear(logits, 2).reshape(b, n, 1, 2 * h, 2 * w)


def _mha_mask_batch_major(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, L]`` (True = blocked) → ``[B·heads, L, L]`` in nn.MultiheadAttention's (b0h0, b0h1, …) order."""
    return mask.repeat_interleave(heads, dim=0)


# --------------------------------------------------------------------------------------------------------------
# feature enhancer
# --------------------------------------------------------------------------------------------------------------

class BiMultiHeadAttention(nn.Module):
    """Bidirectional image↔text attention of the fusion block (GLIP/Grounding DINO).

    ``forward(v [B,Nv,d], txt [B,Nt,d], pad_v [B,Nv] bool or None, pad_l [B,Nt] bool or None)`` (True = padding)
    ``-> (delta_v [B,Nv,d], delta_l [B,Nt,d])``.  One logit matrix serves both directions; the global maximum is
    subtracted and logits are clamped to ±50000 for fp16 safety; image queries ignore padded tokens, text queries
    ignore padded pixels.  Parameters ``v_proj, l_proj, values_v_proj, values_l_proj, out_v_proj, out_l_proj``.
    """

    def __init__(self, dim: int, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"fusion embed dim {embed_dim} is not divisible by {num_heads} heads")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.dropout = dropout
        self.v_proj = nn.Linear(dim, embed_dim)
        self.l_proj = nn.Linear(dim, embed_dim)
        self.values_v_proj = nn.Linear(dim, embed_dim)
        self.values_l_proj = nn.Linear(dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, dim)
        self.out_l_proj = nn.Linear(embed_dim, dim)
        for lin in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj,
                    self.out_l_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, n, hd]

    def forward(self, v: torch.Tensor, txt: torch.Tensor, pad_v: torch.Tensor | None = None,
                pad_l: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, nv, _ = v.shape
        nt = txt.shape[1]
        q = self._heads(self.v_proj(v) * self.scale)
        k = self._heads(self.l_proj(txt))
        val_v = self._heads(self.values_v_proj(v))
        val_l = self._heads(self.values_l_proj(txt))
        logits = q @ k.transpose(-1, -2)  # [B, h, Nv, Nt]
        logits = (logits - logits.max()).clamp(-50000, 50000)
        logits_t = logits.transpose(-1, -2)
        logits_t = (logits_t - logits_t.max(-1, keepdim=True)[0]).clamp(-50000, 50000)
        if pad_v is not None:
            logits_t = logits_t.masked_fill(pad_v[:, None, None, :], float("-inf"))
        if pad_l is not None:
            logits = logits.masked_fill(pad_l[:, None, None, :], float("-inf"))
        attn_v = F.dropout(logits.softmax(-1), self.dropout, self.training)
        attn_l = F.dropout(logits_t.softmax(-1), self.dropout, self.training)
        out_v = (attn_v @ val_l).transpose(1, 2).reshape(b, nv, self.embed_dim)
        out_l = (attn_l @ val_v).transpose(1, 2).reshape(b, nt, self.embed_dim)
        return self.out_v_proj(out_v), self.out_l_proj(out_l)


class BiAttentionBlock(nn.Module):
    """Fusion layer: LayerNorm both streams, bidirectional attention, layer-scaled residual (γ init 1e-4).

    The residual is added to the *normalised* input (``v = LN(v); v = v + drop_path(γ_v·Δv)``), as TAO/IDEA.
    ``forward(v, txt, pad_v, pad_l) -> (v', txt')`` with the shapes of :class:`BiMultiHeadAttention`.
    """

    def __init__(self, dim: int, embed_dim: int, num_heads: int, dropout: float = 0.0, drop_path: float = 0.0,
                 init_values: float = 1e-4):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(dim)
        self.layer_norm_l = nn.LayerNorm(dim)
        self.attn = BiMultiHeadAttention(dim, embed_dim, num_heads, dropout)
        self.drop_path = DropPath(drop_path)
        self.gamma_v = nn.Parameter(torch.full((dim,), init_values))
        self.gamma_l = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, v, txt, pad_v=None, pad_l=None):
        v = self.layer_norm_v(v)
        txt = self.layer_norm_l(txt)
        dv, dl = self.attn(v, txt, pad_v, pad_l)
        return v + self.drop_path(self.gamma_v * dv), txt + self.drop_path(self.gamma_l * dl)


class TextEnhancerLayer(nn.Module):
    """Post-norm transformer encoder layer on text tokens with a phrase block mask.

    ``forward(x [B,L,d], block_mask [B,L,L] bool (True = blocked), pos [B,L,d]) -> [B,L,d]``; q = k = x + pos,
    v = x; FFN with ReLU.  Names ``self_attn`` (nn.MultiheadAttention), ``linear1/2``, ``norm1/2``.
    """

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.nhead = heads
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x, block_mask, pos):
        q = x + pos
        attn = self.self_attn(q, q, x, attn_mask=_mha_mask_batch_major(block_mask, self.nhead),
                              need_weights=False)[0]
        x = self.norm1(x + self.dropout1(attn))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout2(ff))


class FeatureEnhancer(nn.Module):
    """Grounding DINO encoder: per layer fusion → text enhancer → deformable self-attention.

    Submodule lists ``fusion_layers``, ``text_layers``, ``layers`` (TAO names).  ``forward`` returns
    ``(memory [B,S,d], text [B,L,d])``.  With ``activation_checkpoint`` the fusion and deformable layers are
    recomputed in backward while training.
    """

    def __init__(self, num_layers: int, dim: int, heads: int, ffn: int, dropout: float, n_levels: int,
                 n_points: int, fusion_drop_path: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(dim, ffn, dropout, n_levels, heads, n_points)
                                    for _ in range(num_layers))
        self.text_layers = nn.ModuleList(TextEnhancerLayer(dim, max(heads // 2, 1), ffn // 2, 0.0)
                                         for _ in range(num_layers))
        self.fusion_layers = nn.ModuleList(BiAttentionBlock(dim, ffn // 2, max(heads // 2, 1), 0.0,
                                                            fusion_drop_path) for _ in range(num_layers))
        self.activation_checkpoint = False

    @staticmethod
    def reference_points(shapes: Sequence[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level normalised by the valid region → ``[B, S, L, 2]`` ``(x, y)``."""
        refs = []
        for lvl, (h, w) in enumerate(shapes):
            ys = (torch.arange(h, dtype=torch.float32, device=valid_ratios.device) + 0.5)
            xs = (torch.arange(w, dtype=torch.float32, device=valid_ratios.device) + 0.5)
            ry, rx = torch.meshgrid(ys, xs, indexing="ij")
            ry = ry.reshape(1, -1) / (valid_ratios[:, None, lvl, 1] * h)
            rx = rx.reshape(1, -1) / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((rx, ry), -1))
        ref = torch.cat(refs, 1)
        return ref[:, :, None] * valid_ratios[:, None]

    def _ckpt(self, fn, *args):
        if self.activation_checkpoint and self.training and torch.is_grad_enabled():
            import torch.utils.checkpoint as cp

            return cp.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, src, pos, shapes, level_start, valid_ratios, pad, text, text_pad, text_block_mask,
                text_pos):
        ref = self.reference_points(shapes, valid_ratios)
        blocked = ~text_block_mask
        for fusion, text_layer, layer in zip(self.fusion_layers, self.text_layers, self.layers, strict=True):
            src, text = self._ckpt(fusion, src, text, pad, text_pad)
            text = text_layer(text, blocked, text_pos)
            src = self._ckpt(layer, src, pos, ref, shapes, level_start, pad)
        return src, text


# --------------------------------------------------------------------------------------------------------------
# decoder and heads
# --------------------------------------------------------------------------------------------------------------

class DecoderLayer(nn.Module):
    """Cross-modality decoder layer: self-attn → text cross-attn → deformable cross-attn → FFN, all post-norm.

    ``forward(tgt [B,Q,d], query_pos [B,Q,d], ref [B,Q,L,4], memory [B,S,d], shapes, level_start,
    memory_pad [B,S], text [B,T,d], text_pad [B,T]) -> [B,Q,d]``.  Names (TAO): ``self_attn``/``norm2``,
    ``ca_text``/``catext_norm``, ``cross_attn``/``norm1``, ``linear1``/``linear2``/``norm3``.
    """

    def __init__(self, dim: int, ffn: int, dropout: float, n_levels: int, heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(dim, n_levels, heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ca_text = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.catext_dropout = nn.Dropout(dropout)
        self.catext_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn, dim)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, tgt, query_pos, ref, memory, shapes, level_start, memory_pad, text, text_pad):
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, q, tgt, need_weights=False)[0]))
        ca = self.ca_text(tgt + query_pos, text, text, key_padding_mask=text_pad, need_weights=False)[0]
        tgt = self.catext_norm(tgt + self.catext_dropout(ca))
        ca = self.cross_attn(tgt + query_pos, ref, memory, shapes, level_start, memory_pad)
        tgt = self.norm1(tgt + self.dropout1(ca))
        # FFN kept in float32 under autocast, as TAO
        with torch.autocast(device_type=tgt.device.type, enabled=False):
            x = tgt.float()
            ff = self.linear2(self.dropout3(F.relu(self.linear1(x))))
            return self.norm3(x + self.dropout4(ff))


class Decoder(nn.Module):
    """Stack of :class:`DecoderLayer` with a shared output ``norm``, ``ref_point_head`` MLP(2d→d→d) on the sine
    embedding of the reference boxes, and iterative box refinement through ``bbox_embed`` (set by the owner).

    ``forward(tgt [B,Q,d], ref_sig [B,Q,4], memory, shapes, level_start, valid_ratios [B,L,2], memory_pad,
    text, text_pad) -> (hs list of Ldec [B,Q,d] (normed), references list of Ldec+1 [B,Q,4] sigmoid boxes)``.
    ``references[l]`` is the box *input* to layer l; ``references[l+1]`` is refined from the *un-normed* output of
    layer l (detached before it feeds layer l+1, kept with its graph in the returned list, as DINO).
    """

    def __init__(self, num_layers: int, dim: int, ffn: int, dropout: float, n_levels: int, heads: int,
                 n_points: int):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, ffn, dropout, n_levels, heads, n_points)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        self.bbox_embed: nn.ModuleList | None = None
        self.dim = dim

    def forward(self, tgt, ref_sig, memory, shapes, level_start, valid_ratios, memory_pad, text, text_pad):
        hs, refs = [], [ref_sig]
        ref = ref_sig
        scale = torch.cat((valid_ratios, valid_ratios), -1)[:, None]  # [B,1,L,4]
        out = tgt
        for i, layer in enumerate(self.layers):
            ref_in = ref[:, :, None] * scale
            query_pos = self.ref_point_head(sine_embed(ref_in[:, :, 0], self.dim // 2).to(out.dtype))
            out = layer(out, query_pos, ref_in, memory, shapes, level_start, memory_pad, text, text_pad)
            if self.bbox_embed is not None:
                new_ref = (self.bbox_embed[i](out) + inverse_sigmoid(ref)).sigmoid()
                refs.append(new_ref)
                ref = new_ref.detach()
            hs.append(self.norm(out))
        return hs, refs


class ContrastiveEmbed(nn.Module):
    """Token-level classification by dot product with the text features.

    ``forward(x [B,Q,d], text [B,T,d], text_token_mask [B,T] bool (True = real token)) -> [B,Q,max_text_len]``:
    ``x·textᵀ`` (× ``exp(log_scale)`` if a float log scale was given, ÷ √d for ``"auto"``; + ``bias`` if
    requested), −inf on padded tokens, right-padded with −inf to ``max_text_len`` columns (T > max is cut).
    Parameter-free by default; ``log_scale`` / ``bias`` are scalar parameters ``[1]`` when enabled.
    """

    def __init__(self, max_text_len: int = 256, log_scale: float | str | None = None, bias: bool = False,
                 dim: int = 256):
        super().__init__()
        self.max_text_len = max_text_len
        self.scale_mode = None
        if isinstance(log_scale, str) and log_scale.lower() == "none":
            log_scale = None
        if isinstance(log_scale, str):
            if log_scale.lower() != "auto":
                try:
                    log_scale = float(log_scale)
                except ValueError as err:
                    raise ConfigError("model.log_scale", f"'{log_scale}' is not 'none', 'auto' or a number",
                                      "use none, auto or a float") from err
            else:
                self.scale_mode = "auto"
        if isinstance(log_scale, (int, float)) and not isinstance(log_scale, bool):
            self.scale_mode = "learned"
            self.log_scale = nn.Parameter(torch.tensor([float(log_scale)]))
        self.dim = dim
        if bias:
            self.bias = nn.Parameter(torch.tensor([-math.log((1 - 0.01) / 0.01)]))
        else:
            self.bias = None

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_token_mask: torch.Tensor) -> torch.Tensor:
        t = text.shape[1]
        if t > self.max_text_len:
            text, text_token_mask, t = text[:, : self.max_text_len], text_token_mask[:, : self.max_text_len], \
                self.max_text_len
        res = x @ text.transpose(-1, -2)
        if self.scale_mode == "learned":
            res = res * self.log_scale.exp()
        elif self.scale_mode == "auto":
            res = res / math.sqrt(self.dim)
        if self.bias is not None:
            res = res + self.bias
        res = res.masked_fill(~text_token_mask[:, None, :], float("-inf"))
        if t < self.max_text_len:
            res = F.pad(res, (0, self.max_text_len - t), value=float("-inf"))
        return res


class MaskHeadConv(nn.Module):
    """Mask-feature branch (TAO ``MaskHeadConv``): top-down fusion of encoder memory levels (strides 8/16/32).

    ``forward([m8, m16, m32] each [B,d,h_l,w_l]) -> [B, d//32, h8, w8]``:
    ``x = relu(lay3(m32)); x = relu(lay4(m16 + up(x))); x = relu(jia_dcn(m8 + up(x)));
    x = relu(lay1(x)) (d→d/4); x = relu(lay2(x)) (d/4→d/32)``; nearest upsampling to the next level's size;
    every conv 3×3 pad 1, kaiming-uniform(a=1), zero bias, no norm.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.lay1 = nn.Conv2d(dim, dim // 4, 3, padding=1)
        self.lay2 = nn.Conv2d(dim // 4, dim // 32, 3, padding=1)
        self.lay3 = nn.Conv2d(dim, dim, 3, padding=1)
        self.lay4 = nn.Conv2d(dim, dim, 3, padding=1)
        self.jia_dcn = nn.Conv2d(dim, dim, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def fused(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """The top-down fused stride-8 map ``relu(jia_dcn(...))`` ``[B, d, h8, w8]`` (also the ReLA pixel features)."""
        m8, m16, m32 = feats
        x = F.relu(self.lay3(m32))
        x = F.relu(self.lay4(m16 + F.interpolate(x, size=m16.shape[-2:], mode="nearest")))
        return F.relu(self.jia_dcn(m8 + F.interpolate(x, size=m8.shape[-2:], mode="nearest")))

    def head(self, fused: torch.Tensor) -> torch.Tensor:
        """``relu(lay2(relu(lay1(fused))))``: the ``[B, d//32, h8, w8]`` mask features."""
        return F.relu(self.lay2(F.relu(self.lay1(fused))))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(self.fused(feats))


class _BackboneBody(nn.Module):
    """Holds the Swin as ``body`` so its keys read ``backbone.0.body.*`` (TAO)."""

    def __init__(self, body: SwinTransformer):
        super().__init__()
        self.body = body


# --------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------

class _Transformer(nn.Module):
    """Container with TAO's ``transformer.*`` names: ``level_embed``, ``tgt_embed``, ``enc_output``,
    ``enc_output_norm``, ``enc_out_bbox_embed``, ``enc_out_class_embed``, ``encoder``, ``decoder``
    (and ``refpoint_embed`` for two_stage_type "no")."""


MatchFn = Callable[[dict[str, torch.Tensor], Any], list[tuple[torch.Tensor, torch.Tensor]]]


class MaskGDinoModel(nn.Module):
    """Mask Grounding DINO (TAO): open-vocabulary instance segmentation from an image and a caption.

    ``forward(images [B,3,H,W], pixel_mask [B,H,W] bool (True = valid) or None, input_ids [B,T] int64,
    attention_mask [B,T] (padding mask; nonzero = real token), position_ids [B,T] int64 (per phrase),
    token_type_ids [B,T] int64 or None, text_self_attention_masks [B,T,T] bool (phrase block mask),
    targets=None, match_fn=None) -> dict``:

    * ``pred_logits`` ``[B,Q,max_text_len]`` token logits (−inf on padded/absent tokens);
    * ``pred_boxes`` ``[B,Q,4]`` cxcywh normalised by the un-padded image size;
    * ``pred_masks``: eval, or training without ``match_fn``: ``[B,Q,1,H'/4,W'/4]`` logits for all queries of the
      last layer (H', W' = input size rounded up to a multiple of 8; TAO's loss compares them with ground truth
      sampled at rows/columns 2::4); training with ``match_fn``: list over images of ``[n_i,1,H'/4,W'/4]`` for the
      matched queries ``mask_indices[i][0]`` (order of the match);
    * ``mask_indices`` (training with ``match_fn``): the matcher output used, ``list[(src_idx, tgt_idx)]``;
    * ``aux_outputs``: one dict per earlier decoder layer with the same keys (when ``aux_loss``);
    * ``interm_outputs``: ``{"pred_logits", "pred_boxes"}`` of the encoder query selection
      (two_stage_type "standard");
    * ``text_token_mask`` ``[B,T]`` bool (the padding mask actually used, cut to max_text_len);
    * with the ReLA branch (``num_region_queries > 0``, see :mod:`.rela`): ``no_targets`` ``[B,2]`` logits
      (index 1 = the expression has no target), ``union_mask_logits`` ``[B,2,H'/8,W'/8]`` (background,
      foreground), ``minimaps`` ``[B,R,2]`` of the last branch layer, and ``rela_layers`` (every layer's three).

    ``match_fn(outputs_layer, targets)`` receives ``{"pred_logits", "pred_boxes"}`` of one decoder layer and returns
    per image ``(query indices, target indices)``; the model predicts masks only for those queries (TAO).
    """

    def __init__(
        self,
        backbone: SwinTransformer,
        text_encoder: BertTextEncoder,
        *,
        hidden_dim: int = 256,
        nheads: int = 8,
        num_queries: int = 900,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        two_stage_type: str = "standard",
        max_text_len: int = 256,
        pe_temperature_h: float = 20,
        pe_temperature_w: float = 20,
        log_scale: float | str | None = None,
        class_embed_bias: bool = False,
        aux_loss: bool = True,
        fusion_drop_path: float = 0.1,
        num_region_queries: int = 0,
        embed_init_tgt: bool = True,
    ):
        super().__init__()
        if two_stage_type not in ("standard", "no"):
            raise ConfigError("model.two_stage_type", f"'{two_stage_type}' is not supported", "use standard or no")
        if hidden_dim % 32:
            raise ConfigError("model.hidden_dim", f"{hidden_dim} is not a multiple of 32",
                              "GroupNorm(32) and the mask head need hidden_dim divisible by 32")
        n_backbone = len(backbone.out_indices)
        if num_feature_levels < n_backbone:
            raise ConfigError("model.num_feature_levels", f"{num_feature_levels} is less than the {n_backbone} "
                              "backbone levels", "make num_feature_levels equal len(return_interm_indices)")
        if num_feature_levels < 3:
            raise ConfigError("model.num_feature_levels", f"{num_feature_levels} levels leave the mask head without "
                              "its stride 8/16/32 inputs", "use return_interm_indices [1, 2, 3, 4]")
        d = hidden_dim
        self.hidden_dim = d
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.max_text_len = max_text_len
        self.two_stage_type = two_stage_type
        self.aux_loss = aux_loss
        self.backbone = nn.ModuleList([_BackboneBody(backbone)])
        self.bert = text_encoder
        #: set by the Lightning module during evaluation and inference (text_cache.py); None otherwise
        self.text_cache = None
        self.feat_map = nn.Linear(text_encoder.hidden_size, d)
        nn.init.xavier_uniform_(self.feat_map.weight)
        nn.init.zeros_(self.feat_map.bias)
        self.position_embedding = PositionEmbeddingSine(d // 2, normalize=True, temperature_h=pe_temperature_h,
                                                        temperature_w=pe_temperature_w)

        chans = [backbone.num_features[i] for i in backbone.out_indices]
        proj = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in chans]
        in_c = chans[-1]
        for _ in range(num_feature_levels - n_backbone):
            proj.append(nn.Sequential(nn.Conv2d(in_c, d, 3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_c = d
        self.input_proj = nn.ModuleList(proj)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.zeros_(p[0].bias)

        tr = _Transformer()
        tr.level_embed = nn.Parameter(torch.empty(num_feature_levels, d))
        tr.encoder = FeatureEnhancer(enc_layers, d, nheads, dim_feedforward, dropout, num_feature_levels,
                                     enc_n_points, fusion_drop_path)
        tr.decoder = Decoder(dec_layers, d, dim_feedforward, dropout, num_feature_levels, nheads, dec_n_points)
        #: TAO's ``embed_init_tgt``: learned content queries (``tgt_embed``); false (two-stage only) starts the
        #: decoder from the selected encoder features instead, so no ``tgt_embed`` is built (as TAO)
        self.embed_init_tgt = bool(embed_init_tgt) or two_stage_type != "standard"
        if self.embed_init_tgt:
            tr.tgt_embed = nn.Embedding(num_queries, d)
        if two_stage_type == "standard":
            tr.enc_output = nn.Linear(d, d)
            tr.enc_output_norm = nn.LayerNorm(d)
        else:
            tr.refpoint_embed = nn.Embedding(num_queries, 4)
        init_deformable_transformer(tr, tr.level_embed)  # TAO/IDEA's order
        self.transformer = tr

        bbox = MLP(d, d, 4, 3)
        nn.init.zeros_(bbox.layers[-1].weight)
        nn.init.zeros_(bbox.layers[-1].bias)
        cls = ContrastiveEmbed(max_text_len, log_scale, class_embed_bias, d)
        # one shared box MLP / classifier for every decoder layer (listed once per layer in the state dict, as TAO)
        self.bbox_embed = nn.ModuleList([bbox] * dec_layers)
        self.class_embed = nn.ModuleList([cls] * dec_layers)
        tr.decoder.bbox_embed = self.bbox_embed
        tr.decoder.class_embed = self.class_embed
        if two_stage_type == "standard":
            tr.enc_out_bbox_embed = copy.deepcopy(bbox)
            tr.enc_out_class_embed = copy.deepcopy(cls)

        feat_c = d // 32
        w_sizes, b_sizes = _dynamic_layout(feat_c)
        self.num_dynamic_params = sum(w_sizes) + sum(b_sizes)
        self.controller = MLP(d, d, self.num_dynamic_params, 3)
        for layer in self.controller.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.mask_head = MaskHeadConv(d)
        # ReLA region-query branch: built only when asked for (absent = the TAO backend model, same state dict)
        self.num_region_queries = int(num_region_queries)
        self.rela = (RelaBranch(d, self.num_region_queries, nheads, dim_feedforward, dec_layers)
                     if self.num_region_queries > 0 else None)

    # ----------------------------------------------------------------------------------------------------------
    @property
    def swin(self) -> SwinTransformer:
        """The Swin image backbone (``backbone.0.body``)."""
        return self.backbone[0].body

    def set_activation_checkpoint(self, enabled: bool) -> None:
        """Recompute Swin blocks and the fusion/deformable encoder layers in backward (training memory)."""
        self.swin.set_activation_checkpoint(enabled)
        self.transformer.encoder.activation_checkpoint = bool(enabled)

    def _image_features(self, images, pixel_mask):
        """Projected maps, padding masks (True = pad) and position embeddings of every level."""
        feats = self.swin(images)
        srcs, masks, poss = [], [], []
        maps = list(feats.values())
        for lvl in range(self.num_feature_levels):
            if lvl < len(maps):
                src = self.input_proj[lvl](maps[lvl])
            elif lvl == len(maps):
                src = self.input_proj[lvl](maps[-1])
            else:
                src = self.input_proj[lvl](srcs[-1])
            pad = F.interpolate((~pixel_mask)[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(pad)
            poss.append(self.position_embedding(src, pad).to(src.dtype))
        return srcs, masks, poss

    def _proposals(self, memory, pad, shapes):
        """Encoder proposals: unsigmoided boxes ``[B,S,4]`` (+inf where invalid) and memory zeroed there."""
        b = memory.shape[0]
        props, start = [], 0
        for lvl, (h, w) in enumerate(shapes):
            m = pad[:, start:start + h * w].view(b, h, w)
            valid_h = (~m[:, :, 0]).sum(1).to(memory.dtype)
            valid_w = (~m[:, 0, :]).sum(1).to(memory.dtype)
            gy, gx = torch.meshgrid(torch.arange(h, dtype=memory.dtype, device=memory.device),
                                    torch.arange(w, dtype=memory.dtype, device=memory.device), indexing="ij")
            grid = torch.stack((gx, gy), -1)[None] + 0.5  # [1,h,w,2]
            grid = grid / torch.stack((valid_w, valid_h), -1)[:, None, None, :]
            wh = torch.full_like(grid, 0.05 * (2.0 ** lvl))
            props.append(torch.cat((grid, wh), -1).view(b, -1, 4))
            start += h * w
        props = torch.cat(props, 1)
        valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
        props = torch.log(props / (1 - props))
        invalid = pad[..., None] | ~valid
        props = props.masked_fill(invalid, float("inf"))
        return memory.masked_fill(invalid, 0.0), props

    def _encode_text(self, input_ids, block, position_ids, token_type_ids) -> torch.Tensor:
        """BERT features [B, L, H]; through ``self.text_cache`` (set by the Lightning module for evaluation and
        inference) when the encoder cannot change (networks/mask_grounding_dino/text_cache.py)."""
        cache = getattr(self, "text_cache", None)
        if cache is None or not cache.usable(self.bert):
            return self.bert(input_ids, block, position_ids, token_type_ids)

        return cache.encode(self.bert, lambda: self.bert(input_ids, block, position_ids, token_type_ids), input_ids)

    def _layer_outputs(self, hs, refs, text, text_mask):
        logits, boxes = [], []
        for lvl, h in enumerate(hs):
            logits.append(self.class_embed[lvl](h, text, text_mask))
            boxes.append((self.bbox_embed[lvl](h) + inverse_sigmoid(refs[lvl])).sigmoid())
        return logits, boxes

    def forward(
        self,
        images: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        text_self_attention_masks: torch.Tensor,
        targets: Any = None,
        match_fn: MatchFn | None = None,
    ) -> dict[str, Any]:
        b, _, img_h, img_w = images.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((b, img_h, img_w), dtype=torch.bool, device=images.device)
        pixel_mask = pixel_mask.bool()
        t = min(input_ids.shape[1], self.max_text_len)
        input_ids = input_ids[:, :t]
        text_mask = attention_mask[:, :t].bool()
        position_ids = position_ids[:, :t]
        token_type_ids = token_type_ids[:, :t] if token_type_ids is not None else None
        block = text_self_attention_masks[:, :t, :t].bool()

        text = self.feat_map(self._encode_text(input_ids, block, position_ids, token_type_ids))
        text_pos = sine_embed(position_ids[..., None], self.hidden_dim).to(text.dtype)

        srcs, pads, poss = self._image_features(images, pixel_mask)
        shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        tr = self.transformer
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pad_flat = torch.cat([m.flatten(1) for m in pads], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + tr.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(poss)], 1)
        sizes = torch.tensor([h * w for h, w in shapes], device=images.device)
        level_start = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
        valid_ratios = torch.stack([torch.stack(((~m[:, 0, :]).sum(1) / m.shape[2], (~m[:, :, 0]).sum(1) / m.shape[1]),
                                                -1) for m in pads], 1).to(src_flat.dtype)

        memory, text = tr.encoder(src_flat, pos_flat, shapes, level_start, valid_ratios, pad_flat, text,
                                  ~text_mask, block, text_pos)

        out: dict[str, Any] = {}
        tgt = tr.tgt_embed.weight[None].expand(b, -1, -1) if self.embed_init_tgt else None
        if self.two_stage_type == "standard":
            out_mem, props = self._proposals(memory, pad_flat, shapes)
            if self.num_queries > out_mem.shape[1]:
                raise ConfigError("model.num_queries", f"{self.num_queries} queries exceed the {out_mem.shape[1]} "
                                  f"encoder tokens of a {img_h}x{img_w} input",
                                  "lower model.num_queries or use larger images")
            out_mem = tr.enc_output_norm(tr.enc_output(out_mem))
            enc_logits = tr.enc_out_class_embed(out_mem, text, text_mask)
            enc_coords = tr.enc_out_bbox_embed(out_mem) + props
            # Proposals on padding / near the border are +inf: never select them (TAO/IDEA can, and training
            # then learns to pick padded tokens whose boxes are stuck at (1, 1, 1, 1)).
            scores = enc_logits.max(-1)[0].masked_fill(torch.isinf(props).any(-1), float("-inf"))
            topk = torch.topk(scores, self.num_queries, dim=1)[1]
            ref_undetached = torch.gather(enc_coords, 1, topk[..., None].expand(-1, -1, 4))
            hs_enc = torch.gather(out_mem, 1, topk[..., None].expand(-1, -1, self.hidden_dim))
            if tgt is None:  # embed_init_tgt false: content queries = the selected encoder features (detached)
                tgt = hs_enc.detach()
            ref_sig = ref_undetached.detach().sigmoid()
            out["interm_outputs"] = {"pred_logits": tr.enc_out_class_embed(hs_enc, text, text_mask),
                                     "pred_boxes": ref_undetached.sigmoid()}
        else:
            ref_sig = tr.refpoint_embed.weight[None].expand(b, -1, -1).sigmoid()

        hs, refs = tr.decoder(tgt, ref_sig, memory, shapes, level_start, valid_ratios, pad_flat, text, ~text_mask)
        logits, boxes = self._layer_outputs(hs, refs, text, text_mask)
        out["pred_logits"], out["pred_boxes"] = logits[-1], boxes[-1]
        out["text_token_mask"] = text_mask

        # mask branch: features from encoder memory levels 0..2 (strides 8/16/32)
        starts = [0]
        for h, w in shapes:
            starts.append(starts[-1] + h * w)
        lvl_maps = [memory[:, starts[i]:starts[i + 1]].transpose(1, 2).reshape(b, self.hidden_dim, *shapes[i])
                    for i in range(3)]
        fused = self.mask_head.fused(lvl_maps)
        mask_feats = self.mask_head.head(fused)
        if self.rela is not None:
            # levels finest-first → reversed, last three kept: strides 32, 16, 8 (see networks/.../rela.py)
            order = list(range(len(shapes)))[::-1][-3:]
            pos_maps = [(poss[i] + tr.level_embed[i].view(1, -1, 1, 1)) for i in order]
            rela = self.rela([lvl_maps[i] for i in order], pos_maps, [pads[i] for i in order], fused, text,
                             ~text_mask)
            out["no_targets"] = rela["no_targets"]
            out["union_mask_logits"] = rela["union_mask_logits"]
            out["minimaps"] = rela["minimaps"]
            out["rela_layers"] = rela["layers"]
        # un-padded image size in pixels, for the unnormalised relative coordinates
        size_wh = torch.stack((pixel_mask[:, 0, :].sum(1), pixel_mask[:, :, 0].sum(1)), -1).to(memory.dtype)

        per_layer_masks: list[Any] = [None] * len(hs)
        if self.training and match_fn is not None:
            indices_all = []
            for lvl in range(len(hs)):
                if lvl < len(hs) - 1 and not self.aux_loss:
                    indices_all.append(None)
                    continue
                indices = match_fn({"pred_logits": logits[lvl], "pred_boxes": boxes[lvl]}, targets)
                params = self.controller(hs[lvl])
                masks_l = []
                for i, (src_idx, _) in enumerate(indices):
                    src_idx = src_idx.to(params.device)
                    centres = refs[lvl][i, src_idx, :2] * size_wh[i]
                    masks_l.append(dynamic_mask_logits(mask_feats[i:i + 1], params[i:i + 1, src_idx],
                                                       centres[None])[0])
                per_layer_masks[lvl] = masks_l
                indices_all.append(indices)
            out["mask_indices"] = indices_all[-1]
        else:
            indices_all = None
            params = self.controller(hs[-1])
            centres = refs[-2][..., :2] * size_wh[:, None, :]
            per_layer_masks[-1] = dynamic_mask_logits(mask_feats, params, centres)
        out["pred_masks"] = per_layer_masks[-1]

        if self.aux_loss:
            aux = []
            for lvl in range(len(hs) - 1):
                entry = {"pred_logits": logits[lvl], "pred_boxes": boxes[lvl]}
                if per_layer_masks[lvl] is not None:
                    entry["pred_masks"] = per_layer_masks[lvl]
                    entry["mask_indices"] = indices_all[lvl]
                aux.append(entry)
            out["aux_outputs"] = aux
        return out


# --------------------------------------------------------------------------------------------------------------
# config and weights
# --------------------------------------------------------------------------------------------------------------

def _swin_from_cfg(m: Any, out_indices: Sequence[int]) -> SwinTransformer:
    name = str(cfg_get(m, "backbone", "swin_tiny_224_1k"))
    drop_path = 0.1
    if name == "swin_custom":
        sw = cfg_get(m, "swin")
        embed = int(cfg_get(sw, "embed_dim", 96))
        depths = list(cfg_get(sw, "depths", [2, 2, 6, 2]))
        heads = list(cfg_get(sw, "num_heads", [3, 6, 12, 24]))
        window = int(cfg_get(sw, "window_size", 7))
        drop_path = float(cfg_get(sw, "drop_path_rate", 0.1))
    elif (preset := swin_backbone(name)) is not None:
        embed, depths, heads, window = preset
    else:
        raise ConfigError("model.backbone", f"'{name}' is not supported by tao-cli",
                          f"use one of {', '.join(sorted(SWIN_BACKBONES))} or swin_custom")
    if len(depths) != 4 or len(heads) != 4:
        raise ConfigError("model.swin", f"depths {depths} and num_heads {heads} must have 4 stages",
                          "give 4 values for each")
    return SwinTransformer(embed_dim=embed, depths=depths, num_heads=heads, window_size=window,
                           drop_path_rate=drop_path, out_indices=tuple(out_indices))


def rela_queries(model_cfg: Any) -> int:
    """Region queries of the ReLA branch: ``model.num_region_queries`` when ``"rela"`` is in ``model.loss_types``,
    else 0 (no branch).  TAO's default ``num_region_queries`` is 100 even for plain detection specs, so the number
    alone does not build the branch: a spec without ``rela`` gives the TAO backend model (same weights, outputs and
    ONNX graph as before)."""
    if "rela" not in list(cfg_get(model_cfg, "loss_types", []) or []):
        return 0
    return max(int(cfg_get(model_cfg, "num_region_queries", 0) or 0), 0)


def build_model(cfg: Any, *, text_encoder: BertTextEncoder | None = None) -> MaskGDinoModel:
    """Build :class:`MaskGDinoModel` from the experiment config (``cfg.model``) or the model section itself.

    The only function that reads config.  The text encoder is loaded from ``model.text_encoder_type`` (see
    :func:`resolve_text_encoder`) unless ``text_encoder`` is given (tests).  No image-backbone weights are
    loaded here (see :func:`load_backbone_weights`).
    """
    m = cfg_get(cfg, "model", cfg) if not hasattr(cfg, "hidden_dim") else cfg
    rii = [int(i) for i in cfg_get(m, "return_interm_indices", [1, 2, 3, 4])]
    out_indices = [i for i in rii if i < 4]
    if not out_indices or any(i < 0 for i in rii) or sorted(set(out_indices)) != out_indices:
        raise ConfigError("model.return_interm_indices", f"{rii} is not an increasing list of stages 0..4",
                          "use [1, 2, 3, 4]")
    levels = int(cfg_get(m, "num_feature_levels", 4))
    if levels != len(rii):
        raise ConfigError("model.num_feature_levels", f"{levels} differs from len(return_interm_indices)={len(rii)}",
                          "make them equal")
    swin = _swin_from_cfg(m, out_indices)
    if text_encoder is None:
        text_encoder = BertTextEncoder.from_pretrained(resolve_text_encoder(cfg_get(m, "text_encoder_type",
                                                                                 "bert-base-uncased")))
    log_scale = cfg_get(m, "log_scale", None)
    model = MaskGDinoModel(
        swin, text_encoder,
        hidden_dim=int(cfg_get(m, "hidden_dim", 256)),
        nheads=int(cfg_get(m, "nheads", 8)),
        num_queries=int(cfg_get(m, "num_queries", 900)),
        enc_layers=int(cfg_get(m, "enc_layers", 6)),
        dec_layers=int(cfg_get(m, "dec_layers", 6)),
        dim_feedforward=int(cfg_get(m, "dim_feedforward", 2048)),
        dropout=float(cfg_get(m, "dropout_ratio", 0.0)),
        num_feature_levels=levels,
        enc_n_points=int(cfg_get(m, "enc_n_points", 4)),
        dec_n_points=int(cfg_get(m, "dec_n_points", 4)),
        two_stage_type=str(cfg_get(m, "two_stage_type", "standard")),
        max_text_len=int(cfg_get(m, "max_text_len", 256)),
        pe_temperature_h=float(cfg_get(m, "pe_temperatureH", 20)),
        pe_temperature_w=float(cfg_get(m, "pe_temperatureW", 20)),
        log_scale=log_scale,
        class_embed_bias=bool(cfg_get(m, "class_embed_bias", False)),
        aux_loss=bool(cfg_get(m, "aux_loss", True)),
        num_region_queries=rela_queries(m),
        embed_init_tgt=bool(cfg_get(m, "embed_init_tgt", True)),
    )
    if not bool(cfg_get(m, "train_backbone", True)):
        for p in model.swin.parameters():
            p.requires_grad_(False)
    return model


#: file keys with no slot in the model that are dropped silently
BENIGN_KEYS = ("bert.pooler.*", "*.position_ids", "label_enc.*", "*.attn_mask", "*.relative_position_index",
               "backbone.0.body.norm.*", "backbone.0.body.head.*")


def remap_checkpoint_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename TAO / IDEA checkpoint keys to this model's names (pure renaming, tensors untouched).

    * TAO Lightning (Mask/Grounding DINO): ``model.model.<name>`` → ``<name>``; tao-cli: ``model.<name>``;
    * DDP / EMA wrappers: a leading ``module.`` is dropped;
    * IDEA GroundingDINO: ``backbone.0.<swin>`` → ``backbone.0.body.<swin>``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        k = key
        while k.startswith("module."):
            k = k[len("module."):]
        if k.startswith("model.model."):
            k = k[len("model.model."):]
        elif k.startswith("model."):  # a tao-cli Lightning module holds the network as `model`
            k = k[len("model."):]
        if k.startswith("backbone.0.") and not k.startswith("backbone.0.body."):
            k = "backbone.0.body." + k[len("backbone.0."):]
        out[k] = value
    return out


def load_pretrained(model: MaskGDinoModel, state_dict: Mapping, *, source: str = "pretrained weights",
                    raise_on_mismatch: bool = False) -> LoadReport:
    """Load a TAO Mask/Grounding DINO or IDEA GroundingDINO checkpoint into ``model`` by key remapping.

    Accepts a bare state dict or one under ``state_dict``/``model``.  Keys missing from the file (e.g. the mask
    head ``controller.*``/``mask_head.*`` of a Grounding DINO checkpoint) keep their initial values and are listed
    in ``report.missing``.  Shape differences (e.g. another text encoder width) are skipped and listed in
    ``report.mismatched`` unless ``raise_on_mismatch``.
    """
    sd = remap_checkpoint_keys(unwrap_state_dict(state_dict))
    report = apply_state_dict(model, sd, BENIGN_KEYS, source=source, raise_on_mismatch=raise_on_mismatch)
    if any(k.startswith(("controller.", "mask_head.")) for k in report.missing):
        log.info("%s has no mask-head weights (a Grounding DINO checkpoint?): controller/mask_head keep their init",
                 source)
    return report


def load_backbone_weights(model: MaskGDinoModel, path: str | Path,
                          field: str = "model.pretrained_backbone_path", model_cfg: Any = None) -> LoadReport:
    """Load Swin weights into the image backbone only (``backbone.0.body``) and return the report.

    Accepted: an ImageNet release in Microsoft's (``swin_*_patch4_window*.pth``, ``{"model": ...}``) or timm's
    layout, or the Swin part of any whole-model checkpoint :mod:`.weight_formats` knows (tao-cli, TAO, IDEA, HF).
    Bias tables trained with another window size are resized to the model's (logged); per-stage output norms a
    classification release lacks are reported as newly initialised.  Raises :class:`CheckpointError` naming
    ``field`` for a missing/unreadable file, an unknown layout, or a tensor that does not fit.
    """
    from networks.common.weight_formats import detect_format, load_converted, read_source
    from networks.mask_grounding_dino.weight_formats import backbone_formats

    source = read_source(path, field=field)
    fmt = detect_format(source, backbone_formats(model.swin.layers[0].blocks[0].attn.window_size), field=field)
    report = load_converted(model, source, fmt, model_cfg if model_cfg is not None else {},
                            prefix="backbone.0.body.")
    log.info(report.summary(f"{path} ({fmt.name}: {fmt.description})"))
    return report
