"""Mask Grounding DINO for tao-cli: TAO's ``mask_grounding_dino`` spec, train/evaluate/inference/export,
quantize (weight-only int8 of the checkpoint with torchao, simulated static int8 of the checkpoint with ModelOpt,
or static int8 PTQ of the exported ONNX with ONNX Runtime or ModelOpt) and gen_trt_engine (TensorRT, needs a GPU).

Open-vocabulary detection and instance segmentation prompted by text ("cat . dog ."): Grounding DINO
(Liu et al., 2023) with a CondInst-style dynamic mask head, as in TAO.  Implements the engine ↔ network
contract of docs/architecture.md.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

from networks.common.network import Network, lazy, run_extra_action
from networks.mask_grounding_dino import unsupported as _fields
from networks.mask_grounding_dino.config import ExperimentConfig, eval_source
from networks.mask_grounding_dino.config import check as _check_fields

__all__ = ["NAME", "TITLE", "CHECKPOINT_NAME", "ACTIONS", "ExperimentConfig", "check", "main_kpi", "input_paths",
           "build_module", "build_datamodule", "run_action", "NETWORK"]

NAME = "mask_grounding_dino"
TITLE = "Mask Grounding DINO"
CHECKPOINT_NAME = "mask_gdino_model"

ACTIONS: dict[str, str] = {
    "train": "Train Mask Grounding DINO on ODVG detection/grounding data (validates on a COCO file).",
    "evaluate": "Evaluate a checkpoint: COCO bbox and segm AP on the test (or val) COCO file.",
    "inference": "Detect and segment the phrases of infer_data_sources in its images; writes overlays and JSON.",
    "export": "Export a checkpoint to ONNX (standard ops, TAO's input/output names) and check it with onnxruntime.",
    "quantize": "Int8 quantization: the trained checkpoint (torchao weight-only, TAO's default; ModelOpt static) "
                "or the exported ONNX (ONNX Runtime or ModelOpt static PTQ, QDQ); static PTQ calibrates on "
                "dataset.quant_calibration_data_sources.",
    "gen_trt_engine": "Build a TensorRT engine from the exported ONNX (FP32/FP16, or a quantized QDQ file; needs "
                      "TensorRT and a CUDA GPU).",
}


def check(cfg: Any, action: str) -> None:
    """The spec's cross-field checks (:func:`networks.mask_grounding_dino.config.check`), and for
    ``gen_trt_engine`` its own (TensorRT and a GPU present, layer precisions, the ONNX file, the batch range)."""
    _check_fields(cfg, action)
    if action == "gen_trt_engine":
        from networks.mask_grounding_dino.tensorrt import check_engine_spec

        check_engine_spec(cfg)


def main_kpi(cfg: Any) -> tuple[str, str]:
    """The validation metric that picks ``mask_gdino_model_best.pth``, higher is better: COCO ``segm_val_mAP``,
    or gIoU ``val_mIoU`` (TAO's name) when ``dataset.val_data_sources`` selects the referring evaluator
    (``data.eval_kind``: ODVG grounding lines and ``data_type`` other than OD)."""
    src = cfg.dataset.val_data_sources
    path = src.get("json_file") if src else None
    if path and Path(os.path.expanduser(str(path))).is_file():
        from networks.mask_grounding_dino.data import eval_kind

        if eval_kind(src, "dataset.val_data_sources") == "referring":
            return "val_mIoU", "max"
    return "segm_val_mAP", "max"


def input_paths(cfg: Any, action: str) -> dict[str, str]:
    """``{dotted.key: path}`` of the files/folders ``action`` reads (checked before running)."""
    paths: dict[str, str] = {}
    ds = cfg.dataset

    def source(key: str, src: Any, fields: tuple[str, ...]) -> None:
        for f in fields:
            value = src.get(f) if src else None
            if isinstance(value, str) and value:
                paths[f"{key}.{f}"] = value
            elif isinstance(value, (list, tuple)) or (value is not None and not isinstance(value, str)
                                                      and hasattr(value, "__iter__")):
                for j, v in enumerate(value):
                    if v:
                        paths[f"{key}.{f}[{j}]"] = str(v)

    if action == "train":
        for i, src in enumerate(ds.train_data_sources or []):
            source(f"dataset.train_data_sources[{i}]", src, ("image_dir", "json_file", "label_map"))
        source("dataset.val_data_sources", ds.val_data_sources, ("image_dir", "json_file"))
        if cfg.train.pretrained_model_path:
            paths["train.pretrained_model_path"] = cfg.train.pretrained_model_path
        elif cfg.model.pretrained_backbone_path:
            paths["model.pretrained_backbone_path"] = cfg.model.pretrained_backbone_path
    elif action == "evaluate":
        key, src = eval_source(cfg)
        source(key, src, ("image_dir", "json_file"))
    elif action == "inference":
        source("dataset.infer_data_sources", ds.infer_data_sources, ("image_dir", "json_file", "classmap"))
        captions = ds.infer_data_sources.get("captions") if ds.infer_data_sources else None
        if isinstance(captions, str) and captions.strip().lower().endswith(".jsonl"):  # a captions file
            paths["dataset.infer_data_sources.captions"] = captions
    elif action == "export":
        paths["export.checkpoint"] = cfg.export.checkpoint
    elif action == "gen_trt_engine":
        paths["gen_trt_engine.onnx_file"] = cfg.gen_trt_engine.onnx_file
    elif action == "quantize":
        paths["quantize.model_path"] = cfg.quantize.model_path
        if str(cfg.quantize.backend) != "torchao":  # weight-only int8 calibrates nothing
            source("dataset.quant_calibration_data_sources", ds.quant_calibration_data_sources,
                   ("image_dir", "json_file"))
    if action in ("evaluate", "inference"):
        for key in ("checkpoint", "onnx_file", "trt_engine"):  # whichever one is set (config.check: exactly one)
            if cfg[action].get(key):
                paths[f"{action}.{key}"] = cfg[action][key]
    if action in ("train", "evaluate", "inference", "export", "quantize"):
        from networks.mask_grounding_dino.text_encoder import resolve_text_encoder

        # Resolved here so --dry-run refuses an encoder that is neither local nor cached (never downloaded).
        paths["model.text_encoder_type"] = str(resolve_text_encoder(cfg.model.text_encoder_type))
    return paths


#: The LightningModule / LightningDataModule for ``ctx.action``, and ``export`` (ONNX path, I/O spec, parity).
build_module = lazy("networks.mask_grounding_dino.module:MaskGDinoModule")
build_datamodule = lazy("networks.mask_grounding_dino.data:MaskGDinoDataModule")
_export = lazy("networks.mask_grounding_dino.export:run_export")
_quantize = lazy("networks.mask_grounding_dino.quantize:run_quantize")
_gen_trt_engine = lazy("networks.mask_grounding_dino.tensorrt:run_gen_trt_engine")


NETWORK = Network(
    name=NAME, title=TITLE, checkpoint_name=CHECKPOINT_NAME, config_class=ExperimentConfig, actions=ACTIONS,
    check=check, input_paths=input_paths, build_module=build_module, build_datamodule=build_datamodule,
    main_kpi=main_kpi, extra_actions={"export": _export, "quantize": _quantize, "gen_trt_engine": _gen_trt_engine},
    sample_drawer=lazy("networks.mask_grounding_dino.visualize:sample_drawer"),
    unsupported=_fields.UNSUPPORTED, tao_ignored=_fields.TAO_IGNORED,
    weight_formats=lazy("networks.mask_grounding_dino.weight_formats:formats"),
    pretrained_fields=("model.pretrained_backbone_path", "train.pretrained_model_path"),
)

#: ``run_action(action, cfg, ctx)``: a non-Lightning action (``export``, ``quantize``, ``gen_trt_engine``); unknown
#: actions fail with one line.
run_action = partial(run_extra_action, NETWORK)
