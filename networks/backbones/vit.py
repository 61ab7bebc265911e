"""Plain ViT backbones (timm ``VisionTransformer``) returning a spatial token map, and their weight loader.

This is the backbone of TAO's current MAL: a standard Conv2d patch embedding (kernel = stride = patch size),
one cls token, learned absolute position embedding for a 224x224 grid that timm resamples per forward
(``dynamic_img_size=True``, bicubic + antialias), pre-norm blocks and a final LayerNorm (eps 1e-6).

Parameter names are timm's (``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ...), so official MAE
and DeiT/timm checkpoints map onto it by key, and MAL checkpoints hold it under ``student.backbone.``.

``patch_embed="convstem"`` swaps the patch embedding for :class:`ConvStemPatchEmbed`, the stem of TAO 5.0-6.0 and
NVlabs MAL (github NVlabs/mask-auto-labeler ``models/vision_transformers.py`` ``ConvStem``), and drops the unused
classifier (their ``head`` is ``nn.Identity``), so those checkpoints' backbone keys are exactly this module's.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from functools import partial

import torch
from torch import nn

from networks.common.errors import CheckpointError, ConfigError
from networks.common.weights import LoadReport, apply_state_dict, read_weights_file

__all__ = ["ARCHS", "PATCH_EMBEDS", "ConvStemPatchEmbed", "ViTBackbone", "LoadReport", "build_vit", "load_vit_weights",
           "read_weights_file"]

_log = logging.getLogger(__name__)

#: arch name -> (embed_dim, depth, num_heads, patch_size).  "deit"/"mae" only hint at the weights to load.
ARCHS: dict[str, tuple[int, int, int, int]] = {
    "vit-deit-tiny/16": (192, 12, 3, 16),
    "vit-deit-small/16": (384, 12, 6, 16),
    "vit-mae-base/16": (768, 12, 12, 16),
    "vit-mae-large/16": (1024, 24, 16, 16),
    "vit-mae-huge/14": (1280, 32, 16, 14),
}


#: ``model.patch_embed`` values: timm's Conv2d(kernel = stride = patch) or the 4-conv stem of TAO <= 6.0 / NVlabs MAL
PATCH_EMBEDS = ("linear", "convstem")


class ConvStemPatchEmbed(nn.Module):
    """Convolutional patch embedding ("Early Convolutions Help Transformers See Better", Xiao et al. 2021) in the
    layout of TAO 5.0-6.0 / NVlabs MAL, usable as timm's ``embed_layer``.

    ``proj[i]`` (i = 0..depth-1) = ``Sequential(Conv2d(3x3, stride 2, pad 1, no bias), GroupNorm(1, eps 1e-6),
    GELU)``; channels ``in -> D/2^(depth-1) -> ... -> D`` (D = ``embed_dim``; 3->24->48->96->192 for D=192,
    3->96->192->384->768 for D=768); the last stage adds ``Conv2d(D, D, 1)`` with bias at index 3.  Keys:
    ``proj.<i>.0.weight``, ``proj.<i>.1.{weight,bias}``, ``proj.<depth-1>.3.{weight,bias}``.

    ``forward(x [B,C,H,W]) -> [B,H',W',D]`` (``output_fmt="NHWC"``, what timm asks for with ``dynamic_img_size``)
    or ``[B,H'·W',D]``, H' = ceil(H/2^depth) (= H/16 for the usual depth 4 when 16 divides H).
    ``grid_size`` is ``img_size // patch_size`` (the position-embedding grid, which ORIG sizes with the arch's patch
    even for /14 models), ``stride`` = 2^depth is the real token stride.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, *, depth: int = 4, output_fmt: str | None = None,
                 device=None, dtype=None, **_timm_args):
        # _timm_args: bias / strict_img_size / dynamic_img_pad / norm_layer that timm passes to every embed layer;
        # the stem has no single projection bias and accepts any input size.
        super().__init__()
        if embed_dim % (2 ** (depth - 1)):
            raise ConfigError("model.patch_embed", f"convstem needs a width divisible by {2 ** (depth - 1)}, "
                              f"got {embed_dim}", "use model.patch_embed=linear")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.img_size = size
        self.patch_size = patch
        self.grid_size = (size[0] // patch[0], size[1] // patch[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.stride = 2 ** depth
        self.output_fmt = output_fmt or "NLC"
        self.dynamic_img_pad = False
        dd = {"device": device, "dtype": dtype}
        stages = []
        cin, cout = in_chans, embed_dim // 2 ** (depth - 1)
        for i in range(depth):
            layers = [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False, **dd),
                      nn.GroupNorm(1, cout, eps=1e-6, **dd), nn.GELU()]
            if i == depth - 1:
                layers.append(nn.Conv2d(cout, embed_dim, 1, **dd))
            stages.append(nn.Sequential(*layers))
            cin, cout = cout, cout * 2
        self.proj = nn.ModuleList(stages)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        """Token stride in pixels (timm's feature-info hook)."""
        return self.stride if as_scalar else (self.stride, self.stride)

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid for an input of ``img_size`` pixels (each stride-2 conv rounds up)."""
        h, w = img_size
        return -(-h // self.stride), -(-w // self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See class docstring."""
        for stage in self.proj:
            x = stage(x)
        x = x.permute(0, 2, 3, 1)
        return x if self.output_fmt == "NHWC" else x.flatten(1, 2)


