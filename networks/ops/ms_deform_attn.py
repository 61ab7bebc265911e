"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch.

The sampling uses ``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``), so it runs on any device,
supports autograd and exports to ONNX with standard ops (``GridSample``).  Coordinates: sampling locations and
reference points are normalised to ``[0, 1]`` with ``(x, y)`` order, where 0 and 1 are the outer edges of the
feature map (pixel centres at ``(i + 0.5) / size``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ms_deform_attn_core", "MSDeformAttn", "DeformableEncoderLayer", "spatial_shapes_list",
           "init_deformable_transformer"]


def spatial_shapes_list(spatial_shapes) -> list[tuple[int, int]]:
    """Normalise spatial shapes given as a ``[L, 2]`` tensor or a sequence of ``(H, W)`` to a list of tuples.

    A tensor is read with ``tolist()`` (its values become constants when tracing for export).
    """
    if torch.is_tensor(spatial_shapes):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def ms_deform_attn_core(
    value: torch.Tensor,
    spatial_shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinearly sampled values over levels and points.

    Args:
        value: ``[N, S, h, d]`` values of all levels flattened row-major and concatenated (S = Σ H_l·W_l).
        spatial_shapes: ``[L, 2]`` tensor or sequence of ``(H_l, W_l)``.
        sampling_locations: ``[N, Lq, h, L, P, 2]`` normalised ``(x, y)`` in ``[0, 1]``; outside → zeros.
        attention_weights: ``[N, Lq, h, L, P]`` (already softmax-normalised by the caller).

    Returns:
        ``[N, Lq, h·d]`` (heads concatenated, head-major).
    """
    shapes = spatial_shapes_list(spatial_shapes)
    n, _, heads, dim = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    # Points before queries: grid_sample then writes [N*h, d, P, Lq], so the weighting runs over contiguous rows of
    # Lq and sums over P, an outer axis.  Each level's sum is added on its own: no [N*h, d, L*P, Lq] concatenation
    # (a Mask2Former Swin-T train step is ~20 % faster without it, and so is ONNX Runtime on the exported graph).
    # [N, Lq, h, L, P, 2] -> [L, N*h, P, Lq, 2], grid_sample wants [-1, 1]
    grids = (2 * sampling_locations - 1).permute(3, 0, 2, 4, 1, 5).reshape(levels, n * heads, points, lq, 2)
    # [N, Lq, h, L, P] -> [N*h, 1, L, P, Lq]
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(n * heads, 1, levels, points, lq)
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # [N, H*W, h, d] -> [N*h, d, H, W]
        v = values[lvl].flatten(2).transpose(1, 2).reshape(n * heads, dim, h, w)
        sampled.append(F.grid_sample(v, grids[lvl], mode="bilinear", padding_mode="zeros", align_corners=False))
    out = (sampled[0] * weights[:, :, 0]).sum(2)  # [N*h, d, Lq]
    for lvl in range(1, levels):
        out = out + (sampled[lvl] * weights[:, :, lvl]).sum(2)
    return out.view(n, heads * dim, lq).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module.

    Parameters (names as in Deformable DETR / Mask2Former / TAO): ``sampling_offsets`` Linear(C → h·L·P·2),
    ``attention_weights`` Linear(C → h·L·P), ``value_proj`` and ``output_proj`` Linear(C → C).

    ``forward(query [N,Lq,C], reference_points, input_flatten [N,S,C], spatial_shapes, level_start_index=None,
    input_padding_mask=None) -> [N,Lq,C]``.

    * ``reference_points`` ``[N,Lq,L,2]``: normalised ``(x, y)``; location = ref + offset / (W_l, H_l) (offsets in
      pixels of each level).
    * ``reference_points`` ``[N,Lq,L,4]``: normalised ``(cx, cy, w, h)`` boxes; location = ref_xy +
      offset / P · ref_wh · 0.5 (Deformable DETR two-stage / Grounding DINO decoder).
    * ``input_padding_mask`` ``[N,S]`` bool, True = padding: those values are zeroed before sampling.
    * ``level_start_index`` is accepted for API compatibility; level sizes come from ``spatial_shapes``.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR init: zero offset weights with a bias pointing each head in its own direction
        (unit square directions scaled by point index 1..P), uniform attention, xavier projections."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes,
        level_start_index: torch.Tensor | Sequence[int] | None = None,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shapes = spatial_shapes_list(spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels in spatial_shapes, got {len(shapes)}")
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        out_dtype = value.dtype
        # sampling runs in float32 even under fp16/bf16 autocast (as TAO's kernel does): half-precision
        # locations are off by a sizeable fraction of a pixel on large maps
        value = _upcast(value).view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = _upcast(self.sampling_offsets(query)).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = _upcast(self.attention_weights(query)).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        reference_points = _upcast(reference_points)
        if reference_points.shape[-1] == 2:
            # offsets are in level pixels: divide by (W_l, H_l)
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
            loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            loc = (reference_points[:, :, None, :, None, :2]
                   + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 values, got shape {tuple(reference_points.shape)}")
        out = ms_deform_attn_core(value, shapes, loc, weights)
        return self.output_proj(out.to(out_dtype))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, n_points={self.n_points}"


def init_deformable_transformer(transformer: nn.Module, level_embed: nn.Parameter) -> None:
    """The reference initialisation of a deformable transformer (Deformable DETR, Mask2Former, Grounding DINO):
    Xavier-uniform on every matrix, then each :class:`MSDeformAttn`'s own init, then ``level_embed ~ N(0, 1)``.

    The order matters: the references draw random numbers in exactly this order, so seeded builds match them.
    """
    for p in transformer.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for m in transformer.modules():
        if isinstance(m, MSDeformAttn):
            m.reset_parameters()
    nn.init.normal_(level_embed)


class DeformableEncoderLayer(nn.Module):
    """Post-norm deformable self-attention encoder layer (Deformable DETR / Mask2Former / Grounding DINO).

    MSDA(src + pos, src) → dropout → add → LayerNorm → Linear-ReLU-Linear FFN → dropout → add → LayerNorm.
    ``forward(src [B,S,C], pos [B,S,C], reference_points [B,S,L,2], spatial_shapes, level_start_index,
    padding_mask [B,S] bool or None) -> [B,S,C]``.  Submodule names (``self_attn``, ``norm1``, ``linear1``,
    ``linear2``, ``norm2``) are the original ones, so TAO/detectron2/IDEA checkpoints load.
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 3,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(torch.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))
