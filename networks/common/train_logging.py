"""Per-step training logs with the names every network uses (docs/architecture.md, "Metric names")."""
from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["log_train_losses", "MONITOR_METRICS"]

#: TAO's ``train.optim.monitor_name`` values -> the metric logged under that meaning here (the epoch mean of the
#: training loss, the validation loss); networks return it as their LR scheduler's ``monitor``.
MONITOR_METRICS = {"train_loss": "train/loss_epoch", "val_loss": "val/loss"}


def log_train_losses(module, total: torch.Tensor, losses: Mapping[str, torch.Tensor], batch_size: int) -> None:
    """Log ``train/loss`` (weighted total, per step, progress bar), ``train/loss_epoch`` (its epoch mean, synced
    across ranks) and every term as ``train/<term>`` per step.  Only final-layer terms (one underscore, e.g.
    ``loss_ce``) go to the progress bar; aux/interm terms (``loss_ce_0``, ``loss_ce_interm``) to the loggers."""
    module.log("train/loss", total, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
    module.log("train/loss_epoch", total, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
    for k, v in losses.items():
        module.log(f"train/{k}", v.detach(), on_step=True, on_epoch=False, prog_bar=k.count("_") == 1,
                   batch_size=batch_size)
