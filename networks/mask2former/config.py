"""Mask2Former spec: TAO's ``mask2former`` experiment config (field names, nesting and defaults) plus checks.

Mirrors tao-core ``config/mask2former/{model,dataset,train,deploy,default_config}.py`` so TAO spec files load
unchanged.  Deliberate differences (see docs/compat.md): ``model.backbone.swin.type`` accepts ``custom`` (use
``embed_dim``/``depths``/``num_heads`` as given), ``train.precision`` accepts ``bf16``, and the loss/matcher
point-sampling fields (``train_num_points``, ``oversample_ratio``, ``importance_sample_ratio``) are live.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from networks.backbones.swin_presets import SWIN_PRESETS
from networks.common.config import (
    AutoMLConfig,
    EvaluateConfig,
    GenTrtEngineConfig,
    InferenceConfig,
    OnnxExportConfig,
    QuantizeConfig,
    TrainConfig,
    coco_backend_param,
    param,
)
from networks.common.config import ExperimentConfig as CommonExperimentConfig
from networks.common.errors import ConfigError

__all__ = [
    "SwinConfig",
    "EfficientViTConfig",
    "BackboneConfig",
    "SemSegHeadConfig",
    "MaskFormerConfig",
    "ModelConfig",
    "DatasetSplitConfig",
    "AugmentationConfig",
    "CalibrationDatasetConfig",
    "DatasetConfig",
    "OptimConfig",
    "Mask2FormerTrainConfig",
    "Mask2FormerEvaluateConfig",
    "Mask2FormerInferenceConfig",
    "Mask2FormerExportConfig",
    "ExperimentConfig",
    "check",
    "swin_dims",
]

@dataclass
class SwinConfig:
    """Swin Transformer backbone (``model.backbone.swin``)."""

    type: str = param("tiny", description="Swin variant; tiny/small/base/large override embed_dim, depths and "
                      "num_heads. 'custom' (tao-cli) uses those three fields as given.",
                      valid_options=[*SWIN_PRESETS, "custom"], popular=True)
    embed_dim: int = param(96, description="Patch embedding width (used only when type is 'custom').", valid_min=1)
    depths: list[int] = param([2, 2, 6, 2], description="Blocks per stage (used only when type is 'custom').")
    num_heads: list[int] = param([3, 6, 12, 24], description="Heads per stage (used only when type is 'custom').")
    patch_size: int = param(4, description="Patch size in pixels.", valid_min=1)
    window_size: int = param(7, description="Attention window size in tokens.", valid_min=1)
    mlp_ratio: float = param(4.0, description="MLP hidden width / embed width.", valid_min=0)
    qkv_bias: bool = param(True, description="Add a bias to the qkv projection.")
    qk_scale: float | None = param(None, description="Ignored (as in TAO): the scale is always head_dim**-0.5.")
    drop_rate: float = param(0.0, description="Dropout rate.", valid_min=0, valid_max=1)
    attn_drop_rate: float = param(0.0, description="Attention dropout rate.", valid_min=0, valid_max=1)
    drop_path_rate: float = param(0.3, description="Stochastic depth rate (linear over all blocks).",
                                  valid_min=0, valid_max=1)
    ape: bool = param(False, description="Use an absolute position embedding.")
    patch_norm: bool = param(True, description="LayerNorm after patch embedding.")
    out_indices: list[int] = param([0, 1, 2, 3], description="Ignored (as in TAO): all four stages are output.")
    pretrain_img_size: int = param(384, description="Pretraining image size (matters only with ape).", valid_min=1)
    use_checkpoint: bool = param(False, description="Activation checkpointing inside Swin blocks.")
    out_features: list[str] = param(["res2", "res3", "res4", "res5"], description="Backbone outputs to use.")


@dataclass
class EfficientViTConfig:
    """EfficientViT backbone (``model.backbone.efficientvit``); accepted so TAO specs load, not supported yet."""

    name: str = param("l0", description="EfficientViT variant.",
                      valid_options=["b0", "b1", "b2", "b3", "l0", "l1", "l2", "l3"])
    out_indices: list[int] = param([1, 2, 3], description="Output stage indices.")
    pretrain_img_size: int = param(384, description="Pretraining image size.", valid_min=1)
    use_checkpoint: bool = param(False, description="Activation checkpointing.")
    out_features: list[str] = param(["res2", "res3", "res4", "res5"], description="Backbone outputs to use.")


@dataclass
class BackboneConfig:
    """``model.backbone``."""

    type: str = param("swin", description="Backbone type (only 'swin' is supported by tao-cli).",
                      valid_options=["swin", "efficientvit"])
    pretrained_weights: str | None = param(None, description="Backbone weights (official Swin .pth with key "
                                           "'model', or a TAO classification checkpoint).")
    swin: SwinConfig = param(SwinConfig, description="Swin settings.")
    efficientvit: EfficientViTConfig = param(EfficientViTConfig, description="EfficientViT settings.")


@dataclass
class SemSegHeadConfig:
    """``model.sem_seg_head``: multi-scale deformable-attention pixel decoder."""

    common_stride: int = param(4, description="Stride of the mask features.", valid_min=2)
    transformer_enc_layers: int = param(6, description="Deformable-attention encoder layers.", valid_min=1)
    convs_dim: int = param(256, description="Pixel-decoder width.", valid_min=1)
    mask_dim: int = param(256, description="Mask-feature channels.", valid_min=1)
    deformable_transformer_encoder_in_features: list[str] = param(
        ["res3", "res4", "res5"], description="Backbone levels fed to the deformable encoder.")
    num_classes: int = param(200, description="Number of classes (the class head has num_classes+1 outputs; "
                             "index 0 is no-object).", valid_min=1, popular=True)
    norm: str = param("GN", description="Norm of the FPN convolutions.", valid_options=["", "GN", "LN", "SyncBN"])


@dataclass
class MaskFormerConfig:
    """``model.mask_former``: masked-attention transformer decoder and loss weights."""

    dropout: float = param(0.0, description="Dropout of the pixel-decoder encoder.", valid_min=0, valid_max=1)
    nheads: int = param(8, description="Attention heads (pixel decoder and transformer decoder).", valid_min=1)
    num_object_queries: int = param(100, description="Number of queries.", valid_min=1, valid_max="inf",
                                    popular=True)
    hidden_dim: int = param(256, description="Decoder width.", valid_min=64, valid_max=1024,
                            math_cond="/ 8")
    dim_feedforward: int = param(2048, description="Decoder FFN width.", valid_min=1)
    dec_layers: int = param(10, description="Number of predictions; the decoder has dec_layers-1 layers.",
                            valid_min=1, valid_max=50)
    pre_norm: bool = param(False, description="Pre-norm decoder layers.")
    class_weight: float = param(2.0, description="Weight of the classification loss and matching cost.",
                                valid_min=0, valid_max="inf")
    dice_weight: float = param(5.0, description="Weight of the dice loss and matching cost.",
                               valid_min=0, valid_max="inf")
    mask_weight: float = param(5.0, description="Weight of the mask (BCE) loss and matching cost.",
                               valid_min=0, valid_max="inf")
    train_num_points: int = param(12544, description="Points sampled per mask for the mask losses and matching.",
                                  valid_min=1)
    oversample_ratio: float = param(3.0, description="Oversampling ratio of importance sampling.", valid_min=1)
    importance_sample_ratio: float = param(0.75, description="Share of points chosen by uncertainty.",
                                           valid_min=0, valid_max=1)
    deep_supervision: bool = param(True, description="Add losses on every intermediate prediction.")
    no_object_weight: float = param(0.1, description="Cross-entropy weight of the no-object class (index 0).",
                                    valid_min=0)


@dataclass
class ModelConfig:
    """``model``."""

    export: bool = param(False, description="Export mode: set by the export action itself; true is refused for "
                         "train/evaluate/inference.")
    mode: str = param("panoptic", description="Post-processing, visualisation and ONNX outputs.",
                      valid_options=["panoptic", "instance", "semantic"], popular=True)
    object_mask_threshold: float = param(0.4, description="Panoptic: minimum class score of a kept query.",
                                         valid_min=0, valid_max=1)
    overlap_threshold: float = param(0.5, description="Panoptic: minimum visible share of a query's mask.",
                                     valid_min=0, valid_max=1)
    test_topk_per_image: int = param(100, description="Instance: number of detections kept per image.",
                                     valid_min=1)
    backbone: BackboneConfig = param(BackboneConfig, description="Backbone.")
    sem_seg_head: SemSegHeadConfig = param(SemSegHeadConfig, description="Pixel decoder.")
    mask_former: MaskFormerConfig = param(MaskFormerConfig, description="Transformer decoder and losses.")


@dataclass
class DatasetSplitConfig:
    """One of ``dataset.train`` / ``dataset.val`` / ``dataset.test``."""

    type: str = param("ade", description="ade: JSONL of {img, segm}; coco: instance JSON; coco_panoptic: panoptic "
                      "JSON + PNG folder.", valid_options=["coco", "ade", "coco_panoptic"])
    name: str = param("", description="Dataset name (informational).")
    panoptic_json: str = param("", description="COCO panoptic JSON (coco_panoptic).")
    instance_json: str = param("", description="COCO instance JSON (coco).")
    img_dir: str = param("", description="Image folder or archive (coco, coco_panoptic, and test images).")
    panoptic_dir: str = param("", description="Panoptic PNG folder or archive (coco_panoptic).")
    root_dir: str = param("", description="Prefix of the paths in annot_file (ade).")
    annot_file: str = param("", description="JSONL annotation file (ade).")
    batch_size: int = param(1, description="Batch size per device.", valid_min=1, popular=True)
    num_workers: int = param(1, description="Data-loading workers per device.", valid_min=0)
    target_size: list[int] | None = param([], description="[W, H] resize applied before augmentation; [] = off.")


@dataclass
class AugmentationConfig:
    """``dataset.augmentation``."""

    train_min_size: list[int] = param([640], description="Short-side sizes for training; one value s expands "
                                      "to range(s//2, 2s+64, 64).")
    train_max_size: int = param(2560, description="Maximum long side in training.", valid_min=32)
    train_crop_size: list[int] = param([640, 640], description="Random crop [H, W].")
    test_min_size: int = param(640, description="Short side at test time.", valid_min=32)
    test_max_size: int = param(640, description="Maximum long side at test time.", valid_min=32)


@dataclass
class CalibrationDatasetConfig:
    """``dataset.quant_calibration_dataset``: the images the quantize action calibrates on."""

    images_dir: str = param("", description="Folder or archive of calibration images for quantize "
                            "(quantize.calib_images of them), preprocessed as evaluate does.")


@dataclass
class DatasetConfig:
    """``dataset``."""

    train: DatasetSplitConfig = param(DatasetSplitConfig, description="Training data.")
    val: DatasetSplitConfig = param(DatasetSplitConfig, description="Validation data (also used by evaluate).")
    test: DatasetSplitConfig = param(DatasetSplitConfig, description="Inference data (test.img_dir).")
    pin_memory: bool = param(True, description="Pin host memory in the data loaders.")
    pixel_mean: list[float] = param([0.485, 0.456, 0.406], description="Per-channel mean of img/255 (RGB).")
    pixel_std: list[float] = param([0.229, 0.224, 0.225], description="Per-channel std of img/255 (RGB).")
    contiguous_id: bool = param(False, description="Map category ids to 1..N in label-map order.")
    label_map: str = param("", description="JSON list of {id, name, color?, isthing?}; required for train, "
                           "evaluate and inference.", popular=True)
    augmentation: AugmentationConfig = param(AugmentationConfig, description="Augmentation and resizing.")
    quant_calibration_dataset: CalibrationDatasetConfig = param(CalibrationDatasetConfig,
                                                                description="Quantization calibration data.")


@dataclass
class OptimConfig:
    """``train.optim``."""

    type: str = param("AdamW", description="Optimizer.", valid_options=["AdamW", "SGD", "sgd"])
    monitor_name: str = param("train_loss", description="Metric returned as the LR scheduler's monitor "
                              "(train/loss_epoch or val/loss).",
                              valid_options=["val_loss", "train_loss"])
    lr: float = param(2e-4, description="Base learning rate.", valid_min=0, valid_max=1, popular=True,
                      automl_enabled=True)
    backbone_multiplier: float = param(0.1, description="Backbone learning-rate multiplier.",
                                       valid_min=0, valid_max=1)
    momentum: float = param(0.9, description="SGD momentum.", valid_min=0, valid_max=1)
    weight_decay: float = param(0.05, description="Weight decay (0 for norms, embeddings and position tables).",
                                valid_min=0, valid_max=1)
    lr_scheduler: str = param("MultiStep", description="MultiStep (per epoch) or WarmupPoly (per step).",
                              valid_options=["MultiStep", "WarmupPoly", "Warmuppoly"])
    milestones: list[int] = param([88, 96], description="MultiStep milestones in epochs.")
    gamma: float = param(0.1, description="MultiStep decay factor.", valid_min=0)


@dataclass
class Mask2FormerTrainConfig(TrainConfig):
    """``train`` (TAO ``Mask2FormerTrainExpConfig``)."""

    freeze: list[str] | None = param([], description="Dotted sub-module paths of the model to freeze, e.g. "
                                     "'backbone'.")
    pretrained_model_path: str | None = param(None, description="Full-model weights: TAO .pth checkpoint or "
                                              "detectron2 .pkl.")
    clip_grad_norm: float = param(0.1, description="Global L2 gradient clip; 0 disables.", valid_min=0)
    clip_grad_norm_type: Any = param(2.0, description="Norm type of the gradient clipping at clip_grad_norm: a "
                                     "number p >= 1 (2 = L2) or 'inf' (largest absolute value).")
    clip_grad_type: str = param("full", description="'full' = one global norm over all parameters.")
    is_dry_run: bool = param(False, description="Run one batch of train/val (Lightning fast_dev_run).")
    optim: OptimConfig = param(OptimConfig, description="Optimizer and schedule.")
    precision: str = param("fp32", description="Training precision.", valid_options=["fp16", "bf16", "fp32"])
    distributed_strategy: str = param("ddp", description="Multi-GPU strategy.", valid_options=["ddp", "fsdp"])
    activation_checkpoint: bool = param(False, description="Activation checkpointing (also selects plain ddp).")
    use_distributed_sampler: bool = param(False, description="Accepted for TAO compatibility.")
    iters_per_epoch: int | None = param(None, description="Steps per epoch for WarmupPoly; default = the real "
                                        "number of optimizer steps per epoch after distributed sharding.",
                                        valid_min=1)


_ONNX_FILE_HELP = ("ONNX file written by the export action, run with ONNX Runtime instead of a checkpoint "
                   "(not a TAO field; set exactly one of checkpoint, onnx_file, trt_engine).")


@dataclass
class Mask2FormerEvaluateConfig(EvaluateConfig):
    """``evaluate`` (TAO's common evaluate fields) plus the COCO AP backend of ``model.mode: instance`` and
    ``onnx_file``.  ``checkpoint`` is optional here: exactly one of checkpoint / onnx_file / trt_engine is
    required, which :func:`check` enforces."""

    checkpoint: str | None = param(None, description="Path to the checkpoint to evaluate (or set onnx_file).",
                                   examples=["/path/to/mask2former_model.pth"])
    onnx_file: str | None = param(None, description=_ONNX_FILE_HELP)
    coco_backend: str = coco_backend_param("COCO mask AP (model.mode instance)")


@dataclass
class Mask2FormerInferenceConfig(InferenceConfig):
    """``inference`` (TAO's common inference fields) plus ``onnx_file``; as for evaluate, exactly one of
    checkpoint / onnx_file / trt_engine."""

    checkpoint: str | None = param(None, description="Path to the checkpoint to run (or set onnx_file).",
                                   examples=["/path/to/mask2former_model.pth"])
    onnx_file: str | None = param(None, description=_ONNX_FILE_HELP)


@dataclass
class Mask2FormerExportConfig(OnnxExportConfig):
    """``export`` (TAO ``Mask2FormerExportExpConfig``: the common export fields without ``format``)."""

    input_channel: int = param(3, description="Input channels.", valid_min=3, valid_max=3)
    opset_version: int = param(17, description="ONNX opset version (>= 17).", valid_min=1)


@dataclass
class ExperimentConfig(CommonExperimentConfig):
    """Top level of a Mask2Former spec."""

    model_name: str | None = param("mask2former", description="Network name.")
    model: ModelConfig = param(ModelConfig, description="Model.")
    dataset: DatasetConfig = param(DatasetConfig, description="Datasets.")
    train: Mask2FormerTrainConfig = param(Mask2FormerTrainConfig, description="Training.")
    evaluate: Mask2FormerEvaluateConfig = param(Mask2FormerEvaluateConfig, description="Evaluation.")
    inference: Mask2FormerInferenceConfig = param(Mask2FormerInferenceConfig, description="Inference.")
    export: Mask2FormerExportConfig = param(Mask2FormerExportConfig, description="ONNX export.")
    gen_trt_engine: GenTrtEngineConfig = param(GenTrtEngineConfig, description="TensorRT engine from the exported ONNX (needs TensorRT and a CUDA GPU).")
    quantize: QuantizeConfig = param(QuantizeConfig, description="Int8 quantization: of the exported ONNX "
                                     "(onnxruntime or modelopt.onnx, static) or of the trained checkpoint (torchao, "
                                     "weight-only; modelopt.pytorch, static).")
    automl: AutoMLConfig = param(AutoMLConfig, description="AutoML search (tao automl; docs/automl.md).")


def swin_dims(swin: Any) -> tuple[int, list[int], list[int]]:
    """(embed_dim, depths, num_heads) of ``model.backbone.swin``: the variant table, or the fields for 'custom'."""
    if swin.type == "custom":
        return int(swin.embed_dim), [int(d) for d in swin.depths], [int(h) for h in swin.num_heads]
    embed, depths, heads = SWIN_PRESETS[swin.type]
    return embed, list(depths), list(heads)


def _split_needs(split: Any, key: str) -> list[tuple[str, str]]:
    """(field, problem) pairs for a dataset split that lacks what its type needs."""
    needs = {
        "ade": ["annot_file"],
        "coco": ["instance_json", "img_dir"],
        "coco_panoptic": ["panoptic_json", "img_dir", "panoptic_dir"],
    }[split.type]
    return [(f"dataset.{key}.{f}", f"is empty but dataset.{key}.type is '{split.type}'")
            for f in needs if not getattr(split, f)]


def clip_norm_type(value: Any) -> float:
    """``train.clip_grad_norm_type`` as the ``norm_type`` of ``torch.nn.utils.clip_grad_norm_``: a number >= 1, or
    ``inf``/``"inf"`` (max-abs); anything else is a ``ConfigError``."""
    try:
        norm = float(str(value).strip().lower()) if value is not None else float("nan")
    except ValueError:
        norm = float("nan")
    if not norm >= 1.0:  # NaN fails too
        raise ConfigError("train.clip_grad_norm_type", f"{value!r} is not a norm type",
                          "use a number >= 1 (2 = L2) or 'inf'")
    return norm


def _check_model_source(cfg: Any, action: str) -> None:
    """Exactly one of ``<action>.checkpoint`` / ``onnx_file`` / ``trt_engine``; an ONNX file must be a
    Mask2Former export of ``model.mode`` (read without running it)."""
    from networks.common.onnx_runtime import check_model_source
    from networks.mask2former.onnx_runtime import check_onnx_file

    check_model_source(cfg, action, lambda path, field: check_onnx_file(path, str(cfg.model.mode), field))


def check(cfg: Any, action: str) -> None:
    """Cross-field checks for ``action``; raises :class:`ConfigError` naming the field."""
    model = cfg.model
    if model.backbone.type == "efficientvit":
        raise ConfigError("model.backbone.type", "'efficientvit' is not supported yet in tao-cli",
                          "use model.backbone.type=swin")
    swin = model.backbone.swin
    embed, depths, heads = swin_dims(swin)
    if len(depths) != 4 or len(heads) != 4:
        raise ConfigError("model.backbone.swin.depths", f"depths {depths} and num_heads {heads} must have 4 entries")
    for i, h in enumerate(heads):
        width = embed * 2 ** i
        if h <= 0 or width % h:
            raise ConfigError("model.backbone.swin.num_heads",
                              f"stage {i} width {width} is not divisible by {h} heads")
    mf = model.mask_former
    if mf.hidden_dim % mf.nheads:
        raise ConfigError("model.mask_former.hidden_dim",
                          f"{mf.hidden_dim} is not divisible by model.mask_former.nheads={mf.nheads}")
    if mf.hidden_dim % 8:
        raise ConfigError("model.mask_former.hidden_dim", f"{mf.hidden_dim} is not a multiple of 8")
    head = model.sem_seg_head
    if head.convs_dim % mf.nheads:
        raise ConfigError("model.sem_seg_head.convs_dim",
                          f"{head.convs_dim} is not divisible by model.mask_former.nheads={mf.nheads}")
    if head.norm == "GN" and head.convs_dim % 32:
        raise ConfigError("model.sem_seg_head.convs_dim", f"{head.convs_dim} must be a multiple of 32 with GN")
    ds = cfg.dataset
    for name in ("pixel_mean", "pixel_std"):
        values = list(getattr(ds, name))
        if len(values) != 3:
            raise ConfigError(f"dataset.{name}", f"needs 3 values (RGB), got {values}")
    if any(v <= 0 for v in ds.pixel_std):
        raise ConfigError("dataset.pixel_std", f"values must be positive, got {list(ds.pixel_std)}")
    aug = ds.augmentation
    if len(aug.train_crop_size) != 2 or min(aug.train_crop_size) < 32:
        raise ConfigError("dataset.augmentation.train_crop_size",
                          f"must be [H, W] with both >= 32, got {list(aug.train_crop_size)}")
    if any(s < 1 for s in aug.train_min_size):
        raise ConfigError("dataset.augmentation.train_min_size", f"sizes must be positive: {list(aug.train_min_size)}")
    for key in ("train", "val", "test"):
        ts = getattr(ds, key).target_size
        if ts is not None and len(ts) not in (0, 1, 2):
            raise ConfigError(f"dataset.{key}.target_size", f"must be [], [S] or [W, H], got {list(ts)}")

    if action == "train" and clip_norm_type(cfg.train.clip_grad_norm_type) != 2.0 \
            and cfg.train.distributed_strategy == "fsdp":
        raise ConfigError("train.clip_grad_norm_type", f"{cfg.train.clip_grad_norm_type!r} with fsdp",
                          "fsdp clips its sharded gradients in the L2 norm only: use 2, or ddp")
    if action in ("train", "evaluate", "inference") and model.export:
        raise ConfigError("model.export", f"true is only for the export action, not {action}",
                          "leave model.export false: the export action sets it itself")
    if action in ("train", "evaluate", "inference") and not ds.label_map:
        raise ConfigError("dataset.label_map", f"is required for {action}",
                          "point it at a JSON list of {id, name, color, isthing} (COCO 'categories' works)")
    if action == "train":
        problems = _split_needs(ds.train, "train") + _split_needs(ds.val, "val")
        if problems:
            raise ConfigError(*problems[0])
        tr = cfg.train
        if tr.clip_grad_type != "full":
            raise ConfigError("train.clip_grad_type", f"'{tr.clip_grad_type}' is not supported",
                              "use 'full' (one global L2 norm, value train.clip_grad_norm)")
        if tr.optim.type.lower() not in ("adamw", "sgd"):
            raise ConfigError("train.optim.type", f"unknown optimizer '{tr.optim.type}'", "use AdamW or SGD")
        ms = list(tr.optim.milestones)
        if ms != sorted(ms):
            raise ConfigError("train.optim.milestones", f"must be increasing, got {ms}")
        if tr.freeze:
            for path in tr.freeze:
                if not isinstance(path, str) or not path.strip():
                    raise ConfigError("train.freeze", f"entries must be dotted module paths, got {path!r}")
    if action in ("evaluate", "inference"):
        _check_model_source(cfg, action)
    if action == "evaluate":
        problems = _split_needs(ds.val, "val")
        if problems:
            raise ConfigError(*problems[0])
    if action == "inference" and not ds.test.img_dir:
        raise ConfigError("dataset.test.img_dir", "is required for inference",
                          "point it at a folder or archive of images")
    if action == "export":
        ex = cfg.export
        if ex.opset_version < 17:
            raise ConfigError("export.opset_version", f"{ex.opset_version} is too low",
                              "use 17 or higher (GridSample and LayerNormalization need opset >= 17)")
        if ex.input_height % 32 or ex.input_width % 32:
            raise ConfigError("export.input_height", f"input {ex.input_height}x{ex.input_width} must be a multiple "
                              "of 32 in both dimensions")
        if ex.batch_size == 0:
            raise ConfigError("export.batch_size", "must be -1 (dynamic) or >= 1")
    if action == "quantize":
        from networks.mask2former.quantize import check_quantize

        check_quantize(cfg)
