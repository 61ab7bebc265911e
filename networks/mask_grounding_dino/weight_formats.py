"""The weight layouts Mask Grounding DINO converts, most specific first (:func:`formats`).

Converted keys are the keys of :class:`~networks.mask_grounding_dino.model.MaskGDinoModel` (``module.model``),
which are TAO's / IDEA's names with the Swin under ``backbone.0.body.``:

* ``ours`` — a tao-cli checkpoint: tagged ``tao_model: mask_grounding_dino``, or untagged with the Lightning
  module's ``model.<key>`` names, or bare ``<key>`` names (``backbone.0.body.*``, ``transformer.*``).
* ``tao`` — a TAO-trained Mask Grounding DINO / Grounding DINO Lightning checkpoint: ``model.model.<key>`` (TAO's
  ``MaskGDINOModel`` holds ``MaskGroundingDINO`` as ``.model``, which the Lightning module holds as ``.model``;
  ``nvidia_tao_pytorch/cv/mask_grounding_dino/model/build_nn_model.py``).  A Grounding DINO checkpoint has no mask
  head: ``controller.*`` / ``mask_head.*`` are newly initialised.
* ``idea`` — IDEA-Research ``groundingdino_swin{t,b}_*.pth``: ``{"model": {"module.<key>": ...}}`` with the Swin
  directly under ``backbone.0.`` (IDEA's ``Joiner`` is ``nn.Sequential(backbone, position_embedding)``), a BERT
  pooler and, in released files, ``label_enc`` / ``bert.embeddings.position_ids`` (dropped, as TAO's
  ``grounding_dino_parser`` does).  No mask head.
* ``hf`` — a Hugging Face ``GroundingDinoForObjectDetection`` directory (``config.json`` + safetensors/bin) or
  weights file: renamed by :func:`~networks.mask_grounding_dino.convert.hf_to_ours_state_dict` (text encoder
  included); the config is checked against the spec's model section.  No mask head.

Every format may lack the ReLA branch (``rela.*``, tao-cli only).  Keys with no slot in the model that releases
carry (BERT pooler, ``position_ids``, ``label_enc``, Swin ``head``/final ``norm``) are dropped silently.
"""
from __future__ import annotations

from typing import Any

import torch

from networks.common.config import cfg_get
from networks.common.errors import CheckpointError
from networks.common.weight_formats import WeightFormat, WeightSource, has_keys

__all__ = ["formats", "backbone_formats", "NEW_MASK_HEAD", "tao_to_ours", "idea_to_ours", "hf_config_mismatch"]

_NET = "mask_grounding_dino"
#: keys of our model no Grounding DINO detector file carries: the dynamic mask head (TAO-only)
NEW_MASK_HEAD = ("controller.*", "mask_head.*")
#: the ReLA region-query branch exists only in tao-cli (``model.loss_types`` with ``rela``)
_RELA = ("rela.*",)
_BENIGN = ("bert.pooler.*", "*.position_ids", "label_enc.*", "*.attn_mask", "backbone.0.body.norm.*",
           "backbone.0.body.head.*")


# ------------------------------------------------------------------------------------------------ ours
def _has_ours_keys(src: WeightSource, prefix: str) -> bool:
    return (has_keys(src, f"{prefix}backbone.0.body.*", f"{prefix}transformer.*")
            and not has_keys(src, "model.model.*"))


def _ours_detect(src: WeightSource) -> bool:
    return src.tao_model == _NET or _has_ours_keys(src, "model.") or _has_ours_keys(src, "")


def _ours_convert(src: WeightSource, model_cfg: Any) -> dict[str, torch.Tensor]:
    sd = src.tensors
    if any(k.startswith("model.") for k in sd):  # the Lightning module holds the network as `model`
        return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return dict(sd)


# ------------------------------------------------------------------------------------------------- tao
def _body(key: str) -> str:
    """``backbone.0.<swin key>`` → ``backbone.0.body.<swin key>`` (IDEA's Joiner holds the Swin directly)."""
    if key.startswith("backbone.0.") and not key.startswith("backbone.0.body."):
        return "backbone.0.body." + key[len("backbone.0."):]
    return key