def _vit_class():
    # timm is imported lazily so that importing the package (e.g. for `--help`) stays cheap.
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


class ViTBackbone(nn.Module):
    """Marker base; the concrete class (built by :func:`build_vit`) also derives from timm's VisionTransformer.

    ``forward(x [B,3,H,W] float, normalised) -> [B, C, H//p, W//p]``: the patch tokens after the final norm,
    cls token dropped, reshaped to NCHW.  Attributes: ``embed_dim`` (C), ``patch_size`` (p, pixels),
    ``frozen_stages`` (tuple of stage keys actually frozen).
    """

    embed_dim: int
    patch_size: int


def _make_class():
    base = _vit_class()

    class _TimmViTBackbone(base, ViTBackbone):  # type: ignore[misc, valid-type]
        """timm ViT that returns spatial features and keeps frozen stages in eval mode."""

        def __init__(self, *, patch_size: int, frozen_stages: Iterable[int] = (-1,), token_stride: int = 0,
                     **kwargs):
            base.__init__(self, patch_size=patch_size, **kwargs)
            self.patch_size = int(token_stride or patch_size)
            self.frozen_stages: tuple[int, ...] = ()
            self._freeze(frozen_stages)

        def stage_dict(self) -> dict[int, nn.Module]:
            """TAO's stage keys: 0 = patch embedding, i = ``blocks[i-1]`` for i = 1..depth."""
            stages: dict[int, nn.Module] = {0: self.patch_embed}
            for i, blk in enumerate(self.blocks):
                stages[i + 1] = blk
            return stages

        def _freeze(self, keys: Iterable[int]) -> None:
            stages = self.stage_dict()
            frozen = []
            for key in keys:
                key = int(key)
                if key not in stages:
                    # TAO warns and carries on; the default [-1] therefore freezes nothing.
                    if key != -1:
                        _log.warning("model.frozen_stages: no stage %d (valid: 0..%d); ignored", key, len(stages) - 1)
                    continue
                for p in stages[key].parameters():
                    p.requires_grad_(False)
                stages[key].eval()
                frozen.append(key)
            self.frozen_stages = tuple(sorted(set(frozen)))

        def train(self, mode: bool = True):
            super().train(mode)
            stages = self.stage_dict()
            for key in self.frozen_stages:
                stages[key].eval()
            return self

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
            """[B,3,H,W] -> [B,C,H//p,W//p] patch tokens after the final norm."""
            b, _, h, w = x.shape
            gh, gw = h // self.patch_size, w // self.patch_size
            if gh * self.patch_size != h or gw * self.patch_size != w:
                # timm asserts divisibility (e.g. 512 px with patch 14); drop the < p leftover pixels instead.
                x = x[:, :, : gh * self.patch_size, : gw * self.patch_size]
            tokens = self.forward_features(x)
            spatial = tokens[:, self.num_prefix_tokens:]
            return spatial.transpose(1, 2).reshape(b, spatial.shape[-1], gh, gw)

    return _TimmViTBackbone


_CLASS = None


def build_vit(arch: str, *, drop_path_rate: float = 0.0, frozen_stages: Iterable[int] = (-1,),
              img_size: int = 224, weight_init: str = "", patch_embed: str = "linear") -> ViTBackbone:
    """Build one of :data:`ARCHS` (random init) as a timm ViT with the MAL settings.

    ``img_size`` only sets the stored position-embedding grid (``img_size // p`` squared); any input size works.
    ``frozen_stages`` uses TAO's current list semantics (see :meth:`stage_dict`); unknown keys warn.
    ``weight_init`` is timm's (``""`` = its default ViT init; ``"skip"`` leaves PyTorch's default init, which is
    faster and fine when pretrained weights are loaded next or in tests).
    The timm classification head is kept (``Linear(C, 1000)``, unused) so MAL checkpoints keep TAO's keys.
    ``patch_embed="convstem"``: :class:`ConvStemPatchEmbed` (token stride 16 for every arch, so ``patch_size`` is
    16; the position-embedding grid stays ``img_size // arch patch``) and no classifier, as in TAO <= 6.0.
    """
    global _CLASS
    if arch not in ARCHS:
        raise ConfigError("model.arch", f"unknown backbone {arch!r}", f"use one of {', '.join(ARCHS)}")
    if _CLASS is None:
        _CLASS = _make_class()
    if patch_embed not in PATCH_EMBEDS:
        raise ConfigError("model.patch_embed", f"unknown patch embedding {patch_embed!r}",
                          f"use one of {', '.join(PATCH_EMBEDS)}")
    dim, depth, heads, patch = ARCHS[arch]
    stem = {} if patch_embed == "linear" else {"embed_layer": ConvStemPatchEmbed, "num_classes": 0,
                                               "token_stride": 16}
    model = _CLASS(
        img_size=img_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0,
        qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=float(drop_path_rate),
        dynamic_img_size=True, frozen_stages=frozen_stages, weight_init=weight_init, **stem,
    )
    if weight_init == "skip":
        # timm leaves these two as torch.empty() when its init is skipped
        with torch.no_grad():
            nn.init.trunc_normal_(model.pos_embed, std=0.02)
            nn.init.normal_(model.cls_token, std=1e-6)
    return model


