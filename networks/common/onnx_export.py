"""ONNX export and the onnxruntime parity check shared by every network that exports.

A network wraps its model in an ``nn.Module`` whose ``forward(*inputs)`` returns a tuple of tensors in output-name
order (its export signature), then calls :func:`check_export_args` (opset and input size),
:func:`export_onnx_file` (traced export, atomic write, ``onnx.checker``) and :func:`onnx_parity`
(onnxruntime on the CPU vs PyTorch, max |diff| per output).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from networks.common.errors import ConfigError
from networks.common.io import atomic_path

__all__ = ["MIN_OPSET", "check_export_args", "export_onnx_file", "onnx_parity", "max_abs_diff"]

#: Lowest opset with ``GridSample`` (the pure-PyTorch deformable attention path).
MIN_OPSET = 17


def check_export_args(opset: int, input_hw: Sequence[int], divisor: int = 32, size_hint: str = "") -> tuple[int, int]:
    """``(H, W)`` as ints; :class:`ConfigError` for ``opset < MIN_OPSET`` (key ``export.opset_version``) or a
    size that is not a multiple of ``divisor`` (key ``export.input_height``, ``size_hint`` appended)."""
    if opset < MIN_OPSET:
        raise ConfigError("export.opset_version", f"{opset} is too low", f"use {MIN_OPSET} or higher")
    H, W = int(input_hw[0]), int(input_hw[1])
    if H % divisor or W % divisor:
        raise ConfigError("export.input_height", f"input {H}x{W} must be a multiple of {divisor}{size_hint}")
    return H, W


def export_onnx_file(wrapper: nn.Module, args: tuple[torch.Tensor, ...], out_path: str | Path,
                     input_names: Sequence[str], output_names: Sequence[str], *, opset: int = MIN_OPSET,
                     dynamic_batch: str | None = None, verbose: bool = False,
                     ignore_warnings: type[Warning] = Warning) -> Path:
    """Trace ``wrapper(*args)`` (eval mode, no grad) to ONNX at ``out_path`` atomically; checked with ``onnx.checker``.

    ``dynamic_batch`` names axis 0 of every input and output (dynamic batch); None keeps the traced batch size.
    Warnings of class ``ignore_warnings`` are silenced: tracing warns about every shape-dependent Python branch,
    and the exported spatial sizes are static by design.
    """
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: dynamic_batch} for n in (*input_names, *output_names)}
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".onnx") as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ignore_warnings)
        torch.onnx.export(wrapper.eval(), tuple(args), str(tmp), input_names=list(input_names),
                          output_names=list(output_names), opset_version=int(opset), dynamic_axes=dynamic_axes,
                          do_constant_folding=True, verbose=verbose, dynamo=False)
        import onnx

        onnx.checker.check_model(str(tmp))
    return out_path


def max_abs_diff(got: np.ndarray, expected: np.ndarray) -> float:
    """Max |got − expected| over the finite entries of ``expected``; ``inf`` when the shapes or the pattern of
    non-finite entries (±inf logits on padding tokens) differ; 0.0 for empty or all-non-finite outputs."""
    g64, e64 = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if g64.shape != e64.shape:
        return float("inf")
    fin = np.isfinite(e64)
    if not np.array_equal(fin, np.isfinite(g64)):
        return float("inf")
    return float(np.max(np.abs(g64[fin] - e64[fin]))) if fin.any() else 0.0


def onnx_parity(wrapper: nn.Module, onnx_path: str | Path, args: tuple[torch.Tensor, ...],
                input_names: Sequence[str], output_names: Sequence[str]) -> dict[str, float]:
    """Run ``onnx_path`` with onnxruntime (CPU) and ``wrapper`` (PyTorch, eval, no grad) on ``args``;
    ``{output name: max_abs_diff}`` (see :func:`max_abs_diff`)."""
    import onnxruntime as ort

    with torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in wrapper.eval()(*args)]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(input_names, args, strict=True)}
    got = session.run(list(output_names), feeds)
    return {name: max_abs_diff(g, e) for name, g, e in zip(output_names, got, expected, strict=True)}
