"""The ``quantize`` action of Mask2Former: static int8 post-training quantization of the exported ONNX file with
ONNX Runtime, written as a QDQ ONNX graph (standard ``QuantizeLinear``/``DequantizeLinear`` operators only).

Inputs: ``quantize.model_path`` (the fp32 ONNX written by ``export``) and the first ``quantize.calib_images``
images of ``dataset.quant_calibration_dataset.images_dir``, preprocessed exactly as ``evaluate`` from an ONNX
file does (the ``dataset.val`` test resize and normalisation, then :meth:`OnnxHead.prepare` to the graph's H×W).

Outputs in the run directory: ``<stem>_named.onnx`` (the input re-saved with a unique name on every node, which
``nodes_to_exclude`` matches against), ``<stem>_int8_qdq.onnx`` and ``quantize_report.json`` (excluded nodes,
sizes, calibration count).  The parts TAO keeps in fp32 for TensorRT (reference mask2former.md §7.2: the
masked-attention cross-attention layers and the post-processor) stay un-quantized by default.

Only ``backend: onnxruntime`` with ``mode: static_ptq`` runs; :func:`check_quantize` refuses every other
combination at load (``--dry-run`` included) with the reason.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from networks.common.errors import ConfigError

__all__ = ["TAO_FP32_PATTERNS", "POSTPROCESSOR_PREFIX", "ALGORITHMS", "check_quantize", "excluded_nodes",
           "name_nodes", "run_quantize"]

log = logging.getLogger(__name__)

#: Substrings of the layer names TAO forces to fp32 when it builds a TensorRT engine (reference §7.2).
TAO_FP32_PATTERNS = ("/sem_seg_head/predictor/transformer_cross_attention_layers", "/post_processor/Div",
                     "/post_processor/ReduceSum", "/post_processor/Add")
#: Every node of the network proper is traced under ``ExportWrapper.model``; nodes outside this prefix are the
#: export post-processor (TAO's ``/post_processor/*``), which therefore stays in fp32 as a whole.
POSTPROCESSOR_PREFIX = "/model/"
#: ``quantize.algorithm`` → ONNX Runtime calibration method name.
ALGORITHMS = {"minmax": "MinMax", "entropy": "Entropy"}

_FIX = "set quantize.backend=onnxruntime and quantize.mode=static_ptq"
_BACKEND_REFUSALS = {
    "modelopt.onnx": "nvidia-modelopt[onnx] pins onnx 1.21 and onnxruntime-gpu, which conflict with tao-cli's "
                     "onnx/onnxruntime",
    "modelopt.pytorch": "nvidia-modelopt pins onnx 1.21 and onnxruntime-gpu, which conflict with tao-cli's "
                        "onnx/onnxruntime",
    "torchao": "torchao is not installed with tao-cli, and its weight-only quantization yields a PyTorch model "
               "that no tao-cli action runs yet (not implemented)",
}


def check_quantize(cfg: Any) -> None:
    """Refuse (one-line :class:`ConfigError` naming the field) a ``quantize`` spec tao-cli cannot run: another
    backend or mode, an algorithm without an ONNX Runtime calibrator, per-layer settings, ``backend_kwargs``, a
    TensorRT device, an empty or unusable ``model_path`` (checked with :func:`check_onnx_file` against
    ``model.mode``) or an empty ``dataset.quant_calibration_dataset.images_dir``."""
    q = cfg.quantize
    backend, mode = str(q.backend), str(q.mode)
    if backend in _BACKEND_REFUSALS:
        raise ConfigError("quantize.backend", f"'{backend}' is not supported: {_BACKEND_REFUSALS[backend]}", _FIX)
    if mode != "static_ptq":
        raise ConfigError("quantize.mode", f"'{mode}' is not implemented for backend '{backend}' (only static int8 "
                          "PTQ with calibration)", "set quantize.mode=static_ptq")
    if str(q.algorithm) not in ALGORITHMS:
        raise ConfigError("quantize.algorithm", f"'{q.algorithm}' has no ONNX Runtime calibrator",
                          f"use one of {', '.join(ALGORITHMS)}")
    if len(q.layers):
        raise ConfigError("quantize.layers", "per-layer dtypes are not implemented for backend onnxruntime (every "
                          "quantized layer is int8)", "remove quantize.layers; use quantize.skip_names to keep "
                          "layers in fp32")
    if len(q.backend_kwargs):
        raise ConfigError("quantize.backend_kwargs", f"{sorted(q.backend_kwargs)} are not read by backend "
                          "onnxruntime", "remove quantize.backend_kwargs")
    if str(q.device) == "trt":
        raise ConfigError("quantize.device", "'trt' calibrates inside TensorRT (tao-deploy)",
                          "use cpu or cuda (ONNX Runtime calibration)")
    if not q.model_path:
        raise ConfigError("quantize.model_path", "is empty",
                          "point it at the fp32 .onnx file written by the export action")
    from networks.mask2former.onnx_runtime import check_onnx_file

    check_onnx_file(q.model_path, str(cfg.model.mode), "quantize.model_path")
    if not cfg.dataset.quant_calibration_dataset.images_dir:
        raise ConfigError("dataset.quant_calibration_dataset.images_dir", "is empty",
                          "point it at a folder (or archive) of calibration images like the evaluation images")


def name_nodes(model: Any) -> int:
    """Give every unnamed node of ``model`` (an ``onnx.ModelProto``, changed in place) a unique name
    ``<op_type>_<n>``; returns how many were named.  ``nodes_to_exclude`` can only match named nodes."""
    taken = {n.name for n in model.graph.node if n.name}
    named = 0
    for i, node in enumerate(model.graph.node):
        if node.name:
            continue
        name, k = f"{node.op_type}_{i}", 0
        while name in taken:
            k += 1
            name = f"{node.op_type}_{i}_{k}"
        node.name = name
        taken.add(name)
        named += 1
    return named


def excluded_nodes(node_names: list[str], skip_names: list[str], default: bool = True) -> list[str]:
    """Names of the nodes to keep in fp32, in graph order: those containing any ``skip_names`` substring and,
    with ``default``, those containing one of :data:`TAO_FP32_PATTERNS` and, in a tao-cli export (some node
    under :data:`POSTPROCESSOR_PREFIX`), every node outside that prefix (the post-processor).  A graph traced
    otherwise (TAO's exporter names ``/sem_seg_head/...`` and ``/post_processor/...``) gets TAO's patterns only."""
    patterns = [str(s) for s in skip_names if str(s)]
    if default:
        patterns += TAO_FP32_PATTERNS
    wrapped = default and any(n.startswith(POSTPROCESSOR_PREFIX) for n in node_names)
    return [n for n in node_names
            if any(p in n for p in patterns) or (wrapped and not n.startswith(POSTPROCESSOR_PREFIX))]


def _calibration_batches(cfg: Any, model_path: str, count: int) -> tuple[Iterator[dict], int, Any]:
    """(iterator of ``{input name: float32 [B,3,H,W]}``, number of images used, OnnxHead) for calibration: the
    first ``count`` images of the calibration folder through evaluate's preprocessing.  A graph with a fixed
    batch B is fed whole batches; the last one is completed with images from the start of the list."""
    from networks.mask2former.data import Augmentation, PredictDataset, collate
    from networks.mask2former.onnx_runtime import OnnxHead

    ds = cfg.dataset
    aug = ds.augmentation
    field = "dataset.quant_calibration_dataset.images_dir"
    # evaluate's transform (dataset.val's test resize), so calibration sees the statistics evaluate will feed
    transform = Augmentation(False, [aug.test_min_size], aug.test_max_size, None, ds.val.target_size)
    dataset = PredictDataset(ds.quant_calibration_dataset.images_dir, transform, ds.pixel_mean, ds.pixel_std,
                             field=field)
    head = OnnxHead(model_path, str(cfg.model.mode), field="quantize.model_path")
    used = min(count, len(dataset))
    if used < count:
        log.warning("%s has %d images, fewer than quantize.calib_images=%d; calibrating on all of them",
                    ds.quant_calibration_dataset.images_dir, len(dataset), count)
    step = head.batch or 1
    order = list(range(used))
    while len(order) % step:
        order.append(order[len(order) % used])

    def batches() -> Iterator[dict]:
        from networks.mask2former.data import raise_if_error

        for start in range(0, len(order), step):
            batch = collate([dataset[i] for i in order[start:start + step]])
            raise_if_error(batch)
            yield {head.input_name: head.prepare(batch["images"], batch["image_sizes"])}

    return batches(), used, head


def _size_mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 3)


def run_quantize(cfg: Any, ctx: Any) -> dict[str, Any]:
    """The ``quantize`` action; returns the outputs recorded in status.json (paths, sizes, excluded node count,
    calibration count).  The spec is checked with :func:`check_quantize` first, also when called directly."""
    import numpy as np
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from networks.mask2former.onnx_runtime import choose_providers

    check_quantize(cfg)
    q = cfg.quantize
    src = Path(os.path.expanduser(str(q.model_path))).resolve()
    out_dir = Path(ctx.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    named_path = out_dir / f"{src.stem}_named.onnx"
    qdq_path = out_dir / f"{src.stem}_int8_qdq.onnx"

    model = onnx.load(str(src))
    renamed = name_nodes(model)
    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: keep weights beside the graph
    onnx.save(model, str(named_path), save_as_external_data=large)
    node_names = [n.name for n in model.graph.node]
    excluded = excluded_nodes(node_names, list(q.skip_names))
    del model
    ctx.log.info("Named ONNX written to %s (%d unnamed nodes named); %d of %d nodes kept in fp32 (TAO's fp32 "
                 "layers, the post-processor%s)", named_path, renamed, len(excluded), len(node_names),
                 f", quantize.skip_names {list(q.skip_names)}" if len(q.skip_names) else "")
    for name in excluded:
        ctx.log.debug("fp32: %s", name)

    batches, used, head = _calibration_batches(cfg, str(named_path), int(q.calib_images))
    want_gpu = str(q.device).startswith("cuda")
    providers = choose_providers(want_gpu)
    if want_gpu and providers == ["CPUExecutionProvider"]:
        ctx.log.info("quantize.device=%s but this ONNX Runtime has no CUDA provider: calibrating on the CPU",
                     q.device)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = batches

        def get_next(self) -> dict | None:
            return next(self.it, None)

    # external weights are named after the file they are saved with, so a large model is written in place
    tmp = qdq_path if large else qdq_path.with_name(f".{qdq_path.name}.tmp")
    ctx.log.info("Calibrating on %d images of %s (%s, %s)", used, cfg.dataset.quant_calibration_dataset.images_dir,
                 q.algorithm, providers[0])
    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # a tensor that is constant over the calibration set has a zero range; ORT then picks scale 1 itself
        warnings.simplefilter("ignore", RuntimeWarning)
        # ORT logs one root-logger warning per non-initializer bias (hundreds on this graph); the run's own
        # loggers propagate to root's handlers regardless of root's level, so only those are silenced
        root.setLevel(logging.ERROR)
        try:
            quantize_static(str(named_path), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                            nodes_to_exclude=excluded,
                            calibrate_method=getattr(CalibrationMethod, ALGORITHMS[q.algorithm]),
                            use_external_data_format=large, calibration_providers=providers)
        finally:
            root.setLevel(level)
    del head
    qmodel = onnx.load(str(tmp), load_external_data=False)
    foreign = sorted({n.domain for n in qmodel.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"the quantized graph uses non-standard operator domains {foreign}")
    ops = [n.op_type for n in qmodel.graph.node]
    if tmp != qdq_path:
        os.replace(tmp, qdq_path)
    report = {
        "backend": "onnxruntime", "mode": "static_ptq", "algorithm": str(q.algorithm),
        "activations": "int8 (per-tensor)", "weights": "int8 (per-channel)", "format": "QDQ",
        "model_path": str(src), "named_onnx": str(named_path), "quantized_onnx": str(qdq_path),
        "calibration_images_dir": str(cfg.dataset.quant_calibration_dataset.images_dir),
        "calibration_images": used, "calibration_providers": providers,
        "fp32_mb": _size_mb(named_path), "int8_mb": _size_mb(qdq_path),
        "quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
        "excluded_patterns": [*TAO_FP32_PATTERNS, f"not under {POSTPROCESSOR_PREFIX} (post-processor)",
                              *[str(s) for s in q.skip_names]],
        "num_excluded_nodes": len(excluded), "excluded_nodes": excluded,
    }
    (out_dir / "quantize_report.json").write_text(json.dumps(report, indent=2) + "\n")
    ctx.log.info("QDQ ONNX written to %s (%.2f MB; fp32 %.2f MB; %d QuantizeLinear); evaluate it with "
                 "evaluate.onnx_file=%s", qdq_path, report["int8_mb"], report["fp32_mb"], report["quantize_linear"],
                 qdq_path)
    return {k: report[k] for k in ("named_onnx", "quantized_onnx", "fp32_mb", "int8_mb", "calibration_images",
                                   "num_excluded_nodes")}
