"""Post-norm (or pre-norm) transformer decoder sub-layers of Mask2Former's masked-attention decoder.

Shared by Mask2Former's decoder and Mask Grounding DINO's ReLA region-query branch.  Sequence-first tensors
``[L, B, C]`` (``nn.MultiheadAttention`` without ``batch_first``); parameter names ``self_attn``,
``multihead_attn``, ``linear1``/``linear2`` and ``norm`` are those of Mask2Former/TAO checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SelfAttentionLayer", "CrossAttentionLayer", "FFNLayer"]


class SelfAttentionLayer(nn.Module):
    """Query self-attention (``nn.MultiheadAttention`` ``self_attn``, sequence-first) + residual + ``norm``.

    ``forward(tgt [Q,B,C], query_pos [Q,B,C]) -> [Q,B,C]``; positions are added to queries and keys only.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        if self.normalize_before:
            t = self.norm(tgt)
            q = t + query_pos
            return tgt + self.dropout(self.self_attn(q, q, value=t, need_weights=False)[0])
        q = tgt + query_pos
        return self.norm(tgt + self.dropout(self.self_attn(q, q, value=tgt, need_weights=False)[0]))


class CrossAttentionLayer(nn.Module):
    """Masked cross-attention from queries to one memory level (``multihead_attn``) + residual + ``norm``.

    ``forward(tgt [Q,B,C], memory [HW,B,C], memory_mask [B·heads,Q,HW] bool (True = blocked) or None,
    pos [HW,B,C], query_pos [Q,B,C]) -> [Q,B,C]``.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt, memory, memory_mask, pos, query_pos):
        if self.normalize_before:
            t = self.norm(tgt)
            a = self.multihead_attn(t + query_pos, memory + pos, value=memory, attn_mask=memory_mask,
                                    need_weights=False)[0]
            return tgt + self.dropout(a)
        a = self.multihead_attn(tgt + query_pos, memory + pos, value=memory, attn_mask=memory_mask,
                                need_weights=False)[0]
        return self.norm(tgt + self.dropout(a))


class FFNLayer(nn.Module):
    """``linear1`` → ReLU → dropout → ``linear2`` + residual + ``norm`` (post- or pre-norm). ``[Q,B,C] -> [Q,B,C]``."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        if self.normalize_before:
            return tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(self.norm(tgt))))))
        return self.norm(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
