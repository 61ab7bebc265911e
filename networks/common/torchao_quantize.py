"""The ``quantize`` action's PyTorch backend: TAO's ``backend: torchao`` with ``mode: weight_only_ptq``.

The trained checkpoint named by ``quantize.model_path`` gets int8 weights (one scale per output channel, from the
absolute maximum: what TAO calls ``minmax``) in its ``nn.Linear`` layers (but ``nn.MultiheadAttention``'s
output projection, see :func:`_linears`) through ``torchao.quantization``;
activations and every other layer stay in floating point.  The result is written, as TAO does, to
``<results_dir>/quantized_model_torchao.pth`` — here a whole tao-cli checkpoint (the input's state dict with the
quantized tensors in place, the ``tao_model`` tag, and a ``quantization`` record naming the quantized modules),
so that ``evaluate``/``inference`` run it by setting their ``checkpoint`` to that file (the engine re-creates the
int8 layers from the record before loading, :func:`quantize_like`).

Which layers (``quantize.layers``, ``quantize.skip_names``): an entry's ``module_name`` is an ``fnmatch`` pattern
of qualified module names (``backbone.*``) or a class name (``Linear``); ``weights.dtype: int8`` adds the matching
``nn.Linear`` layers, ``native`` removes them, in order, and ``skip_names`` (same patterns) removes last.  With
no ``layers`` every ``nn.Linear`` is quantized; TAO quantizes nothing then and writes an unchanged model
(``docs/compat.md``).  A pattern that matches no ``nn.Linear`` is an error naming the entry, not a silent no-op.
"""
from __future__ import annotations

import copy
import fnmatch
import importlib.util
import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from networks.common.errors import CheckpointError, ConfigError
from networks.common.torch_quantize import check_checkpoint_section, quantize_device, save_quantized

__all__ = ["OUTPUT_NAME", "TORCHAO_REQUIREMENT", "check_torchao_section", "describe", "matches_module",
           "quantize_like", "run_weight_only_ptq", "select_modules"]

#: File name TAO's torchao backend writes in the quantize results directory.
OUTPUT_NAME = "quantized_model_torchao.pth"
#: The pinned package (the ``quantize`` extra of tao-cli).
TORCHAO_REQUIREMENT = "torchao==0.18.0"
_MISSING = "'torchao' needs the torchao package, which is not installed"
_INSTALL = f"pip install '{TORCHAO_REQUIREMENT}' (or tao-cli[quantize])"
#: Calibration algorithms that mean what weight-only int8 does (per-channel absolute-max scales).
_ALGORITHMS = ("minmax", "max")


def _installed() -> bool:
    return importlib.util.find_spec("torchao") is not None


def _import_torchao() -> Any:
    """``torchao.quantization``, or a one-line :class:`ConfigError` saying how to install it."""
    try:
        import torchao.quantization as tq
    except ImportError:
        raise ConfigError("quantize.backend", _MISSING, _INSTALL) from None
    return tq


