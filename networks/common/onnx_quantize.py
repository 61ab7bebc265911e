"""The ``quantize`` action's shared part: static int8 post-training quantization of an exported ONNX file with
ONNX Runtime, written as a QDQ graph (standard ``QuantizeLinear``/``DequantizeLinear`` operators only).

A network supplies three things to :func:`run_static_ptq`: which nodes stay in fp32 (a function of the graph's
node names), the calibration feeds (a function of the named ONNX path, preprocessed exactly as its ``evaluate``
from an ONNX file does) and a few report fields.  Everything else is here: the spec refusals
(:func:`check_quantize_section`: ``backend: onnxruntime`` + ``mode: static_ptq`` runs here, ``backend:
torchao`` goes to :mod:`networks.common.torchao_quantize`), node naming
(``nodes_to_exclude`` can only match named nodes), the calibration reader, the standard-domain check, file names
and ``quantize_report.json``.

Outputs in the run directory: ``<stem>_named.onnx`` (the input re-saved with a unique name on every node),
``<stem>_int8_qdq.onnx`` and ``quantize_report.json``.

Only the operators with integer kernels are quantized (:data:`QUANTIZED_OP_TYPES`: Conv, MatMul, Gemm), as
TensorRT's explicit-quantization guide and ModelOpt's default place Q/DQ: a QDQ pair around an elementwise op,
a LayerNorm or a Softmax runs it in fp32 between an extra quantize and dequantize, which costs time and
accuracy and buys nothing.

The int8 layout depends on the runtime the file is for (:data:`QDQ_LAYOUTS`, chosen by ``quantize.device``):

* ``cpu`` / ``cuda`` (ONNX Runtime): uint8 activations with a zero point, int8 symmetric per-channel weights, and
  no Q/DQ on the outputs of MatMul and Gemm.  On x86 ONNX Runtime fuses a QDQ MatMul into an integer kernel
  only when the activation is uint8 (int8 x int8 stays an fp32 MatMul with its weights dequantized at every
  run), and a MatMul whose output is left in float becomes one ``MatMulIntegerToFloat`` instead of
  ``QLinearMatMul`` + ``DequantizeLinear``.  Conv keeps its output Q/DQ: ``QLinearConv`` needs it.
* ``trt`` (TensorRT): int8 activations with zero point 0 (TensorRT accepts only symmetric int8 Q/DQ) and Q/DQ on
  the inputs of the weighted layers only, TensorRT's recommended placement.

Besides the network's choice, every node that produces or reads a tensor whose calibrated range is not finite
stays fp32 (:func:`unbounded_tensors`, one min-max pass before calibration): attention logits masked with -inf
would otherwise get an infinite int8 scale.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from networks.common.errors import ConfigError

__all__ = ["ALGORITHMS", "BACKEND_REFUSALS", "CALIBRATOR_OPTIONS", "QDQ_LAYOUTS", "QUANTIZED_OP_TYPES", "qdq_layout",
           "calibration_count", "calibration_order", "check_quantize_section", "match_nodes", "name_nodes",
           "read_fp32_inputs", "run_static_ptq", "size_mb", "touching_nodes", "unbounded_tensors"]

log = logging.getLogger(__name__)

#: ``quantize.algorithm`` → ONNX Runtime calibration method name.
ALGORITHMS = {"minmax": "MinMax", "entropy": "Entropy"}
#: Calibrator settings per ``quantize.algorithm``.  ``quantize_static`` builds its entropy calibrator with 128
#: histogram bins and 128 quantized bins, where the KL-divergence search has no narrower range to try and returns
#: the min-max range (the file came out byte-identical to ``minmax``'s).  TensorRT's entropy calibrator folds a
#: 2048-bin histogram of ``|x|`` into int8's 128 positive levels; ONNX Runtime's histogram spans ``-t..t``, so the
#: same resolution is 2048 bins folded into 256.
CALIBRATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {}, "entropy": {"num_bins": 2048, "num_quantized_bins": 256}}

#: Operator types that get int8 inputs (ONNX Runtime and TensorRT have integer kernels for them).
QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")

#: Target runtime -> how its QDQ file is laid out (see the module docstring): activation dtype, whether the
#: activations are symmetric (zero point 0), and the quantized ops whose outputs get no Q/DQ of their own.
QDQ_LAYOUTS: dict[str, dict[str, Any]] = {
    "onnxruntime": {"activations": "uint8", "symmetric": False, "float_outputs": ("MatMul", "Gemm")},
    "tensorrt": {"activations": "int8", "symmetric": True, "float_outputs": QUANTIZED_OP_TYPES},
}


def qdq_layout(device: str) -> str:
    """``quantize.device`` -> key of :data:`QDQ_LAYOUTS`: ``trt`` writes TensorRT's layout, ``cpu``/``cuda[:N]``
    ONNX Runtime's."""
    return "tensorrt" if str(device) == "trt" else "onnxruntime"

