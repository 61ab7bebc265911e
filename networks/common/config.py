"""Spec dataclasses shared by every network, and the one helper that attaches field metadata.

Field names, nesting and defaults follow TAO's tao-core ``CommonExperimentConfig`` and its train/evaluate/
inference/export sections (see ``docs/compat.md`` for the few deliberate deviations), so TAO spec files load
unchanged.  Metadata (description, bounds, options, AutoML hints) lives next to each field through
:func:`param`; ``tao_cli.spec`` enforces it at load time and ``tao_cli.schema`` turns it into JSON Schema.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

__all__ = [
    "MISSING",
    "param",
    "cfg_get",
    "CuDNNConfig",
    "WandBConfig",
    "TrainConfig",
    "EvaluateConfig",
    "InferenceConfig",
    "OnnxExportConfig",
    "ExportConfig",
    "GenTrtEngineConfig",
    "TensorRTConfig",
    "ExperimentConfig",
    "QuantizeConfig",
    "AutoMLConfig",
    "AUTOML_ALGORITHMS",
]

_META_KEYS = (
    "description",
    "display_name",
    "valid_min",
    "valid_max",
    "valid_options",
    "option_weights",
    "automl_enabled",
    "popular",
    "math_cond",
    "depends_on",
    "parent_param",
    "required",
    "examples",
    "relaxed_from",
)


def param(
    default: Any = MISSING,
    *,
    description: str = "",
    display_name: str | None = None,
    valid_min: float | str | None = None,
    valid_max: float | str | None = None,
    valid_options: list[Any] | str | None = None,
    option_weights: list[float] | None = None,
    automl_enabled: bool = False,
    popular: bool = False,
    math_cond: str | None = None,
    depends_on: str | None = None,
    parent_param: bool = False,
    required: bool = False,
    examples: list[Any] | None = None,
    relaxed_from: dict[str, Any] | None = None,
) -> Any:
    """Return a ``dataclasses.field`` carrying the spec metadata of one field.

    ``default`` may be a list or dict (copied per instance) or ``MISSING`` (the value must be given for the
    actions that read it).  ``valid_min``/``valid_max`` may be ``"inf"``; ``valid_options`` may be a list or
    TAO's comma-separated string.  ``relaxed_from`` records a TAO bound that we loosened on purpose (for example
    ``{"valid_min": 256}``) so the schema and ``docs/compat.md`` can say so.
    """
    if isinstance(valid_options, str):
        valid_options = [o.strip() for o in valid_options.split(",") if o.strip()]
    metadata = {
        "description": description,
        "display_name": display_name,
        "valid_min": valid_min,
        "valid_max": valid_max,
        "valid_options": valid_options,
        "option_weights": option_weights,
        "automl_enabled": automl_enabled,
        "popular": popular,
        "math_cond": math_cond,
        "depends_on": depends_on,
        "parent_param": parent_param,
        "required": required,
        "examples": examples,
        "relaxed_from": relaxed_from,
    }
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: _copy(value), metadata=metadata)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        inst = default
        return dataclasses.field(default_factory=lambda: dataclasses.replace(inst), metadata=metadata)
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def metadata_of(field: dataclasses.Field) -> dict[str, Any]:
    """The spec metadata of a dataclass field, with every known key present (``None`` where unset)."""
    meta = {k: None for k in _META_KEYS}
    meta.update({k: v for k, v in field.metadata.items() if k in _META_KEYS})
    return meta


@dataclass
class CuDNNConfig:
    """cuDNN flags applied at the start of training."""

    benchmark: bool = param(False, description="cudnn.benchmark: let cuDNN pick the fastest kernels.")
    deterministic: bool = param(True, description="cudnn.deterministic: use deterministic cuDNN kernels.")


@dataclass
class WandBConfig:
    """Weights & Biases logging.  Off unless ``enable`` is true and the ``wandb`` package is installed."""

    enable: bool = param(
        False,
        description="Log to Weights & Biases (requires the wandb package). TAO defaults to true; see docs/compat.md.",
    )
    project: str = param("TAO Toolkit", description="W&B project name.")
    entity: str = param("", description="W&B entity (team or user).")
    group: str = param("", description="W&B run group.")
    tags: list[str] = param(["training", "tao-toolkit"], description="W&B run tags.")
    reinit: bool = param(False, description="Allow several runs in one process.")
    sync_tensorboard: bool = param(False, description="Sync TensorBoard logs to W&B.")
    save_code: bool = param(False, description="Upload the code with the run.")
    name: str = param("TAO Toolkit training experiment", description="W&B run name.")
    run_id: str = param("", description="Resume this W&B run id when set.")


@dataclass
class TrainConfig:
    """Fields every network's ``train`` section has (TAO ``TrainConfig``)."""

    num_gpus: int = param(1, description="The number of GPUs to run the train job.", valid_min=1, popular=True,
                          display_name="Number of GPUs")
    gpu_ids: list[int] = param([0], description="List of GPU IDs to run the training on.", popular=True)
    num_nodes: int = param(1, description="Number of nodes to run the training on.", valid_min=1)
    seed: int = param(1234, description="Random seed; a negative value disables seeding.", valid_min=-1)
    cudnn: CuDNNConfig = param(CuDNNConfig, description="cuDNN flags.")
    num_epochs: int = param(10, description="Number of epochs to train for.", valid_min=1, popular=True,
                            automl_enabled=False)
    checkpoint_interval: int = param(1, description="Save a checkpoint every this many epochs (or steps).",
                                     valid_min=1, popular=True)
    checkpoint_interval_unit: str = param("epoch", description="Unit of checkpoint_interval.",
                                          valid_options=["epoch", "step"])
    validation_interval: int = param(1, description="Validate every this many epochs.", valid_min=1, popular=True)
    keep_checkpoints: int = param(
        0, description="Keep only the newest N periodic model_epoch_*_step_*.pth files (the files the latest and "
        "best checkpoints point at are always kept); 0 keeps all, as TAO does (not a TAO field).", valid_min=0)
    resume_training_checkpoint_path: str | None = param(
        None, description="Resume from this checkpoint; when unset the latest one in the results dir is used.")
    results_dir: str | None = param(None, description="Results directory of this action; default <results_dir>/train.")


