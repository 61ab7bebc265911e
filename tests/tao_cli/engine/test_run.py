"""run_action end to end on boring_net, in-process: files, status.json, resume, exit codes, dry-run."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import boring_net
import torch
import yaml

from tao_cli.engine.checkpoints import load_checkpoint, save_checkpoint_file
from tao_cli.engine.run import run_action
from tao_cli.engine.trainer import decide_precision

from .helpers import make_cfg, run

FAST = {"dataset.num_samples": 32, "dataset.batch_size": 4}  # 24 train rows -> 6 steps per epoch


def _status(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "status.json").read_text().splitlines()]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_train_writes_status_checkpoints_and_experiment_yaml(tmp_path):
    root = tmp_path / "r"
    argv = ["train", "-e", "spec.yaml", f"results_dir={root}", "train.num_epochs=2"]
    assert run("train", {**FAST, "results_dir": root, "train.num_epochs": 2}, argv=argv) == 0
    run_dir = root / "train"
    files = {p.name for p in run_dir.iterdir()}
    assert {"experiment.yaml", "status.json", "train.log", "lightning_logs", "boring_model_latest.pth",
            "model_epoch_000_step_00006.pth", "model_epoch_001_step_00012.pth"} <= files
    assert not [f for f in files if f.endswith(".tmp")]

    records = _status(run_dir)
    assert [r["status"] for r in records][0] == "STARTED" and records[0]["message"] == "Starting Boring train."
    assert records[-1]["status"] == "SUCCESS" and records[-1]["message"] == "Train finished successfully."
    for r in records:
        assert re.fullmatch(r"\d{1,2}/\d{1,2}/\d{4}", r["date"]) and re.fullmatch(r"\d{1,2}:\d{1,2}:\d{1,2}", r["time"])
        assert r["verbosity"] == "INFO"
        if "kpi" in r:
            assert {"epoch", "step"} <= set(r)  # every KPI record says when
    messages = [r["message"] for r in records]
    assert f"Starting from scratch (no checkpoint in {run_dir})" in messages
    assert "Starting Training Loop." in messages and "Training loop complete." in messages
    evals = [r for r in records if r["message"] == "Eval metrics generated."]
    assert [(r["epoch"], r["step"]) for r in evals] == [(0, 6), (1, 12)] and "val_loss" in evals[0]["kpi"]
    progress = [r for r in records if r["message"] == "Training loop in progress"]
    assert [(r["epoch"], r["step"], r["max_epoch"], r["max_step"]) for r in progress] == [(0, 6, 1, 12), (1, 12, 1, 12)]
    assert all("kpi" not in r for r in progress)  # KPI is not sticky
    assert re.fullmatch(r"\d+:\d{2}:\d{2}(\.\d+)?", progress[0]["eta"])
    trains = [r for r in records if r["message"] == "Train metrics generated."]
    assert len(trains) == 2 and set(trains[0]["kpi"]) == {"train_loss"}

    docs = list(yaml.safe_load_all((run_dir / "experiment.yaml").read_text()))
    assert docs[0]["train"]["num_epochs"] == 2 and docs[0]["train"]["results_dir"] == str(run_dir)
    assert docs[1]["_run"]["argv"] == argv
    assert {"tao_cli", "torch", "lightning", "hydra", "python"} <= set(docs[1]["_run"]["versions"])
    log = (run_dir / "train.log").read_text()
    assert "Saved checkpoint" in log and "Train finished successfully" in log

    ckpt = load_checkpoint(run_dir / "boring_model_latest.pth", expected_network="boring")
    assert ckpt["tao_model"] == "boring" and ckpt["epoch"] == 1 and ckpt["global_step"] == 12
    assert "rng" in ckpt["callbacks"]["TaoCheckpoint"]


def test_resume_with_more_epochs_equals_uninterrupted_run(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert run("train", {**FAST, "results_dir": full, "train.num_epochs": 4}) == 0
    assert run("train", {**FAST, "results_dir": split, "train.num_epochs": 2}) == 0
    assert run("train", {**FAST, "results_dir": split, "train.num_epochs": 4}) == 0
    records = _status(split / "train")
    resumed = [r["message"] for r in records if r["message"].startswith("Resuming training from checkpoint:")]
    assert resumed == [f"Resuming training from checkpoint: {split / 'train' / 'model_epoch_001_step_00012.pth'}"]
    a = load_checkpoint(full / "train" / "model_epoch_003_step_00024.pth")
    b = load_checkpoint(split / "train" / "model_epoch_003_step_00024.pth")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                      strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # A finished run re-run with the same epochs resumes and stops at once, still ending in SUCCESS.
    assert run("train", {**FAST, "results_dir": split, "train.num_epochs": 4}) == 0
    assert _status(split / "train")[-1]["status"] == "SUCCESS"


def test_step_unit_names_files_by_step(tmp_path):
    overrides = {**FAST, "results_dir": tmp_path, "train.num_epochs": 2, "train.checkpoint_interval": 4,
                 "train.checkpoint_interval_unit": "step"}
    assert run("train", overrides) == 0
    names = sorted(p.name for p in (tmp_path / "train").glob("model_*.pth"))
    # every 4 global steps, plus the final state of the last epoch
    assert names == ["model_epoch_000_step_00004.pth", "model_epoch_001_step_00008.pth",
                     "model_epoch_001_step_00012.pth"]


def test_explicit_resume_path_wins(tmp_path):
    assert run("train", {**FAST, "results_dir": tmp_path / "a", "train.num_epochs": 1}) == 0
    src = tmp_path / "a" / "train" / "model_epoch_000_step_00006.pth"
    assert run("train", {**FAST, "results_dir": tmp_path / "b", "train.num_epochs": 2,
                         "train.resume_training_checkpoint_path": src}) == 0
    messages = [r["message"] for r in _status(tmp_path / "b" / "train")]
    assert f"Resuming training from checkpoint: {src}" in messages
    assert (tmp_path / "b" / "train" / "model_epoch_001_step_00012.pth").exists()


def test_dry_run_writes_nothing(tmp_path, capsys):
    before = _tree(tmp_path)
    overrides = {**FAST, "results_dir": tmp_path / "out", "encryption_key": "hunter2", "train.num_gpus": 2}
    assert run("train", overrides, dry_run=True) == 0
    assert _tree(tmp_path) == before
    out = capsys.readouterr().out
    assert "hunter2" not in out
    assert f"results dir:  {tmp_path / 'out' / 'train'}" in out
    assert "devices:      accelerator=cpu, devices=2 CPU process(es)" in out
    assert "strategy:     ddp (gloo)" in out and "precision:    32-true" in out
    assert "resume from:  none" in out and "model_epoch_<EEE>_step_<SSSSS>.pth" in out


def test_missing_results_dir_names_both_keys(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("train", {**FAST, "results_dir": ""}) == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR: results_dir:") and "train.results_dir" in err
    assert _tree(tmp_path) == []


def test_missing_value_results_dir_is_unset(tmp_path, capsys):
    assert run("evaluate", {**FAST, "results_dir": "???", "evaluate.checkpoint": "???"}) == 2
    assert "ERROR: results_dir: neither results_dir nor evaluate.results_dir is set" in capsys.readouterr().err
    assert run("evaluate", {**FAST, "results_dir": tmp_path, "evaluate.checkpoint": "???"}) == 2
    assert "ERROR: evaluate.checkpoint: is not set" in capsys.readouterr().err


def test_action_results_dir_wins(tmp_path):
    assert run("train", {**FAST, "results_dir": tmp_path / "g", "train.results_dir": tmp_path / "own",
                         "train.num_epochs": 1}) == 0
    assert (tmp_path / "own" / "status.json").exists() and not (tmp_path / "g").exists()


def test_missing_input_path_is_data_error_before_writing(tmp_path, capsys):
    missing = tmp_path / "x" / "a.json"
    assert run("train", {**FAST, "results_dir": tmp_path / "r", "dataset.train_ann_path": missing}) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ERROR: dataset.train_ann_path: {missing} does not exist (hint: set dataset.train_ann_path=")
    assert "\n" not in err
    assert not (tmp_path / "r").exists()


def test_evaluate_and_inference(tmp_path):
    assert run("train", {**FAST, "results_dir": tmp_path, "train.num_epochs": 1}) == 0
    ckpt = tmp_path / "train" / "boring_model_latest.pth"
    assert run("evaluate", {**FAST, "results_dir": tmp_path, "evaluate.checkpoint": ckpt}) == 0
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == {"test_loss"} and metrics["test_loss"] > 0
    records = _status(tmp_path / "evaluate")
    assert [r["status"] for r in records] == ["STARTED", "RUNNING", "RUNNING", "SUCCESS"]
    assert records[1]["message"] == f"Loading checkpoint: {ckpt.resolve()}"
    assert records[2]["kpi"] == metrics and (records[2]["epoch"], records[2]["step"]) == (0, 6)

    assert run("inference", {**FAST, "results_dir": tmp_path, "inference.checkpoint": ckpt}) == 0
    preds = json.loads((tmp_path / "inference" / "predictions.json").read_text())
    assert len(preds) == 8
    last = _status(tmp_path / "inference")[-1]
    assert last["status"] == "SUCCESS" and last["outputs"]["count"] == 8


def test_evaluate_refuses_other_network_and_missing_checkpoint(tmp_path, capsys):
    other = save_checkpoint_file({"state_dict": {}}, tmp_path / "m.pth", network="mal")
    assert run("evaluate", {**FAST, "results_dir": tmp_path, "evaluate.checkpoint": other}) == 2
    assert "is a 'mal' checkpoint, not 'boring'" in capsys.readouterr().err
    records = _status(tmp_path / "evaluate")
    assert records[-1]["status"] == "FAILURE" and "'mal' checkpoint" in records[-1]["message"]
    assert run("evaluate", {**FAST, "results_dir": tmp_path / "n", "evaluate.checkpoint": tmp_path / "no.pth"}) == 2
    assert "evaluate.checkpoint:" in capsys.readouterr().err and not (tmp_path / "n").exists()


def test_encrypted_run_end_to_end(tmp_path, capsys):
    key = "hunter2-secret"
    base = {**FAST, "results_dir": tmp_path}
    assert run("train", {**base, "encryption_key": key, "train.num_epochs": 1},
               argv=["train", f"encryption_key={key}"]) == 0
    run_dir = tmp_path / "train"
    for p in run_dir.glob("model_*.pth"):
        assert p.read_bytes()[:6] == b"TAOENC"
    for name in ("experiment.yaml", "status.json", "train.log"):
        assert key not in (run_dir / name).read_text(), name
    assert key not in capsys.readouterr().out
    # resume with the key works; evaluation without it is a clear user error
    assert run("train", {**base, "encryption_key": key, "train.num_epochs": 2}) == 0
    ckpt = run_dir / "boring_model_latest.pth"
    assert run("evaluate", {**base, "evaluate.checkpoint": ckpt}) == 2
    assert "is encrypted but no encryption_key was given" in capsys.readouterr().err
    assert run("evaluate", {**base, "evaluate.checkpoint": ckpt, "encryption_key": "not-the-key"}) == 2
    assert "wrong encryption_key or the file was modified" in capsys.readouterr().err
    assert run("evaluate", {**base, "evaluate.checkpoint": ckpt, "encryption_key": key}) == 0


def test_internal_failure_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    def boom(cfg, ctx):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(boring_net, "NETWORK", dataclasses.replace(boring_net.NETWORK, build_module=boom))
    assert run("train", {**FAST, "results_dir": tmp_path}) == 1
    err = capsys.readouterr().err
    assert err == "ERROR: RuntimeError: boom\n(run with --debug for the full traceback)\n"
    last = _status(tmp_path / "train")[-1]
    assert last["status"] == "FAILURE" and last["message"] == "RuntimeError: boom"
    assert "Traceback" in (tmp_path / "train" / "train.log").read_text()
    assert run("train", {**FAST, "results_dir": tmp_path}, debug=True) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_user_error_inside_the_network_is_exit_2(tmp_path, capsys):
    assert run("train", {**FAST, "results_dir": tmp_path, "dataset.batch_size": 64}) == 2
    assert capsys.readouterr().err.startswith("ERROR: dataset.batch_size: 64 exceeds dataset.num_samples")


def test_precision_mapping():
    cfg = make_cfg({"train.precision": "fp16"})
    assert decide_precision(cfg, "train", "gpu") == "16-mixed"
    assert decide_precision(cfg, "train", "cpu") == "bf16-mixed"
    assert decide_precision(make_cfg({"train.precision": "bf16"}), "train", "gpu") == "bf16-mixed"
    assert decide_precision(make_cfg(), "train", "cpu") == "32-true"
    assert decide_precision(make_cfg(), "evaluate", "cpu") == "32-true"


def test_non_lightning_action_without_network_support_is_user_error(tmp_path, capsys):
    cfg = make_cfg({**FAST, "results_dir": tmp_path})
    assert run_action(boring_net.NETWORK, "export", cfg, argv=["export"]) == 2
    assert "has no action 'export'" in capsys.readouterr().err
    assert _status(tmp_path / "export")[-1]["status"] == "FAILURE"


def test_partial_checkpoint_from_a_killed_run_is_removed(tmp_path):
    run_dir = tmp_path / "train"
    run_dir.mkdir()
    stale = run_dir / ".model_epoch_001_step_00006.pth.abc123.tmp"
    stale.write_bytes(b"half")
    assert run("train", {**FAST, "results_dir": tmp_path, "train.num_epochs": 1}) == 0
    assert not stale.exists()
    assert "Removing partial checkpoint" in (run_dir / "train.log").read_text()


def test_keyboard_interrupt_in_training_saves_and_exits_130(tmp_path, monkeypatch, capsys):
    from boring_net.module import BoringModule

    original = BoringModule.training_step

    def step(self, batch, batch_idx):
        if self.trainer.global_step == 8:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(BoringModule, "training_step", step)
    assert run("train", {**FAST, "results_dir": tmp_path, "train.num_epochs": 3}) == 130
    last = _status(tmp_path / "train")[-1]
    saved = tmp_path / "train" / "model_epoch_001_step_00008.pth"
    assert last["status"] == "INTERRUPTED" and last["message"].endswith(f"checkpoint saved: {saved}")
    assert (tmp_path / "train" / "boring_model_latest.pth").resolve() == saved
    assert "Interrupted (SIGINT)" in capsys.readouterr().err


def test_keyboard_interrupt_in_evaluate_exits_130(tmp_path, monkeypatch):
    from boring_net.module import BoringModule

    assert run("train", {**FAST, "results_dir": tmp_path, "train.num_epochs": 1}) == 0

    def stop(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(BoringModule, "test_step", stop)
    ckpt = tmp_path / "train" / "boring_model_latest.pth"
    assert run("evaluate", {**FAST, "results_dir": tmp_path, "evaluate.checkpoint": ckpt}) == 130
    assert _status(tmp_path / "evaluate")[-1]["status"] == "INTERRUPTED"
    assert not (tmp_path / "evaluate" / "metrics.json").exists()
