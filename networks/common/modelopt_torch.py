"""``quantize.backend: modelopt.pytorch``: NVIDIA ModelOpt's PyTorch static int8 PTQ (TAO's ``modelopt`` backend).

The trained checkpoint named by ``quantize.model_path`` gets ModelOpt's simulated-int8 quantizers on the weights
(one scale per output channel) and inputs (one scale per tensor) of its ``nn.Linear`` and ``nn.Conv2d`` layers
(:data:`QUANTIZABLE_TYPES`),
calibrated (absolute maximum, TAO's ``minmax``/``max``) by running the network on the calibration images;
everything else stays in floating point.  The result is written, as TAO names it, to
``<results_dir>/quantized_model_modelopt.pth``: here a whole tao-cli checkpoint (the model's tensors with the
quantizers' calibrated ranges, the ``tao_model`` tag) with a ``quantization`` record holding ModelOpt's own state
(``modelopt_state``), so that ``evaluate``/``inference`` run it by setting their ``checkpoint`` to that file: the
engine re-inserts the quantizers from the record before loading (:func:`restore_like`).  TAO saves it with
``modelopt.torch.opt.save`` instead, a file only ModelOpt's ``restore`` reads.

Which layers (``quantize.layers``, ``quantize.skip_names``), as for the torchao backend: an entry's
``module_name`` is an ``fnmatch`` pattern of qualified module names or a class name; ``weights.dtype`` /
``activations.dtype`` ``int8`` quantize that part of the matching layers and ``native`` leaves it in floating
point, in order; ``skip_names`` removes last; ``quant_axis`` sets the axis of the scales.  With no ``layers``
every ``nn.Linear`` and ``nn.Conv2d`` is quantized (weights and inputs); TAO's backend quantizes nothing then.
A pattern that matches no quantizable layer is an error naming the entry.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from networks.common.errors import CheckpointError, ConfigError
from networks.common.torch_quantize import check_checkpoint_section, quantize_device, save_quantized
from networks.common.torchao_quantize import matches_module

__all__ = ["OUTPUT_NAME", "INSTALL_HINT", "QUANTIZABLE_TYPES", "check_modelopt_torch_section", "quantizable_layers",
           "select_quantizers", "quant_config", "run_modelopt_ptq", "restore_like", "describe"]

#: File name TAO's ModelOpt PyTorch backend writes in the quantize results directory.
OUTPUT_NAME = "quantized_model_modelopt.pth"
INSTALL_HINT = "pip install 'tao-cli[modelopt]' (nvidia-modelopt and requests, which modelopt.torch imports)"
_ALGORITHMS = ("minmax", "max")
_DTYPES = ("int8", "native")


def _missing() -> list[str]:
    return [name for name in ("modelopt", "requests") if importlib.util.find_spec(name) is None]


def _import_modelopt() -> tuple[Any, Any]:
    """(``modelopt.torch.quantization``, ``modelopt.torch.opt``), imported quietly (ModelOpt warns at import about
    package versions it was not tested with and about TorchScript)."""
    import logging
    import warnings

    # torch's extension builder warns that there is no CUDA runtime when ModelOpt imports it on a CPU machine
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            import modelopt.torch.opt as mto
            import modelopt.torch.quantization as mtq
    finally:
        ext_log.setLevel(level)
    return mtq, mto


def check_modelopt_torch_section(q: Any) -> None:
    """Refuse (one-line :class:`ConfigError` naming the field) a ``quantize`` section this backend cannot run: a
    mode other than ``static_ptq``, an algorithm other than minmax/max, a dtype other than int8/native, observer
    settings, ``backend_kwargs``, a TensorRT device, an empty ``model_path`` or a missing package (looked up, not
    imported: it runs at ``--dry-run``)."""
    if str(q.mode) != "static_ptq":
        raise ConfigError("quantize.mode", f"'{q.mode}' is not run by backend modelopt.pytorch (TAO's ModelOpt "
                          "backend is static PTQ: weights and activations, calibrated)", "set quantize.mode="
                          "static_ptq, or backend=torchao for weight-only int8")
    if str(q.algorithm) not in _ALGORITHMS:
        raise ConfigError("quantize.algorithm", f"'{q.algorithm}' is not implemented by tao-cli's modelopt.pytorch "
                          "backend (int8 ranges are calibrated by absolute maximum)", "set quantize.algorithm=minmax")
    for i, layer in enumerate(q.layers):
        for part in ("weights", "activations"):
            s = getattr(layer, part)
            where = f"quantize.layers[{i}].{part}"
            if str(s.dtype) not in _DTYPES:
                raise ConfigError(f"{where}.dtype", f"'{s.dtype}' is not implemented by tao-cli's "
                                  "modelopt.pytorch backend (fp8 needs a CUDA GPU with fp8 units)",
                                  "use int8 or native")
            if s.observer_or_fake_quant or len(s.observer_or_fake_quant_kwargs or {}):
                raise ConfigError(where, "observer_or_fake_quant and its kwargs are not read by ModelOpt "
                                  "(its calibrator is the absolute maximum)", "remove them")
    check_checkpoint_section(q, "modelopt.pytorch", "Linear, Conv2d", " (TAO's does not read them either)")
    missing = _missing()
    if missing:
        raise ConfigError("quantize.backend", f"'modelopt.pytorch' needs {' and '.join(missing)}, not installed",
                          INSTALL_HINT)


#: The layer types this backend quantizes: exactly these classes, which ModelOpt replaces by its quantized
#: versions.  A subclass (the pixel decoder's ``ConvNorm``, ``nn.MultiheadAttention``'s output projection, whose
#: weight the functional attention reads directly) is not converted by ModelOpt and stays in floating point.
QUANTIZABLE_TYPES = (nn.Linear, nn.Conv2d)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of the layers of ``model`` whose type is one of :data:`QUANTIZABLE_TYPES`."""
    return [(n, m) for n, m in model.named_modules() if n and type(m) in QUANTIZABLE_TYPES]


