"""``quantize.backend: modelopt.onnx``: NVIDIA ModelOpt's ONNX int8 post-training quantization, the backend TAO
uses to make a QDQ file for TensorRT, run inside :func:`networks.common.onnx_quantize.run_static_ptq` (which
names the nodes, chooses the fp32 nodes, probes unbounded tensors and writes the report for every ONNX backend).

ModelOpt places Q/DQ by TensorRT's rules (int8 symmetric activations and per-channel weights, on the inputs of
the layers TensorRT runs in int8) and calibrates through ONNX Runtime.  As in TAO, ``quantize.algorithm`` picks
its calibration (``minmax`` → ModelOpt's ``max``), ``quantize.skip_names`` are node-name regular expressions
(``re.match``; tao-cli also matches them as substrings, as its ONNX Runtime backend does) and
``quantize.backend_kwargs`` go to ``modelopt.onnx.quantization.quantize`` as keyword arguments.

Where tao-cli differs from TAO: the precision of the layers left un-quantized (ModelOpt's ``high_precision_dtype``)
follows ``quantize.device``: ``cpu`` keeps them fp32 (ONNX Runtime's CPU provider runs most fp16 operators
through casts to fp32), ``cuda``/``trt`` get ModelOpt's default fp16 as in TAO.  Calibration runs on the providers
``quantize.device`` names when this ONNX Runtime has them, else on the CPU (ModelOpt would pick the first
available of cpu, cuda:0 and trt, in that order).  The nodes tao-cli keeps in fp32 (the network's TAO layers,
tensors with an infinite range) are passed as exact ``nodes_to_exclude``.

The package pins ``nvidia-modelopt[onnx]`` would bring (onnx 1.21, onnxruntime-gpu) conflict with tao-cli's, so the
``modelopt`` extra installs the base package and the ONNX helpers its quantizer imports, on tao-cli's
onnx/onnxruntime.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from networks.common.errors import ConfigError

__all__ = ["ALGORITHMS", "OWNED_ARGUMENTS", "INSTALL_HINT", "load_quantizer", "check_modelopt_section",
           "calibration_eps", "high_precision_dtype", "ort_quantization_restored", "regex_matches", "exact_names_pattern", "stack_feeds",
           "quantize_with_modelopt"]

#: ``quantize.algorithm`` → ModelOpt's int8 calibration method (TAO sends an unknown name, ``minmax`` included,
#: to ``max``; ``awq_*`` and ``rtn_dq`` are int4 weight-only methods).
ALGORITHMS = {"minmax": "max", "max": "max", "entropy": "entropy"}
#: ModelOpt arguments tao-cli sets itself; ``backend_kwargs`` naming one is refused (with the spec field to use).
OWNED_ARGUMENTS = {"onnx_path": "quantize.model_path", "output_path": "the run directory",
                   "calibration_data": "the calibration dataset", "calibration_data_reader": "the calibration dataset",
                   "nodes_to_exclude": "quantize.skip_names", "quantize_mode": "int8 (the only mode here)"}
INSTALL_HINT = "pip install 'tao-cli[modelopt]' (nvidia-modelopt with its ONNX helpers on tao-cli's onnx/onnxruntime)"


def load_quantizer() -> Callable[..., Any]:
    """``modelopt.onnx.quantization.quantize``; :class:`ConfigError` on ``quantize.backend`` when it does not
    import."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:  # ModelOpt re-raises its helpers' ImportError with an install hint appended
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("quantize.backend", f"'modelopt.onnx' needs nvidia-modelopt's ONNX quantizer, which does "
                          f"not import here ({why})", INSTALL_HINT) from None
    return quantize


