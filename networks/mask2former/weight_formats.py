"""The Mask2Former weight files users already have, as :class:`~networks.common.weight_formats.WeightFormat`\\ s.

Converters return keys of :class:`networks.mask2former.model.Mask2FormerModel` (``module.model``), which are the
original detectron2 / TAO names (``backbone.*``, ``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``)
with TAO's class order (row 0 = "no object").  Formats, most specific first (:func:`formats`):

* ``ours`` — a tao-cli (or TAO) checkpoint tagged ``tao_model: mask2former``: Lightning ``state_dict`` with
  ``model.`` + our keys (``criterion.*`` dropped).
* ``hf`` — a Hugging Face ``Mask2FormerForUniversalSegmentation`` directory or weights file (transformers 4 and 5
  key layouts, :mod:`networks.mask2former.convert`); with a spec, ``config.json`` is checked against it.
* ``detectron2`` — a facebookresearch/Mask2Former model-zoo ``.pkl`` (numpy arrays under ``"model"``, read without
  running code): the same names as ours; the class head is rolled (no-object last there), MaskFormer's
  ``static_query`` is ``query_feat``; ``criterion.empty_weight`` and ``pixel_mean``/``pixel_std`` are dropped.
* ``tao`` — an untagged TAO-trained checkpoint or a bare state dict with TAO's names (:func:`tao_checkpoint_layout`
  lists them); no class roll (TAO's row 0 is "no object" as ours).
* ``swin-timm`` / ``swin-microsoft`` — ImageNet Swin backbones (:mod:`networks.backbones.swin_weights`), keys
  ``backbone.*``; the head (``sem_seg_head.*``) and the per-stage norms are newly initialised.

The class head (another number of classes) and the query embeddings (another number of queries) may differ in
shape: they are re-initialised and reported.  Every other difference is an error.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import torch

from networks.backbones.swin_presets import SWIN_PRESETS
from networks.common.config import cfg_get
from networks.common.errors import CheckpointError
from networks.common.weight_formats import WeightFormat, WeightSource, has_keys

__all__ = ["formats", "FULL_MODEL_OPTIONAL", "check_hf_config", "tao_checkpoint_layout", "CLASS_HEAD_KEYS"]

log = logging.getLogger(__name__)

NETWORK = "mask2former"
CLASS_HEAD_KEYS = ("sem_seg_head.predictor.class_embed.weight", "sem_seg_head.predictor.class_embed.bias")
#: keys that may have another shape in a full-model file (other num_classes / num_object_queries): re-initialised
FULL_MODEL_OPTIONAL = ("sem_seg_head.predictor.class_embed.*", "sem_seg_head.predictor.query_feat.*",
                       "sem_seg_head.predictor.query_embed.*")


# ------------------------------------------------------------------------------------------------ ours / tao
def _lightning_state_dict(src: WeightSource, model_cfg: Any) -> dict[str, torch.Tensor]:
    """``model.`` + our keys (Lightning) or bare keys → our keys; ``criterion.*`` (TAO's ``empty_weight``) dropped."""
    sd = src.tensors
    if any(k.startswith("model.") for k in sd):
        return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return {k: v for k, v in sd.items() if not k.startswith("criterion.")}


def _detect_ours(src: WeightSource) -> bool:
    # a tagged file holding only a backbone (``tao weights convert`` of a Swin release) is a Swin format
    return src.tao_model == NETWORK and has_keys(src, "*sem_seg_head.predictor.*")


def _detect_tao(src: WeightSource) -> bool:
    if src.container not in ("torch", "safetensors"):
        return False
    return (has_keys(src, "model.backbone.layers.*", "model.sem_seg_head.predictor.*")
            or has_keys(src, "backbone.layers.*", "sem_seg_head.predictor.*"))


# --------------------------------------------------------------------------------------------------- HF
def _spec_swin(model_cfg: Any) -> tuple[int, list[int], list[int]]:
    swin = cfg_get(model_cfg, "backbone.swin")
    stype = cfg_get(swin, "type", "tiny")
    if stype in SWIN_PRESETS:
        e, d, h = SWIN_PRESETS[stype]
        return e, list(d), list(h)
    return (int(cfg_get(swin, "embed_dim", 96)), [int(x) for x in cfg_get(swin, "depths", [2, 2, 6, 2])],
            [int(x) for x in cfg_get(swin, "num_heads", [3, 6, 12, 24])])


def check_hf_config(config: dict, model_cfg: Any, source: str) -> list[str]:
    """Compare an HF ``config.json`` with the spec's ``model`` section.

    An architecture difference (Swin size, window, patch size, decoder sizes and depths, heads, pre_norm) raises
    one :class:`CheckpointError` naming the first differing field and both values.  Returns one line per field
    whose tensors will be re-initialised instead (``num_object_queries``, ``num_classes``).
    """
    from networks.mask2former.convert import hf_config_to_spec_overrides

    hf = hf_config_to_spec_overrides(config)["model"]
    hf_swin = hf["backbone"]["swin"]
    embed, depths, heads = _spec_swin(model_cfg)
    checks = [
        ("backbone.swin.embed_dim", hf_swin["embed_dim"], embed),
        ("backbone.swin.depths", hf_swin["depths"], depths),
        ("backbone.swin.num_heads", hf_swin["num_heads"], heads),
        ("backbone.swin.window_size", hf_swin["window_size"], int(cfg_get(model_cfg, "backbone.swin.window_size", 7))),
        ("backbone.swin.patch_size", hf_swin["patch_size"], int(cfg_get(model_cfg, "backbone.swin.patch_size", 4))),
    ]
    defaults = {"convs_dim": 256, "mask_dim": 256, "transformer_enc_layers": 6, "hidden_dim": 256,
                "dim_feedforward": 2048, "dec_layers": 10, "nheads": 8, "pre_norm": False}
    for section in ("sem_seg_head", "mask_former"):
        for name, value in hf[section].items():
            if name in defaults:
                spec_value = cfg_get(model_cfg, f"{section}.{name}", defaults[name])
                checks.append((f"{section}.{name}", value, type(value)(spec_value)))
    for field, file_value, spec_value in checks:
        if file_value != spec_value:
            raise CheckpointError(source, f"config.json has {field.split('.')[-1]}={file_value} but the spec has "
                                  f"model.{field}={spec_value}",
                                  f"set model.{field}: {file_value} to use these weights")
    notes = []
    for field, file_value in (("mask_former.num_object_queries", hf["mask_former"]["num_object_queries"]),
                              ("sem_seg_head.num_classes", hf["sem_seg_head"]["num_classes"])):
        spec_value = cfg_get(model_cfg, field)
        if spec_value is not None and int(spec_value) != int(file_value):
            notes.append(f"config.json has {field.split('.')[-1]}={file_value}, the spec model.{field}={spec_value}:"
                         f" {'query embeddings' if 'queries' in field else 'the class head'} will be re-initialised")
    return notes


def _detect_hf(src: WeightSource) -> bool:
    model_type = src.config.get("model_type")
    if model_type is not None and model_type != "mask2former":
        return False
    return has_keys(src, "model.pixel_level_module.*", "model.transformer_module.*", "class_predictor.weight")


def _hf_state_dict(src: WeightSource, model_cfg: Any) -> dict[str, torch.Tensor]:
    from networks.mask2former.convert import hf_to_tao_state_dict

    if model_cfg is not None and src.config:
        for note in check_hf_config(src.config, model_cfg, str(src.path)):
            log.info("%s: %s", src.path, note)
    num_classes = src.tensors["class_predictor.weight"].shape[0] - 1  # the file's classes (+ no object)
    return hf_to_tao_state_dict(src.tensors, num_classes)


# ---------------------------------------------------------------------------------------------- detectron2
def _detect_detectron2(src: WeightSource) -> bool:
    return src.container == "detectron2-pkl" and has_keys(src, "sem_seg_head.predictor.*", "backbone.*")


def _detectron2_state_dict(src: WeightSource, model_cfg: Any) -> dict[str, torch.Tensor]:
    """facebookresearch/Mask2Former module names are ours (``MaskFormer`` → ``backbone`` = D2SwinTransformer,
    ``sem_seg_head`` = MaskFormerHead with ``pixel_decoder`` = MSDeformAttnPixelDecoder and ``predictor`` =
    MultiScaleMaskedTransformerDecoder); only the class order differs.  ``criterion.empty_weight`` and
    ``pixel_mean``/``pixel_std`` (training buffers, no weights) are dropped."""
    out = {}
    for key, value in src.tensors.items():
        if key.startswith("criterion.") or key in ("pixel_mean", "pixel_std"):
            continue
        key = key.replace("static_query", "query_feat")  # MaskFormer (v1) zoo name of the content queries
        if key in CLASS_HEAD_KEYS:
            value = torch.roll(value, shifts=1, dims=0)  # no-object: last row there, row 0 here
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------- list
def formats() -> list[WeightFormat]:
    """Every Mask2Former weight format, most specific first (see the module docstring)."""
    from networks.backbones.swin_weights import swin_formats

    full = dict(network=NETWORK, part="model", optional_parts=FULL_MODEL_OPTIONAL)
    return [
        WeightFormat(name="ours", description="tao-cli/TAO Mask2Former checkpoint (tao_model: mask2former)",
                     detect=_detect_ours, to_state_dict=_lightning_state_dict, benign=("criterion.*",), **full),
        WeightFormat(name="hf", description="Hugging Face Mask2FormerForUniversalSegmentation (Swin) directory or "
                     "weights file (save_pretrained / hub snapshot)", detect=_detect_hf,
                     to_state_dict=_hf_state_dict, **full),
        WeightFormat(name="detectron2", description="facebookresearch/Mask2Former model-zoo .pkl (detectron2 "
                     "checkpoint of numpy arrays)", detect=_detect_detectron2,
                     to_state_dict=_detectron2_state_dict, **full),
        WeightFormat(name="tao", description="TAO-trained Mask2Former checkpoint without tag, or a bare state dict "
                     "with TAO's names (model.backbone.*, model.sem_seg_head.*)", detect=_detect_tao,
                     to_state_dict=_lightning_state_dict, **full),
        # a backbone file leaves the whole head (and the per-stage norms) newly initialised
        *(replace(f, new_parts=f.new_parts + ("sem_seg_head.*",)) for f in swin_formats(NETWORK, prefix="backbone.")),
    ]


# ------------------------------------------------------------------------------------- TAO's key layout
def tao_checkpoint_layout(model_cfg: Any) -> dict[str, list[int]]:
    """``{key: shape}`` of the Lightning ``state_dict`` TAO saves for a spec's ``model`` section, enumerated from
    TAO's module structure (NVIDIA/tao_pytorch_backend, not from our model):

    * ``cv/mask2former/model/pl_model.py``: ``Mask2formerPlModule.model`` = ``MaskFormerModel``,
      ``.criterion`` = ``SetCriterion`` (buffer ``empty_weight`` [C+1]);
    * ``cv/mask2former/model/mask2former.py``: ``MaskFormerModel.backbone`` = ``D2SwinTransformer``
      (``cv/mask2former/model/backbone/swin.py``, a ``cv/backbone_v2/swin.py`` SwinTransformer with
      ``num_classes=0`` → ``head`` is Identity, no ``post_norm``; blocks in ``cv/backbone_v2/swin_utils.py``:
      ``norm1, attn.{relative_position_bias_table, relative_position_index, qkv, proj}, norm2, mlp.{fc1, fc2}``,
      ``PatchMerging`` = ``downsample.{reduction, norm}`` at the end of stages 0..2, per-stage ``norm{i}``);
      ``.sem_seg_head`` = ``MaskFormerHead`` with ``pixel_decoder`` / ``predictor``;
    * ``cv/mask2former/model/pixel_decoder/msdeformattn.py``: ``input_proj.{l}.{0: Conv1x1, 1: GroupNorm}``
      (res5→res3), ``transformer.level_embed`` [3, D], ``transformer.encoder.layers.{k}.{self_attn (MSDeformAttn:
      sampling_offsets, attention_weights, value_proj, output_proj), norm1, linear1 (D→1024), linear2, norm2}``,
      ``mask_features`` Conv1x1, ``adapter_1`` (Conv1x1 no bias + ``norm``), ``layer_1`` (Conv3x3 no bias + ``norm``);
    * ``cv/mask2former/model/transformer_decoder/mask2former_transformer_decoder.py``:
      ``transformer_{self,cross}_attention_layers.{i}.{self_attn|multihead_attn}.{in_proj_weight, in_proj_bias,
      out_proj}, .norm``, ``transformer_ffn_layers.{i}.{linear1, linear2, norm}``, ``decoder_norm``,
      ``query_feat``, ``query_embed``, ``level_embed`` (Embedding(3, H)), ``input_proj`` (Conv1x1 only when
      convs_dim != hidden_dim), ``class_embed`` [C+1, H], ``mask_embed.layers.{0,1,2}``.

    Keys carry the Lightning ``model.`` prefix, as in TAO's ``.pth`` files.
    """
    out: dict[str, list[int]] = {}

    def add(key: str, *shape: int) -> None:
        out[key] = [int(s) for s in shape]

    # backbone (backbone_v2 SwinTransformer)
    embed, depths, heads = _spec_swin(model_cfg)
    swin = cfg_get(model_cfg, "backbone.swin")
    ws = int(cfg_get(swin, "window_size", 7))
    patch = int(cfg_get(swin, "patch_size", 4))
    mlp_ratio = float(cfg_get(swin, "mlp_ratio", 4.0))
    qkv_bias = bool(cfg_get(swin, "qkv_bias", True))
    b = "model.backbone."
    add(b + "patch_embed.proj.weight", embed, 3, patch, patch)
    add(b + "patch_embed.proj.bias", embed)
    if bool(cfg_get(swin, "patch_norm", True)):
        add(b + "patch_embed.norm.weight", embed)
        add(b + "patch_embed.norm.bias", embed)
    if bool(cfg_get(swin, "ape", False)):
        grid = int(cfg_get(swin, "pretrain_img_size", 384)) // patch
        add(b + "absolute_pos_embed", 1, embed, grid, grid)
    dims = [embed * 2 ** s for s in range(len(depths))]
    for s, (depth, nh) in enumerate(zip(depths, heads, strict=True)):
        c = dims[s]
        hidden = int(c * mlp_ratio)
        for blk in range(depth):
            p = f"{b}layers.{s}.blocks.{blk}."
            add(p + "norm1.weight", c)
            add(p + "norm1.bias", c)
            add(p + "attn.relative_position_bias_table", (2 * ws - 1) ** 2, nh)
            add(p + "attn.relative_position_index", ws * ws, ws * ws)
            add(p + "attn.qkv.weight", 3 * c, c)
            if qkv_bias:
                add(p + "attn.qkv.bias", 3 * c)
            add(p + "attn.proj.weight", c, c)
            add(p + "attn.proj.bias", c)
            add(p + "norm2.weight", c)
            add(p + "norm2.bias", c)
            add(p + "mlp.fc1.weight", hidden, c)
            add(p + "mlp.fc1.bias", hidden)
            add(p + "mlp.fc2.weight", c, hidden)
            add(p + "mlp.fc2.bias", c)
        if s < len(depths) - 1:
            add(f"{b}layers.{s}.downsample.reduction.weight", 2 * c, 4 * c)
            add(f"{b}layers.{s}.downsample.norm.weight", 4 * c)
            add(f"{b}layers.{s}.downsample.norm.bias", 4 * c)
    for i, c in enumerate(dims):  # out_indices (0, 1, 2, 3)
        add(f"{b}norm{i}.weight", c)
        add(f"{b}norm{i}.bias", c)

    # pixel decoder (MSDeformAttnPixelDecoder)
    d = int(cfg_get(model_cfg, "sem_seg_head.convs_dim", 256))
    mask_dim = int(cfg_get(model_cfg, "sem_seg_head.mask_dim", 256))
    enc_layers = int(cfg_get(model_cfg, "sem_seg_head.transformer_enc_layers", 6))
    nheads = int(cfg_get(model_cfg, "mask_former.nheads", 8))
    levels, points, enc_ffn = 3, 4, 1024
    pd = "model.sem_seg_head.pixel_decoder."
    for lvl, cin in enumerate(dims[1:][::-1]):  # res5, res4, res3
        add(f"{pd}input_proj.{lvl}.0.weight", d, cin, 1, 1)
        add(f"{pd}input_proj.{lvl}.0.bias", d)
        add(f"{pd}input_proj.{lvl}.1.weight", d)
        add(f"{pd}input_proj.{lvl}.1.bias", d)
    for k in range(enc_layers):
        p = f"{pd}transformer.encoder.layers.{k}."
        add(p + "self_attn.sampling_offsets.weight", nheads * levels * points * 2, d)
        add(p + "self_attn.sampling_offsets.bias", nheads * levels * points * 2)
        add(p + "self_attn.attention_weights.weight", nheads * levels * points, d)
        add(p + "self_attn.attention_weights.bias", nheads * levels * points)
        add(p + "self_attn.value_proj.weight", d, d)
        add(p + "self_attn.value_proj.bias", d)
        add(p + "self_attn.output_proj.weight", d, d)
        add(p + "self_attn.output_proj.bias", d)
        add(p + "norm1.weight", d)
        add(p + "norm1.bias", d)
        add(p + "linear1.weight", enc_ffn, d)
        add(p + "linear1.bias", enc_ffn)
        add(p + "linear2.weight", d, enc_ffn)
        add(p + "linear2.bias", d)
        add(p + "norm2.weight", d)
        add(p + "norm2.bias", d)
    add(pd + "transformer.level_embed", levels, d)
    add(pd + "mask_features.weight", mask_dim, d, 1, 1)
    add(pd + "mask_features.bias", mask_dim)
    common_stride = int(cfg_get(model_cfg, "sem_seg_head.common_stride", 4))
    num_fpn = int(math.log2(8) - math.log2(common_stride))  # res3 (stride 8) is the finest transformer level
    for i in range(num_fpn):
        add(f"{pd}adapter_{i + 1}.weight", d, dims[i], 1, 1)
        add(f"{pd}adapter_{i + 1}.norm.weight", d)
        add(f"{pd}adapter_{i + 1}.norm.bias", d)
        add(f"{pd}layer_{i + 1}.weight", d, d, 3, 3)
        add(f"{pd}layer_{i + 1}.norm.weight", d)
        add(f"{pd}layer_{i + 1}.norm.bias", d)

    # transformer decoder (MultiScaleMaskedTransformerDecoder)
    h = int(cfg_get(model_cfg, "mask_former.hidden_dim", 256))
    ffn = int(cfg_get(model_cfg, "mask_former.dim_feedforward", 2048))
    layers = int(cfg_get(model_cfg, "mask_former.dec_layers", 10)) - 1
    queries = int(cfg_get(model_cfg, "mask_former.num_object_queries", 100))
    classes = int(cfg_get(model_cfg, "sem_seg_head.num_classes", 150))
    pr = "model.sem_seg_head.predictor."
    for i in range(layers):
        for group, attn in (("transformer_self_attention_layers", "self_attn"),
                            ("transformer_cross_attention_layers", "multihead_attn")):
            p = f"{pr}{group}.{i}."
            add(p + f"{attn}.in_proj_weight", 3 * h, h)
            add(p + f"{attn}.in_proj_bias", 3 * h)
            add(p + f"{attn}.out_proj.weight", h, h)
            add(p + f"{attn}.out_proj.bias", h)
            add(p + "norm.weight", h)
            add(p + "norm.bias", h)
        p = f"{pr}transformer_ffn_layers.{i}."
        add(p + "linear1.weight", ffn, h)
        add(p + "linear1.bias", ffn)
        add(p + "linear2.weight", h, ffn)
        add(p + "linear2.bias", h)
        add(p + "norm.weight", h)
        add(p + "norm.bias", h)
    add(pr + "decoder_norm.weight", h)
    add(pr + "decoder_norm.bias", h)
    add(pr + "query_feat.weight", queries, h)
    add(pr + "query_embed.weight", queries, h)
    add(pr + "level_embed.weight", levels, h)
    if d != h:
        for lvl in range(levels):
            add(f"{pr}input_proj.{lvl}.weight", h, d, 1, 1)
            add(f"{pr}input_proj.{lvl}.bias", h)
    add(pr + "class_embed.weight", classes + 1, h)
    add(pr + "class_embed.bias", classes + 1)
    for j, (o, i) in enumerate(((h, h), (h, h), (mask_dim, h))):
        add(f"{pr}mask_embed.layers.{j}.weight", o, i)
        add(f"{pr}mask_embed.layers.{j}.bias", o)
    add("criterion.empty_weight", classes + 1)
    return out
