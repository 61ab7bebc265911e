"""The MAL weight layouts users already have, as :class:`~networks.common.weight_formats.WeightFormat` s.

MAL's *model* is the LightningModule itself (``Network.weights_prefix == ""``): converted keys are
``student.<MALNetwork key>`` and ``teacher.<MALNetwork key>``, the layout of a tao-cli MAL checkpoint.

Formats, most specific first:

* ``tao`` — a TAO Toolkit MAL checkpoint (TAO 6.25.7+, timm ViT backbone; also tao-cli's own) or any dict with
  the same keys: ``student.backbone.<timm ViT>``, ``student.roi_head.mlp{1,2}.*``,
  ``student.mask_head.convs.<i>.conv.*`` and the same under ``teacher.``.  Key names come from TAO's
  ``nvidia_tao_pytorch/cv/mal/models/mal.py`` (``MAL.student`` / ``MAL.teacher`` = ``MALStudentNetwork`` /
  ``MALTeacherNetwork`` with ``backbone``, ``roi_head`` (``mlp1``, ``relu``, ``mlp2``) and ``mask_head.convs``
  of ``ConvModule`` (``conv``, ``activate``), ``nvidia_tao_pytorch/core/modules/conv_module.py``) and
  ``cv/backbone_v2/vit.py`` (a timm ``VisionTransformer`` subclass, no extra parameters); the metrics'
  states are non-persistent, so a checkpoint holds ``student.*`` and ``teacher.*`` only.  A file with the
  student alone fills the teacher from it, as TAO's pretrained loading does for both networks.
* ``convstem`` — TAO 5.0–6.0 and NVlabs MAL (github NVlabs/mask-auto-labeler ``models/mal.py``; TAO's
  ``cv/mal/models/mal.py`` at 5.x): the same ``student.``/``teacher.`` naming and heads, with the ConvStem ViT of
  ``models/vision_transformers.py`` (TAO: ``cv/backbone/vision_transformer.py``): ``backbone.patch_embed.proj.<i>.
  <j>.*`` instead of ``patch_embed.proj.weight``, and no ``backbone.head.*`` (their classifier is an Identity).
  These are exactly our keys when the spec sets ``model.patch_embed: convstem``
  (:class:`~networks.backbones.vit.ConvStemPatchEmbed`); with ``linear`` the load is refused in one line naming
  that field.  A student-only file fills the teacher, as for ``tao``.
* ``mae`` / ``deit`` / ``timm-vit`` — ImageNet ViT backbones (``part="backbone"``): Facebook MAE pre-training
  checkpoints (``{"model": ...}`` with ``blocks.*``, no classifier, optionally the decoder), DeiT releases
  (``{"model": ...}``; distilled ones add ``dist_token``/``head_dist``) and timm ViT state dicts.  They fill the
  student's and the teacher's backbone; the heads are newly initialised; a ``pos_embed`` for another grid is
  resampled to the 224-pixel grid of the model.
"""
from __future__ import annotations

from typing import Any

import torch

from networks.common.errors import CheckpointError
from networks.common.weight_formats import WeightFormat, WeightSource, has_keys

__all__ = ["FORMATS", "weight_formats"]

_HEADS = ("student.roi_head.*", "student.mask_head.*", "teacher.roi_head.*", "teacher.mask_head.*")
# MAE: decoder and mask token; DeiT: distillation token/head; timm: fc_norm when pooling by average.
_BACKBONE_BENIGN = ("*.backbone.decoder_*", "*.backbone.decoder.*", "*.backbone.mask_token",
                    "*.backbone.head_dist.*", "*.backbone.dist_token", "*.backbone.fc_norm.*")
_VIT_CORE = ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "pos_embed", "cls_token")


def _is_convstem(src: WeightSource) -> bool:
    return has_keys(src, "*patch_embed.proj.0.*")


def _detect_tao(src: WeightSource) -> bool:
    return (not _is_convstem(src)) and has_keys(src, "student.backbone.patch_embed.proj.weight",
                                                 "student.roi_head.mlp1.weight", "student.mask_head.convs.0.conv.weight")


def _patch_embed_of(model_cfg: Any, default: str) -> str:
    # No spec (``tao weights convert`` without -e): the file decides.
    return str(getattr(model_cfg, "patch_embed", default)) if model_cfg is not None else default


#: what each patch embedding's checkpoints are, for the message when the spec selects the other one
_EMBED_ORIGIN = {"linear": "a linear patch embedding (TAO 6.25.7+ or tao-cli)",
                 "convstem": "a ConvStem patch embedding (TAO 5.0-6.0 or NVlabs MAL)"}


def _require_patch_embed(src: WeightSource, model_cfg: Any, file_embed: str) -> None:
    chosen = _patch_embed_of(model_cfg, file_embed)
    if chosen != file_embed:
        raise CheckpointError(str(src.path), f"is a MAL checkpoint with {_EMBED_ORIGIN[file_embed]} but "
                              f"model.patch_embed is '{chosen}'", f"set model.patch_embed={file_embed}")


def _tao_to_state_dict(src: WeightSource, model_cfg: Any) -> dict[str, torch.Tensor]:
    _require_patch_embed(src, model_cfg, "linear")
    return _student_teacher(src)


