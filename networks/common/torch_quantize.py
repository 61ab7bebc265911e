"""The ``quantize`` action's two PyTorch backends behind one entry point, and the one way a checkpoint they wrote
is made loadable again.

``torchao`` (weight-only int8, :mod:`networks.common.torchao_quantize`) and ``modelopt.pytorch`` (ModelOpt's
simulated static int8, :mod:`networks.common.modelopt_torch`) both start from the trained model and write a
tagged tao-cli checkpoint whose ``quantization`` record says how to rebuild the quantized layers.  The networks
supply only their model and, for ModelOpt, how to run it on the calibration images.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from networks.common.errors import ConfigError

__all__ = ["PYTORCH_BACKENDS", "run_checkpoint_quantize", "prepare_quantized", "check_checkpoint_section",
           "quantize_device", "save_quantized"]

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


def check_checkpoint_section(q: Any, backend: str, layer_classes: str, kwargs_note: str = "") -> None:
    """The refusals both PyTorch backends share (one-line :class:`ConfigError` naming the field): an empty
    ``quantize.layers[i].module_name`` (``layer_classes``: the class names to suggest), ``backend_kwargs``
    (``kwargs_note``: appended to the reason), ``device: trt`` and an empty ``model_path``."""
    for i, layer in enumerate(q.layers):
        if not str(layer.module_name or ""):
            raise ConfigError(f"quantize.layers[{i}].module_name", "is empty", "give a module name pattern "
                              f"(backbone.*) or a class name ({layer_classes})")
    if len(q.backend_kwargs):
        raise ConfigError("quantize.backend_kwargs", f"{sorted(q.backend_kwargs)} are not read by backend "
                          f"{backend}{kwargs_note}", "remove quantize.backend_kwargs")
    if str(q.device) == "trt":
        raise ConfigError("quantize.device", f"'trt' is not a device for backend {backend}", "use cpu or cuda")
    if not q.model_path:
        raise ConfigError("quantize.model_path", "is empty", "point it at a checkpoint written by the train action "
                          f"(backend {backend} quantizes the PyTorch model)")


def quantize_device(q: Any, ctx: Any, doing: str) -> torch.device:
    """Where the PyTorch backends work: ``q.device`` when it is a CUDA device and one is present, else the CPU
    (logged as ``"... : <doing> on the CPU"`` when CUDA was asked for)."""
    if str(q.device).startswith("cuda"):
        if torch.cuda.is_available():
            return torch.device(str(q.device))
        ctx.log.info("quantize.device=%s but no CUDA device is present: %s on the CPU", q.device, doing)
    return torch.device("cpu")


def save_quantized(ctx: Any, source: Mapping[str, Any], state_dict: Mapping[str, Any], network: str,
                   record: Mapping[str, Any], name: str) -> Path:
    """Write ``<ctx.run_dir>/<name>``: a tagged tao-cli checkpoint of ``state_dict`` with the ``quantization``
    ``record`` and the ``epoch``/``global_step`` of the ``source`` checkpoint (optimizer and loop states are
    dropped), through ``ctx.save_checkpoint`` (atomic, tagged, encrypted with the spec's key); returns its path."""
    out = {"state_dict": dict(state_dict), "tao_model": network, "quantization": dict(record)}
    out.update({k: source[k] for k in ("epoch", "global_step") if k in source})
    dest = Path(ctx.run_dir) / name
    ctx.save_checkpoint(out, dest)
    return dest
