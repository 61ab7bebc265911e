"""The ``quantize`` action's two PyTorch backends behind one entry point, and the one way a checkpoint they wrote
is made loadable again.

``torchao`` (weight-only int8, :mod:`networks.common.torchao_quantize`) and ``modelopt.pytorch`` (ModelOpt's
simulated static int8, :mod:`networks.common.modelopt_torch`) both start from the trained model and write a
tagged tao-cli checkpoint whose ``quantization`` record says how to rebuild the quantized layers.  The networks
supply only their model and, for ModelOpt, how to run it on the calibration images.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["PYTORCH_BACKENDS", "run_checkpoint_quantize", "prepare_quantized"]

#: ``quantize.backend`` values whose output is a PyTorch checkpoint rather than an ONNX file.
PYTORCH_BACKENDS = ("torchao", "modelopt.pytorch")

Calibrate = Callable[[nn.Module, Any], int]


def run_checkpoint_quantize(q: Any, ctx: Any, model: nn.Module, network: str, prefix: str,
                            calibration: Callable[[], Calibrate]) -> dict[str, Any]:
    """Quantize ``model`` (the bare network, ``q.model_path`` already loaded into it; its tensors sit under
    ``prefix`` in that checkpoint) with ``q.backend``, one of :data:`PYTORCH_BACKENDS`, and return what
    status.json records.  ``calibration()`` makes ``calibrate(model, device) -> images used``; it is called only
    for ``modelopt.pytorch``, so the weight-only backend never reads the calibration dataset."""
    if str(q.backend) == "modelopt.pytorch":
        from networks.common.modelopt_torch import run_modelopt_ptq

        return run_modelopt_ptq(q, ctx, model, network, prefix, calibration())
    from networks.common.torchao_quantize import run_weight_only_ptq

    return run_weight_only_ptq(q, ctx, model, network, prefix)


def prepare_quantized(module: nn.Module, record: Mapping[str, Any], source: str, root: str | None = None) -> str:
    """Give ``module`` the quantized layers a checkpoint's ``quantization`` ``record`` describes, so that the
    checkpoint's tensors load into it, and return one line for the log.  ``root`` overrides the record's
    sub-module for ModelOpt's state (``""``: ``module`` is the bare network, not the Lightning module the record
    was written from).  :class:`~networks.common.errors.CheckpointError` when the record does not fit ``module``
    or its backend's package is missing."""
    if record.get("backend") == "modelopt.pytorch":
        from networks.common.modelopt_torch import describe, restore_like

        restore_like(module, record if root is None else {**record, "root": root}, source)
        return f"ModelOpt simulated-int8 quantized model {describe(record)}"
    from networks.common.torchao_quantize import describe, quantize_like

    quantize_like(module, record, source)
    return f"weight-only quantized model {describe(record)}"
