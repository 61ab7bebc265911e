"""One run per results dir: a second run on a live run's dir is refused in one line naming the holder's pid and
writes nothing; a lock left by a killed run is taken over with a line saying so."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from networks.common.errors import ConfigError
from tao_cli.engine.runlock import LOCK_NAME, RunDirLock, lock_holder
from tests.tao_cli.engine.helpers import run

pytestmark = pytest.mark.reliability

FAST = {"dataset.num_samples": 16, "dataset.batch_size": 4, "train.num_epochs": 1}

_HOLD = """
import sys, time
sys.path.insert(0, sys.argv[2])
from tao_cli.engine.runlock import RunDirLock
lock = RunDirLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold(run_dir) -> subprocess.Popen:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), repo], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_on_a_live_runs_dir_is_refused_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "train"
    run_dir.mkdir()
    holder = _hold(run_dir)
    try:
        assert lock_holder(run_dir) == holder.pid
        assert run("train", {**FAST, "results_dir": tmp_path}) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another tao run (pid {holder.pid})" in err[0]
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # no status.json, no experiment.yaml
        assert run("train", {**FAST, "results_dir": tmp_path}, dry_run=True) == 2  # the dry-run refuses too
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_run_is_taken_over_with_a_line(tmp_path, capsys):
    run_dir = tmp_path / "train"
    run_dir.mkdir()
    holder = _hold(run_dir)
    holder.kill()  # SIGKILL: the kernel drops the flock, the pid stays in the file
    holder.wait()
    assert lock_holder(run_dir) is None
    assert run("train", {**FAST, "results_dir": tmp_path}) == 0
    out = capsys.readouterr().out
    assert f"Took over the lock of {run_dir} from pid {holder.pid}, which is no longer running" in out
    assert not (run_dir / LOCK_NAME).exists()  # released and removed at the end of the run
    assert lock_holder(run_dir) is None


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    first, second = RunDirLock(tmp_path), RunDirLock(tmp_path)
    assert first.acquire() is None
    try:
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            second.acquire()
    finally:
        first.release()
    assert second.acquire() is None
    second.release()
