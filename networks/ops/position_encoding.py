"""Sine/cosine 2-D positional encoding (DETR / Mask2Former / DINO style)."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """2-D sine positional encoding of a feature map, always computed in float32.

    ``forward(x, mask=None)``: ``x`` is any ``[B, C, H, W]`` tensor (only its shape and device are used);
    ``mask`` is an optional bool ``[B, H, W]`` with True = padding.  Returns ``[B, 2·num_pos_feats, H, W]``
    float32, laid out as ``cat(pos_y, pos_x)`` along channels, each half interleaving ``sin`` (even feature
    indices) and ``cos`` (odd).  Positions are the 1-based cumulative count of valid pixels along each axis;
    with ``normalize`` they are divided by the last (valid) count and multiplied by ``scale`` so they lie in
    ``(0, scale]``.  ``offset`` is subtracted from the count before normalising (0 for Mask2Former).

    ``temperature_h``/``temperature_w`` default to ``temperature``; Grounding DINO uses 20 for both.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float | None = None,
        *,
        temperature_h: float | None = None,
        temperature_w: float | None = None,
        offset: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used when normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature_h = float(temperature if temperature_h is None else temperature_h)
        self.temperature_w = float(temperature if temperature_w is None else temperature_w)
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset
        self.eps = eps

    def _dim_t(self, temperature: float, device) -> torch.Tensor:
        idx = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        return temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / self.num_pos_feats)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        if mask is None:
            y_embed = torch.arange(1, h + 1, dtype=torch.float32, device=x.device)[None, :, None].expand(b, h, w)
            x_embed = torch.arange(1, w + 1, dtype=torch.float32, device=x.device)[None, None, :].expand(b, h, w)
        else:
            not_mask = (~mask).to(torch.float32)
            y_embed = not_mask.cumsum(1)
            x_embed = not_mask.cumsum(2)
        if self.normalize:
            y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        pos_x = x_embed[..., None] / self._dim_t(self.temperature_w, x.device)
        pos_y = y_embed[..., None] / self._dim_t(self.temperature_h, x.device)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperature_h={self.temperature_h}, "
                f"temperature_w={self.temperature_w}, normalize={self.normalize}, scale={self.scale:.4f}")
