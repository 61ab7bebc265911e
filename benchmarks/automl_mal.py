"""Issue 13's acceptance run: ``tao automl mal`` on the demo's synthetic set against the default spec (not a test).

Runs ``configs/mal/automl.yaml`` (8 Hyperband trials of up to R = 4 epochs, lr and wd searched) through the CLI
as a user would, then trains the same spec once without a search for the same R epochs, validating every epoch,
and compares the best epoch of each (the value AutoML ranks trials by).  Needs the synthetic set
(``make demo`` or ``tao dataset synthetic --out data/synthetic``).  Writes ``benchmarks/results/automl_mal.json``:
wall time of the study, trials by state, the best trial's mIoU and parameters, the default spec's mIoU.

    .venv/bin/python benchmarks/automl_mal.py [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SPEC = ROOT / "configs" / "mal" / "automl.yaml"


def _tao(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "tao_cli", *args], cwd=ROOT, env=env, check=True)


def _best_epoch_kpi(status: Path, key: str) -> tuple[float, int]:
    """(best value, its epoch) of ``key`` over the epoch records of a run's ``status.json`` (the reader the
    AutoML driver ranks trials with)."""
    from tao_cli.automl.trial_run import epoch_kpis

    values, _ = epoch_kpis(status, key)
    epoch = max(values, key=values.get)
    return values[epoch], epoch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="results_dir of both runs (default: a temp dir)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="automl_mal."))
    start = time.perf_counter()
    _tao("automl", "mal", "-e", str(SPEC), f"results_dir={out / 'study'}")
    study_s = time.perf_counter() - start
    with open(out / "study" / "automl" / "trials.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = max(complete, key=lambda r: float(r["value"]))
    epochs = 4  # automl.automl_max_epochs of the spec
    _tao("model", "mal", "train", "-e", str(SPEC), f"results_dir={out / 'default'}", f"train.num_epochs={epochs}",
         "train.validation_interval=1", "train.checkpoint_interval=1")
    default, default_epoch = _best_epoch_kpi(out / "default" / "train" / "status.json", "mIoU")
    report = {
        "spec": "configs/mal/automl.yaml", "study_seconds": round(study_s, 1), "trials": len(rows),
        "states": states, "best_trial": {k: best[k] for k in best}, "best_mIoU": float(best["value"]),
        "default_mIoU": default, "default_best_epoch": default_epoch, "epochs": epochs,
        "best_at_least_default": float(best["value"]) >= default, "cpu_threads": os.cpu_count(),
    }
    sys.path.insert(0, str(ROOT))
    from networks.common.io import atomic_write_json

    atomic_write_json(ROOT / "benchmarks" / "results" / "automl_mal.json", report, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