def tao_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TAO Lightning keys ``model.model.<key>`` → ``<key>``; other entries are kept as they are (and so reported
    as unexpected by the load)."""
    return {_body(k[len("model.model."):]) if k.startswith("model.model.") else k: v for k, v in sd.items()}


def _tao_detect(src: WeightSource) -> bool:
    return has_keys(src, "model.model.transformer.*", "model.model.backbone.0.*")


# ------------------------------------------------------------------------------------------------ idea
def _strip_module(key: str) -> str:
    while key.startswith("module."):  # DDP / EMA wrappers, as in IDEA's released files
        key = key[len("module."):]
    return key


def idea_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """IDEA GroundingDINO keys (optionally ``module.``-prefixed) → ours: ``backbone.0.<swin>`` →
    ``backbone.0.body.<swin>``, every other name unchanged."""
    return {_body(_strip_module(k)): v for k, v in sd.items()}


def _idea_detect(src: WeightSource) -> bool:
    keys = [_strip_module(k) for k in src.tensors]
    return (any(k.startswith("backbone.0.") and not k.startswith("backbone.0.body.") for k in keys)
            and any(k.startswith("transformer.") for k in keys) and any(k.startswith("bert.") for k in keys))


# -------------------------------------------------------------------------------------------------- hf
def _hf_detect(src: WeightSource) -> bool:
    if src.config and src.config.get("model_type") not in (None, "grounding-dino"):
        return False
    return has_keys(src, "model.backbone.conv_encoder.model.*", "model.text_backbone.*")


def _spec_swin(model_cfg: Any) -> tuple[int, list[int], list[int], int] | None:
    """(embed_dim, depths, num_heads, window_size) the spec builds; None for an unknown backbone name."""
    from networks.backbones.swin_presets import swin_backbone

    name = str(cfg_get(model_cfg, "backbone", "swin_tiny_224_1k"))
    if name == "swin_custom":
        sw = cfg_get(model_cfg, "swin")
        return (int(cfg_get(sw, "embed_dim", 96)), list(cfg_get(sw, "depths", [2, 2, 6, 2])),
                list(cfg_get(sw, "num_heads", [3, 6, 12, 24])), int(cfg_get(sw, "window_size", 7)))
    return swin_backbone(name)


def _text_encoder_config(model_cfg: Any) -> dict | None:
    """``config.json`` of the spec's text encoder (``model.text_encoder_type``), or None when it cannot be found."""
    import json

    from networks.mask_grounding_dino.text_encoder import resolve_text_encoder

    try:
        return json.loads((resolve_text_encoder(cfg_get(model_cfg, "text_encoder_type", "")) / "config.json")
                          .read_text())
    except Exception:  # noqa: BLE001 - an unresolvable encoder is reported when the model is built
        return None


def hf_config_mismatch(config: dict, model_cfg: Any) -> str | None:
    """The first field where an HF ``GroundingDinoConfig`` (``config.json`` as saved, defaults filled in by
    transformers) and the spec's ``model`` section build different weights, as one phrase; None when they agree.
    Without ``model_cfg`` only the layouts this network cannot hold are refused (unshared decoder box heads,
    single-stage)."""
    from transformers import GroundingDinoConfig

    hf = GroundingDinoConfig.from_dict(dict(config))
    if not getattr(hf, "decoder_bbox_embed_share", True):
        return "decoder_bbox_embed_share=false (one box head per decoder layer) is not supported"
    if not getattr(hf, "two_stage", True):
        return "two_stage=false is not supported (tao-cli's HF mapping covers the two-stage model)"
    if model_cfg is None:
        return None
    pairs = [("d_model", "hidden_dim"), ("encoder_layers", "enc_layers"), ("decoder_layers", "dec_layers"),
             ("num_queries", "num_queries"), ("encoder_ffn_dim", "dim_feedforward"),
             ("encoder_attention_heads", "nheads"), ("num_feature_levels", "num_feature_levels"),
             ("encoder_n_points", "enc_n_points"), ("decoder_n_points", "dec_n_points")]
    for theirs, ours in pairs:
        a, b = getattr(hf, theirs), cfg_get(model_cfg, ours)
        if b is not None and int(a) != int(b):
            return f"HF config {theirs}={a} differs from model.{ours}={b}"
    sw = hf.backbone_config
    swin = _spec_swin(model_cfg)
    if sw is not None and swin is not None:
        for name, a, b in zip(("embed_dim", "depths", "num_heads", "window_size"),
                              (sw.embed_dim, list(sw.depths), list(sw.num_heads), sw.window_size), swin, strict=True):
            if a != b:
                return (f"HF Swin {name}={a} differs from {b} of model.backbone="
                        f"{cfg_get(model_cfg, 'backbone', 'swin_tiny_224_1k')}")
    text = _text_encoder_config(model_cfg)
    if text is not None and hf.text_config is not None:
        for name in ("hidden_size", "num_hidden_layers"):
            a, b = getattr(hf.text_config, name), text.get(name)
            if b is not None and int(a) != int(b):
                return (f"HF text encoder {name}={a} differs from {b} of model.text_encoder_type="
                        f"{cfg_get(model_cfg, 'text_encoder_type')}")
    return None


