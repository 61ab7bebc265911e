"""LightningModule and DataModule of the boring network.

Data: ``x ~ N(0, 1)`` of shape (N, F), ``y = x @ w + 0.1 * noise`` with ``w`` fixed by ``data_seed``; 3/4 of
the rows train (shuffled loader), 1/4 validate/test/predict.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from networks.common.io import atomic_write_text
from networks.common.network import TrainerTraits


def make_data(num_samples: int, num_features: int, data_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic regression data ``(x: (N, F), y: (N, 1))``."""
    g = torch.Generator().manual_seed(data_seed)
    x = torch.randn(num_samples, num_features, generator=g)
    w = torch.randn(num_features, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(num_samples, 1, generator=g)
    return x, y


class BoringDataModule(pl.LightningDataModule):
    """Train (shuffled) / val / test / predict loaders over :func:`make_data`."""

    def __init__(self, num_samples: int, num_features: int, batch_size: int, data_seed: int):
        super().__init__()
        x, y = make_data(num_samples, num_features, data_seed)
        n_train = max(1, num_samples * 3 // 4)
        self.train_set = TensorDataset(x[:n_train], y[:n_train])
        self.val_set = TensorDataset(x[n_train:] if n_train < num_samples else x, y[n_train:] if n_train < num_samples else y)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def predict_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class BoringModule(pl.LightningModule):
    """Dropout + Linear(F, 1) trained with MSE and SGD(momentum); ``kpi`` holds the latest val/test metrics."""

    def __init__(self, num_features: int = 8, lr: float = 0.05, dropout: float = 0.1, step_sleep: float = 0.0,
                 run_dir: str | Path | None = None, kpi_schedule: list[float] | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, 1))
        self.lr = lr
        self.step_sleep = step_sleep
        self.run_dir = Path(run_dir) if run_dir else None
        self.kpi_schedule = list(kpi_schedule or [])  # synthetic per-epoch "score" (best-checkpoint tests)
        self.kpi: dict[str, float] = {}
        self.outputs: dict = {}
        self.trainer_traits = TrainerTraits()
        self._val_losses: list[torch.Tensor] = []
        self._preds: list[torch.Tensor] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.step_sleep:
            time.sleep(self.step_sleep)
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        # The engine's naming (docs/architecture.md): train/<term> per step, train/loss_epoch the epoch mean.
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch):
        x, y = batch
        self._val_losses.append(nn.functional.mse_loss(self(x), y, reduction="sum").detach())
        return None

    def validation_step(self, batch, batch_idx):
        return self._eval_step(batch)

    def test_step(self, batch, batch_idx):
        return self._eval_step(batch)

    def _epoch_loss(self) -> float:
        total = torch.stack(self._val_losses).sum() if self._val_losses else torch.tensor(0.0)
        self._val_losses = []
        return float(total)

    def on_validation_epoch_end(self):
        loss = self._epoch_loss()
        if not self.trainer.sanity_checking:
            self.kpi = {"val_loss": loss}
            if self.kpi_schedule:
                self.kpi["score"] = self.kpi_schedule[self.current_epoch % len(self.kpi_schedule)]
        self.log("val/loss", loss)

    def on_test_epoch_end(self):
        self.kpi = {"test_loss": self._epoch_loss()}

    def predict_step(self, batch, batch_idx):
        pred = self(batch[0]).detach()
        self._preds.append(pred)
        return pred

    def on_predict_epoch_end(self):
        preds = torch.cat(self._preds).flatten().tolist() if self._preds else []
        path = self.run_dir / "predictions.json"
        atomic_write_text(path, json.dumps(preds))
        self.outputs = {"predictions": str(path), "count": len(preds)}

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": sched}
