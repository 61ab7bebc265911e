"""MAL's network: ViT backbone + RoI head ("K", one vector per crop) + mask head ("V", a feature map).

``logit(p) = K · V(p)`` per pixel (no bias, no scale), computed at one of three resolutions picked by the
ORIGINAL-image box area, then resized to ``4h x 4w`` (h, w = token grid).  Student and teacher are two
separately built instances of :class:`MALNetwork`; the teacher follows the student by parameter EMA.

Deliberate fix over TAO: TAO's size bins are open intervals, so a box of area exactly 32² or 96² (or 0) gets
all-zero logits.  Here the bins are ``(-inf, 32²]``, ``(32², 96²]``, ``(96², inf)`` and every box lands in one.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from networks.backbones.vit import ViTBackbone, build_vit, load_vit_weights, read_weights_file
from networks.common.weights import apply_state_dict

__all__ = [
    "AREA_BINS",
    "ConvReLU",
    "MaskHead",
    "RoIHead",
    "MALNetwork",
    "area_bin",
    "build_mal_network",
    "build_mal_networks",
    "ema_update",
    "load_mal_pretrained",
]

_log = logging.getLogger(__name__)

#: Upper bounds (inclusive, pixels² of the original-image box) of the small and medium bins.
AREA_BINS = (32.0 ** 2, 96.0 ** 2)


def area_bin(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """Size bin (0 small, 1 medium, 2 large) of each original-image box ``[N,4]`` xyxy pixels -> ``[N]`` int64.

    Half-open bins ``(.., 32²]``, ``(32², 96²]``, ``(96², ..)``: every area, including exactly 1024, 9216 and 0,
    has a bin (TAO's training forward leaves those three at zero logits).
    """
    areas = (boxes_xyxy[:, 3] - boxes_xyxy[:, 1]) * (boxes_xyxy[:, 2] - boxes_xyxy[:, 0])
    return (areas > AREA_BINS[0]).long() + (areas > AREA_BINS[1]).long()


class ConvReLU(nn.Module):
    """3x3 conv (bias) + ReLU, kaiming-normal(fan_out, relu) init and zero bias (TAO's ``ConvModule``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B,Cin,H,W] -> [B,Cout,H,W], non-negative."""
        return F.relu(self.conv(x))


class MaskHead(nn.Module):
    """V head: ``num_convs`` x ConvReLU (the last one too, so V >= 0); bilinear x``scale_ratio`` before conv 3.

    Channels: in -> hidden -> ... -> out.  With fewer than 4 convs there is no upsampling (TAO breaks there; we
    simply produce V at the input resolution).  ``[B,C,h,w] -> [B,out,h·r,w·r]``.
    """

    #: layout of the convolutions' input: oneDNN's convolutions, forward and backward, run ~15 % faster on
    #: channels-last input on CPU (the result is the same up to summation order; later ops take either layout)
    memory_format = torch.channels_last

    def __init__(self, in_channels: int, num_convs: int = 4, hidden_channels: int = 256,
                 out_channels: int = 256, scale_ratio: float = 2.0):
        super().__init__()
        self.scale_ratio = float(scale_ratio)
        self.convs = nn.ModuleList()
        for i in range(num_convs):
            cin = in_channels if i == 0 else hidden_channels
            cout = hidden_channels if i < num_convs - 1 else out_channels
            self.convs.append(ConvReLU(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See class docstring."""
        x = x.contiguous(memory_format=self.memory_format)
        for i, conv in enumerate(self.convs):
            if i == 3:
                h, w = x.shape[-2:]
                size = (max(1, int(h * self.scale_ratio)), max(1, int(w * self.scale_ratio)))
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = conv(x)
        return x


class RoIHead(nn.Module):
    """K head: global average pool over the whole crop's feature map, then Linear -> ReLU -> Linear.

    ``[B,C,h,w] -> [B,out]``.  (The box mask is not used: the box enters only through the crop.)
    """

    def __init__(self, in_channels: int, out_channels: int = 256):
        super().__init__()
        self.mlp1 = nn.Linear(in_channels, out_channels)
        self.mlp2 = nn.Linear(out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See class docstring."""
        return self.mlp2(F.relu(self.mlp1(x.mean((2, 3)))))


class MALNetwork(nn.Module):
    """Backbone + heads mapping a normalised crop and its original-image box to mask logits.

    ``forward(x [B,3,S,S], bboxes [B,4] original-image xyxy pixels) -> logits [B,1,4h,4w]`` with h = S//p.
    On the default multi-scale path (``adjust_scale=True``) bin k uses the token map resized to ``h·2^(k-1)``
    (small objects get the coarser map, as in TAO), the mask head upsamples by ``mask_scale_ratio``, and the
    logits are resized bilinearly to 4h.  With ``adjust_scale=False`` the map is resized by
    ``mask_scale_ratio_pre`` and the logits are upsampled x4 from V's resolution (TAO's ``not_adjust_scale``).
    Precision follows the caller (Lightning autocast); nothing here casts.
    """

    def __init__(self, backbone: ViTBackbone, *, num_convs: int = 4, hidden_channels: int = 256,
                 out_channels: int = 256, mask_scale_ratio: float = 2.0, mask_scale_ratio_pre: float = 1.0,
                 adjust_scale: bool = True):
        super().__init__()
        self.backbone = backbone
        c = backbone.embed_dim
        self.roi_head = RoIHead(c, out_channels)
        self.mask_head = MaskHead(c, num_convs, hidden_channels, out_channels, mask_scale_ratio)
        self.adjust_scale = bool(adjust_scale)
        self.mask_scale_ratio_pre = float(mask_scale_ratio_pre)

    @staticmethod
    def _dot(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [n,C] · [n,C,H,W] -> [n,1,H,W]
        return torch.einsum("nc,nchw->nhw", k, v).unsqueeze(1)

    def forward(self, x: torch.Tensor, bboxes: torch.Tensor) -> torch.Tensor:
        """See class docstring."""
        spatial = self.backbone(x)
        h, w = spatial.shape[-2:]
        k = self.roi_head(spatial)
        out_size = (4 * h, 4 * w)
        if not self.adjust_scale:
            r = self.mask_scale_ratio_pre
            feat = spatial if r == 1.0 else F.interpolate(
                spatial, size=(max(1, int(h * r)), max(1, int(w * r))), mode="bilinear", align_corners=False)
            v = self.mask_head(feat)
            seg = self._dot(k, v)
            return F.interpolate(seg, scale_factor=4.0, mode="bilinear", align_corners=False)
        bins = area_bin(bboxes.to(spatial.device))
        seg_all = None
        for idx in range(3):
            sel = (bins == idx).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            scale = 2.0 ** (idx - 1)
            size = (max(1, int(h * scale)), max(1, int(w * scale)))
            feat = spatial[sel]
            if size != (h, w):
                feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=False)
            seg = self._dot(k[sel], self.mask_head(feat))
            if seg.shape[-2:] != out_size:
                seg = F.interpolate(seg, size=out_size, mode="bilinear", align_corners=False)
            if seg_all is None:
                seg_all = seg.new_zeros((x.shape[0], 1, *out_size))
            seg_all = seg_all.index_copy(0, sel, seg)
        return seg_all


def build_mal_network(cfg: Any) -> MALNetwork:
    """One randomly initialised :class:`MALNetwork` from ``cfg.model.*`` (TAO field names)."""
    m = cfg.model
    backbone = build_vit(str(m.arch), drop_path_rate=float(m.vit_dpr), frozen_stages=list(m.frozen_stages),
                         patch_embed=str(m.patch_embed))
    return MALNetwork(
        backbone,
        num_convs=int(m.mask_head_num_convs),
        hidden_channels=int(m.mask_head_hidden_channel),
        out_channels=int(m.mask_head_out_channel),
        mask_scale_ratio=float(m.mask_scale_ratio),
        mask_scale_ratio_pre=float(m.mask_scale_ratio_pre),
        adjust_scale=not bool(m.not_adjust_scale),
    )


def load_mal_pretrained(net: MALNetwork, state: Any, *, source: str = "pretrained weights",
                        log: logging.Logger | None = None) -> None:
    """Load a pretrained dict into ``net``: the backbone always, the heads from ``student.{roi,mask}_head.*``.

    Official MAE / timm / DeiT dicts fill the backbone only; MAL checkpoints also fill the heads (TAO loads the
    checkpoint's *student* weights into both student and teacher).  The backbone report is logged.
    """
    log = log or _log
    report = load_vit_weights(net.backbone, state, source=source)
    log.info("%s -> backbone: %s", source, report.summary("backbone"))
    flat = state
    for key in ("state_dict", "model"):
        if isinstance(flat, dict) and isinstance(flat.get(key), dict):
            flat = flat[key]
    for head in ("roi_head", "mask_head"):
        prefix = f"student.{head}."
        sub = {k[len(prefix):]: v for k, v in flat.items() if isinstance(k, str) and k.startswith(prefix)}
        if not sub:
            continue
        rep = apply_state_dict(getattr(net, head), sub, source=source, log_summary=False)
        log.info("%s -> %s: %s", source, head, rep.summary(head))


def build_mal_networks(cfg: Any, *, resuming: bool = False,
                       log: logging.Logger | None = None) -> tuple[MALNetwork, MALNetwork]:
    """Build (student, teacher) as two separate networks (TAO: the teacher is not a copy; its heads get their
    own random init) and, unless ``resuming``, load ``train.pretrained_model_path`` into both."""
    student = build_mal_network(cfg)
    teacher = build_mal_network(cfg)
    path = cfg.train.get("pretrained_model_path") if hasattr(cfg.train, "get") else cfg.train.pretrained_model_path
    if path and not resuming:
        state = _read_pretrained(str(path), cfg.model, log or _log)
        load_mal_pretrained(student, state, source=str(path), log=log)
        load_mal_pretrained(teacher, state, source=str(path), log=log)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def _read_pretrained(path: str, model_cfg: Any, log: logging.Logger) -> Any:
    """The dict :func:`load_mal_pretrained` reads: a file as stored, or a directory (a Hugging Face download of a
    timm ViT) converted by the MAL weight format that recognises it (``student.backbone.*`` ...)."""
    from pathlib import Path

    if not Path(path).expanduser().is_dir():
        return read_weights_file(path, field="train.pretrained_model_path")
    from networks.common.weight_formats import detect_format, read_source
    from networks.mal.weight_formats import weight_formats

    src = read_source(path, field="train.pretrained_model_path")
    fmt = detect_format(src, weight_formats(), field="train.pretrained_model_path")
    log.info("%s: format '%s' (%s)", path, fmt.name, fmt.description)
    return fmt.to_state_dict(src, model_cfg)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``θ_t ← m·θ_t + (1-m)·θ_s`` over ``parameters()`` in order (buffers untouched), in place."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_lerp_(t_params, [p.detach().to(t.dtype) for p, t in zip(s_params, t_params, strict=True)], 1.0 - momentum)
