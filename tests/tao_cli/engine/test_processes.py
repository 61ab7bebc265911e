"""Real processes through the CLI (``python -m tao_cli model boring ...``): SIGTERM/SIGINT during training (exit
130, INTERRUPTED, checkpoint, resume) and 2-process DDP on CPU over gloo.

Subprocesses with a clean environment, because Lightning's DDP launcher re-runs ``sys.argv`` for rank 1, which
inside pytest would re-run the test session.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tao_cli.engine.checkpoints import CHECKPOINT_RE, load_checkpoint

from .helpers import REPO, clean_env, cli_cmd, run_cli, write_spec

pytestmark = pytest.mark.slow  # real subprocesses and 2-process DDP: 20-30 s each


def _status(run_dir: Path) -> list[dict]:
    path = run_dir / "status.json"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sigterm_mid_epoch_saves_checkpoint_and_resume_completes(tmp_path):
    """SIGTERM (Slurm preemption, ``kill``); Ctrl-C takes the same path (test_run.py covers KeyboardInterrupt)."""
    signum = signal.SIGTERM
    spec = write_spec(tmp_path / "spec.yaml")
    root = tmp_path / "r"
    run_dir = root / "train"
    args = [f"results_dir={root}", "train.num_epochs=3"]
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen(cli_cmd("train", spec, *args, "model.step_sleep=0.15"), env=clean_env(),
                                cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not any(r["message"] == "Training loop in progress" for r in _status(run_dir)):
                assert proc.poll() is None, (tmp_path / "out.txt").read_text()
                assert time.monotonic() < deadline, "training did not finish its first epoch in time"
                time.sleep(0.05)
            time.sleep(0.4)  # a few steps into epoch 1 (6 steps of 0.15 s per epoch)
            proc.send_signal(signum)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = (tmp_path / "out.txt").read_text()
    assert rc == 130, output
    records = _status(run_dir)
    assert records[-1]["status"] == "INTERRUPTED", records[-1]
    assert signal.Signals(signum).name in records[-1]["message"]
    latest = Path(os.path.realpath(run_dir / "boring_model_latest.pth"))
    match = CHECKPOINT_RE.match(latest.name)
    assert match and int(match.group(1)) == 1 and 6 < int(match.group(2)) < 12, latest.name  # mid-epoch 1
    assert f"checkpoint saved: {latest}" in records[-1]["message"]
    assert load_checkpoint(latest, expected_network="boring")["global_step"] == int(match.group(2))
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]

    done = run_cli("train", spec, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    records = _status(run_dir)
    assert f"Resuming training from checkpoint: {latest}" in [r["message"] for r in records]
    assert records[-1]["status"] == "SUCCESS"
    assert (run_dir / "model_epoch_002_step_00018.pth").exists()


def test_two_cpu_processes_over_gloo(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml")
    root = tmp_path / "r"
    done = run_cli("train", spec, f"results_dir={root}", "train.num_gpus=2", "train.num_epochs=2")
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = root / "train"
    records = _status(run_dir)
    assert [r["message"] for r in records].count("Starting Boring train.") == 1  # rank 0 only
    assert records[-1]["status"] == "SUCCESS"
    # 24 training rows split over 2 processes -> 3 steps per epoch
    assert sorted(p.name for p in run_dir.glob("model_*.pth")) == ["model_epoch_000_step_00003.pth",
                                                                     "model_epoch_001_step_00006.pth"]
    assert "world_size=2" in (run_dir / "train.log").read_text()
    assert "distributed_backend=gloo" in done.stdout + done.stderr


def test_two_nodes_on_localhost_with_tao_environment(tmp_path):
    """TAO's contract (WORLD_SIZE = nodes, NODE_RANK, MASTER_ADDR/PORT): two 'nodes' of one CPU process each."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = write_spec(tmp_path / "spec.yaml")
    root = tmp_path / "shared"
    procs = []
    for node in (0, 1):
        env = clean_env(WORLD_SIZE="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out = open(tmp_path / f"node{node}.txt", "w")
        procs.append((subprocess.Popen(cli_cmd("train", spec, f"results_dir={root}", "train.num_epochs=1"),
                                       env=env, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT), out))
    try:
        codes = [p.wait(timeout=300) for p, _ in procs]
    finally:
        for p, out in procs:
            if p.poll() is None:
                p.kill()
            out.close()
    logs = [(tmp_path / f"node{n}.txt").read_text() for n in (0, 1)]
    assert codes == [0, 0], logs
    run_dir = root / "train"
    records = _status(run_dir)
    assert [r["message"] for r in records].count("Starting Boring train.") == 1  # node 0 only
    assert records[-1]["status"] == "SUCCESS"
    assert sorted(p.name for p in run_dir.glob("model_*.pth")) == ["model_epoch_000_step_00003.pth"]
    assert "num_nodes=2, world_size=2" in logs[0] and "num_nodes=2, world_size=2" in logs[1]