def coco_backend_param(what: str = "COCO AP") -> Any:
    """The ``evaluate.coco_backend`` field (a tao-cli field) of a network whose evaluation computes ``what``."""
    from networks.common.metrics import COCO_BACKENDS

    return param("faster_coco_eval", description=f"Library computing {what} (evaluate, and validation during "
                 "train): faster_coco_eval (C++; the same numbers as pycocotools) or pycocotools (not a TAO field).",
                 valid_options=list(COCO_BACKENDS))


_TRT_ENGINE_HELP = ("TensorRT engine written by gen_trt_engine, run instead of a checkpoint (networks that offer "
                    "gen_trt_engine; needs TensorRT and a CUDA GPU; set exactly one of checkpoint, onnx_file, "
                    "trt_engine).")


@dataclass
class EvaluateConfig:
    """Fields every network's ``evaluate`` section has (TAO ``EvaluateConfig``)."""

    num_gpus: int = param(1, description="The number of GPUs to run the evaluate job.", valid_min=1)
    gpu_ids: list[int] = param([0], description="List of GPU IDs to run evaluation on.")
    num_nodes: int = param(1, description="Number of nodes.", valid_min=1)
    checkpoint: str = param(MISSING, description="Path to the checkpoint to evaluate.", required=True)
    trt_engine: str | None = param(None, description=_TRT_ENGINE_HELP)
    results_dir: str | None = param(None, description="Results directory; default <results_dir>/evaluate.")
    batch_size: int = param(-1, description="Batch size; -1 uses the dataset setting.", valid_min=-1)
    num_overlays: int = param(
        8, description="Number of images for which a ground-truth | prediction PNG is written to "
        "<results>/evaluate/overlays; 0 disables (not a TAO field).", valid_min=0)


