"""ONNX export and the onnxruntime parity check shared by every network that exports.

A network wraps its model in an ``nn.Module`` whose ``forward(*inputs)`` returns a tuple of tensors in output-name
order (its export signature), then calls :func:`check_export_args` (opset and input size),
:func:`export_onnx_file` (traced export, atomic write, ``onnx.checker``) and :func:`onnx_parity`
(onnxruntime on the CPU vs PyTorch: output names, then shapes, then max |diff| per output).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from networks.common.errors import ConfigError
from networks.common.io import atomic_path

__all__ = ["MIN_OPSET", "ParityError", "check_export_args", "compare_outputs", "export_onnx_file", "onnx_parity",
           "max_abs_diff"]

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


class ParityError(RuntimeError):
    """The exported ONNX file does not reproduce the PyTorch outputs: an output is missing, extra, renamed or
    has another shape.  An internal failure (exit code 1), not bad user input."""


def max_abs_diff(got: np.ndarray, expected: np.ndarray) -> float:
    """Max |got − expected| over the finite entries of ``expected``; ``inf`` when the shapes or the pattern of
    non-finite entries (±inf logits on padding tokens) differ (never broadcast); 0.0 for empty or all-non-finite
    outputs."""
    g64, e64 = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if g64.shape != e64.shape:
        return float("inf")
    fin = np.isfinite(e64)
    if not np.array_equal(fin, np.isfinite(g64)):
        return float("inf")
    return float(np.max(np.abs(g64[fin] - e64[fin]))) if fin.any() else 0.0


def compare_outputs(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                    output_names: Sequence[str]) -> dict[str, float]:
    """``{name: max_abs_diff}`` for each of ``output_names``, checked in three steps.

    1. names: ``got`` and ``expected`` must each hold exactly ``output_names`` (a missing or extra output is a
       :class:`ParityError` naming it);
    2. shapes: per output, ``got`` and ``expected`` shapes must be equal (a :class:`ParityError` naming the
       output and both shapes; a batch-1 output never broadcasts against a batch-2 expectation);
    3. values: :func:`max_abs_diff` (inf-aware).
    """
    names = list(output_names)
    if len(set(names)) != len(names):
        raise ParityError(f"duplicate output names {names}")
    for side, outputs in (("ONNX Runtime", got), ("PyTorch", expected)):
        missing = [n for n in names if n not in outputs]
        extra = [n for n in outputs if n not in names]
        if missing or extra:
            raise ParityError(f"{side} outputs {list(outputs)} do not match the export signature {names}: "
                              f"missing {missing}, extra {extra}")
    for n in names:
        g_shape, e_shape = tuple(np.shape(got[n])), tuple(np.shape(expected[n]))
        if g_shape != e_shape:
            raise ParityError(f"output '{n}': ONNX Runtime shape {g_shape} != PyTorch shape {e_shape}")
    return {n: max_abs_diff(got[n], expected[n]) for n in names}


def onnx_parity(wrapper: nn.Module, onnx_path: str | Path, args: tuple[torch.Tensor, ...],
                input_names: Sequence[str], output_names: Sequence[str]) -> dict[str, float]:
    """Run ``onnx_path`` with onnxruntime (CPU) and ``wrapper`` (PyTorch, eval, no grad) on ``args``;
    ``{output name: max_abs_diff}`` after the name and shape checks of :func:`compare_outputs`.

    The ONNX file's own input and output names must be ``input_names`` / ``output_names`` (in order), and the
    wrapper must return exactly one tensor per output name; anything else is a :class:`ParityError`.
    """
    import onnxruntime as ort

    from networks.common.onnx_runtime import run_session_options

    input_names, output_names = list(input_names), list(output_names)
    if len(args) != len(input_names):
        raise ParityError(f"{len(args)} example inputs for input names {input_names}")
    with torch.no_grad():
        result = wrapper.eval()(*args)
    result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    if len(result) != len(output_names):
        raise ParityError(f"the PyTorch wrapper returns {len(result)} outputs for output names {output_names}")
    expected = {n: t.detach().cpu().numpy() for n, t in zip(output_names, result, strict=True)}
    session = ort.InferenceSession(str(onnx_path), run_session_options(), providers=["CPUExecutionProvider"])
    onnx_inputs = [i.name for i in session.get_inputs()]
    if onnx_inputs != input_names:
        raise ParityError(f"ONNX inputs {onnx_inputs} != expected {input_names}")
    onnx_outputs = [o.name for o in session.get_outputs()]
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(input_names, args, strict=True)}
    # every output the file has, by its own names: a renamed, missing or extra output shows up in compare_outputs
    got = dict(zip(onnx_outputs, session.run(onnx_outputs, feeds), strict=True))
    if onnx_outputs != output_names and sorted(onnx_outputs) == sorted(output_names):
        raise ParityError(f"ONNX outputs {onnx_outputs} are not in the export order {output_names}")
    return compare_outputs(got, expected, output_names)
