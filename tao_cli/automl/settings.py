"""The ``automl`` section of a validated train spec → :class:`Settings` (every refusal is one ``ConfigError``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from networks.common.config import AUTOML_ALGORITHMS
from networks.common.errors import ConfigError

from .algorithms import ALGORITHMS, REFUSED

__all__ = ["Settings", "read_settings", "default_storage"]


@dataclass(frozen=True)
class Settings:
    """The AutoML settings of one study, with the defaults that depend on the rest of the spec resolved.

    ``max_epochs`` is R (``automl_max_epochs`` or ``train.num_epochs``); ``seed`` is ``automl.seed`` or
    ``train.seed``; ``storage`` is an Optuna RDB URL; ``grace_period`` is in seconds.
    """

    algorithm: str
    policy: str
    hyperparameters: list[str] | None
    range_override: dict[str, dict] = field(default_factory=dict)
    override_disabled: bool = False
    metric: str = "kpi"
    max_trials: int = 20
    max_epochs: int = 10
    reduction_factor: int = 3
    delete_intermediate_ckpt: bool = False
    seed: int = 0
    storage: str = ""
    study_name: str = ""
    timeout: float | None = None
    heartbeat_interval: int = 60
    grace_period: int = 120

    @property
    def pruned(self) -> bool:
        """True for the Hyperband family (trials validate each epoch and may be pruned)."""
        return ALGORITHMS[self.algorithm].pruned


def default_storage(automl_dir: Path) -> str:
    """``sqlite:///<automl_dir>/study.db`` (absolute path)."""
    return f"sqlite:///{Path(automl_dir).resolve() / 'study.db'}"


def _refuse_algorithm(name: str) -> None:
    if name in ALGORITHMS:
        return
    if name in REFUSED:
        raise ConfigError("automl.automl_algorithm", f"'{name}' is not supported: {REFUSED[name]}",
                          f"use one of {', '.join(ALGORITHMS)} (TAO's enum: {', '.join(AUTOML_ALGORITHMS)})")
    raise ConfigError("automl.automl_algorithm", f"unknown algorithm '{name}'",
                      f"use one of {', '.join(ALGORITHMS)} (TAO's enum: {', '.join(AUTOML_ALGORITHMS)})")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def read_settings(cfg: DictConfig, net_name: str, automl_dir: Path) -> Settings:
    """Read ``cfg.automl`` (each field by name, so a field nobody reads stands out) and refuse what cannot run:
    an algorithm outside the supported four, a Hyperband-family R below 2, a malformed range override, a
    hyper-parameter inside the ``automl`` section itself."""
    if "automl" not in cfg:
        raise ConfigError("automl", f"the {net_name} spec has no automl section", "this network has no AutoML")
    sec = cfg.automl
    algorithm = str(sec.automl_algorithm)
    _refuse_algorithm(algorithm)
    hyperparameters = _plain(sec.automl_hyperparameters)
    if hyperparameters is not None:
        hyperparameters = [str(h) for h in hyperparameters]
        for key in hyperparameters:
            if key == "automl" or key.startswith("automl.") or key in ("results_dir", "train.results_dir"):
                raise ConfigError("automl.automl_hyperparameters", f"'{key}' cannot be searched",
                                  "list train-spec keys such as train.lr")
    overrides = _plain(sec.automl_range_override) or {}
    for key, value in overrides.items():
        if not isinstance(value, dict):
            raise ConfigError(f"automl.automl_range_override.{key}", "must be a mapping",
                              "e.g. {valid_min: 1e-5, valid_max: 1e-3}")
    max_epochs = sec.automl_max_epochs
    max_epochs = int(max_epochs) if max_epochs is not None else int(cfg.train.num_epochs)
    if ALGORITHMS[algorithm].pruned and max_epochs < 2:
        raise ConfigError("automl.automl_max_epochs", f"{algorithm} needs at least 2 epochs per trial to prune "
                          f"(R = {max_epochs})", "set automl.automl_max_epochs=2 or more")
    seed = sec.seed if sec.seed is not None else max(0, int(cfg.train.seed))
    storage = sec.storage or default_storage(automl_dir)
    heartbeat = int(sec.heartbeat_interval)
    grace = int(sec.grace_period) if sec.grace_period is not None else 2 * heartbeat
    if grace <= heartbeat:
        raise ConfigError("automl.grace_period", f"must be longer than heartbeat_interval ({heartbeat} s)",
                          f"set automl.grace_period={2 * heartbeat}")
    return Settings(
        algorithm=algorithm,
        policy=str(sec.automl_policy),
        hyperparameters=hyperparameters,
        range_override={str(k): dict(v) for k, v in overrides.items()},
        override_disabled=bool(sec.override_automl_disabled_params),
        metric=str(sec.metric),
        max_trials=int(sec.automl_max_recommendations),
        max_epochs=max_epochs,
        reduction_factor=int(sec.automl_reduction_factor),
        delete_intermediate_ckpt=bool(sec.automl_delete_intermediate_ckpt),
        seed=int(seed),
        storage=str(storage),
        study_name=str(sec.study_name or net_name),
        timeout=float(sec.timeout) if sec.timeout is not None else None,
        heartbeat_interval=heartbeat,
        grace_period=grace,
    )
