"""Interpolations that fan out (each field referencing the previous one 9 times, 7 deep: 4 M characters and
12 s of resolving) are refused in one short line naming the field, before OmegaConf expands them; every error
line a spec produces stays short, whatever user text it echoes.

Runs the real ``tao`` entry point in-process against the test-only ``boring`` network (no data needed).
"""
from __future__ import annotations

import sys

import pytest

from networks.common.errors import ConfigError
from tao_cli import registry
from tao_cli.spec import load_spec

pytestmark = pytest.mark.reliability

LONGEST_LINE = 1000  # characters of one error line, whatever the spec holds (each echoed part is capped at 300)
LIMIT = 50_000  # tao_cli.spec.MAX_INTERPOLATED_CHARS

# string fields of the boring network (TAO's common sections), each to reference the previous one
CHAIN = ["wandb.project", "wandb.entity", "wandb.group", "wandb.name", "wandb.run_id", "model_name",
         "evaluate.checkpoint"]


def _fan_out_yaml(refs: int, seed: str = "xxxxxxxx") -> str:
    """YAML where CHAIN[0] is ``seed`` and every later field is ``${previous}`` repeated ``refs`` times."""
    values = {CHAIN[0]: seed}
    for prev, key in zip(CHAIN[:-1], CHAIN[1:], strict=True):
        values[key] = "".join(f"${{{prev}}}" for _ in range(refs))
    sections: dict[str, dict[str, str]] = {}
    lines = ["results_dir: out"]
    for key, value in values.items():
        section, _, leaf = key.rpartition(".")
        if section:
            sections.setdefault(section, {})[leaf] = value
        else:
            lines.append(f"{leaf}: '{value}'")
    for section, items in sections.items():
        lines.append(f"{section}:")
        lines += [f"  {leaf}: '{value}'" for leaf, value in items.items()]
    return "\n".join(lines) + "\n"


def _tao(monkeypatch, capfd, *argv: str) -> tuple[int, str]:
    from tao_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["tao", *argv])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capfd.readouterr().err


@pytest.fixture()
def boring(tmp_path, monkeypatch):
    registry.register("boring", "boring_net")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.timeout(60)  # before the fix this took 12 s and printed a 4-59 MB line; never hang the suite
def test_interpolation_fan_out_is_refused_in_one_short_line(boring, monkeypatch, capfd):
    (boring / "fan.yaml").write_text(_fan_out_yaml(refs=9))
    code, err = _tao(monkeypatch, capfd, "model", "boring", "train", "-e", "fan.yaml", "--dry-run")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err[:2000]
    line = lines[0]
    assert f"would exceed {LIMIT} characters" in line, line
    assert any(line.startswith(f"ERROR: {key}:") for key in CHAIN), line  # names the field
    assert len(line) < LONGEST_LINE, len(line)


def test_interpolations_below_the_limit_still_resolve(boring):
    """Control: a fan-out that stays small resolves to the exact value (the estimate does not over-refuse)."""
    from boring_net.config import ExperimentConfig

    (boring / "small.yaml").write_text(_fan_out_yaml(refs=2, seed="ab"))
    cfg = load_spec(ExperimentConfig, "train", boring / "small.yaml", [])
    assert cfg.evaluate.checkpoint == "ab" * 2 ** (len(CHAIN) - 1)
    # relative references, resolvers and whole sections keep working
    cfg = load_spec(ExperimentConfig, "train", boring / "small.yaml",
                    ["wandb.name=${.project}-x", "model_name=${oc.select:wandb.project,none}"])
    assert cfg.wandb.name == "ab-x" and cfg.model_name == "ab"


def test_an_interpolated_value_just_over_the_limit_is_refused(boring):
    """Not only deep chains: one reference repeated past the limit is refused too, naming the field."""
    from boring_net.config import ExperimentConfig

    reps = LIMIT // 10 + 1
    (boring / "wide.yaml").write_text("results_dir: out\nwandb:\n  project: '0123456789'\n"
                                      f"  entity: '{'${wandb.project}' * reps}'\n")
    with pytest.raises(ConfigError) as err:
        load_spec(ExperimentConfig, "train", boring / "wide.yaml", [])
    assert err.value.subject == "wandb.entity"


@pytest.mark.timeout(60)
def test_a_fan_out_of_empty_strings_is_refused_too(boring):
    """No characters at all, but 9^6 expansions for OmegaConf (seconds): each expansion counts."""
    from boring_net.config import ExperimentConfig

    (boring / "empty.yaml").write_text(_fan_out_yaml(refs=9, seed=""))
    with pytest.raises(ConfigError) as err:
        load_spec(ExperimentConfig, "train", boring / "empty.yaml", [])
    assert err.value.subject in CHAIN and f"would exceed {LIMIT} characters" in err.value.one_line()


@pytest.mark.parametrize("override", [
    "train.num_epochs=${" + "x" * 5000 + "}",    # a dangling interpolation echoes its expression
    "wandb.nam" + "e" * 5000 + "=1",               # an unknown key echoes the key and the override
    "train.gpu_ids=[" + "0," * 3000,              # an unparsable override echoes the override
], ids=["interpolation", "unknown-key", "unparsable"])
def test_long_user_text_in_a_spec_error_is_capped(boring, monkeypatch, capfd, override):
    (boring / "good.yaml").write_text("results_dir: out\n")
    code, err = _tao(monkeypatch, capfd, "model", "boring", "train", "-e", "good.yaml", "--dry-run", override)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err[:2000]
    assert len(lines[0]) < LONGEST_LINE, len(lines[0])
