"""The AutoML driver without training: fake trial runners stand in for the train subprocess (scripted KPI
streams), and a tiny Python child stands in for ``tao model ... train`` where the process handling is tested.

What real training adds (CLI, workers, SIGKILL) is in ``test_driver_train.py``.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import sys
import textwrap
import threading
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from tao_cli import registry
from tao_cli.automl import run_automl
from tao_cli.automl.study import budget_used
from tao_cli.automl.trial_run import TrialContext, TrialOutcome, epoch_kpis, subprocess_runner
from tao_cli.cli import app, run_model
from tao_cli.paths import configs_dir

TINY = configs_dir() / "mal" / "tiny.yaml"
SEARCH = ["automl.automl_hyperparameters=[train.lr,train.wd]",
          "automl.automl_range_override={train.lr: {valid_min: 1e-6, valid_max: 1e-3}}"]


def _overrides(data: list[str], root: Path, *extra: str) -> list[str]:
    return [*data, f"results_dir={root}", *SEARCH, *extra]


def _rows(root: Path) -> list[dict]:
    with open(root / "automl" / "trials.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _study(root: Path, name: str = "mal") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'automl' / 'study.db'}")


def scripted(stream):
    """A runner reporting ``stream(ctx, values)`` epoch by epoch, stopping when the pruner says so."""
    def runner(ctx: TrialContext) -> TrialOutcome:
        spec = ctx.spec_path.read_text()
        kpis = {}
        for epoch, value in enumerate(stream(ctx, spec)):
            kpis[epoch] = value
            if ctx.report(epoch, value):
                return TrialOutcome("pruned", kpis, f"pruned at epoch {epoch}")
        return TrialOutcome("complete", kpis)
    return runner


def _lr_of(spec_text: str) -> float:
    import yaml

    return float(yaml.safe_load(spec_text)["train"]["lr"])


# --------------------------------------------------------------------------------------------- pruning
def test_hyperband_prunes_bad_trials_at_a_rung(tmp_path, data, capsys):
    # KPI grows with epochs and with the learning rate: low-lr trials are worse at every rung.
    def stream(ctx, spec):
        lr = _lr_of(spec)
        return [lr * 1000 * (e + 1) for e in range(ctx.max_epochs)]

    import matplotlib

    style = (matplotlib.rcParams["axes.prop_cycle"], matplotlib.rcParams["axes.facecolor"])
    root = tmp_path / "r"
    code = run_automl(registry.load("mal"), TINY, _overrides(
        data, root, "automl.automl_algorithm=hyperband", "automl.automl_max_epochs=9",
        "automl.automl_reduction_factor=3", "automl.automl_max_recommendations=12"), runner=scripted(stream))
    assert code == 0
    assert (root / "automl" / "param_importances.png").is_file()
    # optuna's plots use the ggplot style; the rest of the process (tao plot's colours) must not inherit it
    assert (matplotlib.rcParams["axes.prop_cycle"], matplotlib.rcParams["axes.facecolor"]) == style
    study = _study(root)
    states = [t.state for t in study.trials]
    assert len(states) == 12 and TrialState.PRUNED in states and TrialState.COMPLETE in states
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    # stopped early: fewer epochs reported than R, and the console said so
    assert all(len(t.intermediate_values) < 9 for t in pruned)
    assert "PRUNED after" in capsys.readouterr().out
    rows = {int(r["number"]): r for r in _rows(root)}
    for t in pruned:
        assert rows[t.number]["state"] == "PRUNED" and rows[t.number]["reason"].startswith("pruned at epoch")
    # the pruner saw one report per epoch at step = epochs trained (1..R)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(complete[0].intermediate_values) == list(range(1, 10))
    # the best is the best complete trial (highest lr among them), its value the best epoch
    best = max(complete, key=lambda t: t.value)
    assert best.user_attrs["best_epoch"] == 8


def test_a_trial_without_kpi_is_failed_never_zero(tmp_path, data, capsys):
    def runner(ctx):
        if ctx.number == 1:
            return TrialOutcome("complete", {})  # exit 0 but no KPI record
        return scripted(lambda c, s: [0.3, 0.4])(ctx)

    root = tmp_path / "r"
    code = run_automl(registry.load("mal"), TINY, _overrides(data, root, "automl.automl_max_recommendations=3",
                                                             "automl.automl_max_epochs=2"), runner=runner)
    assert code == 0
    study = _study(root)
    bad = study.trials[1]
    assert bad.state == TrialState.FAIL and bad.value is None
    assert "mIoU" in bad.user_attrs["reason"]
    row = _rows(root)[1]
    assert row["state"] == "FAIL" and row["value"] == "" and row["reason"]
    assert "trial 001 FAILED" in capsys.readouterr().out
    assert [t.value for t in study.trials if t.state == TrialState.COMPLETE] == [0.4, 0.4]


def test_all_trials_failed_is_exit_1_and_no_best(tmp_path, data, capsys):
    root = tmp_path / "r"
    code = run_automl(registry.load("mal"), TINY, _overrides(data, root, "automl.automl_max_recommendations=2"),
                      runner=lambda ctx: TrialOutcome("failed", {}, "train exited with code 1: boom"))
    assert code == 1
    assert not (root / "automl" / "best_spec.yaml").exists()
    assert [r["reason"] for r in _rows(root)] == ["train exited with code 1: boom"] * 2


# --------------------------------------------------------------------------------------------- seeds
def _sequence(root: Path, data, seed: int) -> list[tuple]:
    code = run_automl(registry.load("mal"), TINY, _overrides(
        data, root, f"automl.seed={seed}", "automl.automl_algorithm=bohb", "automl.automl_max_epochs=2",
        "automl.automl_max_recommendations=12"),
        runner=scripted(lambda c, s: [_lr_of(s), _lr_of(s) * 2]))
    assert code == 0
    return [(r["number"], r["train.lr"], r["train.wd"]) for r in _rows(root)]


def test_same_seed_same_sequence_other_seed_differs(tmp_path, data):
    a = _sequence(tmp_path / "a", data, 7)
    b = _sequence(tmp_path / "b", data, 7)
    c = _sequence(tmp_path / "c", data, 8)
    assert len(a) == 12 and a == b
    assert [x[1:] for x in a] != [x[1:] for x in c]
    # every trial of a study trains with the study seed
    spec = (tmp_path / "a" / "automl" / "trial_005" / "spec.yaml").read_text()
    assert "seed: 7" in spec


# --------------------------------------------------------------------------------------------- interrupt
def test_sigterm_stops_the_trial_and_the_rerun_retries_it_once(tmp_path, data, capsys):
    root = tmp_path / "r"
    overrides = _overrides(data, root, "automl.automl_max_recommendations=3")
    ran = []

    def runner(ctx):
        ran.append(ctx.number)
        if ctx.number == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what Slurm or a user sends the driver
            assert ctx.stop.wait(10)
            return TrialOutcome("interrupted", {0: 0.9}, "the AutoML driver was interrupted")
        return TrialOutcome("complete", {0: 0.5})

    assert run_automl(registry.load("mal"), TINY, overrides, runner=runner) == 130
    assert ran == [0, 1]
    assert run_automl(registry.load("mal"), TINY, overrides, runner=runner) == 0
    study = _study(root)
    states = {t.number: t.state for t in study.trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.FAIL, 2: TrialState.COMPLETE, 3: TrialState.COMPLETE}
    assert study.trials[2].system_attrs["retry_history"] == [1]
    assert study.trials[2].params == study.trials[1].params  # the retry runs the same values
    assert ran == [0, 1, 2, 3] and budget_used(study.trials) == 3


# --------------------------------------------------------------------------------------------- the child
CHILD = textwrap.dedent("""\
    import json, os, sys, time
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "pid"), "w").write(str(os.getpid()))
    mode = sys.argv[2]
    for epoch in range(int(sys.argv[3])):
        rec = {"epoch": epoch, "status": "RUNNING", "kpi": {"mIoU": 0.1 * (epoch + 1)}}
        if mode != "nokpi":
            with open(os.path.join(out, "status.json"), "a") as fh:
                fh.write(json.dumps(rec) + "\\n")
        time.sleep(0.2)
    print("last words of the child")
    sys.exit(3 if mode == "crash" else 0)
    """)


def _ctx(tmp_path, mode: str, epochs: int, report) -> TrialContext:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    trial_dir = tmp_path / "trial_000"
    return TrialContext(number=0, trial_dir=trial_dir, train_dir=trial_dir / "train", spec_path=script,
                        command=[sys.executable, str(script), str(trial_dir / "train"), mode, str(epochs)],
                        kpi="mIoU", direction="max", max_epochs=epochs, report=report, poll_s=0.05, grace_s=5)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_pruned_child_is_terminated(tmp_path):
    seen = []

    def report(epoch, value):
        seen.append((epoch, round(value, 3)))
        return epoch == 1

    out = subprocess_runner(_ctx(tmp_path, "ok", 200, report))
    assert out.state == "pruned" and out.reason == "pruned at epoch 1"
    assert seen == [(0, 0.1), (1, 0.2)]
    pid = int((tmp_path / "trial_000" / "train" / "pid").read_text())
    assert _gone(pid)
    assert out.returncode is not None and out.returncode != 0  # stopped, not finished


def test_child_exit_code_and_missing_kpi_fail_with_reason(tmp_path):
    crash = subprocess_runner(_ctx(tmp_path, "crash", 2, lambda e, v: False))
    assert crash.state == "failed" and crash.reason == "train exited with code 3: last words of the child"
    assert crash.kpis == {0: pytest.approx(0.1), 1: pytest.approx(0.2)}
    nokpi = subprocess_runner(_ctx(tmp_path / "n", "nokpi", 1, lambda e, v: False))
    assert nokpi.state == "failed" and "no 'mIoU' in any epoch record" in nokpi.reason


def test_driver_stop_terminates_child(tmp_path):
    ctx = _ctx(tmp_path, "ok", 500, lambda e, v: False)
    threading.Timer(1.0, ctx.stop.set).start()
    out = subprocess_runner(ctx)
    assert out.state == "interrupted"
    assert _gone(int((tmp_path / "trial_000" / "train" / "pid").read_text()))


def test_epoch_kpis_reads_epoch_records_only(tmp_path):
    status = tmp_path / "status.json"
    lines = [{"status": "STARTED"}, {"epoch": 0, "kpi": {"mIoU": 0.2}}, {"epoch": 0, "kpi": {"train_loss": 1.0}},
             {"kpi": {"mIoU": 0.9}},  # no epoch: not attributable
             {"epoch": 1, "kpi": {"mIoU": "NaN"}}, {"epoch": 2, "kpi": {"mIoU": "0.5"}},
             {"epoch": 0, "kpi": {"mIoU": 0.3}}]  # a resumed run's record of epoch 0 wins
    status.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"epoch\": 3, \"kp")
    values, seen = epoch_kpis(status, "mIoU")
    assert values == {0: 0.3, 2: 0.5} and seen == {"mIoU", "train_loss"}


# --------------------------------------------------------------------------------------------- CLI
def test_policy_auto_takes_the_automl_path(tmp_path, data, capsys):
    code = run_model("mal", "train", str(TINY), _overrides(data, tmp_path, "automl.automl_policy=auto"),
                     dry_run=True)
    out = capsys.readouterr().out
    assert code == 0
    assert "automl_policy: auto -> `tao model mal train` runs this AutoML study" in out
    assert "search space: 2 parameter(s)" in out and "train.lr: float" in out
    assert not (tmp_path / "automl").exists()  # a dry run writes nothing
    # policy off (the default): a plain train plan
    assert run_model("mal", "train", str(TINY), _overrides(data, tmp_path), dry_run=True) == 0
    assert "# AutoML plan" not in capsys.readouterr().out


@pytest.mark.parametrize("algorithm", ["pbt", "bfbo", "dehb", "hyperband_es"])
def test_refused_algorithms_exit_2_with_one_line(tmp_path, data, algorithm):
    result = CliRunner().invoke(app, ["automl", "mal", "-e", str(TINY), *_overrides(data, tmp_path),
                                      f"automl.automl_algorithm={algorithm}", "--dry-run"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: automl.automl_algorithm:")
    assert f"'{algorithm}' is not supported" in lines[0]
    assert "bayesian, hyperband, bohb, asha, pbt, bfbo, dehb, hyperband_es" in lines[0]


@pytest.mark.parametrize(("extra", "needle"), [
    (["automl.automl_hyperparameters=[train.lrr]"], "'train.lrr' is not a mal train-spec field"),
    (["automl.automl_hyperparameters=[automl.seed]"], "cannot be searched"),
    (["automl.automl_algorithm=hyperband", "automl.automl_max_epochs=1"], "needs at least 2 epochs"),
])
def test_bad_settings_exit_2_at_dry_run(tmp_path, data, extra, needle):
    result = CliRunner().invoke(app, ["automl", "mal", "-e", str(TINY), *_overrides(data, tmp_path), *extra,
                                      "--dry-run"])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_dry_run_prints_the_plan(tmp_path, data):
    result = CliRunner().invoke(app, ["automl", "mal", "-e", str(TINY), *_overrides(data, tmp_path),
                                      "automl.automl_algorithm=asha", "automl.automl_max_epochs=4", "--dry-run"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for needle in ("algorithm:    asha", "SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)",
                   f"sqlite:///{(tmp_path / 'automl' / 'study.db').resolve()}", "trials:       20",
                   "R=4 per trial, eta=3", "train.wd: float"):
        assert needle in out, needle
    assert not (tmp_path / "automl").exists()


def test_shipped_automl_spec_plans_its_study(tmp_path, data):
    """``configs/mal/automl.yaml`` (README, benchmarks/automl_mal.py): 8 Hyperband trials, lr and wd drawn
    log-uniformly from its range overrides, not from the schema's [0, default]."""
    result = CliRunner().invoke(app, ["automl", "mal", "-e", str(configs_dir() / "mal" / "automl.yaml"), *data,
                                      f"results_dir={tmp_path}", "--dry-run"])
    assert result.exit_code == 0, result.output
    for needle in ("HyperbandPruner(min_resource=1, max_resource=4, reduction_factor=2)", "trials:       8",
                   "train.lr: float, log-uniform [1e-06, 0.0003]", "train.wd: float, log-uniform [1e-05, 0.1]"):
        assert needle in result.stdout, needle


