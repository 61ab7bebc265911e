"""The spec of one trial: the user's validated train spec, the sampled values, and what the driver must fix.

Fixed by the driver: ``results_dir`` = the trial dir and ``train.results_dir`` = ``<trial dir>/train`` (the
user's ``train.results_dir`` is not used), ``automl.automl_policy: off`` (a trial is a plain train run),
``train.seed`` = the study seed (the same for every trial), ``train.num_epochs`` = R, checkpoints and
validation in epochs: every epoch for the Hyperband family (a KPI per rung), else
``min(checkpoint_interval, R)`` for both, as TAO does.  The encryption key is not written: the file reads it
from ``$TAO_AUTOML_ENCRYPTION_KEY``, which the driver sets for the child only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from .settings import Settings

__all__ = ["KEY_ENV", "trial_config", "write_spec", "apply_values"]

KEY_ENV = "TAO_AUTOML_ENCRYPTION_KEY"


def apply_values(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with each dotted key of ``values`` set (struct mode kept: an unknown key raises)."""
    out = cfg.copy()
    for key, value in values.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def trial_config(cfg: DictConfig, values: dict[str, Any], trial_dir: Path, settings: Settings) -> DictConfig:
    """The config trial ``trial_dir`` trains with (see the module docstring for what is fixed)."""
    out = apply_values(cfg, values)
    train = out.train
    out.results_dir = str(trial_dir)
    train.results_dir = str(trial_dir / "train")
    out.automl.automl_policy = "off"
    train.seed = settings.seed
    train.num_epochs = settings.max_epochs
    if "checkpoint_interval_unit" in train:
        train.checkpoint_interval_unit = "epoch"
    interval = 1 if settings.pruned else min(int(train.checkpoint_interval), settings.max_epochs)
    train.checkpoint_interval = interval
    if "validation_interval" in train:
        train.validation_interval = interval
    return out


def write_spec(cfg: DictConfig, path: Path) -> Path:
    """Write ``cfg`` as YAML (interpolations resolved; an encryption key replaced by ``${oc.env:KEY_ENV}``)."""
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True)
    if data.get("encryption_key"):
        data["encryption_key"] = "${oc.env:" + KEY_ENV + "}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120))
    tmp.replace(path)
    return path
