"""Key remapping from Hugging Face ``GroundingDinoForObjectDetection`` state dicts to this package's names.

Pure renaming plus the one structural change the layouts need: HF keeps separate ``query/key/value`` (and Swin
``q_proj/k_proj/v_proj``) linears where TAO uses fused ``in_proj_weight``/``qkv`` tensors, which are the three
matrices concatenated in q, k, v order along the output axis.  HF-only leftovers (Swin's final ``layernorm``,
cached index buffers) are dropped.  The mask head (``controller``, ``mask_head``) has no HF counterpart.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["hf_to_ours_state_dict"]

_SWIN = "model.backbone.conv_encoder.model."
_SWIN_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.o_proj": "attn.proj",
    "attention.output.dense": "attn.proj",
    "attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_FUSION = {
    "vision_param": "gamma_v", "text_param": "gamma_l",
    "layer_norm_vision": "layer_norm_v", "layer_norm_text": "layer_norm_l",
    "attn.vision_proj": "attn.v_proj", "attn.text_proj": "attn.l_proj",
    "attn.values_vision_proj": "attn.values_v_proj", "attn.values_text_proj": "attn.values_l_proj",
    "attn.out_vision_proj": "attn.out_v_proj", "attn.out_text_proj": "attn.out_l_proj",
}
_TEXT_LAYER = {"fc1": "linear1", "fc2": "linear2", "layer_norm_before": "norm1", "layer_norm_after": "norm2",
               "self_attn.out_proj": "self_attn.out_proj"}
_DEFORM_LAYER = {"self_attn_layer_norm": "norm1", "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm2"}
_DEC_LAYER = {
    "self_attn.out_proj": "self_attn.out_proj", "self_attn_layer_norm": "norm2",
    "encoder_attn_text.out_proj": "ca_text.out_proj", "encoder_attn_text_layer_norm": "catext_norm",
    "encoder_attn_layer_norm": "norm1", "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm3",
}
_TOP = {
    "model.text_projection.": "feat_map.",
    "model.level_embed": "transformer.level_embed",
    "model.query_position_embeddings.": "transformer.tgt_embed.",
    "model.enc_output.": "transformer.enc_output.",
    "model.enc_output_norm.": "transformer.enc_output_norm.",
    "model.encoder_output_bbox_embed.": "transformer.enc_out_bbox_embed.",
    "model.decoder.layer_norm.": "transformer.decoder.norm.",
    "model.decoder.reference_points_head.": "transformer.decoder.ref_point_head.",
    "model.reference_points.": "transformer.refpoint_embed.",
}


def _sub(rest: str, table: Mapping[str, str]) -> str | None:
    """Rename the module path at the start of ``rest`` (``<module>.<param>``) using ``table``; None if absent."""
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):]
    return None


def _swin_key(rest: str) -> str | None:
    """HF SwinBackbone key (after ``conv_encoder.model.`` and an optional ``swin.``) → TAO Swin key (after
    ``backbone.0.body.``)."""
    if rest.startswith("layernorm.") or rest.endswith("relative_position_index"):
        return None
    if rest.startswith("embeddings.patch_embeddings.projection."):
        return "patch_embed.proj." + rest.rsplit(".", 1)[1]
    if rest.startswith("embeddings.norm."):
        return "patch_embed.norm." + rest.rsplit(".", 1)[1]
    m = re.match(r"hidden_states_norms\.stage(\d+)\.(.+)$", rest)
    if m:
        return f"norm{int(m.group(1)) - 1}.{m.group(2)}"
    m = re.match(r"encoder\.layers\.(\d+)\.downsample\.(.+)$", rest)
    if m:
        return f"layers.{m.group(1)}.downsample.{m.group(2)}"
    m = re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", rest)
    if m:
        inner = _sub(m.group(3), _SWIN_BLOCK)
        if inner is not None:
            return f"layers.{m.group(1)}.blocks.{m.group(2)}.{inner}"
    return None


def _fuse(out: dict, target: str, parts: Mapping[str, torch.Tensor]) -> None:
    """Concatenate the ``q``, ``k``, ``v`` tensors of ``parts`` into ``out[target]``; KeyError if one is missing."""
    missing = [n for n in ("q", "k", "v") if n not in parts]
    if missing:
        raise KeyError(f"{target}: missing {missing} in the HF state dict")
    out[target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)


def hf_to_ours_state_dict(hf_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a ``GroundingDinoForObjectDetection.state_dict()`` to :class:`MaskGDinoModel` keys.

    Tensors are not copied or modified except for the q/k/v concatenations.  The shared box head is written under
    every ``bbox_embed.{i}`` / ``transformer.decoder.bbox_embed.{i}`` key (i over the decoder layers), even when the
    HF dict holds only one tied copy.  Unknown keys raise ``KeyError`` (a new HF layout is noticed rather than
    silently skipped).
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}

    def stash(target: str, part: str, value: torch.Tensor) -> None:
        fused.setdefault(target, {})[part] = value

    for key, value in hf_sd.items():
        if key.startswith(_SWIN):
            # in memory (transformers 5) the Swin sits under `swin.`; files on disk and the hub omit it
            rest = key[len(_SWIN):]
            rest = rest[len("swin."):] if rest.startswith("swin.") else rest
            m = re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.(?:self\.)?"
                         r"(q_proj|k_proj|v_proj|query|key|value)\.(weight|bias)$", rest)
            if m:
                part = m.group(3)[0]  # q_proj/query -> q, k_proj/key -> k, v_proj/value -> v
                stash(f"backbone.0.body.layers.{m.group(1)}.blocks.{m.group(2)}.attn.qkv.{m.group(4)}", part, value)
                continue
            new = _swin_key(rest)
            if new is None:
                if rest.startswith("layernorm.") or rest.endswith("relative_position_index"):
                    continue
                raise KeyError(f"unmapped HF Swin key: {key}")
            out["backbone.0.body." + new] = value
            continue
        if key.startswith("model.text_backbone."):
            if ".pooler." in key or key.endswith("position_ids"):
                continue
            out["bert." + key[len("model.text_backbone."):]] = value
            continue
        m = re.match(r"model\.input_proj_vision\.(.+)$", key)
        if m:
            out["input_proj." + m.group(1)] = value
            continue
        m = re.match(r"model\.encoder\.layers\.(\d+)\.(text_enhancer_layer|fusion_layer|deformable_layer)\.(.+)$",
                     key)
        if m:
            i, kind, rest = m.groups()
            if kind == "text_enhancer_layer":
                q = re.match(r"self_attn\.(query|key|value)\.(weight|bias)$", rest)
                if q:
                    stash(f"transformer.encoder.text_layers.{i}.self_attn.in_proj_{q.group(2)}", q.group(1)[0], value)
                    continue
                new = _sub(rest, _TEXT_LAYER)
                base = f"transformer.encoder.text_layers.{i}."
            elif kind == "fusion_layer":
                new = _sub(rest, _FUSION)
                base = f"transformer.encoder.fusion_layers.{i}."
            else:
                new = rest if rest.startswith("self_attn.") else _sub(rest, _DEFORM_LAYER)
                base = f"transformer.encoder.layers.{i}."
            if new is None:
                raise KeyError(f"unmapped HF encoder key: {key}")
            out[base + new] = value
            continue
        m = re.match(r"model\.decoder\.layers\.(\d+)\.(.+)$", key)
        if m:
            i, rest = m.groups()
            base = f"transformer.decoder.layers.{i}."
            q = re.match(r"(self_attn|encoder_attn_text)\.(query|key|value)\.(weight|bias)$", rest)
            if q:
                name = "self_attn" if q.group(1) == "self_attn" else "ca_text"
                stash(f"{base}{name}.in_proj_{q.group(3)}", q.group(2)[0], value)
                continue
            if rest.startswith("encoder_attn.") and not rest.startswith("encoder_attn_"):
                out[base + "cross_attn." + rest[len("encoder_attn."):]] = value
                continue
            new = _sub(rest, _DEC_LAYER)
            if new is None:
                raise KeyError(f"unmapped HF decoder key: {key}")
            out[base + new] = value
            continue
        m = re.match(r"(?:model\.decoder\.)?bbox_embed\.(\d+)\.(.+)$", key)
        if m:
            prefix = "transformer.decoder.bbox_embed." if key.startswith("model.decoder.") else "bbox_embed."
            out[f"{prefix}{m.group(1)}.{m.group(2)}"] = value
            continue
        new = None
        for src, dst in _TOP.items():
            if key == src or key.startswith(src):
                new = dst + key[len(src):]
                break
        if new is None:
            raise KeyError(f"unmapped HF key: {key}")
        out[new] = value

    for target, parts in fused.items():
        _fuse(out, target, parts)
    # the box head is shared by every decoder layer; a file saved with tied weights deduplicated may hold it once
    layers = {int(k.split(".")[3]) for k in out if k.startswith("transformer.decoder.layers.")}
    head = {}
    for k, v in out.items():
        m = re.match(r"(?:transformer\.decoder\.)?bbox_embed\.\d+\.(.+)$", k)
        if m:
            head.setdefault(m.group(1), v)
    for i in sorted(layers) if head else ():
        for name, v in head.items():
            out.setdefault(f"bbox_embed.{i}.{name}", v)
            out.setdefault(f"transformer.decoder.bbox_embed.{i}.{name}", v)
    return out
