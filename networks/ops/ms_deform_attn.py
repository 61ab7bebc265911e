"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch.

Two implementations of the sampling, with the same sums (they differ by float rounding only):

* :func:`ms_deform_attn_grid_sample`: ``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``); any
  device, autograd, and it exports to ONNX with standard ops (``GridSample``).  Used on CUDA and whenever the
  model is traced for export.
* :func:`ms_deform_attn_gather`: every output is a weighted sum of value rows (the four bilinear corners of every
  point, times its attention weight), computed by ``embedding_bag``, with a hand-written backward.  Used on CPU
  in eager mode when each head has at least :data:`GATHER_MIN_HEAD_DIM` channels (TAO's configs: 256 / 8 heads
  = 32).  Its cost is mostly per point and ``grid_sample``'s per point and channel: on a Mask2Former encoder
  layer's shapes, forward and backward took 0.64–0.82× ``grid_sample``'s time with 32 channels per head and
  1.56–1.65× with 16.

Coordinates: sampling locations and reference points are normalised to ``[0, 1]`` with ``(x, y)`` order, where
0 and 1 are the outer edges of the feature map (pixel centres at ``(i + 0.5) / size``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ms_deform_attn_core", "ms_deform_attn_grid_sample", "ms_deform_attn_gather", "MSDeformAttn",
           "DeformableEncoderLayer", "spatial_shapes_list", "init_deformable_transformer"]


def spatial_shapes_list(spatial_shapes) -> list[tuple[int, int]]:
    """Normalise spatial shapes given as a ``[L, 2]`` tensor or a sequence of ``(H, W)`` to a list of tuples.

    A tensor is read with ``tolist()`` (its values become constants when tracing for export).
    """
    if torch.is_tensor(spatial_shapes):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


#: fewest channels per head for which :func:`ms_deform_attn_core` takes the gather path on CPU (see module doc)
GATHER_MIN_HEAD_DIM = 32


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

    On CPU in eager mode, with ``d >= GATHER_MIN_HEAD_DIM``, this is :func:`ms_deform_attn_gather`; otherwise
    (other devices, fewer channels, tracing for ONNX export) :func:`ms_deform_attn_grid_sample`.
    """
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if (value.device.type == "cpu" and not tracing and value.shape[-1] >= GATHER_MIN_HEAD_DIM
            and sampling_locations.numel() and value.numel()):
        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_grid_sample(value, spatial_shapes, sampling_locations, attention_weights)


def ms_deform_attn_grid_sample(value, spatial_shapes, sampling_locations, attention_weights) -> torch.Tensor:
    """:func:`ms_deform_attn_core` with ``F.grid_sample`` (same arguments and result)."""
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


class _WeightedRowSums(torch.autograd.Function):
    """``out[b] = Σ_k weights[b, k] · table[index[b, k]]``: ``table [R, d]``, ``index [B, K]`` int32/int64 rows of
    ``table``, ``weights [B, K]`` → ``[B, d]``.  Gradients for ``table`` and ``weights`` (none for ``index``).

    Autograd's own backward of ``embedding_bag`` scatters the table gradient row by row after a sort; here the
    table gradient is the transposed sum, itself an ``embedding_bag`` over the entries sorted by row (a stable sort,
    so the sums run in a fixed order and repeat bit for bit), which is several times faster on CPU.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        bags, k = index.shape
        flat = index.reshape(-1)
        offsets = torch.arange(0, bags * k, k, device=index.device, dtype=index.dtype)
        out, offset2bag, _, _ = torch.ops.aten._embedding_bag(table, flat, offsets, False, 0, False,
                                                              weights.reshape(-1))
        ctx.save_for_backward(table, flat, weights, offsets, offset2bag)
        ctx.bag_size = k
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        table, flat, weights, offsets, offset2bag = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            order = torch.sort(flat, stable=True)[1]
            counts = torch.bincount(flat, minlength=table.shape[0])
            starts = torch.cumsum(counts, 0) - counts
            bag_of_entry = torch.div(order, ctx.bag_size, rounding_mode="floor")
            grad_table = F.embedding_bag(bag_of_entry, grad_out, starts, mode="sum",
                                         per_sample_weights=weights.reshape(-1).index_select(0, order))
        if ctx.needs_input_grad[2]:
            grad_weights = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_out, table, flat, offsets, offset2bag, 0).view_as(weights)
        return grad_table, None, grad_weights


def ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights) -> torch.Tensor:
    """:func:`ms_deform_attn_core` as weighted sums of value rows (same arguments and result).

    Each point contributes its four bilinear corners; a corner outside its level gets weight 0 (zero padding).
    Pixel coordinates follow ``grid_sample`` with ``align_corners=False``: ``x_pix = x · W − 0.5``.
    """
    shapes = spatial_shapes_list(spatial_shapes)
    n, s, heads, dim = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    dev = value.device
    rows = n * s * heads
    itype = torch.int32 if rows < 2 ** 31 else torch.int64
    with torch.autocast(dev.type, enabled=False):
        size = torch.tensor([[w, h] for h, w in shapes], dtype=sampling_locations.dtype, device=dev)  # [L, (W, H)]
        level_start = [0]
        for h, w in shapes[:-1]:
            level_start.append(level_start[-1] + h * w)
        start = torch.tensor(level_start, dtype=itype, device=dev).view(levels, 1)
        width = torch.tensor([w for _, w in shapes], dtype=itype, device=dev).view(levels, 1)
        height = torch.tensor([h for h, _ in shapes], dtype=itype, device=dev).view(levels, 1)
        pix = sampling_locations * size[:, None, :] - 0.5  # [N, Lq, h, L, P, 2]
        # clamped before the integer cast (far-off points stay off the map); their weights are zeroed below
        corner0 = pix.detach().clamp(-2.0, float(max(max(shape) for shape in shapes) + 1)).floor()
        frac_x, frac_y = (pix - corner0).unbind(-1)
        x0, y0 = corner0.to(itype).unbind(-1)
        # weight of each corner: attention · (1 − fx or fx) · (1 − fy or fy), 0 where the corner is off the map
        ax0 = (attention_weights * (1 - frac_x)).masked_fill((x0 < 0) | (x0 >= width), 0.0)
        ax1 = (attention_weights * frac_x).masked_fill((x0 < -1) | (x0 >= width - 1), 0.0)
        wy0 = (1 - frac_y).masked_fill((y0 < 0) | (y0 >= height), 0.0)
        wy1 = frac_y.masked_fill((y0 < -1) | (y0 >= height - 1), 0.0)
        weights = torch.stack([ax0 * wy0, ax1 * wy0, ax0 * wy1, ax1 * wy1], -1)  # [N, Lq, h, L, P, 4]
        # row of value viewed as [N·S·h, d] for corner (x0, y0); the other corners are +1, +W, +W+1 pixels
        image = torch.arange(n, dtype=itype, device=dev).view(n, 1, 1, 1, 1)
        head = torch.arange(heads, dtype=itype, device=dev).view(1, 1, heads, 1, 1)
        row0 = (image * s + start + y0 * width + x0) * heads + head
        step = torch.stack([torch.zeros_like(width), torch.ones_like(width), width, width + 1], -1) * heads  # [L,1,4]
        index = (row0.unsqueeze(-1) + step).clamp_(0, rows - 1)  # zero-weight corners may point anywhere valid
        per_bag = levels * points * 4
        out = _WeightedRowSums.apply(value.reshape(rows, dim), index.view(-1, per_bag),
                                     weights.reshape(-1, per_bag).to(value.dtype))
    return out.view(n, lq, heads * dim)


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
