"""The ``quantize`` action's shared part: static int8 post-training quantization of an exported ONNX file, written
as a QDQ graph (standard ``QuantizeLinear``/``DequantizeLinear`` operators only), by ONNX Runtime (``backend:
onnxruntime``, below) or by NVIDIA ModelOpt (``backend: modelopt.onnx``, :mod:`networks.common.modelopt_onnx`).

A network supplies three things to :func:`run_static_ptq`: which nodes stay in fp32 (a function of the graph's
node names), the calibration feeds (a function of the named ONNX path, preprocessed exactly as its ``evaluate``
from an ONNX file does) and a few report fields.  Everything else is here: the spec refusals
(:func:`check_quantize_section`; ``backend: torchao`` goes to :mod:`networks.common.torchao_quantize`), node
naming (``nodes_to_exclude`` can only match named nodes), the unbounded-range probe, the standard-domain check,
file names and ``quantize_report.json``.

Outputs in the run directory: ``<stem>_named.onnx`` (the input re-saved with a unique name on every node), the
int8 file (``<stem>_int8_qdq.onnx``; ModelOpt's: ``quantized_model.onnx``, TAO's name) and
``quantize_report.json``.

With the ONNX Runtime backend only the operators with integer kernels are quantized (:data:`QUANTIZED_OP_TYPES`:
Conv, MatMul, Gemm), as TensorRT's explicit-quantization guide and ModelOpt's default place Q/DQ: a QDQ pair
around an elementwise op, a LayerNorm or a Softmax runs it in fp32 between an extra quantize and dequantize,
which costs time and accuracy and buys nothing.

The int8 layout depends on the runtime the file is for (:data:`QDQ_LAYOUTS`, chosen by ``quantize.device``):

* ``cpu`` / ``cuda`` (ONNX Runtime): uint8 activations with a zero point, int8 symmetric per-channel weights, and
  no Q/DQ on the outputs of MatMul and Gemm.  On x86 ONNX Runtime fuses a QDQ MatMul into an integer kernel
  only when the activation is uint8 (int8 x int8 stays an fp32 MatMul with its weights dequantized at every
  run), and a MatMul whose output is left in float becomes one ``MatMulIntegerToFloat`` instead of
  ``QLinearMatMul`` + ``DequantizeLinear``.  Conv keeps its output Q/DQ: ``QLinearConv`` needs it.
* ``trt`` (TensorRT): int8 activations with zero point 0 (TensorRT accepts only symmetric int8 Q/DQ) and Q/DQ on
  the inputs of the weighted layers only, TensorRT's recommended placement.

For both backends, besides the network's choice, every node that produces or reads a tensor whose calibrated range
is not finite stays fp32 (:func:`unbounded_tensors`, one min-max pass before calibration): attention logits
masked with -inf would otherwise get an infinite int8 scale.
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

__all__ = ["ALGORITHMS", "CALIBRATOR_OPTIONS", "QDQ_LAYOUTS", "QUANTIZED_OP_TYPES",
           "qdq_layout", "calibration_count", "calibration_order", "check_quantize_section", "int8_weight_layers",
           "int8_weight_nodes", "match_nodes", "name_nodes", "read_fp32_inputs", "run_static_ptq", "size_mb",
           "touching_nodes", "unbounded_tensors", "unshare_weights"]

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

def check_quantize_section(q: Any, check_model: Callable[[str, str], Any], calib_field: str,
                           calib_value: Any) -> None:
    """Refuse (one-line :class:`ConfigError` naming the field) a ``quantize`` section tao-cli cannot run.  Each
    backend checks its own fields: ``torchao`` (:func:`~networks.common.torchao_quantize.check_torchao_section`, a
    trained checkpoint, no calibration), ``modelopt.pytorch``
    (:func:`~networks.common.modelopt_torch.check_modelopt_torch_section`, a trained checkpoint), ``modelopt.onnx``
    (:func:`~networks.common.modelopt_onnx.check_modelopt_section`) and ``onnxruntime`` (here: ``static_ptq``, an
    algorithm with an ONNX Runtime calibrator, no per-layer settings, no ``backend_kwargs``).  The ONNX backends
    need ``model_path`` (a set one goes to ``check_model(path, "quantize.model_path")``, the network's export
    check); every backend but torchao needs a calibration source ``calib_value`` (the spec field
    ``calib_field``)."""
    backend, mode = str(q.backend), str(q.mode)
    if backend == "torchao":
        from networks.common.torchao_quantize import check_torchao_section

        check_torchao_section(q)
        return
    if backend == "modelopt.pytorch":
        from networks.common.modelopt_torch import check_modelopt_torch_section

        check_modelopt_torch_section(q)
    elif backend == "modelopt.onnx":
        from networks.common.modelopt_onnx import check_modelopt_section

        check_modelopt_section(q)
    else:
        if mode != "static_ptq":
            raise ConfigError("quantize.mode", f"'{mode}' is not implemented for backend '{backend}' (only static "
                              "int8 PTQ with calibration)", "set quantize.mode=static_ptq")
        if str(q.algorithm) not in ALGORITHMS:
            raise ConfigError("quantize.algorithm", f"'{q.algorithm}' has no ONNX Runtime calibrator",
                              f"use one of {', '.join(ALGORITHMS)}")
        if len(q.layers):
            raise ConfigError("quantize.layers", "per-layer dtypes are not implemented for backend onnxruntime "
                              "(every quantized layer is int8)", "remove quantize.layers; use quantize.skip_names "
                              "to keep layers in fp32")
        if len(q.backend_kwargs):
            raise ConfigError("quantize.backend_kwargs", f"{sorted(q.backend_kwargs)} are not read by backend "
                              "onnxruntime", "remove quantize.backend_kwargs")
    if backend != "modelopt.pytorch":
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


def unshare_weights(model: Any) -> int:
    """Give every weight-bearing node (:data:`QUANTIZED_OP_TYPES`) of ``model`` (changed in place) its own copy of
    an initializer it reads through an ``Identity``; returns how many copies were made.

    The ONNX exporter stores equal tensors once and reaches the other users through ``Identity`` nodes: weights
    that are really shared (tied layers), and equal constants (zero-initialised layers and biases).  A quantizer
    sees such an input as an activation: the weight is then quantized per tensor at run time instead of once per
    channel, and a bias behind an ``Identity`` keeps ONNX Runtime from fusing the convolution into its integer
    kernel.  The copies compute the same values."""
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    copied = [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits
              and readers.get(n.output[0], set()) & set(QUANTIZED_OP_TYPES)]
    for node in copied:
        tensor = type(inits[node.input[0]])()
        tensor.CopyFrom(inits[node.input[0]])
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        model.graph.node.remove(node)
    return len(copied)


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

    from networks.common.onnx_runtime import sessions_take_run_threads

    augmented = work_dir / f".{model_path.stem}_range_probe.onnx"
    try:
        with sessions_take_run_threads():  # ONNX Runtime makes the calibrator's session itself
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


def int8_weight_nodes(model: Any) -> list[Any]:
    """The nodes of ``model`` that read a weight in int8: an int8/uint8 initializer through a DequantizeLinear
    (int8 weights stored), or a float initializer through a QuantizeLinear/DequantizeLinear pair (fp32 weights
    stored, ModelOpt's and TensorRT's layout).  ``Identity`` nodes (the exporter's way of sharing one initializer,
    e.g. equal constants) are looked through; the Q/DQ and Identity nodes themselves, and int32 biases, do not
    count."""
    import onnx

    producer = {out: n for n in model.graph.node for out in n.output}
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    int8 = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    plumbing = {"Identity", "QuantizeLinear", "DequantizeLinear"}

    def int8_weight(name: str) -> bool:
        dq = producer.get(name)
        while dq is not None and dq.op_type == "Identity":
            dq = producer.get(dq.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            return False
        qn = producer.get(dq.input[0])
        return dtypes.get(dq.input[0]) in int8 or (qn is not None and qn.op_type == "QuantizeLinear"
                                                   and qn.input[0] in dtypes)

    return [node for node in model.graph.node
            if node.op_type not in plumbing and any(int8_weight(name) for name in node.input)]


def int8_weight_layers(model: Any) -> dict[str, int]:
    """{operator type: count} of :func:`int8_weight_nodes`."""
    counts: dict[str, int] = {}
    for node in int8_weight_nodes(model):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def size_mb(path: Path) -> float:
    return round(Path(path).stat().st_size / 2**20, 3)


def run_static_ptq(q: Any, ctx: Any, exclude: Callable[[list[str]], list[str]],
                   calibration: Callable[[str], tuple[Callable[[], Iterator[dict]], int]], calib_source: str,
                   excluded_patterns: list[str], exclusion_why: str) -> dict[str, Any]:
    """Quantize ``q.model_path`` (the spec's checked ``quantize`` section) into ``ctx.run_dir`` with the ONNX
    backend ``q.backend`` (``onnxruntime``: :func:`_quantize_with_onnxruntime`, ``<stem>_int8_qdq.onnx``;
    ``modelopt.onnx``: :func:`~networks.common.modelopt_onnx.quantize_with_modelopt`, ``quantized_model.onnx`` as
    TAO names it).

    ``exclude(node names) -> names kept in fp32``; ``calibration(named onnx path) -> (feeds, images used)``,
    called once, where each call of ``feeds()`` iterates over the same calibration feeds again (a range probe,
    then one pass, or two for ``entropy``); ``calib_source`` (where the images come from), ``excluded_patterns``
    and ``exclusion_why`` go to the log and the report.  Returns the outputs recorded in status.json;
    RuntimeError if the quantized graph uses a non-standard operator domain (the file is then not written)."""
    import onnx

    from networks.common.onnx_runtime import choose_providers, resolve_onnx_path

    backend = str(q.backend)
    src = resolve_onnx_path(q.model_path)
    out_dir = Path(ctx.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    named_path = out_dir / f"{src.stem}_named.onnx"
    qdq_path = out_dir / ("quantized_model.onnx" if backend == "modelopt.onnx" else f"{src.stem}_int8_qdq.onnx")

    model = onnx.load(str(src))
    renamed = name_nodes(model)
    # ONNX Runtime's quantizer reads a weight behind an Identity as an activation; ModelOpt places TensorRT's
    # Q/DQ on it as it is, so its graph is left as exported
    unshared = unshare_weights(model) if backend == "onnxruntime" else 0
    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: keep weights beside the graph
    onnx.save(model, str(named_path), save_as_external_data=large)
    node_names = [n.name for n in model.graph.node]
    excluded = exclude(node_names)
    if backend == "modelopt.onnx":  # TAO hands skip_names to ModelOpt as regular expressions
        from networks.common.modelopt_onnx import regex_matches

        excluded = [*excluded, *regex_matches(node_names, [str(s) for s in q.skip_names])]
    layout_name = "tensorrt" if backend == "modelopt.onnx" else qdq_layout(str(q.device))
    # a file for TensorRT is made on a GPU machine: calibrate there when ONNX Runtime can
    want_gpu = str(q.device).startswith("cuda") or str(q.device) == "trt"
    providers = choose_providers(want_gpu)
    if want_gpu and providers == ["CPUExecutionProvider"]:
        ctx.log.info("quantize.device=%s but this ONNX Runtime has no CUDA provider: calibrating on the CPU",
                     q.device)
    feeds, used = calibration(str(named_path))
    unbounded = unbounded_tensors(named_path, feeds(), providers, out_dir)
    by_range = [n for n in touching_nodes(model, unbounded) if n not in set(excluded)]
    excluded = [n for n in node_names if n in set(excluded) | set(by_range)]
    del model
    ctx.log.info("Named ONNX written to %s (%d unnamed nodes named, %d shared weights copied); %d of %d nodes "
                 "kept in fp32 (%s%s; %d more around %d tensors with an infinite range)", named_path, renamed,
                 unshared, len(excluded),
                 len(node_names), exclusion_why,
                 f", quantize.skip_names {list(q.skip_names)}" if len(q.skip_names) else "", len(by_range),
                 len(unbounded))
    for name in excluded:
        ctx.log.debug("fp32: %s", name)

    # external weights are named after the file they are saved with, so a large model is written in place
    tmp = qdq_path if large else qdq_path.with_name(f".{qdq_path.name}.tmp.onnx")
    ctx.log.info("Calibrating on %d images of %s (%s %s, %s); QDQ layout for %s (quantize.device=%s)", used,
                 calib_source, backend, q.algorithm, providers[0], layout_name, q.device)
    if backend == "modelopt.onnx":
        from networks.common.modelopt_onnx import high_precision_dtype

        if high_precision_dtype(q) != "fp32":
            ctx.log.info("ModelOpt converts the layers it leaves un-quantized to %s (a file for a GPU); "
                         "quantize.device=cpu keeps them fp32", high_precision_dtype(q))
    try:
        with _quiet_quantizer():
            if backend == "modelopt.onnx":
                from networks.common.modelopt_onnx import quantize_with_modelopt

                details = quantize_with_modelopt(q, named_path, tmp, excluded, feeds(), providers, large)
            else:
                details = _quantize_with_onnxruntime(q, named_path, tmp, excluded, feeds, providers, large, out_dir)
        qmodel = onnx.load(str(tmp), load_external_data=large)
        rewired = read_fp32_inputs(qmodel, set(excluded))
        if rewired:
            onnx.save(qmodel, str(tmp), save_as_external_data=large)
        foreign = sorted({n.domain for n in qmodel.graph.node if n.domain not in ("", "ai.onnx")})
        if foreign:
            raise RuntimeError(f"the quantized graph uses non-standard operator domains {foreign}")
    except BaseException:
        if tmp != qdq_path:
            tmp.unlink(missing_ok=True)
        raise
    int8_layers = int8_weight_layers(qmodel)
    ops = [n.op_type for n in qmodel.graph.node]
    del qmodel
    if tmp != qdq_path:
        os.replace(tmp, qdq_path)
    report = {
        "backend": backend, "mode": "static_ptq", "algorithm": str(q.algorithm), "target_runtime": layout_name,
        **details,
        "format": "QDQ", "quantized_op_types": sorted(int8_layers), "int8_weight_layers": int8_layers,
        "model_path": str(src), "named_onnx": str(named_path), "quantized_onnx": str(qdq_path),
        "calibration_images_dir": calib_source, "calibration_images": used, "calibration_providers": providers,
        "fp32_mb": size_mb(named_path), "int8_mb": size_mb(qdq_path),
        "quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
        "excluded_patterns": [*excluded_patterns, *[str(s) for s in q.skip_names]],
        "num_excluded_nodes": len(excluded), "excluded_nodes": excluded, "fp32_inputs_restored": rewired,
        "shared_weights_copied": unshared,
        "unbounded_tensors": sorted(unbounded), "excluded_for_unbounded_range": by_range,
    }
    (out_dir / "quantize_report.json").write_text(json.dumps(report, indent=2) + "\n")
    ctx.log.info("QDQ ONNX written to %s (%.2f MB; fp32 %.2f MB; %d QuantizeLinear); evaluate it with "
                 "evaluate.onnx_file=%s", qdq_path, report["int8_mb"], report["fp32_mb"], report["quantize_linear"],
                 qdq_path)
    return {k: report[k] for k in ("named_onnx", "quantized_onnx", "fp32_mb", "int8_mb", "calibration_images",
                                   "num_excluded_nodes")}


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Silence what ONNX Runtime's quantizer says to everyone: a root-logger warning per non-initializer bias
    (hundreds on these graphs; the run's own loggers and ModelOpt's propagate to root's handlers regardless of
    root's level, so only those are dropped) and numpy's warnings on a tensor that is constant over the
    calibration set (a zero range, for which ONNX Runtime picks scale 1 itself)."""
    import numpy as np

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        root.setLevel(level)


def _quantize_with_onnxruntime(q: Any, named_path: Path, out_path: Path, excluded: list[str],
                               feeds: Callable[[], Iterator[dict]], providers: list[str], large: bool,
                               out_dir: Path) -> dict[str, Any]:
    """Write ``out_path``: ``named_path`` calibrated on the feeds of ``feeds()`` (called once for ``minmax``, twice
    for ``entropy``, see :func:`~networks.common.onnx_calibration.collect_histograms`; ranges kept as
    ``calibration_cache.json`` in ``out_dir``) and quantized by ONNX Runtime in the :data:`QDQ_LAYOUTS` layout of
    ``q.device``, with ``excluded`` (exact node names) kept in fp32.  Returns the report fields of this backend."""
    import torch
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        create_calibrator,
        quantize_static,
        save_tensors_data,
    )

    from networks.common.onnx_calibration import collect_histograms, entropy_ranges
    from networks.common.onnx_runtime import sessions_take_run_threads

    layout = QDQ_LAYOUTS[qdq_layout(str(q.device))]
    cache = out_dir / "calibration_cache.json"
    method = getattr(CalibrationMethod, ALGORITHMS[str(q.algorithm)])
    with tempfile.TemporaryDirectory(prefix="calib_", dir=out_dir) as work:
        # calibrated here rather than inside quantize_static, which cannot give the calibrator its settings
        with sessions_take_run_threads():
            calibrator = create_calibrator(named_path, list(QUANTIZED_OP_TYPES),
                                           augmented_model_path=str(Path(work) / "augmented.onnx"),
                                           calibrate_method=method, use_external_data_format=large,
                                           providers=providers, extra_options=CALIBRATOR_OPTIONS[str(q.algorithm)])
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
            if method == CalibrationMethod.MinMax:
                calibrator.collect_data(feed_reader(feeds()))
                ranges = calibrator.compute_data()
            else:
                collect_histograms(calibrator, feeds)
                # one search process per intra-op thread the engine gave this run
                ranges = entropy_ranges(calibrator.collector, torch.get_num_threads())
            save_tensors_data(ranges, cache)
        del calibrator
        quantize_static(str(named_path), str(out_path), None, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8 if layout["activations"] == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        nodes_to_exclude=excluded, op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                        extra_options={"ActivationSymmetric": layout["symmetric"], "WeightSymmetric": True,
                                       "OpTypesToExcludeOutputQuantization": list(layout["float_outputs"])},
                        calibrate_method=method, use_external_data_format=large,
                        calibration_cache_path=cache)
    return {"activations": f"{layout['activations']} (per-tensor, "
                           f"{'symmetric' if layout['symmetric'] else 'zero point'})",
            "weights": "int8 (per-channel, symmetric)", "float_outputs": list(layout["float_outputs"]),
            "calibration_cache": str(cache)}