@dataclass
class InferenceConfig:
    """Fields every network's ``inference`` section has (TAO ``InferenceConfig``)."""

    num_gpus: int = param(1, description="The number of GPUs to run the inference job.", valid_min=1)
    gpu_ids: list[int] = param([0], description="List of GPU IDs to run inference on.")
    num_nodes: int = param(1, description="Number of nodes.", valid_min=1)
    checkpoint: str = param(MISSING, description="Path to the checkpoint to run.", required=True)
    trt_engine: str | None = param(None, description=_TRT_ENGINE_HELP)
    results_dir: str | None = param(None, description="Results directory; default <results_dir>/inference.")
    batch_size: int = param(-1, description="Batch size; -1 uses the dataset setting.", valid_min=-1)


@dataclass
class OnnxExportConfig:
    """The ``export`` fields every network has (TAO's common export section without ``format``)."""

    results_dir: str | None = param(None, description="Results directory; default <results_dir>/export.")
    gpu_id: int = param(0, description="GPU used for export.", valid_min=0)
    checkpoint: str = param(MISSING, description="Checkpoint to export.", required=True)
    onnx_file: str = param(MISSING, description="Path of the ONNX file to write.", required=True)
    on_cpu: bool = param(False, description="Export on the CPU.")
    input_channel: int = param(3, description="Input channels.", valid_min=1, valid_options=[1, 3])
    input_width: int = param(960, description="Input width in pixels.", valid_min=32)
    input_height: int = param(544, description="Input height in pixels.", valid_min=32)
    opset_version: int = param(17, description="ONNX opset version.", valid_min=1)
    batch_size: int = param(-1, description="Batch size; -1 makes the batch axis dynamic.", valid_min=-1)
    verbose: bool = param(False, description="Verbose export log.")


@dataclass
class ExportConfig(OnnxExportConfig):
    """Fields of TAO's common ``export`` section (ONNX export)."""

    format: str = param("onnx", description="Export format.", valid_options=["onnx", "xdl"])


@dataclass
class TensorRTConfig:
    """TensorRT builder options (tao-deploy; accepted so TAO specs load)."""

    data_type: str = param("FP32", description="Engine precision.", valid_options=["FP32", "FP16"])
    workspace_size: int = param(1024, description="Workspace size in MB.", valid_min=0)
    min_batch_size: int = param(1, valid_min=1)
    opt_batch_size: int = param(1, valid_min=1)
    max_batch_size: int = param(1, valid_min=1)
    layers_precision: list[str] = param([], description="Per-layer precision overrides.")


@dataclass
class GenTrtEngineConfig:
    """``gen_trt_engine`` section (TAO's fields; the action runs for the networks that list it, with TensorRT
    and a CUDA GPU)."""

    results_dir: str | None = param(None)
    gpu_id: int = param(0, valid_min=0)
    onnx_file: str = param(MISSING)
    trt_engine: str = param(MISSING)
    timing_cache: str | None = param(None)
    batch_size: int = param(-1, valid_min=-1)
    verbose: bool = param(False)
    tensorrt: TensorRTConfig = param(TensorRTConfig)


@dataclass
class ExperimentConfig:
    """Top-level fields shared by every network (TAO ``CommonExperimentConfig``)."""

    model_name: str | None = param(None, description="Network name; filled in by the network.")
    encryption_key: str | None = param(
        None, description="Key used to encrypt checkpoints (AES-256-GCM, see docs/encryption.md).")
    results_dir: str | None = param("", description="Root results directory; each action writes to <results_dir>/<action>.")
    wandb: WandBConfig = param(WandBConfig, description="Weights & Biases settings.")


@dataclass
class QuantDtypeConfig:
    """Weights or activations settings of one quantized layer (tao-core ``QuantizationConfig``)."""

    dtype: str = param("native", valid_options=["int8", "fp8_e4m3fn", "fp8_e5m2", "native"])
    observer_or_fake_quant: str | None = param(None)
    quant_axis: int | None = param(None)
    observer_or_fake_quant_kwargs: dict[str, Any] = param({})


@dataclass
class LayerQuantizationConfig:
    """One entry of ``quantize.layers``."""

    module_name: str = param("")
    weights: QuantDtypeConfig = param(QuantDtypeConfig)
    activations: QuantDtypeConfig = param(QuantDtypeConfig)


