"""Swin Transformer backbone (Liu et al., 2021) returning multi-scale NCHW feature maps.

State-dict names follow the official Swin release (``patch_embed.proj``, ``layers.{s}.blocks.{b}.attn.qkv``,
``layers.{s}.downsample.reduction``, ...) plus per-stage output norms ``norm{i}`` as in the detection/segmentation
variants, so ``swin_*_patch4_window*.pth`` release files load by name (:func:`load_swin_weights`).

Feature maps are padded (bottom/right, zeros) to a multiple of the window size inside every block and cropped
afterwards; windows are never shrunk for small inputs.  Any input size works: the patch embedding pads to a
multiple of the patch size and patch merging pads odd sizes.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath, Mlp
from torch import nn

from networks.backbones.swin_presets import SWIN_PRESETS
from networks.common.weights import LoadReport, apply_state_dict, unwrap_state_dict

__all__ = ["SwinTransformer", "SWIN_PRESETS", "load_swin_weights", "SWIN_BENIGN_KEYS"]

log = logging.getLogger(__name__)

#: Keys of official release files that have no slot in the backbone and are dropped silently.
SWIN_BENIGN_KEYS = ("head.*", "norm.weight", "norm.bias", "*.attn_mask", "*.relative_position_index")


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``[B, H, W, C]`` (H, W multiples of ``ws``) → ``[B·nW, ws, ws, C]`` windows, row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B·nW, ws, ws, C]`` → ``[B, H, W, C]``."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // ws, w // ws, ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ``ws×ws`` windows with a learned relative-position bias.

    ``forward(x [B·nW, ws², C], mask [nW, ws², ws²] additive or None) -> [B·nW, ws², C]``.  The bias table is
    ``[(2ws−1)², heads]`` indexed by the persistent buffer ``relative_position_index`` ``[ws², ws²]``.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        coords = coords.flatten(1)  # [2, ws²]
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
        index = rel[..., 0] * (2 * window_size - 1) + rel[..., 1]
        self.register_buffer("relative_position_index", index, persistent=True)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, project: bool = True) -> torch.Tensor:
        """``project=False`` returns the heads' output before ``proj`` (a per-token linear map), so that a caller
        can crop padded tokens first and project only the tokens it keeps."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0).to(q.dtype)  # [1, heads, n, n]
        if mask is not None:
            # the shift mask differs per window: broadcast bias + mask over [images, windows, heads, n, n]
            nw = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask[None, :, None].to(q.dtype)).expand(bw // nw, -1, -1, -1, -1)
            bias = bias.reshape(bw, self.num_heads, n, n)
        # fused attention (same math as softmax(q·kᵀ·scale + bias)·v, fewer temporaries)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                             dropout_p=self.attn_drop.p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out)) if project else out


class SwinTransformerBlock(nn.Module):
    """One Swin block: LN → (shifted) window attention → residual, LN → MLP → residual.

    ``forward(x [B, H·W, C], h, w, attn_mask) -> [B, H·W, C]``; the map is padded to window multiples.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError("shift_size must be in [0, window_size)")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        # timm's Mlp: fc1 → GELU → dropout → fc2 → dropout, parameters fc1.*/fc2.* as in the Swin release
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, h: int, w: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, _, c = x.shape
        ws = self.window_size
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        pad_r = (ws - w % ws) % ws
        pad_b = (ws - h % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            mask = attn_mask
        else:
            mask = None
        windows = window_partition(x, ws).view(-1, ws * ws, c)
        windows = self.attn(windows, mask, project=False).reshape(-1, ws, ws, c)
        x = window_reverse(windows, ws, hp, wp)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        # crop the padding before the output projection: padded tokens are dropped anyway, and with small maps
        # (the last stage at 320 px: 100 of 196 tokens) they are half the projection's work
        x = self.attn.proj_drop(self.attn.proj(x[:, :h, :w, :].reshape(b, h * w, c)))
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2×2 neighbourhood concat → LN(4C) → Linear(4C → 2C, no bias); halves H and W (odd sizes padded).

    ``forward(x [B, H·W, C], h, w) -> [B, ceil(H/2)·ceil(W/2), 2C]``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = x.view(b, -1, 4 * c)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One Swin stage: ``depth`` blocks alternating W-MSA / SW-MSA, then optional :class:`PatchMerging`.

    ``forward(x [B, H·W, C], h, w) -> (stage_out [B, H·W, C], h, w, next_in, h', w')``.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, qkv_bias: bool,
                 drop: float, attn_drop: float, drop_path: Sequence[float], downsample: bool, use_checkpoint: bool):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift_size, mlp_ratio,
                                 qkv_bias, drop, attn_drop, drop_path[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def _shift_mask(self, h: int, w: int, device, dtype) -> torch.Tensor:
        """Additive mask ``[nW, ws², ws²]`` (0 or −100) separating regions that the cyclic shift made adjacent."""
        ws, s = self.window_size, self.shift_size
        # no floor division of negatives here: the ONNX tracer exports it as truncation
        hp, wp = (h + ws - 1) // ws * ws, (w + ws - 1) // ws * ws
        hi = torch.arange(hp, device=device)
        wi = torch.arange(wp, device=device)
        h_region = (hi >= hp - ws).long() + (hi >= hp - s).long()
        w_region = (wi >= wp - ws).long() + (wi >= wp - s).long()
        region = (h_region[:, None] * 3 + w_region[None, :]).to(dtype)[None, :, :, None]
        win = window_partition(region, ws).reshape(-1, ws * ws)
        diff = win[:, None, :] - win[:, :, None]
        return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)

    def forward(self, x: torch.Tensor, h: int, w: int):
        shifted = self.shift_size > 0 and len(self.blocks) > 1
        mask = self._shift_mask(h, w, x.device, x.dtype) if shifted else None
        for blk in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = cp.checkpoint(blk, x, h, w, mask, use_reentrant=False)
            else:
                x = blk(x, h, w, mask)
        if self.downsample is None:
            return x, h, w, x, h, w
        return x, h, w, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch×patch`` conv embedding (``proj``) with optional LayerNorm (``norm``).

    ``forward(images [B, 3, H, W]) -> [B, C, ceil(H/p), ceil(W/p)]`` (right/bottom zero padding).
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        _, _, h, w = x.shape
        if h % p or w % p:
            x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)
        if self.norm is not None:
            hh, ww = x.shape[2], x.shape[3]
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(-1, x.shape[1], hh, ww)
        return x


class SwinTransformer(nn.Module):
    """Swin Transformer feature extractor.

    ``forward(images [B, 3, H, W], normalised) -> {"res{i+2}": [B, C·2^i, ceil(H/2^(i+2)), ...]}`` for every
    ``i`` in ``out_indices`` (strides 4, 8, 16, 32), each after its own LayerNorm ``norm{i}``.  Attributes
    ``num_features`` (channels per stage), ``out_channels`` and ``out_strides`` (dicts keyed like the output).
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        ape: bool = False,
        patch_norm: bool = True,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        pretrain_img_size: int = 224,
        use_checkpoint: bool = False,
        patch_size: int = 4,
        in_chans: int = 3,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} must have the same length")
        self.num_layers = len(depths)
        self.out_indices = tuple(out_indices)
        self.ape = ape
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            start = sum(depths[:i])
            self.layers.append(BasicLayer(
                int(embed_dim * 2 ** i), depth, heads, window_size, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                dpr[start:start + depth], downsample=i < self.num_layers - 1, use_checkpoint=use_checkpoint))
        self.num_features = [int(embed_dim * 2 ** i) for i in range(self.num_layers)]
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.out_channels = {f"res{i + 2}": self.num_features[i] for i in self.out_indices}
        self.out_strides = {f"res{i + 2}": patch_size * 2 ** i for i in self.out_indices}
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def set_activation_checkpoint(self, enabled: bool) -> None:
        """Turn activation checkpointing of the Swin blocks on or off (training only)."""
        for layer in self.layers:
            layer.use_checkpoint = bool(enabled)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(x)
        h, w = x.shape[2], x.shape[3]
        if self.ape:
            pos = F.interpolate(self.absolute_pos_embed, size=(h, w), mode="bicubic", align_corners=False)
            x = x + pos
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        outs: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            stage, sh, sw, x, h, w = layer(x, h, w)
            if i in self.out_indices:
                stage = getattr(self, f"norm{i}")(stage)
                outs[f"res{i + 2}"] = stage.view(-1, sh, sw, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
        return outs


def _interp_bias_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic-resize a ``[(2w−1)², heads]`` relative-position table to ``[size², heads]`` (window change)."""
    old = int(round(table.shape[0] ** 0.5))
    heads = table.shape[1]
    grid = table.t().reshape(1, heads, old, old).float()
    grid = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return grid.reshape(heads, size * size).t().to(table.dtype)


def load_swin_weights(backbone: SwinTransformer, state_dict: Mapping, *, source: str = "backbone weights",
                      interpolate_window: bool = True) -> LoadReport:
    """Load official-release Swin weights (``{"model": ...}``, ``{"state_dict": ...}`` or bare) into ``backbone``.

    Keys are used as they are (the release names are this module's names); a ``backbone.`` prefix is stripped;
    timm's Swin names are renamed first (:mod:`networks.backbones.swin_weights`).
    ``head.*``, the final ``norm.*`` and cached ``attn_mask``/``relative_position_index`` buffers are benign.
    A relative-position bias table trained with another window size is bicubic-resized when
    ``interpolate_window`` (its index buffer is then kept from the model); otherwise, and for every other
    shape difference, :class:`CheckpointError` names the key and both shapes.
    """
    from networks.backbones.swin_weights import swin_layout, timm_to_microsoft

    sd = unwrap_state_dict(state_dict)
    if sd and all(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items()}
    own = backbone.state_dict()
    if swin_layout(sd) == "timm":
        # timm keeps relative_position_index out of its state dicts: the model's own buffers are the right ones
        sd = timm_to_microsoft(sd)
        sd.update({k: v for k, v in own.items() if k.endswith("relative_position_index") and k not in sd})
    fixed: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            if interpolate_window and key.endswith("relative_position_bias_table") and value.shape[1] == own[key].shape[1]:
                size = int(round(own[key].shape[0] ** 0.5))
                log.info("Resizing %s from %s to %s (different window size)", key, tuple(value.shape),
                         tuple(own[key].shape))
                value = _interp_bias_table(value, size)
            elif interpolate_window and key.endswith("relative_position_index"):
                value = own[key]  # derived from the window size; the model's own buffer is the right one
            elif key == "absolute_pos_embed" and value.dim() == 4:
                value = F.interpolate(value, size=own[key].shape[-2:], mode="bicubic", align_corners=False)
        fixed[key] = value
    return apply_state_dict(backbone, fixed, SWIN_BENIGN_KEYS, source=source)
