"""Help that shows the grammar: literal ``[KEY=VALUE ...]``, ``-h`` everywhere, per-action field listings, shell
completion of networks/actions/spec keys, and the ``plot`` / ``dataset browse`` commands' dispatch.

In-process through typer's CliRunner (completion goes through typer's real ``_TAO_COMPLETE`` machinery).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from networks.common.errors import ConfigError
from tao_cli.cli import app, complete_model_args

runner = CliRunner()


def tao(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env=env, prog_name="tao")


def complete(line: str) -> list[str]:
    """What bash gets for ``line`` (the last word is the one being completed; a trailing space starts a new one)."""
    words = line.split(" ")
    result = tao(env={"_TAO_COMPLETE": "complete_bash", "COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1)})
    assert result.exit_code == 0, result.output
    return [w for w in result.stdout.splitlines() if w]


def field_line(output: str, key: str) -> str:
    lines = [line for line in output.splitlines() if line.split()[:1] == [key]]
    assert len(lines) == 1, f"{key} not listed once:\n{output}"
    return lines[0]


# --------------------------------------------------------------------------------------- grammar in help
@pytest.mark.parametrize("args", [("--help",), ("model",), ("model", "-h"), ("model", "mal", "-h"),
                                  ("model", "mal", "train", "-h")])
def test_help_shows_override_grammar_with_brackets(args):
    result = tao(*args)
    assert result.exit_code == 0, result.output
    assert "[KEY=VALUE ...]" in result.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        ((), "Commands:"),
        (("model",), "mask_grounding_dino"),
        (("model", "mal"), "MAL actions:"),
        (("model", "mal", "train"), "train.num_epochs"),
        (("dataset",), "synthetic"),
        (("dataset", "synthetic"), "--seed"),
        (("spec",), "network"),
        (("plot",), "RUN_DIR"),
    ],
)
def test_short_help_flag_works_like_long(args, needle):
    short, long_ = tao(*args, "-h"), tao(*args, "--help")
    assert short.exit_code == 0 and long_.exit_code == 0, short.output + long_.output
    assert needle in short.stdout
    assert short.stdout == long_.stdout


def test_network_help_points_to_action_help():
    out = tao("model", "mal", "-h").stdout
    for action in ("train", "evaluate", "inference"):
        assert f"  {action} " in out
    assert "tao model mal <action> -h" in out


# ------------------------------------------------------------------------------------------ action help
def test_action_help_lists_fields_with_type_default_and_bounds():
    out = tao("model", "mal", "train", "--help").stdout
    cells = field_line(out, "train.num_epochs").split()
    assert cells[:4] == ["train.num_epochs", "int", "10", "[1,"] and cells[4] == "inf)"
    assert "epochs" in field_line(out, "train.num_epochs")
    assert field_line(out, "train.checkpoint_interval_unit").split()[1:4] == ["str", "epoch", "epoch|step"]
    assert field_line(out, "train.optim_momentum").split()[1:5] == ["float", "0.9", "[0.0,", "1.0]"]
    # the action's own section and the shared ones; not the sections of other actions
    assert "dataset.train_ann_path" in out and "model.arch" in out
    assert "inference.ann_path" not in out and "evaluate.checkpoint" not in out


def test_action_help_marks_required_fields():
    out = tao("model", "mal", "evaluate", "-h").stdout
    assert "??? (required)" in field_line(out, "evaluate.checkpoint")
    assert "(required)" not in field_line(out, "train.num_epochs")


def test_action_help_for_unknown_action_is_one_error_line():
    result = tao("model", "mal", "trian", "-h")
    assert result.exit_code == 2
    assert "did you mean 'train'?" in result.stderr
    assert result.stdout == ""


# ------------------------------------------------------------------------------------------- completion
def test_completion_of_networks_actions_and_keys():
    assert complete("tao model ma") == ["mal", "mask2former", "mask_grounding_dino"]
    assert "list" in complete("tao model ")
    assert complete("tao model mal tr") == ["train"]
    assert complete("tao model mask2former ex") == ["export"]
    assert complete("tao model mal train train.num_ep") == ["train.num_epochs="]
    # -e SPEC before the network does not shift the positions
    assert complete("tao model -e spec.yaml mal train train.num_ep") == ["train.num_epochs="]
    assert complete("tao model mal evaluate evaluate.check") == ["evaluate.checkpoint="]
    assert complete("tao model mal train inference.") == []  # another action's section


def test_completion_of_flags_prefixes_and_values():
    assert complete("tao model mal train --dr") == ["--dry-run"]
    assert complete("tao model mal train ~train.se") == ["~train.seed"]
    assert complete("tao model mal train +train.se") == ["+train.seed="]
    # bash splits "key=value" at "=": the value is completed from the field's options / booleans
    assert complete("tao model mal train train.checkpoint_interval_unit = ") == ["epoch", "step"]
    assert complete("tao model mal train train.use_amp = f") == ["false"]
    assert complete("tao model mal train -e ") == []  # the shell completes the file name
    assert complete("tao model nosuchnet train train.") == []


def test_completion_of_joined_key_value_word():
    # zsh and fish keep "key=partial" as one word
    assert complete_model_args(["mal", "train"], "train.checkpoint_interval_unit=s") == [
        ("train.checkpoint_interval_unit=step", "")]
    keys = [value for value, _ in complete_model_args(["mal", "train"], "train.num_")]
    assert keys == ["train.num_gpus=", "train.num_nodes=", "train.num_epochs=", "train.num_wave="]


# --------------------------------------------------------------------------------------- plot and browse
def _fake_module(monkeypatch, name: str, attr: str, func) -> None:
    module = types.ModuleType(name)
    setattr(module, attr, func)
    monkeypatch.setitem(sys.modules, name, module)


def test_plot_passes_run_dirs_and_prints_paths(monkeypatch, tmp_path):
    calls = []

    def plot_runs(run_dirs, out):
        calls.append((run_dirs, out))
        return [tmp_path / "loss.png", tmp_path / "metrics.png"]

    _fake_module(monkeypatch, "tao_cli.plot", "plot_runs", plot_runs)
    result = tao("plot", "runs/a", "runs/b", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert calls == [([Path("runs/a"), Path("runs/b")], tmp_path)]
    assert result.stdout.splitlines() == [str(tmp_path / "loss.png"), str(tmp_path / "metrics.png")]


def test_plot_user_error_is_one_line_exit_2(monkeypatch):
    def plot_runs(run_dirs, out):
        raise ConfigError("RUN_DIR", "has no status.json", "pass a run directory such as results/train")

    _fake_module(monkeypatch, "tao_cli.plot", "plot_runs", plot_runs)
    result = tao("plot", "nowhere")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ERROR: ") and "has no status.json" in lines[0]


def test_dataset_browse_passes_its_arguments(monkeypatch, tmp_path):
    calls = []

    def browse(network, spec_path, action, out, num, overrides):
        calls.append((network, Path(spec_path), action, out, num, overrides))
        return [tmp_path / "000.png"]

    _fake_module(monkeypatch, "tao_cli.browse", "browse", browse)
    spec = tmp_path / "spec.yaml"
    result = tao("dataset", "browse", "mal", "--spec", str(spec), "--action", "evaluate", "--out", str(tmp_path),
                 "--num", "3", "dataset.crop_size=64", "~train.seed")
    assert result.exit_code == 0, result.output
    assert calls == [("mal", spec, "evaluate", tmp_path, 3, ["dataset.crop_size=64", "~train.seed"])]
    assert result.stdout.splitlines() == [str(tmp_path / "000.png")]


def test_dataset_browse_bad_action_is_one_line_exit_2(monkeypatch, tmp_path):
    _fake_module(monkeypatch, "tao_cli.browse", "browse", lambda *a: pytest.fail("browse must not be called"))
    result = tao("dataset", "browse", "mal", "--action", "trian", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "did you mean 'train'?" in result.stderr