_FIX = ("set quantize.backend=onnxruntime and quantize.mode=static_ptq (or backend=torchao with "
        "mode=weight_only_ptq)")
#: Why each TAO backend other than ONNX Runtime is refused.
BACKEND_REFUSALS = {
    "modelopt.onnx": "nvidia-modelopt[onnx] pins onnx 1.21 and onnxruntime-gpu, which conflict with tao-cli's "
                     "onnx/onnxruntime",
    "modelopt.pytorch": "not implemented: nvidia-modelopt's PyTorch static PTQ (simulated int8 quantizers, saved "
                        "with ModelOpt's own state) is not wired into tao-cli's actions yet",
}


def check_quantize_section(q: Any, check_model: Callable[[str, str], Any], calib_field: str,
                           calib_value: Any) -> None:
    """``backend: torchao`` goes to :func:`~networks.common.torchao_quantize.check_torchao_section` (a trained
    checkpoint, no calibration).  Otherwise refuse (one-line :class:`ConfigError` naming the field) a ``quantize`` section tao-cli cannot run: another
    backend or mode, an algorithm without an ONNX Runtime calibrator, per-layer settings, ``backend_kwargs``, an
    empty ``model_path`` (a set one goes to ``check_model(path, "quantize.model_path")``, the
    network's export check) or an empty calibration source ``calib_value`` (the spec field ``calib_field``)."""
    backend, mode = str(q.backend), str(q.mode)
    if backend == "torchao":
        from networks.common.torchao_quantize import check_torchao_section

        check_torchao_section(q)
        return
    if backend in BACKEND_REFUSALS:
        raise ConfigError("quantize.backend", f"'{backend}' is not supported: {BACKEND_REFUSALS[backend]}", _FIX)
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
    if not q.model_path:
        raise ConfigError("quantize.model_path", "is empty",
                          "point it at the fp32 .onnx file written by the export action")
    check_model(str(q.model_path), "quantize.model_path")
    if not calib_value:
        raise ConfigError(calib_field, "is empty",
                          "point it at a folder (or archive) of calibration images like the evaluation images")


def name_nodes(model: Any) -> int:
    """Give every unnamed node of ``model`` (an ``onnx.ModelProto``, changed in place) a unique name
    ``<op_type>_<n>``; returns how many were named."""
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