def check_modelopt_section(q: Any) -> None:
    """Refuse (one-line :class:`ConfigError` naming the field) what this backend cannot run: a mode other than
    ``static_ptq``, an algorithm without an int8 ModelOpt calibration, per-layer settings, a ``skip_names`` entry
    that is not a regular expression, a ``backend_kwargs`` key ModelOpt's ``quantize`` does not take or that
    tao-cli sets itself; and ModelOpt not importing."""
    if str(q.mode) != "static_ptq":
        raise ConfigError("quantize.mode", f"'{q.mode}' is not implemented for backend 'modelopt.onnx' (ModelOpt's "
                          "ONNX quantizer is static PTQ with calibration)", "set quantize.mode=static_ptq")
    if str(q.algorithm) not in ALGORITHMS:
        raise ConfigError("quantize.algorithm", f"'{q.algorithm}' is not an int8 calibration of ModelOpt (awq_* and "
                          "rtn_dq are its int4 weight-only methods)", f"use one of {', '.join(ALGORITHMS)}")
    if len(q.layers):
        raise ConfigError("quantize.layers", "per-layer dtypes are not implemented for backend modelopt.onnx "
                          "(every quantized layer is int8)", "remove quantize.layers; use quantize.skip_names to "
                          "keep layers in fp32")
    for pattern in q.skip_names:
        try:
            re.compile(str(pattern))
        except re.error as exc:
            raise ConfigError("quantize.skip_names", f"'{pattern}' is not a regular expression ({exc}); "
                              "backend modelopt.onnx matches node names with re.match",
                              "escape the special characters") from None
    quantize = load_quantizer()
    accepted = set(inspect.signature(quantize).parameters) - {"kwargs"}
    for key in q.backend_kwargs:
        if key in OWNED_ARGUMENTS:
            raise ConfigError(f"quantize.backend_kwargs.{key}", f"is set by tao-cli from {OWNED_ARGUMENTS[key]}",
                              "remove it from quantize.backend_kwargs")
        if key not in accepted:
            usable = ", ".join(sorted(accepted - set(OWNED_ARGUMENTS)))
            raise ConfigError(f"quantize.backend_kwargs.{key}", "is not an argument of "
                              "modelopt.onnx.quantization.quantize", f"use one of {usable}")


def calibration_eps(device: str, providers: list[str]) -> list[str]:
    """ModelOpt's ``calibration_eps`` for ``quantize.device`` given :func:`choose_providers`' answer: the GPU
    (``cuda:N``; ``trt`` first for ``trt`` when ONNX Runtime has TensorRT) then the CPU, or only the CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in providers:
        return ["cpu"]
    device = str(device)
    gpu = device if device.startswith("cuda:") else "cuda:0"
    eps = [gpu, "cpu"]
    if device == "trt" and "TensorrtExecutionProvider" in ort.get_available_providers():
        eps.insert(0, "trt")
    return eps


def regex_matches(node_names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The names that a pattern matches at their start (``re.match``, ModelOpt's rule), in the given order."""
    compiled = [re.compile(str(p)) for p in patterns if str(p)]
    return [n for n in node_names if any(c.match(n) for c in compiled)]


def exact_names_pattern(names: Iterable[str]) -> list[str]:
    """``nodes_to_exclude`` for ModelOpt that matches exactly ``names``: one anchored alternation (ModelOpt tries
    every pattern on every node, so thousands of separate patterns would cost minutes on a large graph)."""
    names = sorted(set(names))
    return [f"^(?:{'|'.join(re.escape(n) for n in names)})$"] if names else []


