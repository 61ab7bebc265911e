"""Convert HuggingFace ``Mask2FormerForUniversalSegmentation`` weights and configs to this package's model.

* :func:`hf_to_tao_state_dict` renames HF keys to the original/TAO detectron2 names used by
  :class:`networks.mask2former.model.Mask2FormerModel`, concatenates split q/k/v projections, and rolls the class
  axis ("no object" is the last HF row and row 0 here).  Both the transformers-4 key layout (``attention.self.query``,
  hub checkpoints) and the transformers-5 layout (``attention.q_proj``, ``encoder.swin.*``) are accepted.
* :func:`hf_config_to_spec_overrides` turns an HF config into the ``model`` section of a spec.

Only Swin backbones are supported (the only backbone TAO's Mask2Former trains).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from networks.backbones.swin import SWIN_PRESETS
from networks.common.config import cfg_get
from networks.common.errors import CheckpointError, ConfigError

__all__ = ["hf_to_tao_state_dict", "hf_config_to_spec_overrides", "relative_position_index"]

_BB = "backbone."
_PD = "sem_seg_head.pixel_decoder."
_PR = "sem_seg_head.predictor."

# (HF regex after prefix normalisation, our key template); first match wins.
_BACKBONE_RULES = [
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", _BB + "patch_embed.proj.{0}"),
    (r"embeddings\.norm\.(weight|bias)", _BB + "patch_embed.norm.{0}"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.(weight|bias)", _BB + "layers.{0}.blocks.{1}.norm1.{2}"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.(weight|bias)", _BB + "layers.{0}.blocks.{1}.norm2.{2}"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.(?:self\.|relative_position_bias\.)?relative_position_bias_table",
     _BB + "layers.{0}.blocks.{1}.attn.relative_position_bias_table"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)",
     _BB + "layers.{0}.blocks.{1}.attn.proj.{2}"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)",
     _BB + "layers.{0}.blocks.{1}.mlp.fc1.{2}"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(?:output\.dense|mlp\.fc2)\.(weight|bias)",
     _BB + "layers.{0}.blocks.{1}.mlp.fc2.{2}"),
    (r"encoder\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)", _BB + "layers.{0}.downsample.{1}"),
]
# q/k/v of the Swin attention, split in HF, one ``qkv`` Linear here
_SWIN_QKV = re.compile(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.(?:self\.(query|key|value)|(q|k|v)_proj)\."
                       r"(weight|bias)")
_BACKBONE_DROP = re.compile(r"(encoder\.layers\.\d+\.blocks\.\d+\.attention\.(?:self\.)?relative_position_index"
                            r"|layernorm\.(weight|bias)|pooler\..*)")

_PIXEL_RULES = [
    (r"input_projections\.(\d+)\.([01])\.(weight|bias)", _PD + "input_proj.{0}.{1}.{2}"),
    (r"level_embed", _PD + "transformer.level_embed"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
     _PD + "transformer.encoder.layers.{0}.self_attn.{1}.{2}"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", _PD + "transformer.encoder.layers.{0}.norm1.{1}"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", _PD + "transformer.encoder.layers.{0}.linear1.{1}"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", _PD + "transformer.encoder.layers.{0}.linear2.{1}"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", _PD + "transformer.encoder.layers.{0}.norm2.{1}"),
    (r"(adapter|layer)_(\d+)\.0\.(weight|bias)", _PD + "{0}_{1}.{2}"),
    (r"(adapter|layer)_(\d+)\.1\.(weight|bias)", _PD + "{0}_{1}.norm.{2}"),
    (r"mask_projection\.(weight|bias)", _PD + "mask_features.{0}"),
]

_TRANSFORMER_RULES = [
    (r"queries_embedder\.weight", _PR + "query_embed.weight"),
    (r"queries_features\.weight", _PR + "query_feat.weight"),
    (r"level_embed\.weight", _PR + "level_embed.weight"),
    (r"input_projections\.(\d+)\.(weight|bias)", _PR + "input_proj.{0}.{1}"),
    (r"decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
     _PR + "transformer_self_attention_layers.{0}.self_attn.out_proj.{1}"),
    (r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", _PR + "transformer_self_attention_layers.{0}.norm.{1}"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     _PR + "transformer_cross_attention_layers.{0}.multihead_attn.{1}"),
    (r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(weight|bias)", _PR + "transformer_cross_attention_layers.{0}.norm.{1}"),
    (r"decoder\.layers\.(\d+)\.fc1\.(weight|bias)", _PR + "transformer_ffn_layers.{0}.linear1.{1}"),
    (r"decoder\.layers\.(\d+)\.fc2\.(weight|bias)", _PR + "transformer_ffn_layers.{0}.linear2.{1}"),
    (r"decoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", _PR + "transformer_ffn_layers.{0}.norm.{1}"),
    (r"decoder\.layernorm\.(weight|bias)", _PR + "decoder_norm.{0}"),
    (r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(weight|bias)", _PR + "mask_embed.layers.{0}.{1}"),
]
_DEC_QKV = re.compile(r"decoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)")

_SECTIONS = [
    # (HF prefix, rules, qkv regex, qkv target template, drop regex)
    ("model.pixel_level_module.encoder.", _BACKBONE_RULES, _SWIN_QKV, _BB + "layers.{0}.blocks.{1}.attn.qkv.{2}",
     _BACKBONE_DROP),
    ("model.pixel_level_module.decoder.", _PIXEL_RULES, None, None, None),
    ("model.transformer_module.", _TRANSFORMER_RULES, _DEC_QKV,
     _PR + "transformer_self_attention_layers.{0}.self_attn.in_proj_{1}", None),
]


def relative_position_index(window_size: int) -> torch.Tensor:
    """The ``[ws², ws²]`` long index into a ``[(2ws−1)², heads]`` Swin relative-position bias table."""
    ws = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def _apply_rules(rest: str, rules) -> str | None:
    for pattern, template in rules:
        m = re.fullmatch(pattern, rest)
        if m:
            return template.format(*m.groups())
    return None


def hf_to_tao_state_dict(hf_sd: Mapping[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """Map an HF ``Mask2FormerForUniversalSegmentation`` state dict to :class:`Mask2FormerModel` keys.

    ``num_classes`` is the number of real classes C (HF ``num_labels``); the class head must have C+1 rows.
    The class axis is rolled so that row 0 is "no object" (HF row C) and row k+1 is HF row k.  Swin
    ``relative_position_index`` buffers are regenerated from the bias-table size; ``criterion.*`` and the unused
    final Swin ``layernorm`` are dropped.  Any other unrecognised key raises :class:`CheckpointError` (nothing is
    dropped silently).  Values are not copied (same tensors, except concatenated/rolled ones).
    """
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in hf_sd.items():
        if key.startswith("criterion."):
            continue
        if key in ("class_predictor.weight", "class_predictor.bias"):
            if value.shape[0] != num_classes + 1:
                raise CheckpointError(key, f"has {value.shape[0]} rows, expected num_classes + 1 = {num_classes + 1}",
                                      "pass the checkpoint's number of labels as num_classes")
            out[_PR + "class_embed." + key.split(".")[-1]] = torch.roll(value, shifts=1, dims=0)
            continue
        for prefix, rules, qkv_re, qkv_tpl, drop_re in _SECTIONS:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if prefix.endswith("encoder.") and rest.startswith("swin."):
                rest = rest[len("swin."):]  # transformers-5 nests the Swin model one level deeper
            if rest.startswith("hidden_states_norms.stage"):
                m = re.fullmatch(r"hidden_states_norms\.stage(\d+)\.(weight|bias)", rest)
                if m:
                    out[f"{_BB}norm{int(m.group(1)) - 1}.{m.group(2)}"] = value
                    break
            if drop_re is not None and drop_re.fullmatch(rest):
                break
            if qkv_re is not None:
                m = qkv_re.fullmatch(rest)
                if m:
                    groups = [g for g in m.groups() if g is not None]
                    part = groups[-2][0]  # q / k / v ("query" -> "q")
                    target = qkv_tpl.format(*groups[:-2], groups[-1])
                    qkv_parts.setdefault(target, {})[part] = value
                    break
            target = _apply_rules(rest, rules)
            if target is not None:
                out[target] = value
                break
            unknown.append(key)
            break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise CheckpointError("HF state dict", f"unrecognised keys: {shown}",
                              "only Mask2FormerForUniversalSegmentation with a Swin backbone is supported")
    for target, parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError("HF state dict", f"incomplete q/k/v projections for {target}: have {sorted(parts)}",
                                  "the file is truncated or not a Mask2Former checkpoint")
        out[target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    for key in [k for k in out if k.endswith("attn.relative_position_bias_table")]:
        ws = (int(round(out[key].shape[0] ** 0.5)) + 1) // 2
        out[key[: -len("relative_position_bias_table")] + "relative_position_index"] = relative_position_index(ws)
    return out


def hf_config_to_spec_overrides(hf_config: Any) -> dict[str, Any]:
    """Spec overrides ``{"model": {"backbone": {...}, "sem_seg_head": {...}, "mask_former": {...}}}`` that build
    a model matching an HF ``Mask2FormerConfig`` (object or ``to_dict()`` output).

    ``swin.type`` is the matching TAO preset when embed_dim/depths/num_heads equal one, else ``"custom"``.
    Raises :class:`ConfigError` for settings this implementation cannot reproduce (non-Swin backbone, pixel-decoder
    FFN other than 1024, an activation other than ReLU).
    """
    bb = cfg_get(hf_config, "backbone_config")
    if bb is None or cfg_get(bb, "model_type") != "swin":
        raise ConfigError("backbone_config", f"model_type {cfg_get(bb, 'model_type')!r} is not supported",
                          "only Swin backbones can be converted")
    ffn = int(cfg_get(hf_config, "encoder_feedforward_dim", 1024))
    if ffn != 1024:
        raise ConfigError("encoder_feedforward_dim", f"{ffn} is not supported (TAO hard-codes 1024)",
                          "convert a model with encoder_feedforward_dim=1024")
    act = cfg_get(hf_config, "activation_function", "relu")
    if act != "relu":
        raise ConfigError("activation_function", f"{act!r} is not supported", "only relu is implemented")
    embed_dim = int(cfg_get(bb, "embed_dim"))
    depths = [int(d) for d in cfg_get(bb, "depths")]
    heads = [int(h) for h in cfg_get(bb, "num_heads")]
    swin_type = "custom"
    for name, (e, d, h) in SWIN_PRESETS.items():
        if (e, list(d), list(h)) == (embed_dim, depths, heads):
            swin_type = name
            break
    num_labels = cfg_get(hf_config, "num_labels")
    if num_labels is None:
        id2label = cfg_get(hf_config, "id2label") or {}
        num_labels = len(id2label)
    swin = {
        "type": swin_type,
        "embed_dim": embed_dim,
        "depths": depths,
        "num_heads": heads,
        "patch_size": int(cfg_get(bb, "patch_size", 4)),
        "window_size": int(cfg_get(bb, "window_size", 7)),
        "mlp_ratio": float(cfg_get(bb, "mlp_ratio", 4.0)),
        "qkv_bias": bool(cfg_get(bb, "qkv_bias", True)),
        "drop_rate": float(cfg_get(bb, "hidden_dropout_prob", 0.0)),
        "attn_drop_rate": float(cfg_get(bb, "attention_probs_dropout_prob", 0.0)),
        "drop_path_rate": float(cfg_get(bb, "drop_path_rate", 0.1)),
        "ape": bool(cfg_get(bb, "use_absolute_embeddings", False)),
        "patch_norm": True,
        "pretrain_img_size": int(cfg_get(bb, "image_size", 224)),
        "out_features": ["res2", "res3", "res4", "res5"],
    }
    return {
        "model": {
            "backbone": {"type": "swin", "swin": swin},
            "sem_seg_head": {
                "common_stride": int(cfg_get(hf_config, "common_stride", 4)),
                "transformer_enc_layers": int(cfg_get(hf_config, "encoder_layers", 6)),
                "convs_dim": int(cfg_get(hf_config, "feature_size", 256)),
                "mask_dim": int(cfg_get(hf_config, "mask_feature_size", 256)),
                "num_classes": int(num_labels),
            },
            "mask_former": {
                "dropout": float(cfg_get(hf_config, "dropout", 0.0)),
                "nheads": int(cfg_get(hf_config, "num_attention_heads", 8)),
                "num_object_queries": int(cfg_get(hf_config, "num_queries", 100)),
                "hidden_dim": int(cfg_get(hf_config, "hidden_dim", 256)),
                "dim_feedforward": int(cfg_get(hf_config, "dim_feedforward", 2048)),
                "dec_layers": int(cfg_get(hf_config, "decoder_layers", 10)),
                "pre_norm": bool(cfg_get(hf_config, "pre_norm", False)),
                "class_weight": float(cfg_get(hf_config, "class_weight", 2.0)),
                "dice_weight": float(cfg_get(hf_config, "dice_weight", 5.0)),
                "mask_weight": float(cfg_get(hf_config, "mask_weight", 5.0)),
                "no_object_weight": float(cfg_get(hf_config, "no_object_weight", 0.1)),
                "deep_supervision": bool(cfg_get(hf_config, "use_auxiliary_loss", True)),
            },
        }
    }