def match_nodes(node_names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The names containing any of ``patterns`` (empty patterns ignored), in the given order."""
    pats = [str(p) for p in patterns if str(p)]
    return [n for n in node_names if any(p in n for p in pats)]


def calibration_count(wanted: int, available: int, where: Any) -> int:
    """How many calibration images are used: ``quantize.calib_images``, or all of ``where`` (warned) when it
    holds fewer."""
    used = min(int(wanted), int(available))
    if used < wanted:
        log.warning("%s has %d images, fewer than quantize.calib_images=%d; calibrating on all of them", where,
                    available, wanted)
    return used


def calibration_order(used: int, step: int) -> list[int]:
    """Indices ``0..used-1``, completed to a multiple of ``step`` (a fixed graph batch) with indices from the
    start of the list, so every calibration batch is whole."""
    order = list(range(used))
    while used and len(order) % step:
        order.append(order[len(order) % used])
    return order


def feed_reader(feeds: Iterator[dict]) -> Any:
    """ONNX Runtime's ``CalibrationDataReader`` over an iterator of input feeds."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict | None:
            return next(feeds, None)

    return Reader()


def unbounded_tensors(model_path: Path, feeds: Iterator[dict], providers: list[str], work_dir: Path) -> set[str]:
    """Names of the float tensors whose value range over ``feeds`` is not finite (a min-max calibration pass on
    ``model_path``).  Masked attention logits hold -inf by design; an int8 scale computed from such a range is
    inf and turns every value of the tensor into garbage, so these tensors must stay fp32."""
    import numpy as np
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    augmented = work_dir / f".{model_path.stem}_range_probe.onnx"
    try:
        calibrator = create_calibrator(str(model_path), [], augmented_model_path=str(augmented),
                                       calibrate_method=CalibrationMethod.MinMax, providers=providers)
        calibrator.collect_data(feed_reader(feeds))
        ranges = calibrator.compute_data()
    finally:
        for leftover in work_dir.glob(f".{model_path.stem}_range_probe*"):
            leftover.unlink(missing_ok=True)
    out = set()
    for name in ranges:
        lo, hi = ranges[name].range_value
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            out.add(name)
    return out


def touching_nodes(model: Any, tensors: set[str]) -> list[str]:
    """Names of the nodes of ``model`` that produce or read any of ``tensors``, in graph order: keeping them
    fp32 keeps a QuantizeLinear/DequantizeLinear pair off those tensors."""
    return [n.name for n in model.graph.node if tensors.intersection(n.input) or tensors.intersection(n.output)]


def read_fp32_inputs(model: Any, excluded: set[str]) -> int:
    """Make the nodes named in ``excluded`` read their activations in fp32, in place; returns how many inputs
    changed.

    ONNX Runtime's quantizer puts one QuantizeLinear/DequantizeLinear pair on a tensor and gives the dequantized
    copy to every consumer, excluded ones included, so a node "kept in fp32" that shares an input with a quantized
    node (Grounding DINO's mask controller and box head both read the decoder's output) would compute on
    int8-rounded values.  Such an input goes back to the tensor the QuantizeLinear reads; the pair stays for the
    quantized consumers, and a pair nobody reads any more is removed with its scale and zero point.  The output
    pair of a quantized operator stays (ONNX Runtime's ``QLinearConv`` needs it): its readers get what the integer
    kernel gives."""
    producer = {out: node for node in model.graph.node for out in node.output}
    weights = {t.name for t in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.name not in excluded:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            qn = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if qn is None or qn.op_type != "QuantizeLinear" or qn.input[0] in weights:
                continue
            source = producer.get(qn.input[0])
            if source is not None and source.op_type in QUANTIZED_OP_TYPES and source.name not in excluded:
                continue  # the output pair of a quantized operator
            node.input[i] = qn.input[0]
            changed += 1
    while True:  # drop the Q/DQ nodes left without a reader
        read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node
                if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not read.intersection(n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    read = {name for node in model.graph.node for name in node.input}
    for t in [t for t in model.graph.initializer if t.name not in read]:
        model.graph.initializer.remove(t)
    return changed


def size_mb(path: Path) -> float:
    return round(Path(path).stat().st_size / 2**20, 3)


def run_static_ptq(q: Any, ctx: Any, exclude: Callable[[list[str]], list[str]],
                   calibration: Callable[[str], tuple[Iterator[dict], int]], calib_source: str,
                   excluded_patterns: list[str], exclusion_why: str) -> dict[str, Any]:
    """Quantize ``q.model_path`` (the spec's checked ``quantize`` section) into ``ctx.run_dir``.

    ``exclude(node names) -> names kept in fp32``; ``calibration(named onnx path) -> (iterator of feeds, images
    used)``; ``calib_source`` (where the images come from), ``excluded_patterns`` and ``exclusion_why`` go to the
    log and the report.  Returns the outputs recorded in status.json; RuntimeError if the quantized graph uses a
    non-standard operator domain (the file is then not written)."""
    import numpy as np
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        create_calibrator,
        quantize_static,
        save_tensors_data,
    )

    from networks.common.onnx_runtime import choose_providers, resolve_onnx_path

    src = resolve_onnx_path(q.model_path)
    out_dir = Path(ctx.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    named_path = out_dir / f"{src.stem}_named.onnx"
    qdq_path = out_dir / f"{src.stem}_int8_qdq.onnx"

    model = onnx.load(str(src))
    renamed = name_nodes(model)
    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: keep weights beside the graph
    onnx.save(model, str(named_path), save_as_external_data=large)
    node_names = [n.name for n in model.graph.node]
    excluded = exclude(node_names)
    layout_name = qdq_layout(str(q.device))
    layout = QDQ_LAYOUTS[layout_name]
    # a file for TensorRT is made on a GPU machine: calibrate there when ONNX Runtime can
    want_gpu = str(q.device).startswith("cuda") or layout_name == "tensorrt"
    providers = choose_providers(want_gpu)
    if want_gpu and providers == ["CPUExecutionProvider"]:
        ctx.log.info("quantize.device=%s but this ONNX Runtime has no CUDA provider: calibrating on the CPU",
                     q.device)
    unbounded = unbounded_tensors(named_path, calibration(str(named_path))[0], providers, out_dir)
    by_range = [n for n in touching_nodes(model, unbounded) if n not in set(excluded)]
    excluded = [n for n in node_names if n in set(excluded) | set(by_range)]
    del model
    ctx.log.info("Named ONNX written to %s (%d unnamed nodes named); %d of %d nodes kept in fp32 (%s%s; %d "
                 "more around %d tensors with an infinite range)", named_path, renamed, len(excluded),
                 len(node_names), exclusion_why,
                 f", quantize.skip_names {list(q.skip_names)}" if len(q.skip_names) else "", len(by_range),
                 len(unbounded))
    for name in excluded:
        ctx.log.debug("fp32: %s", name)

    batches, used = calibration(str(named_path))
    # external weights are named after the file they are saved with, so a large model is written in place
    tmp = qdq_path if large else qdq_path.with_name(f".{qdq_path.name}.tmp")
    cache = out_dir / "calibration_cache.json"
    ctx.log.info("Calibrating on %d images of %s (%s, %s); QDQ layout for %s (quantize.device=%s)", used,
                 calib_source, q.algorithm, providers[0], layout_name, q.device)
    root = logging.getLogger()
    level = root.level
    method = getattr(CalibrationMethod, ALGORITHMS[str(q.algorithm)])
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"), \
            tempfile.TemporaryDirectory(prefix="calib_", dir=out_dir) as work:
        # a tensor that is constant over the calibration set has a zero range; ORT then picks scale 1 itself
        warnings.simplefilter("ignore", RuntimeWarning)
        # ORT logs one root-logger warning per non-initializer bias (hundreds on these graphs); the run's own
        # loggers propagate to root's handlers regardless of root's level, so only those are silenced
        root.setLevel(logging.ERROR)
        try:
            # calibrated here rather than inside quantize_static, which cannot give the calibrator its settings
            calibrator = create_calibrator(named_path, list(QUANTIZED_OP_TYPES),
                                           augmented_model_path=str(Path(work) / "augmented.onnx"),
                                           calibrate_method=method, use_external_data_format=large,
                                           providers=providers, extra_options=CALIBRATOR_OPTIONS[str(q.algorithm)])
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
                calibrator.collect_data(feed_reader(batches))
                save_tensors_data(calibrator.compute_data(), cache)
            del calibrator
            quantize_static(str(named_path), str(tmp), None, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8 if layout["activations"] == "uint8" else QuantType.QInt8,
                            weight_type=QuantType.QInt8, per_channel=True,
                            nodes_to_exclude=excluded, op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                            extra_options={"ActivationSymmetric": layout["symmetric"], "WeightSymmetric": True,
                                           "OpTypesToExcludeOutputQuantization": list(layout["float_outputs"])},
                            calibrate_method=method, use_external_data_format=large,
                            calibration_cache_path=cache)
        finally:
            root.setLevel(level)
    qmodel = onnx.load(str(tmp), load_external_data=large)
    rewired = read_fp32_inputs(qmodel, set(excluded))
    if rewired:
        onnx.save(qmodel, str(tmp), save_as_external_data=large)
    foreign = sorted({n.domain for n in qmodel.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"the quantized graph uses non-standard operator domains {foreign}")
    ops = [n.op_type for n in qmodel.graph.node]
    if tmp != qdq_path:
        os.replace(tmp, qdq_path)
    report = {
        "backend": "onnxruntime", "mode": "static_ptq", "algorithm": str(q.algorithm),
        "target_runtime": layout_name,
        "activations": f"{layout['activations']} (per-tensor, {'symmetric' if layout['symmetric'] else 'zero point'})",
        "weights": "int8 (per-channel, symmetric)", "format": "QDQ",
        "float_outputs": list(layout["float_outputs"]),
        "quantized_op_types": list(QUANTIZED_OP_TYPES),
        "model_path": str(src), "named_onnx": str(named_path), "quantized_onnx": str(qdq_path),
        "calibration_images_dir": calib_source, "calibration_images": used, "calibration_providers": providers,
        "fp32_mb": size_mb(named_path), "int8_mb": size_mb(qdq_path),
        "quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
        "excluded_patterns": [*excluded_patterns, *[str(s) for s in q.skip_names]],
        "num_excluded_nodes": len(excluded), "excluded_nodes": excluded, "fp32_inputs_restored": rewired,
        "calibration_cache": str(cache),
        "unbounded_tensors": sorted(unbounded), "excluded_for_unbounded_range": by_range,
    }
    (out_dir / "quantize_report.json").write_text(json.dumps(report, indent=2) + "\n")
    ctx.log.info("QDQ ONNX written to %s (%.2f MB; fp32 %.2f MB; %d QuantizeLinear); evaluate it with "
                 "evaluate.onnx_file=%s", qdq_path, report["int8_mb"], report["fp32_mb"], report["quantize_linear"],
                 qdq_path)
    return {k: report[k] for k in ("named_onnx", "quantized_onnx", "fp32_mb", "int8_mb", "calibration_images",
                                   "num_excluded_nodes")}