# File keys that are expected in MAE / DeiT / timm checkpoints but have no counterpart in the backbone.
_BENIGN_PATTERNS = ("decoder_*", "decoder.*", "mask_token", "head.*", "head_dist.*", "fc_norm.*", "dist_token")


def _unwrap(state: Mapping) -> Mapping:
    # Lightning/TAO: {"state_dict": ...}; MAE/DeiT: {"model": ...}; either may nest once more.
    for _ in range(3):
        for key in ("state_dict", "model", "module"):
            inner = state.get(key) if isinstance(state, Mapping) else None
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) or isinstance(v, Mapping)
                                                  for v in inner.values()):
                state = inner
                break
        else:
            break
    return state


def _select_backbone_keys(state: Mapping) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}
    for prefix in ("student.backbone.", "backbone."):
        picked = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if picked:
            return picked
    return tensors


def load_vit_weights(backbone: nn.Module, state_dict: Mapping, *, source: str = "state dict",
                     raise_on_mismatch: bool = True) -> LoadReport:
    """Copy matching tensors of ``state_dict`` into ``backbone`` by key and return what did not match.

    Accepts (after unwrapping ``{"state_dict": ...}`` / ``{"model": ...}``) official MAE checkpoints, timm/DeiT
    dicts and MAL checkpoints (``student.backbone.*``).  A ``pos_embed`` with another grid is resampled with
    timm's ``resample_abs_pos_embed``.  Any other shape mismatch raises :class:`CheckpointError` naming the key
    and both shapes (``source`` names the file in that message).  Nothing in the file matching the backbone, or a
    ConvStem file (TAO 5.0-6.0 / NVlabs MAL) for a linear patch embedding and vice versa, also raises (naming
    ``model.patch_embed``).
    """
    from timm.layers import resample_abs_pos_embed

    state = _select_backbone_keys(_unwrap(state_dict))
    convstem_model = isinstance(getattr(backbone, "patch_embed", None), ConvStemPatchEmbed)
    convstem_file = any(k.startswith("patch_embed.proj.0.") for k in state)
    if convstem_file and not convstem_model:
        raise CheckpointError(source, "holds a ConvStem patch embedding (TAO 5.0-6.0 / NVlabs MAL backbone) but "
                              "model.patch_embed is 'linear'", "set model.patch_embed=convstem")
    if convstem_model and "patch_embed.proj.weight" in state:
        raise CheckpointError(source, "holds a linear patch embedding (MAE/DeiT/timm or TAO 6.25.7+) but "
                              "model.patch_embed is 'convstem'", "set model.patch_embed=linear")
    own = backbone.state_dict()
    remapped: dict[str, torch.Tensor] = {}
    resampled_head = []
    for key, value in state.items():
        target = own.get(key)
        if target is not None and key == "pos_embed" and value.shape != target.shape and value.ndim == 3 \
                and value.shape[-1] == target.shape[-1]:
            n_prefix = 2 if "dist_token" in state else 1
            if n_prefix == 2:  # DeiT-distilled: drop the distillation token's position
                value = torch.cat([value[:, :1], value[:, 2:]], dim=1)
            old = value.shape[1] - 1
            side = int(round(old ** 0.5))
            if side * side == old:
                value = resample_abs_pos_embed(value.float(), new_size=list(backbone.patch_embed.grid_size),
                                               old_size=[side, side], num_prefix_tokens=1).to(target.dtype)
                _log.info("%s: pos_embed resampled from a %dx%d grid to %s", source, side, side,
                          tuple(backbone.patch_embed.grid_size))
        if target is not None and key.startswith("head.") and value.shape != target.shape:
            resampled_head.append(key)  # a classifier for another label set; MAL never uses the head
            continue
        remapped[key] = value
    if not any(k in own for k in remapped):
        raise CheckpointError(source, "no tensor in the file matches the ViT backbone",
                              "expected MAE/timm keys like 'blocks.0.attn.qkv.weight' or MAL 'student.backbone.*'")
    report = apply_state_dict(backbone, remapped, _BENIGN_PATTERNS, source=source,
                              raise_on_mismatch=raise_on_mismatch, log_summary=False)
    report.benign.extend(resampled_head)
    # The timm classifier exists only to keep TAO's checkpoint keys; MAE files have none and that is fine.
    report.missing = [k for k in report.missing if not k.startswith("head.")]
    _log.info("%s", report.summary(f"ViT backbone from {source}"))
    return report
