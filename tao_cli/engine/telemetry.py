"""Per-step training telemetry: ``<run_dir>/metrics.csv`` and ``<run_dir>/plots/*.png``.

``metrics.csv`` has one row per optimizer step, written by global rank 0 only:

* ``epoch`` — 0-based, as in ``status.json`` and checkpoint names; ``step`` — optimizer steps done
  (``trainer.global_step`` after the step, so the first row has step 1);
* ``train/lr``, ``train/lr_backbone``, ... — the learning rate(s) used by that step;
* ``train/loss``, then every other ``train/<term>`` the network logs per step (epoch means ``*_epoch`` are left
  out: they are the mean of the column over the epoch);
* ``val/<kpi>`` (``val/loss``, ``val/mIoU``, ...) — filled only in the row of the step after which validation
  ran, empty elsewhere.  ``pandas.read_csv(p).dropna(subset=["val/mIoU"])`` gives the validation rows.

New columns (e.g. the first validation's KPIs) rewrite the file with the wider header; otherwise rows are
appended.  On resume, rows after the resumed step (written by the interrupted run past its last checkpoint) are
dropped, so each step appears once.  Plots are redrawn from the CSV after each validation and at the end of
training (:func:`tao_cli.plot.plot_run`); a plotting failure is logged, never fatal.
"""
from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback

from networks.common.io import atomic_write_text

__all__ = ["TelemetryCallback", "step_metrics", "val_metrics"]

log = logging.getLogger("tao.telemetry")


def _scalar(value: Any) -> float | None:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None


def step_metrics(trainer) -> dict[str, float]:
    """The ``train/*`` values logged at the current step (epoch aggregates ``*_epoch`` excluded)."""
    out = {}
    for key, value in trainer.logged_metrics.items():
        if key.startswith("train/") and not key.endswith("_epoch"):
            number = _scalar(value)
            if number is not None:
                out[key] = number
    return out


def val_metrics(trainer) -> dict[str, float]:
    """The ``val/*`` values of the validation that just ended."""
    out = {}
    for key, value in trainer.logged_metrics.items():
        if key.startswith("val/"):
            number = _scalar(value)
            if number is not None:
                out[key] = number
    return out


def _order(columns: list[str]) -> list[str]:
    """epoch, step, train/lr*, train/loss, other train/*, val/*, anything else — each group in first-seen order."""
    def rank(c: str) -> int:
        if c == "epoch":
            return 0
        if c == "step":
            return 1
        if c.startswith("train/lr"):
            return 2
        if c == "train/loss":
            return 3
        if c.startswith("train/"):
            return 4
        if c.startswith("val/"):
            return 5
        return 6

    return sorted(dict.fromkeys(columns), key=rank)  # stable: first-seen order within a group


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.7g}"
    return str(value)


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of an existing metrics.csv; rows whose step does not parse (cut short) are dropped."""
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = []
        for row in reader:
            try:
                row["step"] = str(int(float(row.get("step") or "")))
            except ValueError:
                continue
            rows.append(row)
        return list(reader.fieldnames or []), rows


class TelemetryCallback(Callback):
    """Writes ``<run_dir>/metrics.csv`` (see the module doc) and redraws ``<run_dir>/plots/`` on rank 0.

    Args:
        run_dir: the train results dir.
        plots: redraw the PNGs after each validation and at the end of training.
    """

    def __init__(self, run_dir: str | Path, *, plots: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.csv"
        self.plots = plots
        self._columns: list[str] = []
        self._pending: dict[str, Any] | None = None
        self._last_step: int | None = None
        self._plot_failed = False

    # -- file ------------------------------------------------------------------------------------------
    def _rewrite(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._columns, restval="", extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
        atomic_write_text(self.path, buf.getvalue())

    def _flush(self) -> None:
        row, self._pending = self._pending, None
        if row is None:
            return
        new = [k for k in row if k not in self._columns]
        if new or not self.path.is_file():
            _, rows = _read(self.path)
            self._columns = _order(self._columns + new)
            self._rewrite(rows + [row])
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self._columns, restval="", lineterminator="\n").writerow(
                {k: _cell(v) for k, v in row.items()})

    def _plot(self) -> None:
        if not self.plots or self._plot_failed or not self.path.is_file():
            return
        try:
            from tao_cli.plot import plot_run

            plot_run(self.run_dir)
        except Exception as exc:  # plots are a convenience; never stop training for them
            self._plot_failed = True
            log.warning("Could not draw the training plots (%s: %s); metrics.csv is still written",
                        type(exc).__name__, exc)

    # -- hooks -----------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = int(trainer.global_step)
        if not trainer.is_global_zero:
            return
        header, rows = _read(self.path)
        kept = [r for r in rows if int(r["step"]) <= self._last_step]
        self._columns = _order(header)
        if self.path.is_file() and (len(kept) != len(rows) or not header):
            # Resumed from an earlier step than the file reaches (or a fresh run over an old file).
            self._rewrite(kept)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if not trainer.is_global_zero or step == self._last_step:  # accumulating: no optimizer step yet
            return
        self._flush()
        self._pending = {"epoch": int(trainer.current_epoch), "step": step, **step_metrics(trainer)}
        self._last_step = step

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        kpis = val_metrics(trainer)
        step = int(trainer.global_step)
        if self._pending is None or self._pending["step"] != step:
            self._flush()
            self._pending = {"epoch": int(trainer.current_epoch), "step": step}
        self._pending.update(kpis)
        self._flush()
        self._plot()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._flush()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._flush()
            self._plot()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if trainer.is_global_zero:
            self._flush()
