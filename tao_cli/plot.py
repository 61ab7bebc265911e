"""Training curves as PNGs from ``<run_dir>/metrics.csv`` (written by :mod:`tao_cli.engine.telemetry`).

One run (:func:`plot_run`, called during training): ``<run_dir>/plots/`` gets

* ``loss.png`` — one panel per loss term (``train/loss``, ``train/loss_ce``, ``train/loss_ce_0``, ...) against
  the optimizer step, raw values faint and an exponential moving average (TensorBoard-style, bias-corrected)
  on top;
* ``lr.png`` — every ``train/lr*`` column;
* ``val.png`` — one panel per validation metric (``val/loss``, ``val/mIoU``, ...), one marker per validation.

Several runs (:func:`plot_runs`, the ``tao plot`` command): the same three figures with the runs overlaid, one
colour per run, labelled by the shortest path suffix that tells the run dirs apart.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, so no pyplot state and no
global backend is touched, and each PNG is written atomically (temp file + rename).
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from networks.common.errors import ConfigError
from networks.common.io import atomic_path

__all__ = ["plot_runs", "plot_run", "read_metrics", "smooth", "METRICS_FILE"]

#: Name of the per-step metrics file in a train results dir.
METRICS_FILE = "metrics.csv"
_MAX_COLS = 4
_MAX_POINTS = 4000


def read_metrics(run_dir: str | Path) -> dict[str, list[float]]:
    """Columns of ``<run_dir>/metrics.csv`` as float lists (empty cells → NaN; unparsable rows skipped).

    Raises ``ConfigError`` naming ``run_dir`` when it has no ``metrics.csv`` (not a train results dir).
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        what = "does not exist" if not run_dir.exists() else f"is not a train results dir (no {METRICS_FILE})"
        raise ConfigError(str(run_dir), what, "pass the results dir of a train run, e.g. results/mal/train")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        data: dict[str, list[float]] = {c: [] for c in columns}
        for row in reader:
            try:
                int(float(row.get("step") or ""))
            except ValueError:  # a line cut short by a killed process
                continue
            for c in columns:
                data[c].append(_float(row.get(c)))
    return data


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Bias-corrected exponential moving average of ``values`` (NaNs are skipped and stay NaN).

    ``weight`` defaults to ``1 - 20 / n`` clipped to [0, 0.95] (no smoothing for 20 points or fewer).
    """
    finite = [v for v in values if not math.isnan(v)]
    if weight is None:
        weight = min(0.95, max(0.0, 1.0 - 20.0 / max(1, len(finite))))
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if math.isnan(v):
            out.append(math.nan)
            continue
        avg = weight * avg + (1.0 - weight) * v
        norm = weight * norm + (1.0 - weight)
        out.append(avg / norm if norm > 0 else v)
    return out


def _groups(columns: list[str]) -> dict[str, list[str]]:
    """``{"loss": [...], "lr": [...], "val": [...]}`` in column order (empty groups dropped)."""
    groups: dict[str, list[str]] = {"loss": [], "lr": [], "val": []}
    for c in columns:
        if c in ("epoch", "step"):
            continue
        if c.startswith("train/lr"):
            groups["lr"].append(c)
        elif c.startswith("train/"):
            groups["loss"].append(c)
        elif c.startswith("val/") and not c.startswith("val/num_"):
            # val/num_* are the counts behind a metric (e.g. instances per size bin), not curves to watch.
            groups["val"].append(c)
    return {k: v for k, v in groups.items() if v}


def _points(data: dict[str, list[float]], column: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for x, y in zip(data.get("step", []), data.get(column, []), strict=False):
        if not (math.isnan(x) or math.isnan(y)):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _labels(run_dirs: list[Path]) -> list[str]:
    """Shortest path suffixes that tell the run dirs apart (``exp1/train`` vs ``exp2/train``)."""
    parts = [Path(os.path.abspath(p)).parts for p in run_dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in run_dirs]


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _figure(runs: list[tuple[str, dict[str, list[float]]]], columns: list[str], title: str, *, markers: bool,
            one_axis: bool = False):
    from matplotlib.figure import Figure

    panels = [columns] if one_axis else [[c] for c in columns]
    ncols = min(_MAX_COLS, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    overlay = len(runs) > 1
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, panel in zip(axes, panels, strict=False):
        for (label, data), colour in zip(runs, colours, strict=True):
            for j, column in enumerate(panel):
                xs, ys = _points(data, column)
                if not xs:
                    continue
                name = label if overlay else column
                if one_axis and overlay:
                    name = f"{label} {column}"
                style = dict(color=colour if overlay else f"C{j % 10}")
                if markers:
                    ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=name, **style)
                    continue
                smoothed = smooth(ys)
                # Long runs: draw at most ~_MAX_POINTS points per line (the smoothing used every point).
                k = max(1, len(xs) // _MAX_POINTS)
                if smoothed != ys:
                    ax.plot(xs[::k], ys[::k], linewidth=0.8, alpha=0.3, **style)
                ax.plot(xs[::k], smoothed[::k], linewidth=1.4, label=name, **style)
        ax.set_title(" / ".join(panel) if not one_axis else title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if overlay or one_axis:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig


def _plot(runs: list[tuple[str, dict[str, list[float]]]], out: Path) -> list[Path]:
    columns: list[str] = []
    for _, data in runs:
        columns += [c for c in data if c not in columns]
    written = []
    for group, cols in _groups(columns).items():
        if not any(_points(data, c)[0] for _, data in runs for c in cols):
            continue
        if group == "loss":
            fig = _figure(runs, cols, "training losses (raw faint, smoothed solid)", markers=False)
        elif group == "lr":
            fig = _figure(runs, cols, "learning rate", markers=False, one_axis=True)
        else:
            fig = _figure(runs, cols, "validation", markers=True)
        written.append(_save(fig, out / f"{group}.png"))
    return written


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write ``loss.png``, ``lr.png`` and ``val.png`` (those that have data) for one run; return their paths.

    ``out`` defaults to ``<run_dir>/plots``.  ``ConfigError`` when ``run_dir`` has no ``metrics.csv``.
    """
    run_dir = Path(run_dir)
    data = read_metrics(run_dir)
    return _plot([(run_dir.name, data)], Path(out) if out is not None else run_dir / "plots")


def plot_runs(run_dirs: list[Path], out: Path | None = None) -> list[Path]:
    """Overlay the curves of ``run_dirs`` (one colour per run) and return the PNG paths written.

    ``out`` defaults to ``<run_dirs[0]>/plots/compare``.  A dir without ``metrics.csv`` → ``ConfigError`` naming
    it (checked for every dir before anything is drawn).  A single run dir gives the same figures as
    :func:`plot_run`, written to ``out``.
    """
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise ConfigError("RUN_DIR", "no run dir given", "pass one or more train results dirs")
    data = [read_metrics(p) for p in run_dirs]
    out = Path(out) if out is not None else run_dirs[0] / "plots" / "compare"
    return _plot(list(zip(_labels(run_dirs), data, strict=True)), out)
