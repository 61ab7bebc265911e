"""Helpers for engine tests: boring_net specs, in-process runs and subprocess runs with a clean environment."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[3]


def make_cfg(overrides: dict | None = None):
    """A struct-mode boring_net spec: dataclass defaults merged with ``{"a.b": value}`` overrides."""
    import boring_net

    dotlist = [f"{k}={v}" for k, v in (overrides or {}).items()]
    cfg = OmegaConf.merge(OmegaConf.structured(boring_net.ExperimentConfig), OmegaConf.from_dotlist(dotlist))
    OmegaConf.set_struct(cfg, True)
    return cfg


def run(action, overrides: dict | None = None, *, argv=None, dry_run=False, debug=False):
    """Run boring_net ``action`` in-process with ``{"a.b": value}`` overrides; returns the exit code."""
    import boring_net

    from tao_cli.engine.run import run_action

    cfg = make_cfg(overrides)
    return run_action(boring_net.NETWORK, action, cfg, argv=argv or [action], dry_run=dry_run, debug=debug)


def clean_env(**extra) -> dict:
    """Environment for subprocesses: no distributed/Slurm variables, offline, repo + tests importable."""
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "NUM_GPU_PER_NODE", "TAO_CLI_DEVICE_PLAN", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "PYTEST_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}",
               TAO_EXTRA_NETWORKS="boring=boring_net",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def cli_cmd(action: str, spec: Path, *overrides: str) -> list[str]:
    """``python -m tao_cli model boring <action> -e <spec> <overrides>`` (boring_net registered via env)."""
    return [sys.executable, "-m", "tao_cli", "model", "boring", action, "-e", str(spec), *overrides]


def write_spec(path: Path) -> Path:
    """A small boring_net spec file (the tests pass everything else as overrides)."""
    path.write_text("dataset:\n  num_samples: 32\n  batch_size: 4\ntrain:\n  num_epochs: 1\n")
    return path


def run_cli(action: str, spec: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the CLI to completion in a clean environment; stdout/stderr as text."""
    return subprocess.run(cli_cmd(action, spec, *overrides), env=clean_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))
