"""Mask2Former network (Cheng et al., CVPR 2022) as built by TAO: Swin backbone, MSDeformAttn pixel decoder,
masked-attention transformer decoder.

Module and parameter names follow the original detectron2 release (and therefore TAO checkpoints after
stripping their ``model.`` prefix): ``backbone.*``, ``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``.

Class convention (TAO): the class head has ``num_classes + 1`` outputs and **column 0 is "no object"**; column
``k`` (k ≥ 1) is dataset class ``k``.  The original release and HF put "no object" last (see ``convert.py``).

:func:`build_model` is the only function here that reads the spec.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from networks.backbones.swin import SWIN_PRESETS, SwinTransformer
from networks.common.config import cfg_get
from networks.common.errors import ConfigError
from networks.common.weights import LoadReport
from networks.ops.layers import MLP, ConvNorm, build_norm2d, c2_xavier_fill
from networks.ops.ms_deform_attn import DeformableEncoderLayer, init_deformable_transformer
from networks.ops.position_encoding import PositionEmbeddingSine
from networks.ops.transformer_layers import CrossAttentionLayer, FFNLayer, SelfAttentionLayer

__all__ = [
    "Mask2FormerModel",
    "MaskFormerHead",
    "MSDeformAttnPixelDecoder",
    "MultiScaleMaskedTransformerDecoder",
    "build_model",
    "build_backbone",
    "load_backbone_weights",
    "SWIN_TYPES",
]

log = logging.getLogger(__name__)

#: valid ``model.backbone.swin.type`` values; "custom" keeps embed_dim/depths/num_heads as given.
SWIN_TYPES = tuple(SWIN_PRESETS) + ("custom",)


def _run(module: nn.Module, use_checkpoint: bool, *args):
    """Call ``module(*args)``, through activation checkpointing when asked and gradients are being recorded."""
    if use_checkpoint and module.training and torch.is_grad_enabled():
        return cp.checkpoint(module, *args, use_reentrant=False)
    return module(*args)


# ----------------------------------------------------------------------------------------------------------------
# Pixel decoder
# ----------------------------------------------------------------------------------------------------------------


class _EncoderStack(nn.Module):
    """Holds ``layers`` (name kept for checkpoint compatibility: ``transformer.encoder.layers.{k}``)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Deformable transformer encoder over L flattened levels with a learned ``level_embed`` ``[L, C]``.

    ``forward(srcs: list of [B,C,H_l,W_l], pos_embeds: same shapes) -> (memory [B,S,C], shapes [(H_l,W_l)],
    level_start_index [L] long)``.  No padding masks: every pixel is valid (inputs are padded by the data
    pipeline, as in TAO), so reference points are the plain normalised pixel centres.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, dim_feedforward: int = 1024,
                 dropout: float = 0.1, num_feature_levels: int = 3, enc_n_points: int = 4,
                 use_checkpoint: bool = False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.encoder = _EncoderStack([
            DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                                enc_n_points)
            for _ in range(num_encoder_layers)
        ])
        init_deformable_transformer(self, self.level_embed)

    @staticmethod
    def reference_points(shapes: Sequence[tuple[int, int]], batch: int, device, dtype) -> torch.Tensor:
        """Normalised pixel centres ``(x, y)`` of every level, ``[B, S, L, 2]`` (same point for every level)."""
        refs = []
        for h, w in shapes:
            ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device),
                                    torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device), indexing="ij")
            refs.append(torch.stack((xs.reshape(-1) / w, ys.reshape(-1) / h), -1))
        ref = torch.cat(refs, 0)
        return ref[None, :, None, :].expand(batch, -1, len(shapes), -1)

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]):
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(pos_embeds)], 1)
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        level_start_index = torch.tensor(starts, dtype=torch.long, device=src_flat.device)
        ref = self.reference_points(shapes, src_flat.shape[0], src_flat.device, src_flat.dtype)
        out = src_flat
        for layer in self.encoder.layers:
            out = _run(layer, self.use_checkpoint, out, pos_flat, ref, shapes, level_start_index)
        return out, shapes, level_start_index


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former pixel decoder: deformable encoder on ``transformer_in_features`` + FPN up to ``common_stride``.

    Args:
        in_channels / in_strides: ``{"res2": C2, ...}`` and ``{"res2": 4, ...}`` of the backbone outputs used.
        transformer_in_features: levels fed to the encoder (res3..res5), processed low→high resolution.
        conv_dim: decoder width (MSDA ``d_model``); mask_dim: channels of ``mask_features``.
        norm: FPN lateral/output norm (``GN``, ``""``, ...); ``input_proj`` always uses GroupNorm(32).

    ``forward(features: dict of [B,C,H,W]) -> (mask_features [B,mask_dim,H/4,W/4], encoder_out_lowres
    [B,conv_dim,H/32,W/32], multi_scale_features [1/32, 1/16, 1/8] each [B,conv_dim,h,w])``.  Features are
    cast to float32 and the decoder runs with autocast off, so its outputs are float32 under mixed precision
    (the TAO/original ``@autocast(enabled=False)`` behaviour).
    """

    def __init__(self, in_channels: Mapping[str, int], in_strides: Mapping[str, int],
                 transformer_in_features: Sequence[str] = ("res3", "res4", "res5"), conv_dim: int = 256,
                 mask_dim: int = 256, transformer_enc_layers: int = 6, nheads: int = 8, dropout: float = 0.0,
                 dim_feedforward: int = 1024, norm: str = "GN", common_stride: int = 4, n_points: int = 4,
                 use_checkpoint: bool = False):
        super().__init__()
        order = sorted(in_channels, key=lambda k: in_strides[k])
        self.in_features = order
        self.transformer_in_features = sorted(transformer_in_features, key=lambda k: in_strides[k])
        for k in self.transformer_in_features:
            if k not in in_channels:
                raise ValueError(f"transformer input feature {k!r} is not among the backbone outputs {order}")
        num_levels = len(self.transformer_in_features)
        self.transformer_num_feature_levels = num_levels
        self.input_proj = nn.ModuleList()
        for k in self.transformer_in_features[::-1]:
            conv = nn.Conv2d(in_channels[k], conv_dim, kernel_size=1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.constant_(conv.bias, 0)
            self.input_proj.append(nn.Sequential(conv, nn.GroupNorm(32, conv_dim)))
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim, nhead=nheads, num_encoder_layers=transformer_enc_layers,
            dim_feedforward=dim_feedforward, dropout=dropout, num_feature_levels=num_levels, enc_n_points=n_points,
            use_checkpoint=use_checkpoint)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_dim = mask_dim
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = 3
        self.common_stride = common_stride
        min_stride = min(in_strides[k] for k in self.transformer_in_features)
        self.num_fpn_levels = int(math.log2(min_stride) - math.log2(common_stride))
        use_bias = norm == ""
        lateral, output = [], []
        for idx, k in enumerate(order[: self.num_fpn_levels]):
            lat = ConvNorm(in_channels[k], conv_dim, kernel_size=1, bias=use_bias, norm=build_norm2d(norm, conv_dim))
            out = ConvNorm(conv_dim, conv_dim, kernel_size=3, padding=1, bias=use_bias,
                           norm=build_norm2d(norm, conv_dim), activation=F.relu)
            c2_xavier_fill(lat)
            c2_xavier_fill(out)
            self.add_module(f"adapter_{idx + 1}", lat)
            self.add_module(f"layer_{idx + 1}", out)
            lateral.append(lat)
            output.append(out)
        # plain lists: the modules are registered above under their checkpoint names
        self._lateral = lateral[::-1]
        self._output = output[::-1]

    def forward(self, features: Mapping[str, torch.Tensor]):
        # autocast off as well: under it the convs would turn the float32 features back into fp16/bf16
        device_type = next(iter(features.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward_fp32(features)

    def _forward_fp32(self, features: Mapping[str, torch.Tensor]):
        srcs, pos = [], []
        for idx, k in enumerate(self.transformer_in_features[::-1]):
            x = features[k].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        memory, shapes, _ = self.transformer(srcs, pos)
        b = memory.shape[0]
        chunks = torch.split(memory, [h * w for h, w in shapes], dim=1)
        outs = [c.transpose(1, 2).reshape(b, -1, h, w) for c, (h, w) in zip(chunks, shapes, strict=True)]
        for idx, k in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            x = features[k].float()
            cur = self._lateral[idx](x)
            y = cur + F.interpolate(outs[-1], size=cur.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self._output[idx](y))
        multi_scale = outs[: self.maskformer_num_feature_levels]
        return self.mask_features(outs[-1]), outs[0], multi_scale


# ----------------------------------------------------------------------------------------------------------------
# Transformer decoder
# ----------------------------------------------------------------------------------------------------------------


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Masked-attention decoder with ``num_layers`` layers (TAO ``dec_layers − 1``) cycling over 3 levels.

    ``forward(multi_scale [3 × [B,C_in,h_l,w_l], order 1/32, 1/16, 1/8], mask_features [B,mask_dim,H/4,W/4])
    -> {"pred_logits": [B,Q,num_classes+1], "pred_masks": [B,Q,H/4,W/4], "aux_outputs": num_layers × {...}}``.

    Predictions are made before layer 0 and after every layer (``num_layers + 1`` in all); the mask of
    prediction k, resized to level ``k % 3``, thresholded at sigmoid < 0.5 (= blocked) and detached, masks
    the cross-attention of layer k.  Rows blocked everywhere are unblocked.  Decoder dropout is 0 (TAO/original).
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 nheads: int = 8, dim_feedforward: int = 2048, num_layers: int = 9, pre_norm: bool = False,
                 mask_dim: int = 256, enforce_input_project: bool = False, num_feature_levels: int = 3,
                 use_checkpoint: bool = False):
        super().__init__()
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = num_layers
        self.use_checkpoint = use_checkpoint
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(num_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, 0.0, pre_norm) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.num_feature_levels = num_feature_levels
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Sequential())
        self.num_classes = num_classes
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def _heads(self, output: torch.Tensor, mask_features: torch.Tensor, target_size):
        decoded = self.decoder_norm(output).transpose(0, 1)  # [B,Q,C]
        logits = self.class_embed(decoded)
        b, c, h, w = mask_features.shape
        # a MatMul, not an Einsum, in the exported graph: int8 PTQ quantizes it (10 of them at 1/4 resolution)
        masks = torch.matmul(self.mask_embed(decoded), mask_features.reshape(b, c, h * w)).view(b, -1, h, w)
        attn = F.interpolate(masks, size=target_size, mode="bilinear", align_corners=False)
        # threshold before repeating over heads: the repeat then copies booleans, not floats
        attn = (attn.sigmoid() < 0.5).flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)
        return logits, masks, attn.detach()

    def forward(self, x: Sequence[torch.Tensor], mask_features: torch.Tensor) -> dict[str, Any]:
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        src, pos, sizes = [], [], []
        for i in range(self.num_feature_levels):
            sizes.append(tuple(x[i].shape[-2:]))
            pos.append(self.pe_layer(x[i]).to(x[i].dtype).flatten(2).permute(2, 0, 1))
            s = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(s.permute(2, 0, 1))
        bs = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        logits, masks, attn = self._heads(output, mask_features, sizes[0])
        all_logits, all_masks = [logits], [masks]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            # a query whose mask blocks everything would attend nowhere (NaN): let it see the whole level
            attn = attn & ~attn.all(-1, keepdim=True)
            output = _run(self.transformer_cross_attention_layers[i], self.use_checkpoint, output, src[level], attn,
                          pos[level], query_embed)
            output = _run(self.transformer_self_attention_layers[i], self.use_checkpoint, output, query_embed)
            output = _run(self.transformer_ffn_layers[i], self.use_checkpoint, output)
            logits, masks, attn = self._heads(output, mask_features, sizes[(i + 1) % self.num_feature_levels])
            all_logits.append(logits)
            all_masks.append(masks)
        return {
            "pred_logits": all_logits[-1],
            "pred_masks": all_masks[-1],
            "aux_outputs": [{"pred_logits": a, "pred_masks": b}
                            for a, b in zip(all_logits[:-1], all_masks[:-1], strict=True)],
        }


# ----------------------------------------------------------------------------------------------------------------
# Whole model
# ----------------------------------------------------------------------------------------------------------------


class MaskFormerHead(nn.Module):
    """``pixel_decoder`` + ``predictor``: ``forward(features dict) -> predictor outputs`` (see the decoder)."""

    def __init__(self, pixel_decoder: MSDeformAttnPixelDecoder, predictor: MultiScaleMaskedTransformerDecoder):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        mask_features, _, multi_scale = self.pixel_decoder(features)
        return self.predictor(multi_scale, mask_features)


class Mask2FormerModel(nn.Module):
    """Backbone → pixel decoder → masked-attention decoder.

    ``forward(images [B,3,H,W] normalised, padded to ``size_divisibility``) -> {"pred_logits": [B,Q,C+1]
    (column 0 = no object), "pred_masks": [B,Q,H/4,W/4] logits, "aux_outputs": [{pred_logits, pred_masks}] ×
    (dec_layers − 1)}``.
    """

    size_divisibility = 32

    def __init__(self, backbone: nn.Module, pixel_decoder: MSDeformAttnPixelDecoder,
                 predictor: MultiScaleMaskedTransformerDecoder):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = MaskFormerHead(pixel_decoder, predictor)

    @property
    def num_classes(self) -> int:
        return self.sem_seg_head.predictor.num_classes

    @property
    def num_queries(self) -> int:
        return self.sem_seg_head.predictor.num_queries

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        return self.sem_seg_head(self.backbone(images))


# ----------------------------------------------------------------------------------------------------------------
# Spec → model
# ----------------------------------------------------------------------------------------------------------------


def _as_list(value) -> list:
    return [v for v in value]


def build_backbone(backbone_cfg: Any, *, activation_checkpoint: bool = False) -> SwinTransformer:
    """Swin backbone from ``model.backbone`` (``type`` must be ``swin``; ``swin.type`` picks the preset or
    ``custom`` to use ``embed_dim``/``depths``/``num_heads`` as written).  All four stages are computed."""
    btype = cfg_get(backbone_cfg, "type", "swin")
    if btype != "swin":
        raise ConfigError("model.backbone.type", f"'{btype}' is not supported", "use 'swin'")
    swin = cfg_get(backbone_cfg, "swin", None)
    stype = cfg_get(swin, "type", "tiny")
    if stype in SWIN_PRESETS:
        embed_dim, depths, num_heads = SWIN_PRESETS[stype]
    elif stype == "custom":
        embed_dim = int(cfg_get(swin, "embed_dim", 96))
        depths = [int(d) for d in _as_list(cfg_get(swin, "depths", [2, 2, 6, 2]))]
        num_heads = [int(h) for h in _as_list(cfg_get(swin, "num_heads", [3, 6, 12, 24]))]
    else:
        raise ConfigError("model.backbone.swin.type", f"'{stype}' is not one of {', '.join(SWIN_TYPES)}",
                          "use a preset, or 'custom' to take embed_dim/depths/num_heads as written")
    if len(depths) != 4 or len(num_heads) != 4:
        raise ConfigError("model.backbone.swin.depths", f"depths {depths} and num_heads {num_heads} need 4 stages",
                          "give four values each")
    for i, heads in enumerate(num_heads):
        if (embed_dim * 2 ** i) % heads:
            raise ConfigError("model.backbone.swin.num_heads",
                              f"stage {i} width {embed_dim * 2 ** i} is not divisible by {heads} heads",
                              "choose embed_dim and num_heads so each stage width divides evenly")
    return SwinTransformer(
        embed_dim=embed_dim, depths=depths, num_heads=num_heads,
        window_size=int(cfg_get(swin, "window_size", 7)),
        mlp_ratio=float(cfg_get(swin, "mlp_ratio", 4.0)),
        qkv_bias=bool(cfg_get(swin, "qkv_bias", True)),
        drop_rate=float(cfg_get(swin, "drop_rate", 0.0)),
        attn_drop_rate=float(cfg_get(swin, "attn_drop_rate", 0.0)),
        drop_path_rate=float(cfg_get(swin, "drop_path_rate", 0.3)),
        ape=bool(cfg_get(swin, "ape", False)),
        patch_norm=bool(cfg_get(swin, "patch_norm", True)),
        out_indices=(0, 1, 2, 3),  # TAO ignores swin.out_indices; out_features selects the maps
        pretrain_img_size=int(cfg_get(swin, "pretrain_img_size", 384)),
        use_checkpoint=bool(cfg_get(swin, "use_checkpoint", False)) or activation_checkpoint,
        patch_size=int(cfg_get(swin, "patch_size", 4)),
    )


def build_model(model_cfg: Any, *, activation_checkpoint: bool = False) -> Mask2FormerModel:
    """Build :class:`Mask2FormerModel` from the spec's ``model`` section (TAO field names).

    ``activation_checkpoint`` (``train.activation_checkpoint``) checkpoints Swin blocks, encoder layers and
    decoder layers.  Pretrained weights are *not* loaded here; see :func:`load_backbone_weights`.
    """
    backbone_cfg = cfg_get(model_cfg, "backbone", None)
    head = cfg_get(model_cfg, "sem_seg_head", None)
    mf = cfg_get(model_cfg, "mask_former", None)
    backbone = build_backbone(backbone_cfg, activation_checkpoint=activation_checkpoint)
    swin = cfg_get(backbone_cfg, "swin", None)
    out_features = [str(f) for f in _as_list(cfg_get(swin, "out_features", ["res2", "res3", "res4", "res5"]))]
    unknown = [f for f in out_features if f not in backbone.out_channels]
    if unknown:
        raise ConfigError("model.backbone.swin.out_features", f"unknown feature(s) {unknown}",
                          f"choose from {sorted(backbone.out_channels)}")
    enc_in = [str(f) for f in _as_list(cfg_get(head, "deformable_transformer_encoder_in_features",
                                            ["res3", "res4", "res5"]))]
    missing = [f for f in enc_in if f not in out_features]
    if missing:
        raise ConfigError("model.sem_seg_head.deformable_transformer_encoder_in_features",
                          f"{missing} not in model.backbone.swin.out_features {out_features}",
                          "add them to out_features")
    if len(enc_in) != 3:
        raise ConfigError("model.sem_seg_head.deformable_transformer_encoder_in_features",
                          f"needs exactly 3 levels, got {enc_in}", "use [res3, res4, res5]")
    conv_dim = int(cfg_get(head, "convs_dim", 256))
    mask_dim = int(cfg_get(head, "mask_dim", 256))
    hidden_dim = int(cfg_get(mf, "hidden_dim", 256))
    nheads = int(cfg_get(mf, "nheads", 8))
    norm = str(cfg_get(head, "norm", "GN"))
    for key, dim in (("model.sem_seg_head.convs_dim", conv_dim),):
        if dim % 32:
            raise ConfigError(key, f"{dim} is not a multiple of 32 (GroupNorm uses 32 groups)", "use e.g. 256")
    if conv_dim % nheads or hidden_dim % nheads:
        raise ConfigError("model.mask_former.nheads", f"{nheads} does not divide convs_dim {conv_dim} and "
                          f"hidden_dim {hidden_dim}", "choose a divisor of both")
    dec_layers = int(cfg_get(mf, "dec_layers", 10))
    if dec_layers < 1:
        raise ConfigError("model.mask_former.dec_layers", f"{dec_layers} < 1", "use at least 1")
    channels = {k: backbone.out_channels[k] for k in out_features}
    strides = {k: backbone.out_strides[k] for k in out_features}
    pixel_decoder = MSDeformAttnPixelDecoder(
        channels, strides, transformer_in_features=enc_in, conv_dim=conv_dim, mask_dim=mask_dim,
        transformer_enc_layers=int(cfg_get(head, "transformer_enc_layers", 6)), nheads=nheads,
        dropout=float(cfg_get(mf, "dropout", 0.0)), dim_feedforward=1024, norm=norm,
        common_stride=int(cfg_get(head, "common_stride", 4)), use_checkpoint=activation_checkpoint)
    predictor = MultiScaleMaskedTransformerDecoder(
        in_channels=conv_dim, num_classes=int(cfg_get(head, "num_classes", 200)), hidden_dim=hidden_dim,
        num_queries=int(cfg_get(mf, "num_object_queries", 100)), nheads=nheads,
        dim_feedforward=int(cfg_get(mf, "dim_feedforward", 2048)), num_layers=dec_layers - 1,
        pre_norm=bool(cfg_get(mf, "pre_norm", False)), mask_dim=mask_dim, use_checkpoint=activation_checkpoint)
    # the backbone always computes all four stages (as TAO); the decoder only reads out_features
    return Mask2FormerModel(backbone, pixel_decoder, predictor)


def load_backbone_weights(model: Mask2FormerModel, path: str | Path, model_cfg: Any = None, *,
                          field: str = "model.backbone.pretrained_weights") -> LoadReport:
    """Load an ImageNet Swin release (``model.backbone.pretrained_weights``) into ``model.backbone``.

    Formats ``swin-timm`` / ``swin-microsoft`` (:mod:`networks.backbones.swin_weights`): Microsoft's
    ``{"model": ...}`` release or timm's names, with or without a ``backbone.`` prefix.  Bias tables of another
    window size are resized to the model's (logged); the per-stage norms stay at init (``report.missing``); the
    classifier, final norm and ``attn_mask`` buffers are ``report.benign``.  Unreadable files, other layouts and
    shape mismatches raise :class:`CheckpointError`.  The report summary is logged.
    """
    from networks.backbones.swin_weights import swin_formats, unused_swin_keys
    from networks.common.weight_formats import detect_format, load_converted, read_source

    src = read_source(path, field=field)
    fmt = detect_format(src, swin_formats("mask2former"), field=field)
    if model_cfg is None:
        model_cfg = {"backbone": {"swin": {"window_size": int(model.backbone.layers[0].window_size)}}}
    report = load_converted(model.backbone, src, fmt, model_cfg)
    report.benign = unused_swin_keys(src.tensors)
    log.info(report.summary(f"{path} ({fmt.name})"))
    return report
