"""Small building blocks shared by several networks: MLP, activation lookup, conv+norm.

Stochastic depth and the transformer FFN come from ``timm.layers`` (``DropPath``, ``Mlp``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "get_activation", "c2_xavier_fill", "ConvNorm", "build_norm2d"]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (not after the last).

    Kept rather than ``timm.layers.Mlp`` (fixed two layers, ``fc1``/``fc2``) or ``torchvision.ops.MLP``
    (``Sequential`` indices that count the activations), whose state-dict names would break checkpoints.

    Input ``[..., input_dim]`` → output ``[..., output_dim]``.  Parameters are ``layers.{j}.{weight,bias}``
    (the detectron2/DETR naming used by Mask2Former's ``mask_embed`` and DETR-style box heads).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


def get_activation(name: str):
    """Return the functional activation called ``name`` (``relu``, ``gelu``, ``glu``)."""
    table = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in table:
        raise ValueError(f"activation should be one of {sorted(table)}, not {name!r}")
    return table[name]


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2-style "XavierFill" used by detectron2: kaiming-uniform with a=1 on the weight, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, 0)


def build_norm2d(norm: str, channels: int) -> nn.Module | None:
    """Normalisation layer for NCHW maps by detectron2 name: ``""`` (none), ``GN`` (32 groups), ``BN``,
    ``SyncBN`` (plain BatchNorm2d here; DDP converts it when asked), ``LN`` (channel LayerNorm)."""
    if not norm:
        return None
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    if norm in ("BN", "SyncBN"):
        return nn.BatchNorm2d(channels)
    if norm == "LN":
        return LayerNorm2d(channels)
    raise ValueError(f"norm should be one of '', GN, BN, SyncBN, LN; got {norm!r}")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (parameters ``weight``/``bias`` of size C)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ConvNorm(nn.Conv2d):
    """``nn.Conv2d`` with an optional ``norm`` submodule and activation applied after it.

    Mirrors detectron2's ``layers.Conv2d`` so state-dict names are ``weight``, ``bias`` and ``norm.*``.
    """

    def __init__(self, *args, norm: nn.Module | None = None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x