# --------------------------------------------------------------------------------------------- results
def test_best_model_is_the_best_epoch_and_other_checkpoints_are_deleted(tmp_path, data):
    # Trial n reports val_loss [3, 1 + n / 2, 2.5]: the best epoch is 1 for every trial and trial 0 is the best.
    def runner(ctx):
        assert (ctx.kpi, ctx.direction) == ("val_loss", "min")
        ctx.train_dir.mkdir(parents=True)
        for epoch in range(3):
            (ctx.train_dir / f"model_epoch_{epoch:03d}_step_{(epoch + 1) * 2:05d}.pth").write_bytes(b"%d" % epoch)
        (ctx.train_dir / "mal_model_best.pth").write_bytes(b"best")
        return scripted(lambda c, s: [3.0, 1.0 + c.number / 2, 2.5])(ctx)

    root = tmp_path / "r"
    code = run_automl(registry.load("mal"), TINY, _overrides(
        data, root, "automl.metric=loss", "automl.automl_max_epochs=3", "automl.automl_max_recommendations=3",
        "automl.automl_delete_intermediate_ckpt=true"), runner=runner)
    assert code == 0
    best_model = root / "automl" / "best_model"
    assert sorted(p.name for p in best_model.iterdir()) == ["mal_model_best.pth", "model_epoch_001_step_00004.pth"]
    assert (best_model / "model_epoch_001_step_00004.pth").read_bytes() == b"1"
    assert [r["value"] for r in _rows(root)] == ["1.0", "1.5", "2.0"]
    assert [r["best_epoch"] for r in _rows(root)] == ["1", "1", "1"]
    assert len(list((root / "automl" / "trial_000" / "train").glob("*.pth"))) == 4  # the best trial keeps its own
    for n in (1, 2):
        assert not list((root / "automl" / f"trial_{n:03d}" / "train").glob("*.pth"))
    best_spec = (root / "automl" / "best_spec.yaml").read_text()
    assert best_spec.startswith("# Best AutoML trial 000") and "automl_policy: 'off'" in best_spec