def _relative_position_indices(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Swin ``relative_position_index`` buffer of every block whose bias table is in ``sd`` (HF files do not
    store it: it is a function of the window size, read from the table's ``(2w−1)²`` rows)."""
    from networks.backbones.swin import WindowAttention

    out: dict[str, torch.Tensor] = {}
    cache: dict[int, torch.Tensor] = {}
    for key, table in sd.items():
        if key.endswith(".relative_position_bias_table"):
            window = (int(round(table.shape[0] ** 0.5)) + 1) // 2
            if window not in cache:
                cache[window] = WindowAttention(1, window, 1).relative_position_index
            out[key[: -len("relative_position_bias_table")] + "relative_position_index"] = cache[window].clone()
    return out


def _hf_convert(src: WeightSource, model_cfg: Any) -> dict[str, torch.Tensor]:
    from networks.mask_grounding_dino.convert import hf_to_ours_state_dict

    if src.config:
        problem = hf_config_mismatch(src.config, model_cfg)
        if problem:
            raise CheckpointError(str(src.path), problem,
                                  "use a spec whose model section matches the checkpoint (or other weights)")
    try:
        sd = hf_to_ours_state_dict(src.tensors)
    except KeyError as exc:
        raise CheckpointError(str(src.path), f"has a Hugging Face Grounding DINO key tao-cli cannot map "
                              f"({exc.args[0] if exc.args else exc})",
                              "use a directory written by GroundingDinoForObjectDetection.save_pretrained") from None
    sd.update(_relative_position_indices(sd))
    return sd


# ------------------------------------------------------------------------------------------------ list
def formats() -> list[WeightFormat]:
    """Mask Grounding DINO's weight formats, most specific first (``Network.weight_formats``)."""
    return [
        WeightFormat("ours", _NET, "model", "tao-cli Mask Grounding DINO checkpoint (tao_model tag or model.* keys)",
                     _ours_detect, _ours_convert, new_parts=_RELA, benign=_BENIGN),
        WeightFormat("tao", _NET, "model",
                     "TAO-trained Mask Grounding DINO / Grounding DINO checkpoint (model.model.* keys)",
                     _tao_detect, lambda src, cfg: tao_to_ours(src.tensors), new_parts=NEW_MASK_HEAD + _RELA,
                     benign=_BENIGN),
        WeightFormat("idea", _NET, "model",
                     "IDEA-Research GroundingDINO release (groundingdino_swin*.pth; module.backbone.0.* keys)",
                     _idea_detect, lambda src, cfg: idea_to_ours(src.tensors), new_parts=NEW_MASK_HEAD + _RELA,
                     benign=_BENIGN),
        WeightFormat("hf", _NET, "model",
                     "Hugging Face GroundingDinoForObjectDetection directory (config.json + safetensors/bin)",
                     _hf_detect, _hf_convert, new_parts=NEW_MASK_HEAD + _RELA, benign=_BENIGN),
    ]


def _swin_part(fmt: WeightFormat, window_size: int):
    """Converter taking the Swin of a whole-model ``fmt`` (keys under ``backbone.0.body.``, prefix removed), its
    bias tables resized to ``window_size`` when the file's window differs."""
    from networks.backbones.swin_weights import convert_swin_state_dict

    prefix = "backbone.0.body."

    def convert(src: WeightSource, model_cfg: Any) -> dict[str, torch.Tensor]:
        full = fmt.to_state_dict(src, None)  # sizes outside the backbone do not matter here
        swin = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        return convert_swin_state_dict(swin, target_window=window_size, source=str(src.path))

    return convert


def backbone_formats(window_size: int) -> list[WeightFormat]:
    """Formats ``model.pretrained_backbone_path`` accepts, converted to keys of the Swin (load them with
    ``prefix="backbone.0.body."``): ImageNet releases (timm, Microsoft; :mod:`networks.backbones.swin_weights`) and
    the Swin part of every whole-model format of :func:`formats`.  Bias tables are resized to ``window_size``."""
    from networks.backbones.swin_weights import SWIN_NEW_PARTS, swin_formats

    out = list(swin_formats(_NET, "backbone", window_size=lambda cfg: window_size))
    for fmt in formats():
        out.append(WeightFormat(f"{fmt.name}-backbone", _NET, "backbone", f"the Swin of a {fmt.description}",
                                fmt.detect, _swin_part(fmt, window_size), new_parts=SWIN_NEW_PARTS))
    return out
