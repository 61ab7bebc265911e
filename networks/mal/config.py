"""MAL experiment spec: TAO's ``mal`` dataclasses (tao-core ``config/mal/default_config.py``) with metadata.

Field names, nesting and defaults are TAO's runtime defaults (the dataclass ``value``, not the UI
``default_value``: ``train.batch_size`` 3, ``train.min_lr_rate`` 0.2, ``train.lr`` 1e-6), so TAO MAL spec files
load unchanged.  Deliberate differences are marked with ``relaxed_from`` and listed in ``docs/mal.md``.

:func:`check` holds the cross-field rules that a per-field type/range/option check cannot express; it raises
:class:`~networks.common.errors.ConfigError` naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from networks.common.config import AutoMLConfig, cfg_get, coco_backend_param, param
from networks.common.config import EvaluateConfig as _BaseEvaluate
from networks.common.config import ExperimentConfig as _BaseExperiment
from networks.common.config import InferenceConfig as _BaseInference
from networks.common.config import TrainConfig as _BaseTrain
from networks.common.errors import ConfigError

__all__ = [
    "SUPPORTED_ARCHS",
    "MALDatasetConfig",
    "MALModelConfig",
    "MALTrainExpConfig",
    "MALEvalExpConfig",
    "MALInferenceExpConfig",
    "ExperimentConfig",
    "check",
]

#: The ViT variants TAO advertises for ``model.arch`` (its ``valid_options`` order).  All five build here.
SUPPORTED_ARCHS = [
    "vit-deit-tiny/16",
    "vit-deit-small/16",
    "vit-mae-base/16",
    "vit-mae-large/16",
    "vit-mae-huge/14",
]


@dataclass
class MALDatasetConfig:
    """``dataset``: COCO box annotations and images for training and validation."""

    type: str = param("coco", description="Dataset format; only COCO JSON is supported.", valid_options=["coco"])
    train_ann_path: str = param(
        "", description="COCO JSON with the training boxes (segmentations are not needed).", popular=True,
        display_name="Train annotation file")
    train_img_dir: str = param(
        "", description="Directory (or .tar/.tar.gz/.zip archive) holding the training images; "
        "joined with each image's file_name.", popular=True, display_name="Train image directory")
    val_ann_path: str = param(
        "", description="COCO JSON used for validation and evaluate; needs segmentations when load_mask is true.",
        popular=True, display_name="Validation annotation file")
    val_img_dir: str = param(
        "", description="Directory (or archive) holding the validation images.", popular=True,
        display_name="Validation image directory")
    min_obj_size: float = param(
        2048.0, description="Training boxes whose area w*h is not strictly above this (pixels^2) are skipped.",
        valid_min=0, valid_max="inf", automl_enabled=True)
    max_obj_size: float = param(
        1e10, description="Training boxes whose area w*h is not strictly below this (pixels^2) are skipped.",
        valid_min=0, valid_max="inf")
    num_workers_per_gpu: int = param(
        2, description="Data-loader worker processes per device process.", valid_min=0)
    load_mask: bool = param(
        True, description="Read the ground-truth masks of the validation set and report mIoU against them.")
    crop_size: int = param(
        512, description="Side S of the square network input: each box crop is resized to SxS pixels.",
        valid_min=32, valid_max="inf", relaxed_from={"valid_min": 256}, popular=True)


@dataclass
class MALModelConfig:
    """``model``: ViT backbone and the mask/RoI heads."""

    arch: str = param(
        "vit-mae-base/16", description="ViT backbone variant (width/depth from the size word, patch from the "
        "number); weights come from train.pretrained_model_path.", valid_options=list(SUPPORTED_ARCHS),
        popular=True, display_name="Backbone")
    patch_embed: str = param(
        "linear", description="Patch embedding of the ViT: 'linear' (16x16 conv, timm/MAE/DeiT and TAO 6.25.7+) or "
        "'convstem' (4 stride-2 convs); TAO 5.0-6.0 / NVlabs MAL checkpoints use convstem (not a TAO field).",
        valid_options=["linear", "convstem"])
    frozen_stages: list[int] = param(
        [-1], description="Backbone stages to freeze: 0 = patch embedding, i = transformer block i (1-based); "
        "unknown ids such as -1 freeze nothing.")
    mask_head_num_convs: int = param(
        4, description="Number of 3x3 convolutions in the mask head (the 4th is preceded by the upsampling).",
        valid_min=1)
    mask_head_hidden_channel: int = param(256, description="Width of the mask head's hidden convolutions.",
                                          valid_min=1)
    mask_head_out_channel: int = param(256, description="Width of the mask head output and of the RoI query.",
                                       valid_min=1)
    teacher_momentum: float = param(
        0.996, description="EMA factor of the teacher: teacher = m*teacher + (1-m)*student after every step.",
        valid_min=0, valid_max=1)
    not_adjust_scale: bool = param(
        False, description="Disable the per-box-size feature rescaling (one resolution for every box).")
    mask_scale_ratio_pre: int = param(
        1, description="Feature rescale factor before the heads when not_adjust_scale is true.", valid_min=1)
    mask_scale_ratio: float = param(
        2.0, description="Upsampling factor applied before the last mask-head convolution.", valid_min=0)
    vit_dpr: float = param(0.0, description="Stochastic depth (drop-path) rate of the backbone.",
                           valid_min=0, valid_max=1)


@dataclass
class MALTrainExpConfig(_BaseTrain):
    """``train``: optimisation, schedule, augmentation margins and loss settings."""

    batch_size: int = param(
        3, description="Boxes per device per step; also multiplies the learning rate.", valid_min=1,
        popular=True, automl_enabled=True)
    accum_grad_batches: int = param(
        1, description="Batches whose gradients are summed before each optimiser step (TAO rejects values > 1; "
        "supported here).",
        valid_min=1)
    use_amp: bool = param(True, description="Train with 16-bit mixed precision (on devices that support it).")
    teacher_precision: str = param(
        "auto", description="Precision of the teacher's no-gradient forward, whose masks only seed the CRF "
        "target (tao-cli addition): 'run' follows use_amp as TAO does; 'bf16' runs it under bf16 autocast; "
        "'auto' is 'bf16' when the run is fp32 and the device computes bf16 in hardware, else 'run'.",
        valid_options=["auto", "run", "bf16"])
    pretrained_model_path: str | None = param(
        None, description="Backbone (MAE/DeiT-style) or full MAL checkpoint used to initialise student and "
        "teacher; ignored when resuming.")
    optim_type: str = param("adamw", description="Optimiser; AdamW is the only choice.", valid_options=["adamw"])
    optim_momentum: float = param(0.9, description="Kept for spec compatibility; AdamW does not read it.",
                                  valid_min=0, valid_max=1)
    lr: float = param(
        1e-6, description="Base learning rate per box; the applied rate is lr x devices x batch_size.",
        valid_min=0, valid_max="inf", automl_enabled=True, popular=True)
    min_lr: float = param(
        0.0, description="Floor of the cosine schedule (absolute LR) when > 0; 0 uses lr x devices x batch_size x "
        "min_lr_rate (TAO always uses the latter).", valid_min=0)
    min_lr_rate: float = param(
        0.2, description="Final learning rate of the cosine schedule as a fraction of the scaled rate.",
        valid_min=0, valid_max=1, automl_enabled=True)
    num_wave: float = param(1.0, description="Frequency multiplier of the cosine schedule.", valid_min=0)
    wd: float = param(5e-4, description="AdamW weight decay (applied to every parameter).", valid_min=0,
                      automl_enabled=True)
    optim_eps: float = param(1e-8, description="AdamW epsilon.", valid_min=0)
    optim_betas: list[float] = param([0.9, 0.9], description="AdamW (beta1, beta2).")
    warmup_epochs: int = param(1, description="Linear warm-up length in (fractional) epochs.", valid_min=0)
    margin_rate: list[float] = param(
        [0.0, 1.2], description="[low, high] of the random crop margin added around each training box, as a "
        "fraction of the half box size.")
    test_margin_rate: list[float] = param(
        [0.6, 0.6], description="Crop margin for validation/inference; only the first value is used "
        "(each side grows by half of it times the half box size).")
    mask_thres: list[float] = param(
        [0.1], description="Probability threshold that binarises a mask, one value or one per box size "
        "(small <32^2, medium <96^2, large).")
    loss_mil_weight: float = param(4.0, description="Weight of the box-projection (MIL) loss.", valid_min=0,
                                   automl_enabled=True)
    loss_crf_weight: float = param(0.5, description="Weight of the mean-field (CRF) pseudo-label loss.",
                                   valid_min=0, automl_enabled=True)
    crf_zeta: float = param(0.1, description="Colour bandwidth of the CRF pairwise affinity.", valid_min=0)
    crf_kernel_size: int = param(3, description="Neighbourhood size of the CRF affinity (odd).", valid_min=1)
    crf_num_iter: int = param(100, description="Mean-field iterations.", valid_min=1)
    loss_crf_step: int = param(4000, description="Steps over which the CRF loss weight ramps up in epoch 0.",
                               valid_min=0)
    loss_mil_step: int = param(1000, description="Steps over which the MIL loss weight ramps up in epoch 0.",
                               valid_min=0)
    crf_size_ratio: int = param(1, description="CRF resolution as a multiple of the mask-logit resolution.",
                                valid_min=1)
    crf_value_high_thres: float = param(0.9, description="Upper clamp of the mean-field probabilities.",
                                        valid_min=0, valid_max=1)
    crf_value_low_thres: float = param(0.1, description="Lower clamp of the mean-field probabilities.",
                                       valid_min=0, valid_max=1)


@dataclass
class MALEvalExpConfig(_BaseEvaluate):
    """``evaluate``: test-time options; the metric is class-averaged per-instance mask IoU (mIoU)."""

    batch_size: int = param(3, description="Boxes per device per step.", valid_min=1)
    use_mixed_model_test: bool = param(
        False, description="Predict with the average of student and teacher logits (wins over use_teacher_test).")
    use_teacher_test: bool = param(False, description="Predict with the EMA teacher instead of the student.")
    comp_clustering: bool = param(
        False, description="Report val_cluster_score (kept for spec compatibility; see docs/mal.md).")
    use_flip_test: bool = param(False, description="Average logits with those of the horizontally flipped crop.")
    coco_backend: str = coco_backend_param("COCO AP")


@dataclass
class MALInferenceExpConfig(_BaseInference):
    """``inference``: pseudo-label generation for a COCO JSON of boxes."""

    ann_path: str = param("", description="COCO JSON with the boxes to label.", popular=True,
                          display_name="Annotation file")
    img_dir: str = param("", description="Directory (or archive) holding its images.", popular=True,
                         display_name="Image directory")
    label_dump_path: str = param(
        "instances_val2017_mal.json", description="Output COCO JSON with the pseudo-masks; relative paths are "
        "inside the inference results directory.")
    batch_size: int = param(3, description="Boxes per device per step.", valid_min=1)
    load_mask: bool = param(
        False, description="Also read ground-truth masks of ann_path and store each box's IoU in the output.")
    num_overlays: int = param(
        8, description="Number of images for which an overlay PNG is written to <results>/overlays "
        "(not a TAO field).", valid_min=0)


@dataclass
class ExperimentConfig(_BaseExperiment):
    """Top level of a MAL spec: the common fields plus dataset/model/train/evaluate/inference."""

    model_name: str | None = param("mal", description="Network name.")
    dataset: MALDatasetConfig = param(MALDatasetConfig, description="Dataset settings.")
    model: MALModelConfig = param(MALModelConfig, description="Model settings.")
    train: MALTrainExpConfig = param(MALTrainExpConfig, description="Training settings.")
    evaluate: MALEvalExpConfig = param(MALEvalExpConfig, description="Evaluation settings.")
    inference: MALInferenceExpConfig = param(MALInferenceExpConfig, description="Inference settings.")
    automl: AutoMLConfig = param(AutoMLConfig, description="AutoML search (tao automl; docs/automl.md).")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in ("", "???"))


def check(cfg: Any, action: str) -> None:
    """Cross-field checks for ``action`` ("train" | "evaluate" | "inference"); raise ``ConfigError`` on the first.

    ``cfg`` is the merged spec (DictConfig or the dataclass).  Paths are only checked for being set here; their
    existence is checked through :func:`networks.mal.input_paths` by the engine.
    """
    arch = cfg_get(cfg, "model.arch")
    if arch not in SUPPORTED_ARCHS:
        if isinstance(arch, str) and arch.startswith("fan"):
            problem = (f"'{arch}' is a FAN backbone, which MAL cannot use (TAO's FAN returns no spatial "
                       f"tokens, so its MAL forward fails)")
        else:
            problem = f"unknown backbone '{arch}'"
        raise ConfigError("model.arch", problem, "use one of: " + ", ".join(SUPPORTED_ARCHS))

    dtype = cfg_get(cfg, "dataset.type")
    if dtype != "coco":
        raise ConfigError("dataset.type", f"'{dtype}' is not supported", "MAL reads COCO JSON only: use 'coco'")

    mask_thres = list(cfg_get(cfg, "train.mask_thres"))
    if len(mask_thres) not in (1, 3):
        raise ConfigError("train.mask_thres", f"has {len(mask_thres)} values",
                          "give one threshold, or three (small, medium, large)")
    for t in mask_thres:
        if not 0.0 <= float(t) <= 1.0:
            raise ConfigError("train.mask_thres", f"threshold {t} is outside [0, 1]")

    margin = list(cfg_get(cfg, "train.margin_rate"))
    if len(margin) != 2:
        raise ConfigError("train.margin_rate", f"has {len(margin)} values", "give [low, high], e.g. [0, 1.2]")
    if float(margin[0]) < 0 or float(margin[0]) > float(margin[1]):
        raise ConfigError("train.margin_rate", f"{margin} is not a range 0 <= low <= high")
    test_margin = list(cfg_get(cfg, "train.test_margin_rate"))
    if len(test_margin) < 1 or float(test_margin[0]) < 0:
        raise ConfigError("train.test_margin_rate", f"{test_margin} needs a first value >= 0")

    if len(list(cfg_get(cfg, "train.optim_betas"))) != 2:
        raise ConfigError("train.optim_betas", "must have two values", "e.g. [0.9, 0.9]")

    k = int(cfg_get(cfg, "train.crf_kernel_size"))
    if k % 2 != 1:
        raise ConfigError("train.crf_kernel_size", f"{k} is even", "use an odd size such as 3")

    lo, hi = float(cfg_get(cfg, "train.crf_value_low_thres")), float(cfg_get(cfg, "train.crf_value_high_thres"))
    if not 0.0 < lo < hi < 1.0:
        raise ConfigError("train.crf_value_low_thres",
                          f"clamp range [{lo}, {hi}] must satisfy 0 < low < high < 1")

    if action == "train":
        epochs, warm = int(cfg_get(cfg, "train.num_epochs")), int(cfg_get(cfg, "train.warmup_epochs"))
        if epochs <= warm:
            # TAO divides by zero here; we run warm-up only (the LR ramps up and then stays at its peak)
            import logging

            logging.getLogger("tao").warning(
                "train.warmup_epochs=%d is not below train.num_epochs=%d: the whole run is warm-up, no cosine decay",
                warm, epochs)
        for key in ("dataset.train_ann_path", "dataset.train_img_dir"):
            if _blank(cfg_get(cfg, key)):
                raise ConfigError(key, "is not set", "training needs the training annotations and images")
        for key in ("dataset.val_ann_path", "dataset.val_img_dir"):
            if _blank(cfg_get(cfg, key)):
                raise ConfigError(key, "is not set", "training validates every validation_interval epochs")
    elif action == "evaluate":
        for key in ("dataset.val_ann_path", "dataset.val_img_dir"):
            if _blank(cfg_get(cfg, key)):
                raise ConfigError(key, "is not set", "evaluate reads the validation annotations and images")
    elif action == "inference":
        for key in ("inference.ann_path", "inference.img_dir"):
            if _blank(cfg_get(cfg, key)):
                raise ConfigError(key, "is not set", "inference labels the boxes of this COCO JSON")
        if _blank(cfg_get(cfg, "inference.label_dump_path")):
            raise ConfigError("inference.label_dump_path", "is empty", "name the output JSON file")
