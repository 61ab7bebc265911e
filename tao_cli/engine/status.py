"""``status.json``: TAO's JSON-lines status log, and the Lightning callback that feeds it.

Each line is one JSON object.  Field order follows TAO's writer: progress fields (``epoch``, ``step``,
``max_epoch``, ``max_step``, ``time_per_epoch``, ``time_per_step``, ``eta``) first, then ``date`` (``M/D/YYYY``,
not zero-padded), ``time`` (``H:M:S``, not padded), ``status``, ``verbosity``, ``message`` and ``kpi``.
Differences from TAO (on purpose): KPI is not sticky, every KPI record carries ``epoch`` and ``step``, and a run
always ends with ``SUCCESS``, ``FAILURE`` or ``INTERRUPTED``.  Lines are appended one at a time (open, write,
flush, fsync, close) by the rank-0 process only, so the file accumulates across runs and resumes.
"""
from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tao_cli.redact import mask

__all__ = ["STATUSES", "StatusLogger", "StatusCallback", "format_date", "format_time"]

STATUSES = ("STARTED", "RUNNING", "SUCCESS", "FAILURE", "INTERRUPTED", "SKIPPED")
_PROGRESS_KEYS = ("epoch", "step", "max_epoch", "max_step", "time_per_epoch", "time_per_step", "eta")


def format_date(now: datetime) -> str:
    """TAO's unpadded ``M/D/YYYY``."""
    return f"{now.month}/{now.day}/{now.year}"


def format_time(now: datetime) -> str:
    """TAO's unpadded ``H:M:S``."""
    return f"{now.hour}:{now.minute}:{now.second}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class StatusLogger:
    """Append-only writer of ``status.json``; ``enabled=False`` (non-zero ranks) makes every call a no-op.

    ``redact`` strings (the encryption key) are replaced by ``*****`` in every line.
    """

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True, redact: tuple[str, ...] = ()):
        self.path = Path(path)
        self.enabled = enabled
        self.redact = tuple(r for r in redact if r)
        self.last_status: str | None = None

    def write(self, status: str, message: str, *, kpi: dict | None = None, verbosity: str = "INFO",
              **fields: Any) -> dict:
        """Append one record and return it.  ``fields`` are the progress fields (or any extra key)."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        now = datetime.now()
        record: dict[str, Any] = {}
        for key in _PROGRESS_KEYS:
            if key in fields:
                record[key] = fields.pop(key)
        record.update(fields)
        record.update(date=format_date(now), time=format_time(now), status=status, verbosity=verbosity,
                      message=message)
        if kpi:
            record["kpi"] = kpi
        record = _jsonable(record)
        self.last_status = status
        if not self.enabled:
            return record
        line = mask(json.dumps(record), self.redact)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write() of one line in append mode: concurrent or interrupted writers never interleave mid-line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return record

    @property
    def ended(self) -> bool:
        """True once a terminal record (SUCCESS/FAILURE/INTERRUPTED) was written."""
        return self.last_status in ("SUCCESS", "FAILURE", "INTERRUPTED")


def _first_metric(trainer, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = trainer.callback_metrics.get(key)
        if value is not None:
            return float(value)
    return None


try:
    from pytorch_lightning import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[assignment,misc]


class StatusCallback(Callback):
    """Writes the training-loop records of ``status.json`` (TAO §6.2 order).

    Per validation epoch (not the sanity check): RUNNING "Eval metrics generated." with ``kpi=module.kpi``.
    Per training epoch: RUNNING "Training loop in progress" with progress fields, then RUNNING "Train metrics
    generated." with ``kpi={"train_loss": ...}``.  Test epochs: RUNNING "Evaluation metrics generated.".
    """

    def __init__(self, status: StatusLogger):
        self.status = status
        self._fit_start = 0.0
        self._epoch_start = 0.0
        self._start_epoch = 0
        self._start_step = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.status.write("STARTED", "Starting Training Loop.")

    def on_train_start(self, trainer, pl_module) -> None:
        self._fit_start = time.monotonic()
        self._start_epoch = trainer.current_epoch
        self._start_step = trainer.global_step

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.monotonic()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        kpi = dict(getattr(pl_module, "kpi", None) or {})
        if kpi:
            self.status.write("RUNNING", "Eval metrics generated.", kpi=kpi, epoch=trainer.current_epoch,
                              step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        now = time.monotonic()
        epoch, step = trainer.current_epoch, trainer.global_step
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else epoch + 1
        batches = trainer.num_training_batches if math.isfinite(trainer.num_training_batches) else 0
        steps_per_epoch = max(1, int(batches) // max(1, trainer.accumulate_grad_batches)) if batches else 0
        max_step = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else max_epochs * steps_per_epoch
        epochs_done = max(1, epoch + 1 - self._start_epoch)
        steps_done = max(1, step - self._start_step)
        per_epoch = (now - self._fit_start) / epochs_done
        per_step = (now - self._fit_start) / steps_done
        eta = per_epoch * max(0, max_epochs - epoch - 1)
        self.status.write(
            "RUNNING", "Training loop in progress", epoch=epoch, step=step, max_epoch=max_epochs - 1,
            max_step=max_step, time_per_epoch=str(timedelta(seconds=now - self._epoch_start)),
            time_per_step=str(timedelta(seconds=per_step)), eta=str(timedelta(seconds=eta)),
        )
        train_loss = _first_metric(trainer, ("train/loss_epoch",))  # the epoch mean every network logs
        if train_loss is not None:
            self.status.write("RUNNING", "Train metrics generated.", kpi={"train_loss": train_loss},
                              epoch=epoch, step=step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.status.write("RUNNING", "Training loop complete.")
