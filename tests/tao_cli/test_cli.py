"""The `tao` command line: argv handling, help, list, version and error exit codes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tao_cli.cli import parse_model_args


def run_tao(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "tao_cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_overrides_are_kept_as_the_argv_list():
    parsed = parse_model_args(["mal", "train", "-e", "my spec.yaml", "train.freeze=[backbone.0, bert]",
                               "'x=a b'", "~train.seed", "+train.num_gpus=2", "--dry-run"])
    assert parsed["positional"] == ["mal", "train"]
    assert parsed["spec"] == "my spec.yaml"
    assert parsed["dry_run"] is True
    assert parsed["overrides"] == ["train.freeze=[backbone.0, bert]", "'x=a b'", "~train.seed",
                                   "+train.num_gpus=2"]


def test_negative_values_and_equals_in_values_are_overrides():
    parsed = parse_model_args(["mal", "train", "train.seed=-1", "dataset.x=a=b"])
    assert parsed["overrides"] == ["train.seed=-1", "dataset.x=a=b"]


def test_version_and_list():
    out = run_tao("--version")
    assert out.returncode == 0 and "tao-cli" in out.stdout
    out = run_tao("model", "list")
    assert out.returncode == 0
    assert "mal" in out.stdout and "mask2former" in out.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (("model", "nosuchnet", "train"), "network 'nosuchnet': is not a known network"),
        (("model", "mal", "trian"), "did you mean 'train'?"),
        (("model", "mal", "train", "--bogus-flag"), "--bogus-flag: unknown option"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line(args, needle):
    out = run_tao(*args)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_network_help_lists_actions():
    out = run_tao("model", "mal", "--help")
    assert out.returncode == 0
    for action in ("train", "evaluate", "inference"):
        assert action in out.stdout
