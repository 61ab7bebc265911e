"""Mask2Former (Cheng et al., CVPR 2022) for tao-cli: TAO's ``mask2former`` spec, train/evaluate/inference/export
and quantize (weight-only int8 of the checkpoint with torchao, simulated static int8 of the checkpoint with
ModelOpt, or static int8 PTQ of the exported ONNX with ONNX Runtime or ModelOpt).

Implements the engine ↔ network contract of docs/architecture.md.  ``gen_trt_engine`` builds a TensorRT engine
from the exported ONNX where TensorRT and a CUDA GPU exist, and says what is missing (at load) where they do not.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from networks.common.network import Network, lazy, run_extra_action
from networks.mask2former import unsupported as _fields
from networks.mask2former.config import ExperimentConfig
from networks.mask2former.config import check as _check_fields

__all__ = ["NAME", "TITLE", "CHECKPOINT_NAME", "ACTIONS", "ExperimentConfig", "check", "main_kpi", "input_paths",
           "build_module", "build_datamodule", "run_action", "NETWORK"]

NAME = "mask2former"
TITLE = "Mask2Former"
CHECKPOINT_NAME = "mask2former_model"

ACTIONS: dict[str, str] = {
    "train": "Train a Mask2Former model (panoptic, instance or semantic segmentation).",
    "evaluate": "Evaluate a checkpoint on dataset.val: mIoU and pixel accuracy, plus PQ or mask AP.",
    "inference": "Segment the images of dataset.test.img_dir; writes overlays and PNG/JSON results.",
    "export": "Export a checkpoint to ONNX (standard ops) and check it with onnxruntime.",
    "quantize": "Int8 quantization: the trained checkpoint (torchao weight-only, TAO's default; ModelOpt static) "
                "or the exported ONNX (ONNX Runtime or ModelOpt static PTQ, QDQ); static PTQ calibrates on "
                "dataset.quant_calibration_dataset.",
    "gen_trt_engine": "Build a TensorRT engine from the exported ONNX (FP32/FP16; needs TensorRT and a CUDA GPU).",
}

_SPLIT_FIELDS = {
    "ade": ("annot_file", "root_dir"),
    "coco": ("instance_json", "img_dir"),
    "coco_panoptic": ("panoptic_json", "img_dir", "panoptic_dir"),
}


def check(cfg: Any, action: str) -> None:
    """The spec's cross-field checks (:func:`networks.mask2former.config.check`), and for ``gen_trt_engine`` its
    own (TensorRT and a GPU present, layer precisions, the ONNX file)."""
    _check_fields(cfg, action)
    if action == "gen_trt_engine":
        from networks.mask2former.tensorrt import check_engine_spec

        check_engine_spec(cfg)


def main_kpi(cfg: Any) -> tuple[str, str]:
    """The validation metric that picks ``mask2former_model_best.pth``, by ``model.mode``: ``PQ`` (panoptic),
    ``mIoU`` (semantic) or COCO mask ``AP`` (instance); higher is better."""
    return {"panoptic": "PQ", "semantic": "mIoU", "instance": "AP"}[str(cfg.model.mode)], "max"


def input_paths(cfg: Any, action: str) -> dict[str, str]:
    """``{dotted.key: path}`` of the files/folders ``action`` reads (checked before running)."""
    paths: dict[str, str] = {}
    ds = cfg.dataset

    def split(key: str) -> None:
        s = getattr(ds, key)
        for f in _SPLIT_FIELDS.get(s.type, ()):
            value = getattr(s, f)
            if value:
                paths[f"dataset.{key}.{f}"] = value

    if action in ("train", "evaluate", "inference") and ds.label_map:
        paths["dataset.label_map"] = ds.label_map
    if action == "train":
        split("train")
        split("val")
        if cfg.train.pretrained_model_path:
            paths["train.pretrained_model_path"] = cfg.train.pretrained_model_path
        elif cfg.model.backbone.pretrained_weights:
            paths["model.backbone.pretrained_weights"] = cfg.model.backbone.pretrained_weights
    elif action in ("evaluate", "inference"):
        if action == "evaluate":
            split("val")
        elif ds.test.img_dir:
            paths["dataset.test.img_dir"] = ds.test.img_dir
        for key in ("checkpoint", "onnx_file", "trt_engine"):  # whichever one is set (config.check: exactly one)
            if cfg[action].get(key):
                paths[f"{action}.{key}"] = cfg[action][key]
    elif action == "export":
        paths["export.checkpoint"] = cfg.export.checkpoint
    elif action == "gen_trt_engine":
        paths["gen_trt_engine.onnx_file"] = cfg.gen_trt_engine.onnx_file
    elif action == "quantize":
        paths["quantize.model_path"] = cfg.quantize.model_path
        if str(cfg.quantize.backend) != "torchao":  # weight-only int8 calibrates nothing
            paths["dataset.quant_calibration_dataset.images_dir"] = cfg.dataset.quant_calibration_dataset.images_dir
    return paths


#: The LightningModule / LightningDataModule for ``ctx.action``, and ``export`` (ONNX path, I/O spec, parity).
build_module = lazy("networks.mask2former.module:Mask2FormerModule")
build_datamodule = lazy("networks.mask2former.data:Mask2FormerDataModule")
_export = lazy("networks.mask2former.export:run_export")
_quantize = lazy("networks.mask2former.quantize:run_quantize")
_gen_trt_engine = lazy("networks.mask2former.tensorrt:run_gen_trt_engine")


NETWORK = Network(
    name=NAME, title=TITLE, checkpoint_name=CHECKPOINT_NAME, config_class=ExperimentConfig, actions=ACTIONS,
    check=check, input_paths=input_paths, build_module=build_module, build_datamodule=build_datamodule,
    main_kpi=main_kpi, extra_actions={"export": _export, "quantize": _quantize, "gen_trt_engine": _gen_trt_engine},
    sample_drawer=lazy("networks.mask2former.visualize:sample_drawer"),
    unsupported=_fields.UNSUPPORTED, tao_ignored=_fields.TAO_IGNORED, weight_formats=lazy("networks.mask2former.weight_formats:formats"),
    pretrained_fields=("model.backbone.pretrained_weights", "train.pretrained_model_path"),
)

#: ``run_action(action, cfg, ctx)``: a non-Lightning action (``export``, ``quantize``, ``gen_trt_engine``); unknown actions fail
#: with one line.
run_action = partial(run_extra_action, NETWORK)
