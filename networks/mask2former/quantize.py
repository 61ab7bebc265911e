"""The ``quantize`` action of Mask2Former: static int8 post-training quantization of the exported ONNX file with
ONNX Runtime, written as a QDQ ONNX graph (:mod:`networks.common.onnx_quantize` does the shared work).

Inputs: ``quantize.model_path`` (the fp32 ONNX written by ``export``) and the first ``quantize.calib_images``
images of ``dataset.quant_calibration_dataset.images_dir``, preprocessed exactly as ``evaluate`` from an ONNX
file does (the ``dataset.val`` test resize and normalisation, then :meth:`OnnxHead.prepare` to the graph's H×W).

Outputs in the run directory: ``<stem>_named.onnx``, ``<stem>_int8_qdq.onnx`` and ``quantize_report.json``.  The
parts TAO keeps in fp32 for TensorRT (reference mask2former.md §7.2: the masked-attention cross-attention layers
and the post-processor) stay un-quantized by default.

``backend: onnxruntime`` (or ``modelopt.onnx``: NVIDIA ModelOpt, TensorRT's Q/DQ placement, written as
``quantized_model.onnx``) with ``mode: static_ptq`` runs as above; ``backend: torchao`` with ``mode:
weight_only_ptq`` (TAO's default) gives the trained checkpoint ``quantize.model_path`` int8 ``nn.Linear`` weights
(:mod:`networks.common.torchao_quantize`), and ``backend: modelopt.pytorch`` with ``mode: static_ptq`` gives it
ModelOpt's simulated-int8 quantizers calibrated on the same images (:mod:`networks.common.modelopt_torch`).
:func:`check_quantize` refuses every other combination at load (``--dry-run`` included) with the reason.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from networks.common.onnx_quantize import (
    ALGORITHMS,
    calibration_count,
    calibration_order,
    check_quantize_section,
    match_nodes,
    name_nodes,
    run_static_ptq,
)
from networks.common.torch_quantize import PYTORCH_BACKENDS, run_checkpoint_quantize

__all__ = ["TAO_FP32_PATTERNS", "POSTPROCESSOR_PREFIX", "ALGORITHMS", "check_quantize", "excluded_nodes",
           "name_nodes", "run_quantize"]

#: Substrings of the layer names TAO forces to fp32 when it builds a TensorRT engine (reference §7.2).
TAO_FP32_PATTERNS = ("/sem_seg_head/predictor/transformer_cross_attention_layers", "/post_processor/Div",
                     "/post_processor/ReduceSum", "/post_processor/Add")
#: Every node of the network proper is traced under ``ExportWrapper.model``; nodes outside this prefix are the
#: export post-processor (TAO's ``/post_processor/*``), which therefore stays in fp32 as a whole.
POSTPROCESSOR_PREFIX = "/model/"


def check_quantize(cfg: Any) -> None:
    """:func:`~networks.common.onnx_quantize.check_quantize_section` with Mask2Former's export check
    (against ``model.mode``) and ``dataset.quant_calibration_dataset.images_dir``."""
    from networks.mask2former.onnx_runtime import check_onnx_file

    check_quantize_section(cfg.quantize, lambda path, field: check_onnx_file(path, str(cfg.model.mode), field),
                           "dataset.quant_calibration_dataset.images_dir",
                           cfg.dataset.quant_calibration_dataset.images_dir)


def excluded_nodes(node_names: list[str], skip_names: list[str], default: bool = True) -> list[str]:
    """Names of the nodes to keep in fp32, in graph order: those containing any ``skip_names`` substring and,
    with ``default``, those containing one of :data:`TAO_FP32_PATTERNS` and, in a tao-cli export (some node
    under :data:`POSTPROCESSOR_PREFIX`), every node outside that prefix (the post-processor).  A graph traced
    otherwise (TAO's exporter names ``/sem_seg_head/...`` and ``/post_processor/...``) gets TAO's patterns only."""
    patterns = [*skip_names, *(TAO_FP32_PATTERNS if default else ())]
    matched = set(match_nodes(node_names, patterns))
    wrapped = default and any(n.startswith(POSTPROCESSOR_PREFIX) for n in node_names)
    return [n for n in node_names if n in matched or (wrapped and not n.startswith(POSTPROCESSOR_PREFIX))]


def _calibration_images(cfg: Any, count: int) -> tuple[Any, int]:
    """(dataset of the calibration folder through evaluate's preprocessing: ``dataset.val``'s test resize and
    normalisation, so calibration sees the statistics evaluate will feed; how many of its images are used)."""
    from networks.mask2former.data import Augmentation, PredictDataset

    ds = cfg.dataset
    aug = ds.augmentation
    transform = Augmentation(False, [aug.test_min_size], aug.test_max_size, None, ds.val.target_size)
    dataset = PredictDataset(ds.quant_calibration_dataset.images_dir, transform, ds.pixel_mean, ds.pixel_std,
                             field="dataset.quant_calibration_dataset.images_dir")
    return dataset, calibration_count(count, len(dataset), ds.quant_calibration_dataset.images_dir)


def _calibration_batches(cfg: Any, model_path: str, count: int) -> tuple[Callable[[], Iterator[dict]], int]:
    """(function giving an iterator of ``{input name: float32 [B,3,H,W]}`` at each call, number of images used) for
    calibrating an ONNX file: the first ``count`` calibration images (:func:`_calibration_images`) resized to the
    graph's H×W.  A graph with a fixed batch B is fed whole batches
    (:func:`~networks.common.onnx_quantize.calibration_order`)."""
    from networks.mask2former.data import collate, raise_if_error
    from networks.mask2former.onnx_runtime import OnnxHead

    dataset, used = _calibration_images(cfg, count)
    head = OnnxHead(model_path, str(cfg.model.mode), field="quantize.model_path")
    step = head.batch or 1
    order = calibration_order(used, step)

    def batches() -> Iterator[dict]:
        for start in range(0, len(order), step):
            batch = collate([dataset[i] for i in order[start:start + step]])
            raise_if_error(batch)
            yield {head.input_name: head.prepare(batch["images"], batch["image_sizes"])}

    return batches, used


def _torch_calibration(cfg: Any, count: int) -> Callable[[Any, Any], int]:
    """``calibrate(model, device) -> images used`` for backend modelopt.pytorch: the model run on the first
    ``count`` calibration images (:func:`_calibration_images`), ``dataset.val.batch_size`` at a time."""
    from networks.mask2former.data import collate, raise_if_error

    dataset, used = _calibration_images(cfg, count)
    step = max(1, int(cfg.dataset.val.batch_size))

    def calibrate(model: Any, device: Any) -> int:
        for start in range(0, used, step):
            batch = collate([dataset[i] for i in range(start, min(used, start + step))])
            raise_if_error(batch)
            model(batch["images"].to(device))
        return used

    return calibrate


def run_quantize(cfg: Any, ctx: Any) -> dict[str, Any]:
    """The ``quantize`` action; returns the outputs recorded in status.json (paths, sizes, excluded node count,
    calibration count).  The spec is checked with :func:`check_quantize` first, also when called directly."""
    check_quantize(cfg)
    q = cfg.quantize
    if str(q.backend) in PYTORCH_BACKENDS:
        from networks.mask2former.export import load_model_weights
        from networks.mask2former.model import build_model

        model = build_model(cfg.model).eval()
        load_model_weights(model, q.model_path, field="quantize.model_path", loader=ctx.load_checkpoint,
                           model_cfg=cfg.model)
        return run_checkpoint_quantize(q, ctx, model, "mask2former", "model.",
                                       lambda: _torch_calibration(cfg, int(q.calib_images)))
    return run_static_ptq(
        q, ctx, lambda names: excluded_nodes(names, list(q.skip_names)),
        lambda path: _calibration_batches(cfg, path, int(q.calib_images)),
        str(cfg.dataset.quant_calibration_dataset.images_dir),
        [*TAO_FP32_PATTERNS, f"not under {POSTPROCESSOR_PREFIX} (post-processor)"],
        "TAO's fp32 layers, the post-processor")