@dataclass
class QuantizeConfig:
    """``quantize`` (tao-core ``ModelQuantizationConfig``) plus ``calib_images``.  TAO's fields and defaults are
    kept so TAO specs load for every action; a network that implements the action says which combinations it runs
    (``backend: onnxruntime``, ``modelopt.onnx`` or ``modelopt.pytorch`` with ``mode: static_ptq``, ``backend:
    torchao`` with ``mode: weight_only_ptq``), the rest is refused when quantizing."""

    backend: str = param("torchao", description="Quantization backend. torchao: weight-only int8 of the trained "
                         "checkpoint's nn.Linear layers, written as quantized_model_torchao.pth (evaluate/inference "
                         "run it as their checkpoint). onnxruntime (a tao-cli addition): static int8 PTQ of the "
                         "exported ONNX with ONNX Runtime, written as a QDQ ONNX for ONNX Runtime (or TensorRT with "
                         "device trt). modelopt.onnx: static int8 PTQ of the exported ONNX with NVIDIA ModelOpt "
                         "(TensorRT's Q/DQ placement), written as quantized_model.onnx. modelopt.pytorch: ModelOpt's "
                         "simulated static int8 of the trained checkpoint's Linear/Conv2d layers, written as "
                         "quantized_model_modelopt.pth (evaluate/inference run it as their checkpoint). Both "
                         "modelopt backends need tao-cli[modelopt].",
                         valid_options=["modelopt.pytorch", "torchao", "modelopt.onnx", "onnxruntime"])
    mode: str = param("weight_only_ptq", description="static_ptq: weights and activations, calibrated on the "
                      "calibration dataset (backends onnxruntime, modelopt.onnx, modelopt.pytorch); weight_only_ptq: "
                      "weights only (backend torchao).", valid_options=["static_ptq", "weight_only_ptq"])
    algorithm: str = param("minmax", description="Calibration algorithm; backend onnxruntime runs minmax and "
                           "entropy, modelopt.onnx minmax/max (ModelOpt's max) and entropy, torchao and "
                           "modelopt.pytorch minmax/max (absolute max).",
                           valid_options=["minmax", "max", "entropy", "awq_clip", "awq_lite", "awq_full", "rtn_dq"])
    layers: list[LayerQuantizationConfig] = param([], description="Per-layer dtypes. Backends torchao and "
                                                  "modelopt.pytorch: module_name patterns (fnmatch, or a class "
                                                  "name) with weights (and, modelopt.pytorch, activations) int8 "
                                                  "(add) or native (remove); empty = every nn.Linear (modelopt."
                                                  "pytorch: and nn.Conv2d). Refused by the ONNX backends (every "
                                                  "quantized layer is int8).")
    skip_names: list[str] = param([], description="Layers to keep in floating point, in addition to the layers "
                                  "TAO keeps in fp32: substrings of ONNX node names (onnxruntime), substrings or "
                                  "re.match regular expressions of them (modelopt.onnx), or module name patterns "
                                  "(torchao, modelopt.pytorch).")
    model_path: str = param("", description="The fp32 ONNX file written by the export action (backends "
                            "onnxruntime, modelopt.onnx), or the checkpoint written by train (backends torchao, "
                            "modelopt.pytorch).")
    results_dir: str = param("")
    backend_kwargs: dict[str, Any] = param({}, description="Backend options: keyword arguments of "
                                           "modelopt.onnx.quantization.quantize (backend modelopt.onnx; those "
                                           "tao-cli sets from other fields are refused); must stay empty for the "
                                           "other backends.")
    device: str = param("cuda", description="Where quantization runs and what the file is for: cuda (ONNX "
                        "Runtime's CUDA provider, or the GPU for the PyTorch backends, when present, else the "
                        "CPU), cpu, or trt (ONNX backends: TensorRT's Q/DQ layout). modelopt.onnx keeps "
                        "un-quantized layers fp32 with cpu, fp16 otherwise (ModelOpt's default).")
    calib_images: int = param(64, description="Number of calibration images (the first N of "
                              "dataset.quant_calibration_dataset.images_dir, sorted); not a TAO field.",
                              valid_min=1)