def check_torchao_section(q: Any) -> None:
    """Refuse (one-line :class:`ConfigError` naming the field) a ``quantize`` section the torchao backend cannot
    run: another mode, an algorithm other than minmax/max, fp8 weights, quantized activations, observer
    settings, ``backend_kwargs``, a TensorRT device, an empty ``model_path`` or a missing torchao package (looked
    up, not imported: it runs at ``--dry-run``)."""
    if str(q.mode) != "weight_only_ptq":
        raise ConfigError("quantize.mode", f"'{q.mode}' is not run by backend torchao (it quantizes weights only)",
                          "set quantize.mode=weight_only_ptq, or backend=onnxruntime for static int8 PTQ of the "
                          "exported ONNX")
    if str(q.algorithm) not in _ALGORITHMS:
        raise ConfigError("quantize.algorithm", f"'{q.algorithm}' is not available for weight-only int8 (each "
                          "output channel is scaled by its absolute maximum)", "set quantize.algorithm=minmax")
    for i, layer in enumerate(q.layers):
        where = f"quantize.layers[{i}]"
        dtype = str(layer.weights.dtype)
        if dtype not in ("int8", "native"):
            raise ConfigError(f"{where}.weights.dtype", f"'{dtype}' is not implemented by tao-cli's torchao "
                              "backend (fp8 weights need a CUDA GPU with fp8 units)", "use int8 or native")
        if str(layer.activations.dtype) != "native":
            raise ConfigError(f"{where}.activations.dtype", "weight_only_ptq leaves activations in floating point",
                              "set it to native, or use backend onnxruntime with mode static_ptq")
        for part in ("weights", "activations"):
            s = getattr(layer, part)
            if s.observer_or_fake_quant or s.quant_axis is not None or len(s.observer_or_fake_quant_kwargs or {}):
                raise ConfigError(f"{where}.{part}", "observer_or_fake_quant, quant_axis and their kwargs are not "
                                  "read by weight-only int8 (per output channel, absolute max)", "remove them")
    check_checkpoint_section(q, "torchao", "Linear")
    if not _installed():
        raise ConfigError("quantize.backend", _MISSING, _INSTALL)


def matches_module(name: str, module: nn.Module, pattern: str) -> bool:
    """Whether a ``quantize.layers``/``skip_names`` pattern names the layer: an ``fnmatch`` pattern of its
    qualified name, or its class name (the PyTorch backends' rule)."""
    return fnmatch.fnmatchcase(name, pattern) or type(module).__name__ == pattern


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The quantizable ``nn.Linear`` layers.  ``nn.MultiheadAttention``'s output projection is not one: the
    functional attention reads its weight directly (its fast path transposes it, which an int8 tensor does not
    support), which is why torch marks it ``NonDynamicallyQuantizableLinear``."""
    return [(n, m) for n, m in model.named_modules()
            if n and isinstance(m, nn.Linear) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)]


def select_modules(model: nn.Module, layers: Iterable[Any], skip_names: Iterable[str]) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers of ``model`` to quantize, in module order (rules in the module
    docstring).  :class:`ConfigError` naming the entry when a pattern matches no ``nn.Linear``."""
    linears = _linears(model)
    layers = list(layers)
    chosen = set() if layers else {n for n, _ in linears}
    rules = [(f"quantize.layers[{i}].module_name", str(x.module_name), str(x.weights.dtype) == "int8")
             for i, x in enumerate(layers)]
    rules += [(f"quantize.skip_names[{i}]", str(p), False) for i, p in enumerate(skip_names)]
    for field, pattern, add in rules:
        hit = {n for n, m in linears if matches_module(n, m, pattern)}
        if not hit:
            raise ConfigError(field, f"'{pattern}' matches no nn.Linear layer of the model (weight-only int8 "
                              "quantizes nn.Linear)", f"e.g. {linears[0][0] if linears else 'Linear'} or Linear")
        chosen = chosen | hit if add else chosen - hit
    return [n for n, _ in linears if n in chosen]


def _apply(model: nn.Module, names: list[str]) -> None:
    """Replace the weights of the ``nn.Linear`` layers ``names`` of ``model`` by torchao int8 tensors."""
    tq = _import_torchao()
    if names:
        tq.quantize_(model, tq.FqnToConfig({n: tq.Int8WeightOnlyConfig() for n in names}), filter_fn=None)


def quantize_like(module: nn.Module, record: Mapping[str, Any], source: str) -> None:
    """Give ``module`` the int8 layers a checkpoint's ``quantization`` record lists (its ``modules`` are qualified
    names in ``module``), so that the checkpoint's tensors load into them.  :class:`CheckpointError` when the
    record is not one this version writes or names a layer ``module`` does not have as ``nn.Linear``."""
    if record.get("backend") != "torchao" or record.get("dtype") != "int8":
        raise CheckpointError(source, f"holds a quantized model this tao-cli does not run ({dict(record)})",
                              "quantize the trained checkpoint again with quantize.backend=torchao")
    names = [str(n) for n in record.get("modules", [])]
    have = {n for n, _ in _linears(module)}
    missing = [n for n in names if n not in have]
    if missing:
        raise CheckpointError(source, f"quantizes {len(missing)} layer(s) the model does not have, e.g. "
                              f"{', '.join(missing[:3])}", "check that the spec's model section matches the one "
                              "the checkpoint was trained with")
    try:
        _apply(module, names)
    except ConfigError:
        raise CheckpointError(source, "is a torchao weight-only int8 checkpoint and torchao is not installed",
                              _INSTALL) from None