def stack_feeds(feeds: Iterator[dict]) -> dict[str, Any]:
    """ModelOpt's ``calibration_data``: the feeds concatenated along the batch axis (ModelOpt splits them again by
    the graph's batch size, 1 where it is dynamic)."""
    import numpy as np

    parts = list(feeds)
    if not parts:
        raise ValueError("no calibration feeds")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _plain(section: Any) -> dict[str, Any]:
    """A spec mapping as plain Python containers (ModelOpt and the JSON report take no OmegaConf nodes)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)


@contextlib.contextmanager
def ort_quantization_restored() -> Iterator[None]:
    """Put ONNX Runtime's quantization package back as it was on exit.  ModelOpt patches it in place at every call
    and never undoes it: calibrator factories and methods replaced, operators added to and removed from the QDQ
    registry.  Left so, the next ONNX Runtime quantization in the process (``backend: onnxruntime``, the
    range probe, a second ModelOpt call) runs ModelOpt's versions, or fails on their signatures."""
    import onnxruntime.quantization  # noqa: F401  (loads the modules to snapshot)

    saved: list[tuple[Any, dict[str, Any]]] = []
    tables: list[tuple[dict, dict]] = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("onnxruntime.quantization"):
            continue
        saved.append((module, dict(vars(module))))
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == name:
                saved.append((value, dict(vars(value))))
            elif isinstance(value, dict):
                tables.append((value, dict(value)))
    try:
        yield
    finally:
        for owner, before in saved:
            now = vars(owner)
            for key in [k for k in now if k not in before]:
                delattr(owner, key)
            for key, value in before.items():
                if now.get(key) is not value:
                    setattr(owner, key, value)
        for table, before in tables:
            if table != before:
                table.clear()
                table.update(before)


class _DropNvmlError(logging.Filter):
    """ModelOpt logs an ERROR when it cannot count GPUs through NVML (every machine without an NVIDIA driver);
    the CPU calibration it then runs is what was asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "NVML" not in record.getMessage()


def high_precision_dtype(q: Any) -> str:
    """The precision ModelOpt gives the layers it leaves un-quantized: ``backend_kwargs.high_precision_dtype``,
    else fp32 for ``quantize.device=cpu`` and ModelOpt's (and TAO's) fp16 for a GPU."""
    return str(_plain(q.backend_kwargs).get("high_precision_dtype", "fp32" if str(q.device) == "cpu" else "fp16"))


def quantize_with_modelopt(q: Any, named_path: Path, out_path: Path, excluded: list[str], feeds: Iterator[dict],
                           providers: list[str], large: bool) -> dict[str, Any]:
    """Write ``out_path``: ``named_path`` quantized by ModelOpt with ``excluded`` (exact node names) kept out and
    ``feeds`` as the calibration data.  Returns the report fields this backend adds."""
    from networks.common.onnx_runtime import sessions_take_run_threads

    quantize = load_quantizer()
    device = str(q.device)
    kwargs: dict[str, Any] = {
        "quantize_mode": "int8", "calibration_method": ALGORITHMS[str(q.algorithm)],
        "calibration_eps": calibration_eps(device, providers),
        "high_precision_dtype": high_precision_dtype(q), "dq_only": False,
        "use_external_data_format": large, "log_level": "WARNING",
    }
    extra = _plain(q.backend_kwargs)
    kwargs.update(extra)
    modelopt_log = logging.getLogger("modelopt.onnx")
    quiet = _DropNvmlError()
    modelopt_log.addFilter(quiet)
    try:
        # ModelOpt also prints its records on a stdout handler it makes at each call; they reach the run's log by
        # propagation, so that copy is dropped
        # its calibration sessions get the run's intra-op thread count, as tao-cli's own do
        with contextlib.redirect_stdout(io.StringIO()), ort_quantization_restored(), sessions_take_run_threads():
            quantize(onnx_path=str(named_path), output_path=str(out_path), calibration_data=stack_feeds(feeds),
                     nodes_to_exclude=exact_names_pattern(excluded), **kwargs)
    finally:
        modelopt_log.removeFilter(quiet)
    if not out_path.is_file():
        raise RuntimeError(f"ModelOpt wrote no quantized model at {out_path}")
    return {"activations": "int8 (per-tensor, symmetric)", "weights": "int8 (per-channel, symmetric)",
            "calibration_method": kwargs["calibration_method"], "calibration_eps": list(kwargs["calibration_eps"]),
            "high_precision_dtype": kwargs["high_precision_dtype"],
            "backend_kwargs": extra}
