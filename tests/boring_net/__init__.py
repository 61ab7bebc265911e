"""A test-only network package that follows the engine contract (docs/architecture.md).

"boring": a tiny linear regression (dropout + Linear) on a deterministic random dataset.  The train loader
shuffles, so exact-resume tests exercise the RNG state handling.
"""
from __future__ import annotations

from networks.common.network import Network

from .config import ExperimentConfig
from .module import BoringDataModule, BoringModule

NAME = "boring"
TITLE = "Boring"
CHECKPOINT_NAME = "boring_model"
ACTIONS = {
    "train": "Train the boring regressor.",
    "evaluate": "Evaluate a checkpoint on the validation split.",
    "inference": "Write predictions.json for the validation split.",
}

__all__ = ["NAME", "TITLE", "CHECKPOINT_NAME", "ACTIONS", "ExperimentConfig", "check", "input_paths",
           "main_kpi", "build_module", "build_datamodule", "NETWORK"]


def check(cfg, action: str) -> None:
    """Cross-field checks: the batch size must not exceed the dataset size."""
    from networks.common.errors import ConfigError

    if cfg.dataset.batch_size > cfg.dataset.num_samples:
        raise ConfigError("dataset.batch_size", f"{cfg.dataset.batch_size} exceeds dataset.num_samples")


def main_kpi(cfg) -> tuple[str, str]:
    """``("score", "max")`` when ``model.kpi_schedule`` is set, else ``("val_loss", "min")``."""
    return ("score", "max") if cfg.model.kpi_schedule else ("val_loss", "min")


def input_paths(cfg, action: str) -> dict:
    """``dataset.train_ann_path`` for train when set (the boring data itself is generated)."""
    if action == "train" and cfg.dataset.train_ann_path:
        return {"dataset.train_ann_path": cfg.dataset.train_ann_path}
    return {}


def build_module(cfg, ctx):
    """The LightningModule for ``ctx.action``."""
    return BoringModule(num_features=cfg.dataset.num_features, lr=cfg.train.lr, dropout=cfg.model.dropout,
                        step_sleep=cfg.model.step_sleep, run_dir=ctx.run_dir,
                        kpi_schedule=list(cfg.model.kpi_schedule))


def build_datamodule(cfg, ctx):
    """The LightningDataModule for ``ctx.action``."""
    return BoringDataModule(num_samples=cfg.dataset.num_samples, num_features=cfg.dataset.num_features,
                            batch_size=cfg.dataset.batch_size, data_seed=cfg.dataset.data_seed)


NETWORK = Network(
    name=NAME, title=TITLE, checkpoint_name=CHECKPOINT_NAME, config_class=ExperimentConfig, actions=ACTIONS,
    check=check, input_paths=input_paths, build_module=build_module, build_datamodule=build_datamodule,
    main_kpi=main_kpi,
)