def _axis(s: Any, default: int | None) -> int | None:
    return default if s is None or s.quant_axis is None else int(s.quant_axis)


def select_quantizers(model: nn.Module, layers: Iterable[Any], skip_names: Iterable[str]) -> dict[str, dict]:
    """``{qualified layer name: {"weights": axis or False, "inputs": axis or False}}`` for the layers of ``model``
    with at least one quantized part, in module order (rules in the module docstring; ``False``: floating point,
    ``None``: one scale per tensor).  :class:`ConfigError` naming the entry when a pattern matches no layer."""
    candidates = quantizable_layers(model)
    layers = list(layers)
    state = {n: {"weights": 0 if not layers else False, "inputs": None if not layers else False}
             for n, _ in candidates}
    for i, layer in enumerate(layers):
        field = f"quantize.layers[{i}].module_name"
        hit = [n for n, m in candidates if matches_module(n, m, str(layer.module_name))]
        if not hit:
            raise ConfigError(field, f"'{layer.module_name}' matches no nn.Linear or nn.Conv2d layer of the model",
                              f"e.g. {candidates[0][0] if candidates else 'Linear'} or Linear")
        for n in hit:
            if str(layer.weights.dtype) == "int8":
                state[n]["weights"] = _axis(layer.weights, 0)
            elif str(layer.weights.dtype) == "native":
                state[n]["weights"] = False
            if str(layer.activations.dtype) == "int8":
                state[n]["inputs"] = _axis(layer.activations, None)
            elif str(layer.activations.dtype) == "native":
                state[n]["inputs"] = False
    for i, pattern in enumerate(skip_names):
        hit = [n for n, m in candidates if matches_module(n, m, str(pattern))]
        if not hit:
            raise ConfigError(f"quantize.skip_names[{i}]", f"'{pattern}' matches no nn.Linear or nn.Conv2d layer of "
                              "the model", f"e.g. {candidates[0][0] if candidates else 'Linear'} or Linear")
        for n in hit:
            state[n] = {"weights": False, "inputs": False}
    return {n: s for n, s in state.items() if s["weights"] is not False or s["inputs"] is not False}


