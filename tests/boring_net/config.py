"""Spec schema of the boring test network, built from the shared TAO sections."""
from __future__ import annotations

from dataclasses import dataclass

from networks.common import config as common
from networks.common.config import param


@dataclass
class DatasetConfig:
    """Generated regression data: ``num_samples`` rows of ``num_features`` features."""

    train_ann_path: str = param("", description="Optional file that must exist (tests input path checks).")
    num_samples: int = param(32, valid_min=1)
    num_features: int = param(8, valid_min=1)
    batch_size: int = param(4, valid_min=1)
    data_seed: int = param(0, description="Seed of the generated data (independent of train.seed).")


@dataclass
class ModelConfig:
    """Dropout before the linear layer; ``step_sleep`` seconds per training step (slows tests that signal);
    ``kpi_schedule``: a synthetic validation ``score`` per epoch (cycled), which then is the main KPI."""

    dropout: float = param(0.1, valid_min=0.0, valid_max=1.0)
    step_sleep: float = param(0.0, valid_min=0.0)
    kpi_schedule: list[float] = param([], description="Validation 'score' of epoch i = kpi_schedule[i] (tests).")


@dataclass
class TrainConfig(common.TrainConfig):
    """TAO train fields plus the engine-read options (names as in mask2former/mask_grounding_dino)."""

    lr: float = param(0.05, valid_min=0.0)
    precision: str = param("fp32", valid_options=["fp16", "bf16", "fp32"])
    distributed_strategy: str = param("ddp", valid_options=["ddp", "fsdp"])
    activation_checkpoint: bool = param(False)
    clip_grad_norm: float = param(0.0, valid_min=0.0)
    accum_grad_batches: int = param(1, valid_min=1)
    is_dry_run: bool = param(False)


@dataclass
class ExperimentConfig(common.ExperimentConfig):
    """Top-level spec of the boring network."""

    dataset: DatasetConfig = param(DatasetConfig)
    model: ModelConfig = param(ModelConfig)
    train: TrainConfig = param(TrainConfig)
    evaluate: common.EvaluateConfig = param(common.EvaluateConfig)
    inference: common.InferenceConfig = param(common.InferenceConfig)
    export: common.ExportConfig = param(common.ExportConfig)