def _student_teacher(src: WeightSource) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in src.tensors.items() if k.startswith(("student.", "teacher."))}
    if not any(k.startswith("teacher.") for k in state):
        state.update({"teacher." + k[len("student."):]: v for k, v in list(state.items())})
    # Keys outside student/teacher (an optimizer-free Lightning dict has none) are returned as they are, so that
    # the load report lists them as keys without a place instead of hiding them.
    state.update({k: v for k, v in src.tensors.items() if not k.startswith(("student.", "teacher."))})
    return state


def _convstem_to_state_dict(src: WeightSource, model_cfg: Any) -> dict[str, torch.Tensor]:
    """``student.*``/``teacher.*`` as they are (our ConvStem backbone has ORIG's names); ``model_cfg`` (when given)
    must select that backbone."""
    _require_patch_embed(src, model_cfg, "convstem")
    return _student_teacher(src)


def _backbone_tensors(src: WeightSource) -> dict[str, torch.Tensor]:
    tensors = dict(src.tensors)
    if any(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    if not any(k.startswith("blocks.") for k in tensors):
        picked = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        tensors = picked or tensors
    return tensors


def _detect_vit(src: WeightSource) -> bool:
    t = _backbone_tensors(src)
    return all(k in t for k in _VIT_CORE) and t["patch_embed.proj.weight"].ndim == 4


def _detect_mae(src: WeightSource) -> bool:
    t = _backbone_tensors(src)
    return _detect_vit(src) and "head.weight" not in t and (
        "mask_token" in t or any(k.startswith("decoder") for k in t) or "norm.weight" in t)


def _detect_deit(src: WeightSource) -> bool:
    t = _backbone_tensors(src)
    distilled = "dist_token" in t or any(k.startswith("head_dist.") for k in t)
    # DeiT releases wrap the weights as {"model": ...}, timm state dicts are bare; both carry head.weight.
    return _detect_vit(src) and (distilled or ("head.weight" in t and src.wrapper == "model"))


def _vit_to_state_dict(src: WeightSource, model_cfg: Any) -> dict[str, torch.Tensor]:
    """The backbone tensors under ``student.backbone.`` and ``teacher.backbone.`` (TAO loads the same file into
    both networks); ``pos_embed`` resampled to the model's ``224 // patch`` grid; a distillation token's position
    dropped."""
    chosen = _patch_embed_of(model_cfg, "linear")
    if chosen != "linear":
        raise CheckpointError(str(src.path), "is a ViT with a linear patch embedding (MAE/DeiT/timm) but "
                              f"model.patch_embed is '{chosen}'", "set model.patch_embed=linear")
    t = _backbone_tensors(src)
    pos = t["pos_embed"]
    patch = int(t["patch_embed.proj.weight"].shape[-1])
    n_prefix = 2 if "dist_token" in t else 1
    side = 224 // patch
    if pos.ndim == 3 and pos.shape[1] != side * side + 1:
        from timm.layers import resample_abs_pos_embed

        if n_prefix == 2:
            pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
        old = int(round((pos.shape[1] - 1) ** 0.5))
        if old * old == pos.shape[1] - 1:
            pos = resample_abs_pos_embed(pos.float(), new_size=[side, side], old_size=[old, old],
                                         num_prefix_tokens=1).to(t["pos_embed"].dtype)
    elif n_prefix == 2:
        pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    t["pos_embed"] = pos
    out: dict[str, torch.Tensor] = {}
    for net in ("student", "teacher"):
        out.update({f"{net}.backbone.{k}": v for k, v in t.items()})
    return out


def weight_formats() -> list[WeightFormat]:
    """MAL's formats, most specific first (see the module docstring)."""
    return [
        WeightFormat("tao", "mal", "model",
                     "MAL Lightning checkpoint (TAO 6.25.7+ or tao-cli): student.*/teacher.* with a timm ViT",
                     _detect_tao, _tao_to_state_dict),
        WeightFormat("convstem", "mal", "model",
                     "MAL checkpoint with a ConvStem ViT (TAO 5.0-6.0, NVlabs MAL): needs model.patch_embed=convstem",
                     _is_convstem, _convstem_to_state_dict),
        WeightFormat("mae", "mal", "backbone",
                     "MAE pre-trained ViT (mae_pretrain_vit_*.pth, no classifier): backbone only",
                     _detect_mae, _vit_to_state_dict, new_parts=_HEADS + ("*.backbone.head.*",),
                     benign=_BACKBONE_BENIGN),
        WeightFormat("deit", "mal", "backbone",
                     "DeiT ImageNet ViT ({'model': ...}, optionally distilled): backbone only",
                     _detect_deit, _vit_to_state_dict, new_parts=_HEADS, optional_parts=("*.backbone.head.*",),
                     benign=_BACKBONE_BENIGN),
        WeightFormat("timm-vit", "mal", "backbone",
                     "timm VisionTransformer state dict (blocks.*, patch_embed.proj.weight): backbone only",
                     _detect_vit, _vit_to_state_dict, new_parts=_HEADS + ("*.backbone.head.*",),
                     optional_parts=("*.backbone.head.*",), benign=_BACKBONE_BENIGN),
    ]


#: the name ``Network.weight_formats`` points at
FORMATS = weight_formats