def cfg_get(section: Any, key: str, default: Any = None) -> Any:
    """``section.key`` for a spec section that may be a ``DictConfig``, a plain ``dict``, a dataclass or any object
    (an HF config), or ``None``; ``key`` may be dotted (``"train.optim.lr"``).

    ``default`` is returned when the section is ``None``, the key is absent (or an unset ``???`` value in a
    ``DictConfig``) or its value is ``None`` — so optional spec sections and fields need no special cases.
    """
    node = section
    for part in key.split("."):
        if node is None:
            return default
        if isinstance(node, Mapping):
            node = node.get(part) if part in node else None
        else:
            node = getattr(node, part, None)
    return default if node is None else node


#: TAO's ``automl_algorithm`` enum (TC ``microservices/blueprints/v2/schemas.py``); tao-cli runs the first four
#: on Optuna and refuses the others when a study is planned (``tao_cli/automl/algorithms.py`` says why).
AUTOML_ALGORITHMS = ["bayesian", "hyperband", "bohb", "asha", "pbt", "bfbo", "dehb", "hyperband_es"]


@dataclass
class AutoMLConfig:
    """``automl``: the hyper-parameter search of ``tao automl <net>`` (docs/automl.md); ignored by a plain train
    run unless ``automl_policy`` is ``auto``.  Nothing in this section is itself searchable."""

    automl_policy: str = param(
        "off", description="auto: `tao model <net> train` runs the AutoML study of this spec instead of one "
        "training run; off: a plain training run (this section is not read).", valid_options=["off", "auto"])
    automl_algorithm: str = param(
        "bayesian", description="Search algorithm (TAO's enum). bayesian, hyperband, bohb and asha run on Optuna; "
        "pbt, bfbo, dehb and hyperband_es are refused with the reason.", valid_options=AUTOML_ALGORITHMS)
    automl_hyperparameters: list[str] | None = param(
        None, description="Dotted train-spec keys to search; unset = the schema's automl_default_parameters.")
    automl_range_override: dict[str, Any] = param(
        {}, description="Per searched key: valid_min, valid_max, valid_options, option_weights, depends_on, "
        "math_cond, replacing the schema's values.")
    override_automl_disabled_params: bool = param(
        False, description="Allow keys the schema marks automl_enabled=false in automl_hyperparameters.")
    metric: str = param(
        "kpi", description="kpi: the network's main validation KPI (its direction); loss: val_loss, minimised.",
        valid_options=["kpi", "loss"])
    automl_max_recommendations: int = param(
        20, description="Number of trials of the study (completed, pruned and finally failed ones count; a "
        "retried trial counts once).", valid_min=1)
    automl_max_epochs: int | None = param(
        None, description="Epochs of a full trial (Hyperband's R). Unset: train.num_epochs. Every algorithm "
        "trains each trial for this many epochs unless a pruner stops it.", valid_min=1)
    automl_reduction_factor: int = param(
        3, description="Hyperband/successive-halving reduction factor (eta): 1/eta of the trials go on at each "
        "rung.", valid_min=2)
    automl_delete_intermediate_ckpt: bool = param(
        False, description="At the end of the study delete the checkpoints of every trial but the best one.")
    seed: int | None = param(
        None, description="Seeds the sampler (trial N uses seed + N) and every trial's train.seed. Unset: "
        "train.seed.", valid_min=0)
    storage: str | None = param(
        None, description="Optuna RDB URL of the study (e.g. postgresql://user@host/db) shared by every worker. "
        "Unset: sqlite:///<results_dir>/automl/study.db.")
    study_name: str | None = param(None, description="Study name in the storage. Unset: the network name.")
    timeout: float | None = param(
        None, description="Stop starting new trials after this many seconds of this worker (running ones end).",
        valid_min=0)
    heartbeat_interval: int = param(
        60, description="Seconds between a worker's heartbeats for its running trial.", valid_min=1)
    grace_period: int | None = param(
        None, description="A running trial without a heartbeat for this many seconds is failed and retried once "
        "(its worker died). Unset: 2 x heartbeat_interval.", valid_min=1)
