"""ImageNet Swin releases as weight formats: Microsoft's ``swin_*_patch4_window*.pth`` and timm's Swin names.

Both layouts convert to the keys of :class:`networks.backbones.swin.SwinTransformer` (no prefix); a network wraps
them with its own prefix (Mask2Former: ``backbone.``, Mask Grounding DINO: ``swin.``).

Microsoft layout (``microsoft/Swin-Transformer`` ``models/swin_transformer.py``; the release file is
``{"model": {...}}``) — the same names as ours, except that a classification release has a final ``norm`` and a
``head`` and no per-stage output norms ``norm{i}``::

    patch_embed.proj.{weight,bias}  patch_embed.norm.{weight,bias}  [absolute_pos_embed]
    layers.{s}.blocks.{b}.{norm1,norm2}.{weight,bias}
    layers.{s}.blocks.{b}.attn.{qkv,proj}.{weight,bias}
    layers.{s}.blocks.{b}.attn.relative_position_bias_table   [(2ws-1)^2, heads]
    layers.{s}.blocks.{b}.attn.relative_position_index        [ws^2, ws^2] buffer
    layers.{s}.blocks.{b}.attn_mask                           shifted blocks only, buffer
    layers.{s}.blocks.{b}.mlp.{fc1,fc2}.{weight,bias}
    layers.{s}.downsample.{reduction.weight,norm.weight,norm.bias}   s = 0 .. S-2 (end of a stage)
    norm.{weight,bias}   head.{weight,bias}

timm layout (``timm/models/swin_transformer.py`` >= 0.9, see its ``checkpoint_filter_fn``), differences only:

=====================================================  ==========================================================
timm                                                    Microsoft / ours
=====================================================  ==========================================================
``layers.{s}.downsample.*`` (s = 1 .. S-1: the start     ``layers.{s-1}.downsample.*`` (the end of the previous
of a stage; same PatchMerging tensors and channel        stage)
order)
``head.fc.{weight,bias}``                               ``head.{weight,bias}``
no ``relative_position_index`` / ``attn_mask``          persistent buffers (regenerated here from the table
(non-persistent buffers)                                size, dropped)
``layers_{s}.*`` (``features_only`` models)             ``layers.{s}.*``
=====================================================  ==========================================================

A relative-position bias table trained with another window size is bicubic-resized to the model's window
(:func:`networks.backbones.swin._interp_bias_table`) and the resize is logged; with ``interpolate=False`` it is a
:class:`CheckpointError`.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from networks.common.config import cfg_get
from networks.common.errors import CheckpointError

__all__ = ["swin_formats", "convert_swin_state_dict", "swin_layout", "timm_to_microsoft", "microsoft_to_timm",
           "relative_position_index", "unused_swin_keys", "SWIN_NEW_PARTS", "SWIN_UNUSED"]

log = logging.getLogger(__name__)

#: our keys no classification release carries: the per-stage output norms (left at init, reported as new)
SWIN_NEW_PARTS = ("norm[0-9].*",)
#: release keys (Microsoft names) with no slot in the backbone — classifier, final norm, cached ``attn_mask``
#: buffers: the converters drop them
SWIN_UNUSED = ("head.*", "norm.weight", "norm.bias", "*.attn_mask")

_BLOCK_KEY = "layers.*.blocks.*.attn.qkv.weight"
_FEATURES_ONLY = re.compile(r"^layers_(\d+)\.")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def relative_position_index(window_size: int) -> torch.Tensor:
    """The ``[ws², ws²]`` long index into a ``[(2ws−1)², heads]`` relative-position bias table (Swin's formula)."""
    ws = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def _strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``model.`` / ``module.`` / ``backbone.`` prefixes every key shares (Lightning, DDP-wrapped or re-saved
    backbones, e.g. ``model.backbone.*`` written by ``tao weights convert`` from a release), and Grounding DINO's
    ``0.body.`` / ``0.`` under ``backbone.`` (the Swin part of a TAO / IDEA model saved on its own)."""
    out = dict(sd)
    for prefix in ("model.", "module.", "backbone.", "0.body.", "0."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def swin_layout(sd: Mapping[str, torch.Tensor]) -> str | None:
    """``"timm"``, ``"microsoft"`` or None (not a Swin backbone state dict) for prefix-free keys ``sd``.

    timm: ``layers_N.`` keys, ``head.fc.*``, or downsampling at the start of stage 1 with none in stage 0;
    Microsoft: ``layers.0.downsample.*`` (downsampling at the end of a stage).
    """
    keys = list(sd)
    if not any(re.fullmatch(r"layers[._]\d+\.blocks\.\d+\.attn\.qkv\.weight", k) for k in keys):
        return None
    if any(_FEATURES_ONLY.match(k) for k in keys) or "head.fc.weight" in sd:
        return "timm"
    if any(k.startswith("layers.0.downsample.") for k in keys):
        return "microsoft"
    if any(k.startswith("layers.1.downsample.") for k in keys):
        return "timm"
    return "microsoft"  # a single-stage model: both layouts agree


def timm_to_microsoft(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm Swin keys to Microsoft's (table in the module docstring); tensors are not copied."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        key = _FEATURES_ONLY.sub(lambda m: f"layers.{m.group(1)}.", key)
        key = _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        if key.startswith("head.fc."):
            key = "head." + key[len("head.fc."):]
        out[key] = value
    return out


def microsoft_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`timm_to_microsoft` (Microsoft names → timm names; buffers dropped as timm does)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        key = _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        if key.startswith("head."):
            key = "head.fc." + key[len("head."):]
        out[key] = value
    return out


def unused_swin_keys(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of a release state dict (file names) that :func:`convert_swin_state_dict` drops (:data:`SWIN_UNUSED`
    after renaming to Microsoft names): what a load report lists as known-unused."""
    import fnmatch

    stripped = _strip_prefix(sd)
    renamed = timm_to_microsoft(stripped) if swin_layout(stripped) == "timm" else stripped
    originals = dict(zip(renamed, stripped, strict=True))
    return [originals[k] for k in renamed if any(fnmatch.fnmatchcase(k, p) for p in SWIN_UNUSED)]


def convert_swin_state_dict(sd: Mapping[str, torch.Tensor], *, target_window: int | None = None,
                            interpolate: bool = True, source: str = "Swin weights",
                            prefix: str = "") -> dict[str, torch.Tensor]:
    """Microsoft or timm Swin tensors (``model.``/``module.``/``backbone.`` stripped) → ``prefix`` + our backbone
    keys.

    Every ``relative_position_bias_table`` is resized to ``target_window`` (None: keep the file's) and its
    ``relative_position_index`` is regenerated for the resulting window; a 3-D ``absolute_pos_embed``
    ``[1, H·W, C]`` becomes ``[1, C, H, W]``; classifier, final-norm and ``attn_mask`` keys (:data:`SWIN_UNUSED`) are
    dropped.  A different window with ``interpolate=False`` raises :class:`CheckpointError`.
    """
    import fnmatch

    sd = _strip_prefix(sd)
    layout = swin_layout(sd)
    if layout is None:
        raise CheckpointError(source, "has no Swin blocks (layers.N.blocks.M.attn.qkv.weight)",
                              "pass an ImageNet Swin release (Microsoft .pth or timm) for the backbone")
    if layout == "timm":
        sd = timm_to_microsoft(sd)
    out: dict[str, torch.Tensor] = {}
    resized: list[str] = []
    old_windows: set[int] = set()
    for key, value in sd.items():
        if key.endswith("relative_position_index") or any(fnmatch.fnmatchcase(key, p) for p in SWIN_UNUSED):
            continue  # the index is regenerated below from the (possibly resized) table
        if key.endswith("relative_position_bias_table"):
            ws = (int(round(value.shape[0] ** 0.5)) + 1) // 2
            if target_window is not None and ws != target_window:
                if not interpolate:
                    raise CheckpointError(source, f"'{key}' was trained with window {ws}, the model uses "
                                          f"window {target_window}",
                                          "set the spec's window size to the file's, or allow interpolation")
                from networks.backbones.swin import _interp_bias_table

                value = _interp_bias_table(value, 2 * target_window - 1)
                resized.append(key)
                old_windows.add(ws)
                ws = target_window
            out[key] = value
            out[key[: -len("relative_position_bias_table")] + "relative_position_index"] = relative_position_index(ws)
            continue
        if key == "absolute_pos_embed" and value.dim() == 3:
            side = int(round(value.shape[1] ** 0.5))
            value = value.transpose(1, 2).reshape(1, value.shape[2], side, side)
        out[key] = value
    out = {prefix + k: v for k, v in out.items()}
    if resized:
        log.info("%s: resized the relative-position bias tables of %d blocks from window %s to %d (bicubic "
                 "interpolation)", source, len(resized), "/".join(map(str, sorted(old_windows))), target_window)
    return out


def _spec_window(model_cfg: Any) -> int | None:
    """Window size of the spec's Swin (Mask2Former: ``model.backbone.swin.window_size``), None when unset."""
    value = cfg_get(model_cfg, "backbone.swin.window_size")
    return int(value) if value is not None else None


def swin_formats(network: str, part: str = "backbone", *, window_size: Callable[[Any], int | None] | None = None,
                 prefix: str = "") -> list:
    """The Swin release formats for ``network``: ``swin-timm`` then ``swin-microsoft``.

    Their converters return ``prefix`` + keys of :class:`~networks.backbones.swin.SwinTransformer` (default no
    prefix: load them into the backbone module itself, or wrap them).  ``window_size(model_cfg) -> int | None``
    gives the model's window so bias tables are resized to it (default: ``model_cfg.backbone.swin.window_size``;
    None or no spec: the file's window is kept).  ``new_parts`` = the per-stage norms ``prefix + "norm[0-9].*"``;
    classifier, final norm and ``attn_mask`` buffers are dropped by the converter (:func:`unused_swin_keys`).
    """
    from networks.common.weight_formats import WeightFormat

    target = window_size or _spec_window

    def detect_for(layout: str) -> Callable:
        def detect(src) -> bool:
            return swin_layout(_strip_prefix(src.tensors)) == layout
        return detect

    def convert(src, model_cfg) -> dict[str, torch.Tensor]:
        return convert_swin_state_dict(src.tensors, target_window=target(model_cfg) if model_cfg is not None
                                       else None, source=str(src.path), prefix=prefix)

    common = dict(network=network, part=part, to_state_dict=convert,
                  new_parts=tuple(prefix + p for p in SWIN_NEW_PARTS))
    return [
        WeightFormat(name="swin-timm", description="timm Swin Transformer state dict (timm>=0.9 names: "
                     "downsample at the start of a stage, head.fc)", detect=detect_for("timm"), **common),
        WeightFormat(name="swin-microsoft", description="Microsoft Swin-Transformer ImageNet release "
                     "(swin_*_patch4_window*.pth, {'model': ...})", detect=detect_for("microsoft"), **common),
    ]