def test_a_trial_that_trained_all_epochs_is_not_pruned(tmp_path, data):
    # Every trial is worse than trial 0 at every epoch, so the pruner would stop them at any rung, the last included.
    def stream(ctx, spec):
        return [1.0 if ctx.number == 0 else 0.1] * ctx.max_epochs

    root = tmp_path / "r"
    code = run_automl(registry.load("mal"), TINY, _overrides(
        data, root, "automl.automl_algorithm=asha", "automl.automl_max_epochs=2", "automl.automl_reduction_factor=2",
        "automl.automl_max_recommendations=6"), runner=scripted(stream))
    assert code == 0
    pruned = [t for t in _study(root).trials if t.state == TrialState.PRUNED]
    assert pruned and all(sorted(t.intermediate_values) == [1] for t in pruned)


def test_deleting_intermediate_checkpoints_spares_the_directory_a_retry_shares_with_its_trial(tmp_path):
    """A retry trains in the directory of the trial it retries: when the retry is the best trial, the failed
    trial's entry must not delete the best checkpoints that directory now holds."""
    from optuna.trial import create_trial

    from tao_cli.automl.results import _delete_intermediate

    shared, other = tmp_path / "trial_001", tmp_path / "trial_000"
    for d in (shared, other):
        (d / "train").mkdir(parents=True)
        (d / "train" / "mal_model_best.pth").write_bytes(b"x")
    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={"trial_dir": str(other)}))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"trial_dir": str(shared)}))
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.9, user_attrs={"trial_dir": str(shared)},
                                 system_attrs={"retry_history": [1]}))
    trials = study.get_trials()
    assert _delete_intermediate(None, trials, study.best_trial) == 1
    assert (shared / "train" / "mal_model_best.pth").exists() and not list((other / "train").glob("*.pth"))
