"""What a study leaves in ``<results_dir>/automl/``, rewritten by each worker when its loop ends.

* ``trials.csv``: number, state, value (the trial's best epoch value; pruned trials too), best_epoch, one column
  per searched key (the values written into the trial's spec), duration_s, reason.
* ``best_spec.yaml``: the user's spec (overrides applied) with the best COMPLETE trial's values and
  ``automl.automl_policy: off``, so ``tao model <net> train -e best_spec.yaml`` trains it; an encryption key is
  left out (pass ``encryption_key=...``).
* ``best_model/``: from the best trial's train dir, ``model_epoch_<best_epoch>_step_*.pth`` (the name TAO's
  AutoML copies) and ``<checkpoint_name>_best.pth`` when it exists (the same epoch when the metric is the KPI).
* ``optimization_history.png`` and ``param_importances.png`` (needs >= 2 complete trials and > 1 parameter;
  otherwise a console note says why it is missing).
* A Rich table of the trials on the console.
* With ``automl_delete_intermediate_ckpt``, once no trial is running or waiting: every other trial's ``*.pth``.

Every file is written to a temporary name and renamed, so two workers ending together leave whole files.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from .plan import Prepared
from .trial_spec import apply_values

__all__ = ["write_results", "best_trial", "trial_rows"]


def _say(text: str) -> None:
    sys.stdout.write(f"[automl] {text}\n")
    sys.stdout.flush()


def _atomic_bytes(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def best_trial(trials: list[FrozenTrial], direction: str) -> FrozenTrial | None:
    """The COMPLETE trial with the best value (the lowest number on a tie), or None."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not done:
        return None
    sign = -1.0 if direction == "max" else 1.0
    return min(done, key=lambda t: (sign * t.value, t.number))


def _value(t: FrozenTrial) -> Any:
    value = t.user_attrs.get("best_value")
    return value if value is not None else (t.value if t.state == TrialState.COMPLETE else None)


def trial_rows(trials: list[FrozenTrial]) -> tuple[list[str], list[dict[str, Any]]]:
    """The header and rows of ``trials.csv`` (module docstring), by trial number."""
    keys: list[str] = []
    for t in trials:
        for k in t.user_attrs.get("values", {}) or {}:
            if k not in keys:
                keys.append(k)
    header = ["number", "state", "value", "best_epoch", *keys, "duration_s", "reason"]
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        values = t.user_attrs.get("values", {}) or {}
        duration = t.duration.total_seconds() if t.duration is not None else None
        row = {"number": t.number, "state": t.state.name, "value": _value(t), "best_epoch": t.user_attrs.get(
            "best_epoch"), "duration_s": None if duration is None else round(duration, 1),
            "reason": t.user_attrs.get("reason", "")}
        row.update({k: values.get(k) for k in keys})
        rows.append(row)
    return header, rows


def _write_csv(path: Path, header: list[str], rows: list[dict[str, Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return _atomic_bytes(path, buf.getvalue().encode())


def _write_best_spec(prep: Prepared, best: FrozenTrial) -> Path:
    cfg = apply_values(prep.cfg, best.user_attrs.get("values", {}) or {})
    cfg.automl.automl_policy = "off"
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True)
    head = (f"# Best AutoML trial {best.number:03d} of study '{prep.settings.study_name}': {prep.kpi}="
            f"{best.value:.6g} at epoch {best.user_attrs.get('best_epoch')} "
            f"({prep.settings.max_epochs} epochs, train.seed {prep.settings.seed}).\n")
    if data.get("encryption_key"):
        data["encryption_key"] = None
        head += "# encryption_key left out: pass encryption_key=... on the command line.\n"
    text = head + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)
    return _atomic_bytes(prep.automl_dir / "best_spec.yaml", text.encode())


def _copy_best_model(prep: Prepared, best: FrozenTrial) -> list[Path]:
    train_dir = Path(best.user_attrs.get("trial_dir", "")) / "train"
    epoch = best.user_attrs.get("best_epoch")
    sources = sorted(train_dir.glob(f"model_epoch_{int(epoch):03d}_step_*.pth")) if epoch is not None else []
    best_file = train_dir / f"{prep.net.checkpoint_name}_best.pth"
    if best_file.exists():
        sources.append(best_file)
    out_dir = prep.automl_dir / "best_model"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in sources}
    for old in out_dir.iterdir():  # files of an earlier best trial
        if old.name not in names and not old.name.startswith("."):
            old.unlink(missing_ok=True)
    written = []
    for src in sources:
        dst = out_dir / src.name
        tmp = out_dir / f".{src.name}.{os.getpid()}.tmp"
        shutil.copyfile(src.resolve(), tmp)
        tmp.replace(dst)
        written.append(dst)
    if not written:
        _say(f"best_model/: no checkpoint of epoch {epoch} in {train_dir}")
    return written