def quant_config(selected: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """ModelOpt's quantization config for :func:`select_quantizers`' answer: every quantizer off, then 8-bit
    weight / input quantizers on the selected layers (quantizer names are the layer's name plus
    ``.weight_quantizer`` / ``.input_quantizer``), calibrated by absolute maximum."""
    cfg: dict[str, Any] = {"*": {"enable": False}}
    for name, parts in selected.items():
        for part, quantizer in (("weights", "weight_quantizer"), ("inputs", "input_quantizer")):
            if parts[part] is not False:
                cfg[f"{name}.{quantizer}"] = {"num_bits": 8, "axis": parts[part]}
    return {"quant_cfg": cfg, "algorithm": "max"}


def run_modelopt_ptq(q: Any, ctx: Any, model: nn.Module, network: str, prefix: str,
                     calibrate: Callable[[nn.Module, torch.device], int]) -> dict[str, Any]:
    """Quantize ``model`` (the bare network, ``quantize.model_path`` already loaded into it) with ModelOpt,
    calibrated by ``calibrate(model, device)`` (runs the network on the calibration images, returns how many),
    and write :data:`OUTPUT_NAME` and ``quantize_report.json`` into ``ctx.run_dir``; returns what status.json
    records.  ``q.device`` cuda runs on the GPU when there is one (else the CPU, logged); the file holds CPU
    tensors and is written with ``ctx.save_checkpoint`` (atomic, tagged, encrypted with the spec's key)."""
    from networks.common.io import atomic_write_json
    from networks.common.weights import whole_model_state

    path = Path(str(q.model_path))
    obj = ctx.load_checkpoint(path)
    state = whole_model_state(obj, model, prefix, field="quantize.model_path", source=path, network=network)
    selected = select_quantizers(model, q.layers, q.skip_names)
    device = quantize_device(q, ctx, "calibrating")
    mtq, mto = _import_modelopt()
    import modelopt

    work = copy.deepcopy(model).to(device).eval()
    images: list[int] = []

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            images.append(calibrate(m, device))

    with contextlib.redirect_stdout(io.StringIO()):  # ModelOpt prints how many quantizers it inserted
        work = mtq.quantize(work, quant_config(selected), forward_loop)
    without = [n for n in selected if not hasattr(work.get_submodule(n), "weight_quantizer")]
    if without:
        raise RuntimeError(f"ModelOpt did not convert {len(without)} selected layer(s), e.g. {without[:3]}")
    quantized = {k: v.detach().to("cpu") for k, v in work.state_dict().items()}
    kept = {k: v for k, v in state.items() if not k.startswith(prefix)}
    record = {"backend": "modelopt.pytorch", "mode": "static_ptq", "dtype": "int8", "modelopt": modelopt.__version__,
              "root": prefix.rstrip("."), "modelopt_state": mto.modelopt_state(work),
              "modules": [prefix + n for n in selected], "source": str(path)}
    dest = save_quantized(ctx, obj, {**kept, **{prefix + k: v for k, v in quantized.items()}}, network, record,
                          OUTPUT_NAME)
    weights = sum(s["weights"] is not False for s in selected.values())
    inputs = sum(s["inputs"] is not False for s in selected.values())
    total = len(quantizable_layers(model))
    report = {"backend": "modelopt.pytorch", "mode": "static_ptq", "dtype": "int8", "algorithm": "max",
              "modelopt": modelopt.__version__, "source": str(path), "output": str(dest),
              "calibration_images": sum(images), "quantizable_layers": total, "quantized_layers": len(selected),
              "int8_weights": weights, "int8_inputs": inputs,
              "modules": {n: {k: (v if v is not False else "native") for k, v in s.items()}
                          for n, s in selected.items()}}
    atomic_write_json(Path(ctx.run_dir) / "quantize_report.json", report, indent=2)
    ctx.log.info("ModelOpt %s: int8 weights in %d and int8 inputs in %d of %d Linear/Conv2d layers, calibrated on "
                 "%d images; written to %s", modelopt.__version__, weights, inputs, total, sum(images), dest)
    return {"quantized_model": str(dest), "quantized_layers": len(selected), "quantizable_layers": total,
            "calibration_images": sum(images), "report": str(Path(ctx.run_dir) / "quantize_report.json")}


def restore_like(module: nn.Module, record: Mapping[str, Any], source: str) -> None:
    """Give ``module`` the quantizers a checkpoint's ``quantization`` record describes (ModelOpt's state, on the
    sub-module ``record["root"]``), so that the checkpoint's tensors, calibrated ranges included, load into them.
    :class:`CheckpointError` when ModelOpt is missing or the record does not fit the model."""
    if _missing():
        raise CheckpointError(source, "is a ModelOpt int8 checkpoint and nvidia-modelopt is not installed",
                              INSTALL_HINT)
    _, mto = _import_modelopt()
    root = str(record.get("root") or "")
    try:
        target = module.get_submodule(root) if root else module
        with contextlib.redirect_stdout(io.StringIO()):
            mto.restore_from_modelopt_state(target, record["modelopt_state"])
    except (AttributeError, KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(source, f"holds ModelOpt quantizers that do not fit this model ({exc})",
                              "check that the spec's model section matches the one the checkpoint was trained "
                              "with") from None


def describe(record: Mapping[str, Any]) -> str:
    """One line for logs: what a checkpoint's ``quantization`` record says."""
    return json.dumps({k: record.get(k) for k in ("backend", "mode", "dtype", "modelopt")}) + \
        f" ({len(record.get('modules', []))} quantized layers)"
