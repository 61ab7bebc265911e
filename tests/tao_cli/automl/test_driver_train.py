"""``tao automl mal`` for real: each trial trains MAL's tiny config for one epoch on a few synthetic images.

Every study here runs as ``python -m tao_cli automl ...`` subprocesses, as a user or a Slurm array would: one
driver (CLI, results), two workers on one SQLite study, and a driver SIGKILLed during trial 2 and rerun.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tao_cli import registry
from tao_cli.automl.study import budget_used
from tao_cli.paths import configs_dir
from tao_cli.spec import load_spec

REPO = Path(__file__).resolve().parents[3]
TINY = configs_dir() / "mal" / "tiny.yaml"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PL_", "LOCAL_RANK", "RANK"))}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _cmd(data: list[str], root: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tao_cli", "automl", "mal", "-e", str(TINY), *data, f"results_dir={root}",
            "automl.automl_hyperparameters=[train.lr,train.wd]",
            "automl.automl_range_override={train.lr: {valid_min: 1e-6, valid_max: 1e-3}}",
            f"automl.automl_max_recommendations={trials}", *extra]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _rows(root: Path) -> list[dict]:
    with open(root / "automl" / "trials.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _trials(root: Path) -> list:
    study = optuna.load_study(study_name="mal", storage=f"sqlite:///{root / 'automl' / 'study.db'}")
    return study.get_trials()


def test_three_trials_through_the_cli(tmp_path, data):
    root = tmp_path / "r"
    proc = _run(_cmd(data, root, 3))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count(" started: ") == 3 and out.count(" COMPLETE: mIoU=") == 3
    assert "Epoch 1/1" not in out  # the trials' training output goes to their logs
    rows = _rows(root)
    assert [r["number"] for r in rows] == ["0", "1", "2"] and {r["state"] for r in rows} == {"COMPLETE"}
    for r in rows:
        value = float(r["value"])
        assert 0.0 < value <= 1.0 and r["best_epoch"] == "0"
        spec = load_spec(registry.load("mal").config_class, "train", root / "automl" / f"trial_{int(r['number']):03d}"
                         / "spec.yaml", [])
        assert spec.train.lr == pytest.approx(float(r["train.lr"])) and spec.automl.automl_policy == "off"
        assert (root / "automl" / f"trial_{int(r['number']):03d}" / "trial.log").stat().st_size > 0
    best = max(rows, key=lambda r: (float(r["value"]), -int(r["number"])))
    cfg = load_spec(registry.load("mal").config_class, "train", root / "automl" / "best_spec.yaml", [])
    assert cfg.train.lr == pytest.approx(float(best["train.lr"])) and cfg.automl.automl_policy == "off"
    assert cfg.results_dir == str(root)  # the user's spec, not a trial's
    best_model = sorted(p.name for p in (root / "automl" / "best_model").glob("*.pth"))
    assert "model_epoch_000_step_00002.pth" in best_model
    assert (root / "automl" / "optimization_history.png").stat().st_size > 1000


def test_two_workers_share_one_study(tmp_path, data):
    root = tmp_path / "r"
    cmd = _cmd(data, root, 4)
    workers = [subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outs = [w.communicate(timeout=400)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs
    trials = _trials(root)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(int(r["number"]) for r in _rows(root)) == [0, 1, 2, 3]
    # both workers ran trials; each trial ran once (one train run per trial dir)
    assert all(o.count(" started: ") >= 1 for o in outs) and sum(o.count(" started: ") for o in outs) == 4
    for n in range(4):
        status = (root / "automl" / f"trial_{n:03d}" / "train" / "status.json").read_text()
        assert status.count('"STARTED", "verbosity": "INFO", "message": "Starting MAL train."') == 1


def _wait_for(path: Path, timeout: float, text: str = "") -> None:
    end = time.monotonic() + timeout
    while not path.exists() or text not in path.read_text():
        assert time.monotonic() < end, f"{path} did not appear" + (f" with {text!r}" if text else "")
        time.sleep(0.2)


def test_sigkill_during_trial_2_then_rerun(tmp_path, data):
    """Trials of 3 epochs; the driver is killed once trial 2 has finished its first epoch.  The rerun retries
    trial 2 as trial 3 in trial 2's directory, resuming its stopped run instead of training from scratch."""
    root = tmp_path / "r"
    cmd = _cmd(data, root, 3, "automl.heartbeat_interval=1", "automl.grace_period=2", "automl.automl_max_epochs=3")
    driver = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        _wait_for(root / "automl" / "trial_002" / "train" / "status.json", 300, '"message": "Training loop in')
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    # The trial's train process does not outlive its driver: it gets SIGTERM and ends INTERRUPTED.
    status2 = root / "automl" / "trial_002" / "train" / "status.json"
    end = time.monotonic() + 60
    while '"INTERRUPTED"' not in status2.read_text() and '"SUCCESS"' not in status2.read_text():
        assert time.monotonic() < end, status2.read_text()
        time.sleep(0.2)
    done = {n: {p: p.stat().st_mtime_ns for p in (root / "automl" / f"trial_{n:03d}").rglob("*") if p.is_file()}
            for n in (0, 1)}
    texts = {n: (root / "automl" / f"trial_{n:03d}" / "train" / "status.json").read_text() for n in (0, 1)}
    time.sleep(2.5)  # past the grace period: trial 2's heartbeat is stale

    checkpoints = sorted(p.name for p in (root / "automl" / "trial_002" / "train").glob("*.pth"))
    assert checkpoints, "the stopped train run left no checkpoint to resume"

    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trial 003 started (retry of trial 002, in trial_002)" in proc.stdout
    # the retry resumed the stopped run in its directory instead of training from scratch in a new one
    assert not (root / "automl" / "trial_003").exists()
    status = (root / "automl" / "trial_002" / "train" / "status.json").read_text()
    assert status.count("Resuming training from checkpoint") == 1 and '"SUCCESS"' in status.splitlines()[-1]
    assert '"epoch": 2' in status.split("Resuming training from checkpoint")[1]
    assert " 000 started" not in proc.stdout and " 001 started" not in proc.stdout
    for n in (0, 1):  # untouched
        assert {p: p.stat().st_mtime_ns for p in (root / "automl" / f"trial_{n:03d}").rglob("*")
                if p.is_file()} == done[n]
        assert (root / "automl" / f"trial_{n:03d}" / "train" / "status.json").read_text() == texts[n]
    trials = _trials(root)
    states = {t.number: t.state for t in trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.COMPLETE, 2: TrialState.FAIL, 3: TrialState.COMPLETE}
    assert trials[3].system_attrs["retry_history"] == [2] and trials[3].params == trials[2].params
    assert trials[3].user_attrs["trial_dir"] == trials[2].user_attrs["trial_dir"]
    assert budget_used(trials) == 3
    assert [r["state"] for r in _rows(root)] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