def _plots(prep: Prepared, study, complete: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    out = []
    # optuna's plots switch matplotlib's global style (ggplot) for the rest of the process: keep it to these two
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")
        ax = ovm.plot_optimization_history(study, target_name=prep.kpi)
        out.append(_save(ax, prep.automl_dir / "optimization_history.png", plt))
        if complete >= 2 and len(prep.space) > 1:
            try:
                ax = ovm.plot_param_importances(study)
                out.append(_save(ax, prep.automl_dir / "param_importances.png", plt))
            except (RuntimeError, ValueError, ZeroDivisionError) as exc:
                _say(f"param_importances.png not written: {exc}")
        else:
            _say("param_importances.png not written: it needs at least 2 complete trials and more than one "
                 f"searched parameter ({complete} complete, {len(prep.space)} parameter(s))")
    return out


def _save(ax, path: Path, plt) -> Path:
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.set_size_inches(8, 5)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def _print_table(prep: Prepared, header: list[str], rows: list[dict[str, Any]], best: FrozenTrial | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"AutoML trials ({prep.kpi}, {'max' if prep.direction == 'max' else 'min'})")
    for col in header:
        table.add_column(col, overflow="fold")
    for row in rows:
        cells = []
        for col in header:
            v = row.get(col)
            cells.append("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))[:80])
        style = "bold green" if best is not None and row["number"] == best.number else None
        table.add_row(*cells, style=style)
    Console(width=max(120, 12 * len(header))).print(table)


def _delete_intermediate(prep: Prepared, trials: list[FrozenTrial], best: FrozenTrial) -> int:
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return 0
    removed = 0
    keep = best.user_attrs.get("trial_dir")  # a retried trial shares its directory with its retry
    for t in trials:
        if not t.user_attrs.get("trial_dir") or t.user_attrs["trial_dir"] == keep:
            continue
        for ckpt in (Path(t.user_attrs["trial_dir"]) / "train").glob("*.pth"):
            ckpt.unlink(missing_ok=True)
            removed += 1
    return removed


def write_results(prep: Prepared, study) -> int:
    """Write the files of the module docstring and print the table; returns the number of COMPLETE trials."""
    trials = study.get_trials(deepcopy=False)
    prep.automl_dir.mkdir(parents=True, exist_ok=True)
    header, rows = trial_rows(trials)
    _write_csv(prep.automl_dir / "trials.csv", header, rows)
    best = best_trial(trials, prep.direction)
    complete = sum(1 for t in trials if t.state == TrialState.COMPLETE)
    _print_table(prep, header, rows, best)
    if best is None:
        _say("no complete trial: no best_spec.yaml, best_model/ or plots")
        return 0
    _write_best_spec(prep, best)
    _copy_best_model(prep, best)
    _plots(prep, study, complete)
    if prep.settings.delete_intermediate_ckpt:
        removed = _delete_intermediate(prep, trials, best)
        if removed:
            _say(f"deleted {removed} checkpoint file(s) of the other trials")
    _say(f"best trial {best.number:03d}: {prep.kpi}={best.value:.6g} at epoch {best.user_attrs.get('best_epoch')}; "
         f"{prep.automl_dir / 'best_spec.yaml'}, {prep.automl_dir / 'best_model'}")
    return complete
