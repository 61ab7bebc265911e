"""Intra-op threads chosen from the plan: the arithmetic, each network's workers field, the dry-run line, and a
real run whose training happens with the chosen count and hands the caller's setting back."""
from __future__ import annotations

import subprocess

import pytest
import torch
from omegaconf import OmegaConf

from tao_cli.engine.threads import choose_threads, loader_workers

from .helpers import REPO, clean_env, cli_cmd, run, write_spec

FAST = {"dataset.num_samples": 32, "dataset.batch_size": 4}


@pytest.mark.parametrize("procs,workers,cores,expected", [
    (1, 0, 2, 2),    # the whole machine
    (2, 0, 2, 1),    # two DDP processes share two cores
    (1, 8, 16, 8),   # half of the share left to eight loader workers
    (2, 8, 16, 4),
    (1, 1, 16, 15),  # one worker takes one core
    (4, 8, 2, 1),    # never below one
])
def test_share_of_the_cores(procs, workers, cores, expected):
    threads, why = choose_threads(procs, workers, env={}, cores=cores)
    assert threads == expected and f"{cores} cores / {procs} process(es)" in why


def test_omp_num_threads_wins():
    assert choose_threads(2, 8, env={"OMP_NUM_THREADS": "3"}, cores=64) == (3, "from OMP_NUM_THREADS")
    assert choose_threads(1, 0, env={"OMP_NUM_THREADS": "junk"}, cores=4)[0] == 4


@pytest.mark.parametrize("field", ["workers", "num_workers", "num_workers_per_gpu"])
def test_each_networks_workers_field(field):
    assert loader_workers(OmegaConf.create({"dataset": {field: 6}})) == 6
    assert loader_workers(OmegaConf.create({"train": {}})) == 0


def test_dry_run_prints_the_choice(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert run("train", {**FAST, "results_dir": tmp_path, "train.num_gpus": 2}, dry_run=True) == 0
    threads, why = choose_threads(2, 0)
    assert f"threads:      {threads} intra-op per process ({why})" in capsys.readouterr().out


def test_training_runs_with_the_chosen_count_and_restores_the_callers(tmp_path, monkeypatch):
    from tao_cli.engine import run as engine_run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = []
    real = engine_run.Run.execute

    def spy(self):
        seen.append(torch.get_num_threads())
        return real(self)

    monkeypatch.setattr(engine_run.Run, "execute", spy)
    monkeypatch.setattr("tao_cli.engine.threads._cores", lambda: 7)  # a count this machine would not pick
    before = torch.get_num_threads()
    assert run("train", {**FAST, "results_dir": tmp_path}) == 0
    assert seen == [7] and torch.get_num_threads() == before
    assert "Intra-op threads: 7 per process (7 cores / 1 process(es) per node)" in \
        (tmp_path / "train" / "train.log").read_text()


def test_two_processes_log_their_share(tmp_path):
    env = clean_env()
    env.pop("OMP_NUM_THREADS")
    spec = write_spec(tmp_path / "spec.yaml")
    done = subprocess.run(cli_cmd("train", spec, f"results_dir={tmp_path / 'r'}", "train.num_gpus=2"), env=env,
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert done.returncode == 0, done.stdout + done.stderr
    threads, why = choose_threads(2, 0, env={})
    assert f"Intra-op threads: {threads} per process ({why})" in (tmp_path / "r" / "train" / "train.log").read_text()
