"""Optimizer options shared by the networks."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["fused_option"]

_FUSED_DEVICES = ("cpu", "cuda")


def fused_option(params: Iterable[Any], precision: str | None = None) -> dict[str, bool]:
    """``{"fused": True}`` when torch's fused Adam/AdamW/SGD step can update every parameter, else ``{}`` (torch's
    default) or, under mixed precision, ``{"foreach": True}``.

    ``params``: tensors or parameter-group dicts (``"params"`` lists), as given to the optimizer.  The fused step
    applies the same update rule in one kernel per dtype/device instead of a Python loop over tensors: on a
    2-core CPU, AdamW over MAL's 90M-parameter ViT-B takes 54 ms instead of 517 ms.  It needs floating-point
    parameters on one device type that torch has fused kernels for (CPU, CUDA); anything else keeps the default.
    ``precision`` is the Trainer's (``trainer.precision``): under Lightning's mixed precision ("16-mixed",
    "bf16-mixed") the answer is ``{"foreach": True}`` (one multi-tensor step per group: 194 ms in the example
    above), because Lightning refuses gradient clipping with an optimizer that unscales gradients itself, which a
    fused one does.
    """
    if precision is not None and "mixed" in str(precision):
        return {"foreach": True}
    tensors: list[torch.Tensor] = []
    for p in params:
        tensors.extend(p["params"] if isinstance(p, dict) else [p])
    if not tensors:
        return {}
    kinds = {t.device.type for t in tensors}
    if len(kinds) != 1 or kinds.pop() not in _FUSED_DEVICES:
        return {}
    if not all(torch.is_floating_point(t) for t in tensors):
        return {}
    return {"fused": True}
