"""tao_cli.spec: precedence, override grammar, interpolation, and one-line ConfigErrors for every bad input.

The schema below is a test-only stand-in for a network's ``ExperimentConfig``; no network package is imported.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from networks.common.config import (
    MISSING,
    EvaluateConfig,
    ExperimentConfig,
    ExportConfig,
    InferenceConfig,
    TrainConfig,
    param,
)
from networks.common.errors import ConfigError
from tao_cli.spec import REDACTED, all_keys, iter_fields, load_spec, lookup, to_yaml


# ------------------------------------------------------------------------------------------- toy schema
@dataclass
class ToyModel:
    """Model section."""

    backbone: str = param("resnet", description="Backbone name.", valid_options=["resnet", "vit", "swin"],
                          automl_enabled=True)
    hidden_dim: int = param(256, description="Hidden width.", display_name="Hidden dim", valid_min=64,
                            valid_max=1024, math_cond="/ 8", automl_enabled=True, popular=True)
    dropout: float = param(0.1, description="Dropout probability.", valid_min=0.0, valid_max=1.0)
    freeze: list[str] = param([], description="Module names to freeze.")
    out_indices: list[int] = param([1, 2, 3], description="Backbone stages to output.", valid_min=0, valid_max=3)
    extra: dict[str, Any] = param({}, description="Free-form options.")
    pretrained_path: str | None = param(None, description="Pretrained weights.")


@dataclass
class ToyDataset:
    """Dataset section."""

    root: str = param(MISSING, description="Dataset root directory.", required=True)
    sources: list[dict[str, Any]] = param([], description="Data sources (list of dicts).")
    batch_size: int = param(2, description="Batch size.", valid_min=1)
    num_classes: int | None = param(None, description="Number of classes.", valid_min=1)
    format: str = param("coco", description="Annotation format.", valid_options="coco,odvg")
    channels: int = param(3, description="Image channels.", valid_options=["1", "3"])


@dataclass
class ToyOptim:
    """Optimiser section."""

    lr: float = param(1e-4, description="Learning rate.", valid_min=0.0, valid_max=1.0, automl_enabled=True)
    lr_steps: list[int] = param([8], description="Epochs at which the lr drops.", valid_min=1)


@dataclass
class ToyTrain(TrainConfig):
    """Train section: TAO's common fields plus a few."""

    optim: ToyOptim = param(ToyOptim, description="Optimiser.")
    precision: str = param("fp32", description="Training precision.", valid_options=["fp16", "bf16", "fp32"])
    warmup_epochs: int = param(0, description="Warm-up epochs.", valid_min=0)


@dataclass
class ToyEvaluate(EvaluateConfig):
    """Evaluate section."""

    threshold: float = param(0.5, description="Score threshold.", valid_min=0, valid_max=1)


@dataclass
class ToyExperiment(ExperimentConfig):
    """The whole toy spec."""

    model: ToyModel = param(ToyModel)
    dataset: ToyDataset = param(ToyDataset)
    train: ToyTrain = param(ToyTrain)
    evaluate: ToyEvaluate = param(ToyEvaluate)
    inference: InferenceConfig = param(InferenceConfig)
    export: ExportConfig = param(ExportConfig)


ACTIONS = {
    "train": "Train the toy model.",
    "evaluate": "Evaluate a checkpoint.",
    "inference": "Run inference.",
    "export": "Export to ONNX.",
}

toy_network = types.SimpleNamespace(NAME="toy", ACTIONS=ACTIONS, ExperimentConfig=ToyExperiment)


def load(overrides=(), spec: Path | None = None, action: str | None = "train", **kw) -> DictConfig:
    return load_spec(ToyExperiment, action, spec, list(overrides), **kw)


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_line(excinfo: pytest.ExceptionInfo) -> str:
    line = str(excinfo.value)
    assert "\n" not in line, line
    return line