def _serialized_mb(tensors: Mapping[str, torch.Tensor]) -> float:
    buf = io.BytesIO()
    torch.save(dict(tensors), buf)
    return round(len(buf.getvalue()) / 2**20, 3)


def run_weight_only_ptq(q: Any, ctx: Any, model: nn.Module, network: str, prefix: str) -> dict[str, Any]:
    """Quantize ``model`` (the bare network, ``quantize.model_path`` already loaded into it) and write
    :data:`OUTPUT_NAME` and ``quantize_report.json`` into ``ctx.run_dir``; returns what status.json records.

    The input checkpoint (read again with ``ctx.load_checkpoint``) must hold exactly the model's tensors under
    ``prefix`` (a train checkpoint or ``tao weights convert`` output); its other entries (criterion buffers,
    epoch, step) are kept, optimizer and loop states dropped.  ``q.device`` cuda quantizes on the GPU when there
    is one (else the CPU, logged); the file always holds CPU tensors and is written with ``ctx.save_checkpoint``
    (the engine's writer: atomic, tagged, encrypted with the spec's key)."""
    from networks.common.io import atomic_write_json
    from networks.common.weights import whole_model_state

    path = Path(str(q.model_path))
    obj = ctx.load_checkpoint(path)
    state = whole_model_state(obj, model, prefix, field="quantize.model_path", source=path, network=network)
    names = select_modules(model, q.layers, q.skip_names)
    device = quantize_device(q, ctx, "quantizing")
    work = copy.deepcopy(model).to(device).eval()
    _apply(work, names)
    quantized = {k: v.detach().to("cpu") for k, v in work.state_dict().items()}
    fp32_mb = _serialized_mb({k: state[prefix + k] for k in quantized})
    state.update({prefix + k: v for k, v in quantized.items()})
    import torchao

    record = {"backend": "torchao", "mode": "weight_only_ptq", "dtype": "int8", "torchao": torchao.__version__,
              "modules": [prefix + n for n in names], "source": str(path)}
    dest = save_quantized(ctx, obj, state, network, record, OUTPUT_NAME)
    linear_total = len(_linears(model))
    int8_mb = _serialized_mb(quantized)
    report = {"backend": "torchao", "mode": "weight_only_ptq", "dtype": "int8", "source": str(path),
              "output": str(dest), "quantized_linear_layers": len(names), "linear_layers": linear_total,
              "model_tensors_mb_fp32": fp32_mb, "model_tensors_mb_int8": int8_mb, "modules": names}
    atomic_write_json(Path(ctx.run_dir) / "quantize_report.json", report, indent=2)
    ctx.log.info("Quantized %d of %d nn.Linear layers to int8 weights (torchao %s); model tensors %.1f -> %.1f MB; "
                 "written to %s", len(names), linear_total, torchao.__version__, fp32_mb, int8_mb, dest)
    return {"quantized_model": str(dest), "quantized_linear_layers": len(names), "linear_layers": linear_total,
            "size_mb_fp32": fp32_mb, "size_mb_int8": int8_mb,
            "report": str(Path(ctx.run_dir) / "quantize_report.json")}


def describe(record: Mapping[str, Any]) -> str:
    """One line for logs: what a checkpoint's ``quantization`` record says."""
    return json.dumps({k: record.get(k) for k in ("backend", "mode", "dtype", "torchao")}) + \
        f" ({len(record.get('modules', []))} int8 layers)"
