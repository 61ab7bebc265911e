"""The one place where Lightning ``Trainer`` arguments are decided (precision, strategy, loggers, ...).

Spec fields read (TAO names, each only if the network's section has it): ``train.precision`` (fp16|bf16|fp32)
or ``train.use_amp``; ``train.distributed_strategy`` (ddp|fsdp); ``train.activation_checkpoint``;
``train.clip_grad_norm``; ``train.accum_grad_batches``; ``train.is_dry_run``; ``train.num_epochs``;
``train.validation_interval``; ``train.seed``; ``train.cudnn``; ``wandb.*``.  Module class attributes read:
``find_unused_parameters`` (DDP), ``sync_batchnorm`` and ``use_distributed_sampler``.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar

from networks.common.errors import ConfigError

from .devices import DevicePlan

__all__ = ["build_trainer", "decide_precision", "decide_strategy", "seed_run", "PlainProgress"]

log = logging.getLogger("tao.trainer")

_PRECISIONS = {"fp16": "16-mixed", "16": "16-mixed", "16-mixed": "16-mixed", "bf16": "bf16-mixed",
               "bf16-mixed": "bf16-mixed", "fp32": "32-true", "32": "32-true", "32-true": "32-true"}


def _section(cfg, name: str):
    return cfg.get(name) if name in cfg else None


def _get(section, key: str, default: Any = None) -> Any:
    if section is None or key not in section:
        return default
    value = section.get(key)
    return default if value is None else value


def decide_precision(cfg, action: str, accelerator: str) -> str:
    """Lightning precision string from ``<section>.precision`` or ``<section>.use_amp`` (train section for train).

    fp16 → ``16-mixed``, bf16 → ``bf16-mixed``, fp32 → ``32-true``; ``use_amp: true`` → ``16-mixed``.  On CPU,
    where Lightning has no fp16, ``16-mixed`` becomes ``bf16-mixed`` with a warning.
    """
    section = _section(cfg, action)
    precision = "32-true"
    raw = _get(section, "precision")
    if raw is not None and str(raw) != "":
        key = str(raw).strip().lower()
        if key not in _PRECISIONS:
            raise ConfigError(f"{action}.precision", f"{raw!r} is not one of fp16, bf16, fp32")
        precision = _PRECISIONS[key]
    elif _get(section, "use_amp", False):
        precision = "16-mixed"
    if accelerator == "cpu" and precision == "16-mixed":
        log.warning("%s: fp16 mixed precision is not available on CPU; using bf16-mixed instead", action)
        precision = "bf16-mixed"
    return precision


def decide_strategy(cfg, action: str, plan: DevicePlan, module: Any) -> Any:
    """``"auto"`` for one process; otherwise DDP (gloo on CPU) or FSDP per ``train.distributed_strategy``.

    DDP's ``find_unused_parameters`` is on when the module class says so, or (TAO's mask2former rule) when the
    spec has ``distributed_strategy`` and ``activation_checkpoint`` is off.
    """
    if plan.world_size <= 1:
        return "auto"
    from pytorch_lightning.strategies import DDPStrategy

    backend = "gloo" if plan.accelerator == "cpu" else None
    section = _section(cfg, "train") if action == "train" else None
    name = str(_get(section, "distributed_strategy", "ddp")).lower()
    if action != "train":
        return DDPStrategy(process_group_backend=backend)
    if name == "fsdp":
        if plan.accelerator == "cpu":
            raise ConfigError("train.distributed_strategy", "fsdp needs CUDA devices", "use ddp on CPU")
        from pytorch_lightning.strategies import FSDPStrategy

        return FSDPStrategy()
    if name != "ddp":
        raise ConfigError("train.distributed_strategy", f"{name!r} is not one of ddp, fsdp")
    find_unused = bool(getattr(type(module), "find_unused_parameters", False))
    if section is not None and "distributed_strategy" in section and not _get(section, "activation_checkpoint", False):
        find_unused = True
    return DDPStrategy(find_unused_parameters=find_unused, process_group_backend=backend)


def seed_run(cfg, action: str) -> int | None:
    """Seed python/numpy/torch (and dataloader workers) from ``train.seed`` for train; apply cuDNN flags.

    Returns the seed used, or None (negative seed, or not a train run).  Call before the module is built.
    """
    import torch

    train = _section(cfg, "train")
    if action != "train" or train is None:
        return None
    cudnn = _get(train, "cudnn")
    if cudnn is not None:
        torch.backends.cudnn.benchmark = bool(_get(cudnn, "benchmark", False))
        torch.backends.cudnn.deterministic = bool(_get(cudnn, "deterministic", True))
    seed = int(_get(train, "seed", -1))
    if seed < 0:
        return None
    pl.seed_everything(seed, workers=True, verbose=False)
    return seed


class PlainProgress(ProgressBar):
    """Line-per-event progress for logs (CI, Slurm): every ``every_n_steps`` steps and at each epoch end."""

    def __init__(self, every_n_steps: int = 50):
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self._enabled = True
        self._epoch_start = time.monotonic()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _line(self, trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            log.info(text)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.every_n_steps == 0:
            total = trainer.num_training_batches
            total_s = str(int(total)) if math.isfinite(total) else "?"
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
            extra = " ".join(f"{k}={v}" for k, v in metrics.items())
            self._line(trainer, f"Epoch {trainer.current_epoch}: batch {batch_idx + 1}/{total_s} "
                                f"step {trainer.global_step} {extra}".rstrip())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        extra = " ".join(f"{k}={v}" for k, v in metrics.items())
        self._line(trainer, f"Epoch {trainer.current_epoch} done in {time.monotonic() - self._epoch_start:.1f}s, "
                            f"step {trainer.global_step} {extra}".rstrip())


def _loggers(cfg, action: str, run_dir: Path) -> list:
    if action != "train":
        return []
    loggers: list = []
    try:
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="lightning_logs"))
    except ModuleNotFoundError:
        from pytorch_lightning.loggers import CSVLogger

        log.warning("tensorboard is not installed; writing CSV logs instead")
        loggers.append(CSVLogger(save_dir=str(run_dir), name="lightning_logs"))
    wandb_cfg = _section(cfg, "wandb")
    if wandb_cfg is not None and _get(wandb_cfg, "enable", False):
        try:
            import wandb  # noqa: F401
        except ImportError:
            log.warning("wandb.enable is true but the wandb package is not installed; W&B logging is off")
        else:
            from omegaconf import OmegaConf
            from pytorch_lightning.loggers import WandbLogger

            config = OmegaConf.to_container(cfg, resolve=True)
            if isinstance(config, dict) and "encryption_key" in config:
                config["encryption_key"] = "*****" if config["encryption_key"] else None
            loggers.append(WandbLogger(
                project=_get(wandb_cfg, "project", None), entity=_get(wandb_cfg, "entity", "") or None,
                group=_get(wandb_cfg, "group", "") or None, tags=list(_get(wandb_cfg, "tags", []) or []),
                name=_get(wandb_cfg, "name", None), id=_get(wandb_cfg, "run_id", "") or None,
                save_dir=str(run_dir), config=config,
            ))
    return loggers


def build_trainer(cfg, action: str, plan: DevicePlan, run_dir: str | Path, callbacks: list, module: Any,
                  *, plugins: list | None = None) -> pl.Trainer:
    """Build the Trainer for ``action`` on ``plan`` writing under ``run_dir``.

    ``callbacks`` are the engine's (checkpoint, status); a progress callback is added here (Rich on a TTY, else
    :class:`PlainProgress`).  ``plugins`` typically holds the engine's CheckpointIO.
    """
    run_dir = Path(run_dir)
    train = _section(cfg, "train")
    kwargs: dict[str, Any] = dict(
        accelerator=plan.accelerator,
        devices=plan.devices,
        num_nodes=plan.num_nodes,
        strategy=decide_strategy(cfg, action, plan, module),
        precision=decide_precision(cfg, action, plan.accelerator),
        default_root_dir=str(run_dir),
        logger=_loggers(cfg, action, run_dir) or False,
        enable_progress_bar=True,
        enable_model_summary=action == "train",
    )
    callbacks = list(callbacks)
    if sys.stdout.isatty():
        from pytorch_lightning.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    else:
        # Plain text that reaches the log file (Lightning would pick Rich's table whenever rich is installed).
        callbacks.append(PlainProgress())
        if action == "train":
            from pytorch_lightning.callbacks import ModelSummary

            callbacks.append(ModelSummary(max_depth=1))
    kwargs["callbacks"] = callbacks
    if plugins:
        kwargs["plugins"] = plugins
    for attr in ("sync_batchnorm", "use_distributed_sampler"):
        if hasattr(type(module), attr):
            kwargs[attr] = bool(getattr(type(module), attr))
    if action == "train" and train is not None:
        kwargs["max_epochs"] = int(_get(train, "num_epochs", 1))
        kwargs["check_val_every_n_epoch"] = int(_get(train, "validation_interval", 1))
        kwargs["enable_checkpointing"] = True
        clip = _get(train, "clip_grad_norm", 0)
        if clip and float(clip) > 0:
            kwargs["gradient_clip_val"] = float(clip)
        accum = int(_get(train, "accum_grad_batches", 1) or 1)
        if accum > 1:
            if getattr(module, "automatic_optimization", True):
                kwargs["accumulate_grad_batches"] = accum
            else:
                log.warning("train.accum_grad_batches=%d is ignored: the module optimises manually", accum)
        if _get(train, "is_dry_run", False):
            kwargs["fast_dev_run"] = True
    else:
        kwargs["enable_checkpointing"] = False
    return pl.Trainer(**kwargs)
