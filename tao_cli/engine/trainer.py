"""The one place where Lightning ``Trainer`` arguments are decided (precision, strategy, loggers, ...).

Spec fields read (TAO names, each only if the network's section has it): ``train.precision`` (fp16|bf16|fp32)
or ``train.use_amp``; ``train.distributed_strategy`` (ddp|fsdp);
``train.clip_grad_norm``; ``train.accum_grad_batches``; ``train.is_dry_run``; ``train.num_epochs``;
``train.validation_interval``; ``train.seed``; ``train.cudnn``; ``wandb.*``.  Read from the module instance:
``trainer_traits`` (``find_unused_parameters`` for DDP, ``sync_batchnorm``, ``use_distributed_sampler``).
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

from networks.common.config import cfg_get
from networks.common.errors import ConfigError
from networks.common.network import trainer_traits_of
from tao_cli.redact import redact_container

from .devices import DevicePlan

__all__ = ["build_trainer", "check_strategy", "decide_precision", "decide_strategy", "seed_run", "PlainProgress",
           "ParamSummary", "format_metrics", "epoch_label"]

log = logging.getLogger("tao.trainer")

_PRECISIONS = {"fp16": "16-mixed", "16": "16-mixed", "16-mixed": "16-mixed", "bf16": "bf16-mixed",
               "bf16-mixed": "bf16-mixed", "fp32": "32-true", "32": "32-true", "32-true": "32-true"}


def _section(cfg, name: str):
    return cfg.get(name) if name in cfg else None


def decide_precision(cfg, action: str, accelerator: str) -> str:
    """Lightning precision string from ``<section>.precision`` or ``<section>.use_amp`` (train section for train).

    fp16 → ``16-mixed``, bf16 → ``bf16-mixed``, fp32 → ``32-true``; ``use_amp: true`` → ``16-mixed``.
    ``train.distributed_strategy: fsdp`` forces ``16-mixed`` for train whatever the precision field says (TAO's
    rule, logged when it changes the value).  On CPU, where Lightning has no fp16, ``16-mixed`` becomes
    ``bf16-mixed`` with a warning.
    """
    section = _section(cfg, action)
    precision = "32-true"
    raw = cfg_get(section, "precision")
    if raw is not None and str(raw) != "":
        key = str(raw).strip().lower()
        if key not in _PRECISIONS:
            raise ConfigError(f"{action}.precision", f"{raw!r} is not one of fp16, bf16, fp32")
        precision = _PRECISIONS[key]
    elif cfg_get(section, "use_amp", False):
        precision = "16-mixed"
    if action == "train" and str(cfg_get(section, "distributed_strategy", "ddp")).lower() == "fsdp" \
            and precision != "16-mixed":
        log.warning("train.distributed_strategy=fsdp: training in fp16 mixed precision (TAO's rule), "
                    "not %s", precision)
        precision = "16-mixed"
    if accelerator == "cpu" and precision == "16-mixed":
        log.warning("%s: fp16 mixed precision is not available on CPU; using bf16-mixed instead", action)
        precision = "bf16-mixed"
    return precision


def check_strategy(cfg, action: str, plan: DevicePlan) -> str:
    """The ``train.distributed_strategy`` name (``ddp`` where unset), refused where it cannot run on ``plan``.

    Called before anything is written (so ``--dry-run`` refuses it too): fsdp needs CUDA devices.
    """
    section = _section(cfg, "train") if action == "train" else None
    name = str(cfg_get(section, "distributed_strategy", "ddp")).lower()
    if name not in ("ddp", "fsdp"):
        raise ConfigError("train.distributed_strategy", f"{name!r} is not one of ddp, fsdp")
    if name == "fsdp" and plan.accelerator == "cpu":
        raise ConfigError("train.distributed_strategy", "fsdp needs CUDA devices and none is visible",
                          "use ddp on CPU")
    return name


def decide_strategy(cfg, action: str, plan: DevicePlan, module: Any) -> Any:
    """``"auto"`` for one process; otherwise DDP (gloo on CPU) or FSDP per ``train.distributed_strategy``.

    DDP's ``find_unused_parameters`` is what the module instance declares in its ``trainer_traits``
    (:class:`networks.common.network.TrainerTraits`; e.g. Mask2Former turns it off with activation checkpointing).
    """
    if plan.world_size <= 1:
        return "auto"
    from pytorch_lightning.strategies import DDPStrategy

    backend = "gloo" if plan.accelerator == "cpu" else None
    name = check_strategy(cfg, action, plan)
    if action != "train":
        return DDPStrategy(process_group_backend=backend)
    if name == "fsdp":
        from pytorch_lightning.strategies import FSDPStrategy

        return FSDPStrategy()
    traits = trainer_traits_of(module)
    return DDPStrategy(find_unused_parameters=traits.find_unused_parameters, process_group_backend=backend)


def seed_run(cfg, action: str) -> int | None:
    """Seed python/numpy/torch (and dataloader workers) from ``train.seed`` for train; apply cuDNN flags.

    Returns the seed used, or None (negative seed, or not a train run).  Call before the module is built.
    """
    import torch

    train = _section(cfg, "train")
    if action != "train" or train is None:
        return None
    cudnn = cfg_get(train, "cudnn")
    if cudnn is not None:
        torch.backends.cudnn.benchmark = bool(cfg_get(cudnn, "benchmark", False))
        torch.backends.cudnn.deterministic = bool(cfg_get(cudnn, "deterministic", True))
    seed = int(cfg_get(train, "seed", -1))
    if seed < 0:
        return None
    pl.seed_everything(seed, workers=True, verbose=False)
    return seed


def format_metrics(metrics: dict[str, Any]) -> str:
    """``name=value`` pairs for the console: ``v_num`` dropped, ``train/`` prefix dropped, numbers to 4 significant
    digits (``train/loss=0.123456`` → ``loss=0.1235``)."""
    parts = []
    for key, value in metrics.items():
        if key == "v_num":
            continue
        if hasattr(value, "item"):
            value = value.item()
        name = key[len("train/"):] if key.startswith("train/") else key
        parts.append(f"{name}={value:.4g}" if isinstance(value, (int, float)) else f"{name}={value}")
    return " ".join(parts)


def epoch_label(trainer) -> str:
    """``Epoch 1/2`` (1-based, with the total when the run is bounded by epochs), else ``Epoch 1``."""
    total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
    return f"Epoch {trainer.current_epoch + 1}" + (f"/{total}" if total else "")


class PlainProgress(ProgressBar):
    """Line-per-event progress for logs (CI, Slurm): every ``every_n_steps`` batches, at each epoch end and after
    each validation.  Epochs are 1-based with the total (``Epoch 1/2``), values have 4 significant digits."""

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
            extra = format_metrics(self.get_metrics(trainer, pl_module))
            self._line(trainer, f"{epoch_label(trainer)}: batch {batch_idx + 1}/{total_s} "
                                f"step {trainer.global_step} {extra}".rstrip())

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        values = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if values:
            self._line(trainer, f"{epoch_label(trainer)} validation, step {trainer.global_step}: "
                                f"{format_metrics(values)}")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = dict(self.get_metrics(trainer, pl_module))
        mean = trainer.callback_metrics.get("train/loss_epoch")
        if mean is not None:
            metrics = {"loss_epoch": mean, **metrics}
        self._line(trainer, f"{epoch_label(trainer)} done in {time.monotonic() - self._epoch_start:.1f}s, "
                            f"step {trainer.global_step} {format_metrics(metrics)}".rstrip())


def _rich_progress():
    """Rich progress bar with the console conventions of :class:`PlainProgress` (1-based epochs, no v_num)."""
    from pytorch_lightning.callbacks import RichProgressBar
    from pytorch_lightning.callbacks.progress.rich_progress import RichProgressBarTheme

    class TaoRichProgress(RichProgressBar):
        def get_metrics(self, trainer, pl_module):
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            return {k[len("train/"):] if k.startswith("train/") else k: v for k, v in items.items()}

        def _get_train_description(self, current_epoch: int) -> str:
            # Lightning prints "Epoch 0/<max_epochs - 1>"; users count from 1.
            total = self.trainer.max_epochs
            text = f"Epoch {current_epoch + 1}" + (f"/{total}" if total is not None and total > 0 else "")
            return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) \
                else text

    return TaoRichProgress(theme=RichProgressBarTheme(metrics_format=".4g"))


class ParamSummary(pl.Callback):
    """Top-level sub-modules with their parameter counts, logged once at the start of fit (rank 0).

    Replaces Lightning's ModelSummary, whose FLOPs column reads 0 unless the module defines an example input.
    """

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return

        def count(params) -> tuple[int, int]:
            total = trainable = 0
            for p in params:
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
            return total, trainable

        rows = [(name, type(child).__name__, *count(child.parameters())) for name, child in pl_module.named_children()]
        total, trainable = count(pl_module.parameters())
        width = max([len(r[0]) for r in rows] + [4])
        type_width = max([len(r[1]) for r in rows] + [4])
        lines = [f"{'Name':<{width}}  {'Type':<{type_width}}  {'Params':>10}  {'Trainable':>10}"]
        lines += [f"{n:<{width}}  {t:<{type_width}}  {_count(a):>10}  {_count(b):>10}" for n, t, a, b in rows]
        size = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        lines.append(f"Total {_count(total)} parameters, {_count(trainable)} trainable ({size / 1e6:.1f} MB)")
        log.info("Model:\n%s", "\n".join(lines))


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


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
    if wandb_cfg is not None and cfg_get(wandb_cfg, "enable", False):
        try:
            import wandb  # noqa: F401
        except ImportError:
            log.warning("wandb.enable is true but the wandb package is not installed; W&B logging is off")
        else:
            from omegaconf import OmegaConf
            from pytorch_lightning.loggers import WandbLogger

            config = redact_container(OmegaConf.to_container(cfg, resolve=True))
            loggers.append(WandbLogger(
                project=cfg_get(wandb_cfg, "project", None), entity=cfg_get(wandb_cfg, "entity", "") or None,
                group=cfg_get(wandb_cfg, "group", "") or None, tags=list(cfg_get(wandb_cfg, "tags", []) or []),
                name=cfg_get(wandb_cfg, "name", None), id=cfg_get(wandb_cfg, "run_id", "") or None,
                save_dir=str(run_dir), config=config,
                # passed on to wandb.init (TAO's WandBConfig fields)
                reinit=bool(cfg_get(wandb_cfg, "reinit", False)),
                sync_tensorboard=bool(cfg_get(wandb_cfg, "sync_tensorboard", False)),
                save_code=bool(cfg_get(wandb_cfg, "save_code", False)),
            ))
    return loggers


def build_trainer(cfg, action: str, plan: DevicePlan, run_dir: str | Path, callbacks: list, module: Any,
                  *, plugins: list | None = None) -> pl.Trainer:
    """Build the Trainer for ``action`` on ``plan`` writing under ``run_dir``.

    ``callbacks`` are the engine's (checkpoint, status); a progress callback is added here (Rich on a TTY, else
    :class:`PlainProgress`), and for train :class:`ParamSummary` and the telemetry callback (``metrics.csv``,
    ``plots/``; :mod:`tao_cli.engine.telemetry`).  Metrics are logged every step.  ``plugins`` typically holds
    the engine's CheckpointIO.
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
        # Our ParamSummary replaces Lightning's (its FLOPs column is all zeros without an example input).
        enable_model_summary=False,
        # Every loss term and the LR reach the loggers at every step (Lightning's default is every 50 steps,
        # which leaves short epochs with one point).
        log_every_n_steps=1,
    )
    callbacks = list(callbacks)
    if sys.stdout.isatty():
        callbacks.append(_rich_progress())
    else:
        # Plain text that reaches the log file (Lightning would pick Rich's table whenever rich is installed).
        callbacks.append(PlainProgress())
    if action == "train":
        from .telemetry import TelemetryCallback

        callbacks += [ParamSummary(), TelemetryCallback(run_dir)]
    kwargs["callbacks"] = callbacks
    if plugins:
        kwargs["plugins"] = plugins
    traits = trainer_traits_of(module)
    kwargs["sync_batchnorm"] = traits.sync_batchnorm
    kwargs["use_distributed_sampler"] = traits.use_distributed_sampler
    if action == "train" and train is not None:
        kwargs["max_epochs"] = int(cfg_get(train, "num_epochs", 1))
        kwargs["check_val_every_n_epoch"] = int(cfg_get(train, "validation_interval", 1))
        kwargs["enable_checkpointing"] = True
        clip = cfg_get(train, "clip_grad_norm", 0)
        if clip and float(clip) > 0:
            kwargs["gradient_clip_val"] = float(clip)
        accum = int(cfg_get(train, "accum_grad_batches", 1) or 1)
        if accum > 1:
            if getattr(module, "automatic_optimization", True):
                kwargs["accumulate_grad_batches"] = accum
            else:
                log.warning("train.accum_grad_batches=%d is ignored: the module optimises manually", accum)
        if cfg_get(train, "is_dry_run", False):
            kwargs["fast_dev_run"] = True
    else:
        kwargs["enable_checkpointing"] = False
    return pl.Trainer(**kwargs)
