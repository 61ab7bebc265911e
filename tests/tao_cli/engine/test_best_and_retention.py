"""Best checkpoint by the network's main KPI, checkpoint retention, and checkpoint errors that keep their cause.

The boring network's ``model.kpi_schedule`` sets a synthetic validation ``score`` per epoch (its main KPI, "max"),
so the best epoch is chosen by the test and is not the last one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import boring_net
import pytest
import torch
from boring_net.module import BoringModule
from omegaconf import OmegaConf

from tao_cli.engine.checkpoints import (
    checkpoint_filename,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint_file,
    update_latest_link,
)

from .helpers import run

FAST = {"dataset.num_samples": 32, "dataset.batch_size": 4}  # 24 train rows -> 6 steps per epoch


def _status(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "status.json").read_text().splitlines()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(path: Path, key: str | None = None) -> dict:
    return load_checkpoint(path, key=key, expected_network="boring")["state_dict"]


# ------------------------------------------------------------------------------------------ best checkpoint


def test_best_is_the_epoch_with_the_best_kpi_and_is_named_in_status(tmp_path):
    overrides = {**FAST, "results_dir": tmp_path, "train.num_epochs": 3, "model.kpi_schedule": "[0.1,0.9,0.3]"}
    assert run("train", overrides) == 0
    run_dir = tmp_path / "train"
    best = run_dir / "boring_model_best.pth"
    assert best.is_file()
    obj = load_checkpoint(best, expected_network="boring")
    assert (obj["epoch"], obj["global_step"]) == (1, 12)
    same_epoch = _weights(run_dir / checkpoint_filename(1, 12))
    last_epoch = _weights(run_dir / checkpoint_filename(2, 18))
    for name, value in obj["state_dict"].items():
        assert torch.equal(value, same_epoch[name]), name
    assert not all(torch.equal(v, last_epoch[k]) for k, v in obj["state_dict"].items())

    records = _status(run_dir)
    news = [r for r in records if r["message"] == "New best checkpoint"]
    assert [(r["epoch"], r["step"], r["best_checkpoint"]["value"]) for r in news] == [(0, 6, 0.1), (1, 12, 0.9)]
    expected = {"path": str(best), "kpi": "score", "value": 0.9, "mode": "max", "epoch": 1, "step": 12}
    assert news[-1]["best_checkpoint"] == expected
    assert records[-1]["status"] == "SUCCESS" and records[-1]["best_checkpoint"] == expected


def test_min_mode_kpi_without_a_schedule_uses_val_loss(tmp_path):
    assert boring_net.main_kpi(OmegaConf.create({"model": {"kpi_schedule": []}})) == ("val_loss", "min")
    assert run("train", {**FAST, "results_dir": tmp_path, "train.num_epochs": 2}) == 0
    records = _status(tmp_path / "train")
    evals = {r["epoch"]: r["kpi"]["val_loss"] for r in records if r["message"] == "Eval metrics generated."}
    best = records[-1]["best_checkpoint"]
    assert best["kpi"] == "val_loss" and best["value"] == pytest.approx(min(evals.values()))
    assert evals[best["epoch"]] == pytest.approx(best["value"])


def test_nan_kpi_never_becomes_best(tmp_path):
    overrides = {**FAST, "results_dir": tmp_path, "train.num_epochs": 3, "model.kpi_schedule": "[nan,0.2,0.1]"}
    assert run("train", overrides) == 0
    best = _status(tmp_path / "train")[-1]["best_checkpoint"]
    assert (best["epoch"], best["value"]) == (1, 0.2)
    assert load_checkpoint(tmp_path / "train" / "boring_model_best.pth")["epoch"] == 1


def test_best_survives_resume(tmp_path):
    schedule = {"model.kpi_schedule": "[0.1,0.9,0.3,0.5]"}
    assert run("train", {**FAST, **schedule, "results_dir": tmp_path, "train.num_epochs": 2}) == 0
    best = tmp_path / "train" / "boring_model_best.pth"
    digest = _sha(best)
    # The resumed epochs score 0.3 and 0.5: worse than epoch 1's 0.9, so the best file must not change.
    assert run("train", {**FAST, **schedule, "results_dir": tmp_path, "train.num_epochs": 4}) == 0
    records = _status(tmp_path / "train")
    assert [r["epoch"] for r in records if r["message"] == "New best checkpoint"] == [0, 1]
    assert records[-1]["best_checkpoint"]["epoch"] == 1 and records[-1]["best_checkpoint"]["value"] == 0.9
    assert _sha(best) == digest
    latest = load_checkpoint(tmp_path / "train" / "boring_model_latest.pth")
    assert latest["epoch"] == 3 and latest["callbacks"]["TaoCheckpoint"]["best"]["value"] == 0.9


def test_best_is_encrypted_like_the_others(tmp_path):
    key = "hunter2-secret"
    overrides = {**FAST, "results_dir": tmp_path, "train.num_epochs": 1, "encryption_key": key}
    assert run("train", overrides) == 0
    best = tmp_path / "train" / "boring_model_best.pth"
    assert best.read_bytes()[:6] == b"TAOENC"
    assert "weight" in "".join(_weights(best, key))


# ------------------------------------------------------------------------------------------ retention


def test_keep_checkpoints_keeps_newest_n_and_never_the_best(tmp_path):
    overrides = {**FAST, "results_dir": tmp_path, "train.num_epochs": 5, "train.keep_checkpoints": 2,
                 "model.kpi_schedule": "[0.9,0.1,0.2,0.3,0.4]"}
    assert run("train", overrides) == 0
    run_dir = tmp_path / "train"
    assert sorted(p.name for p in run_dir.glob("model_*.pth")) == [checkpoint_filename(3, 24),
                                                                   checkpoint_filename(4, 30)]
    assert (run_dir / "boring_model_latest.pth").resolve() == run_dir / checkpoint_filename(4, 30)
    assert load_checkpoint(run_dir / "boring_model_best.pth")["epoch"] == 0
    assert "Removed checkpoint model_epoch_000_step_00006.pth" in (run_dir / "train.log").read_text()


def test_default_keeps_every_checkpoint(tmp_path):
    assert run("train", {**FAST, "results_dir": tmp_path, "train.num_epochs": 3}) == 0
    assert len(list((tmp_path / "train").glob("model_*.pth"))) == 3


def test_prune_never_deletes_what_latest_or_best_point_at(tmp_path):
    paths = [save_checkpoint_file({"w": torch.zeros(1)}, tmp_path / checkpoint_filename(e, 10 * (e + 1)))
             for e in range(6)]
    update_latest_link(tmp_path, "m", paths[1])  # an old latest (e.g. after a resume from an old file)
    os.symlink(paths[0].name, tmp_path / "m_best.pth")
    removed = prune_checkpoints(tmp_path, 2, protect=("m_latest.pth", "m_best.pth"))
    assert sorted(p.name for p in removed) == [paths[2].name, paths[3].name]
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == [p.name for p in (paths[0], paths[1], paths[4],
                                                                                     paths[5])]
    assert prune_checkpoints(tmp_path, 0) == [] and len(list(tmp_path.glob("model_*.pth"))) == 4


def test_prune_orders_by_step_not_by_name_or_time(tmp_path):
    # epoch 9 at step 90 is older than epoch 10 at step 100 although "model_epoch_010" sorts after "..._009".
    a = save_checkpoint_file({}, tmp_path / checkpoint_filename(10, 100))
    b = save_checkpoint_file({}, tmp_path / checkpoint_filename(9, 90))
    os.utime(b, (a.stat().st_mtime + 100, a.stat().st_mtime + 100))  # the older step is the newer file
    assert prune_checkpoints(tmp_path, 1) == [b]


# ------------------------------------------------------------------------------------------ main KPI per network


@pytest.mark.parametrize("mode, key", [("panoptic", "PQ"), ("semantic", "mIoU"), ("instance", "AP")])
def test_mask2former_main_kpi_follows_the_mode(mode, key):
    import networks.mask2former as m2f

    cfg = OmegaConf.structured(m2f.ExperimentConfig)
    cfg.model.mode = mode
    assert m2f.main_kpi(cfg) == (key, "max")


def test_mal_and_mask_grounding_dino_main_kpi():
    import networks.mal as mal
    import networks.mask_grounding_dino as gdino

    assert mal.main_kpi(OmegaConf.structured(mal.ExperimentConfig)) == ("mIoU", "max")
    assert gdino.main_kpi(OmegaConf.structured(gdino.ExperimentConfig)) == ("segm_val_mAP", "max")
    assert (mal.CHECKPOINT_NAME, gdino.CHECKPOINT_NAME) == ("mal_model", "mask_gdino_model")


# ------------------------------------------------------------------------------------------ load errors


def _boring_checkpoint(path: Path, num_features: int = 8) -> Path:
    return save_checkpoint_file({"epoch": 0, "global_step": 6,
                                 "state_dict": BoringModule(num_features=num_features).state_dict()},
                                path, network="boring")


def test_truncated_checkpoint_is_one_line_user_error(tmp_path, capsys):
    ckpt = _boring_checkpoint(tmp_path / "whole.pth")
    for i, size in enumerate((0, 100, len(ckpt.read_bytes()) // 2, len(ckpt.read_bytes()) - 20)):
        cut = tmp_path / f"cut{i}.pth"
        cut.write_bytes(ckpt.read_bytes()[:size])
        assert run("evaluate", {**FAST, "results_dir": tmp_path / f"r{i}", "evaluate.checkpoint": cut}) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "truncated or corrupt" in err[0] and str(cut) in err[0], (size, err)
        assert "arbitrary code" not in err[0]
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(200))  # no zip header: torch reads it as a (broken) legacy pickle
    assert run("evaluate", {**FAST, "results_dir": tmp_path / "j", "evaluate.checkpoint": junk}) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_size_mismatch_names_keys_and_both_shapes(tmp_path, capsys):
    ckpt = _boring_checkpoint(tmp_path / "four.pth", num_features=4)
    assert run("evaluate", {**FAST, "results_dir": tmp_path, "evaluate.checkpoint": ckpt}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "net.1.weight: (1, 4) in the checkpoint vs (1, 8) in the model" in err[0]
    assert "does not match the model" in err[0]


def test_missing_and_unexpected_keys_are_listed(tmp_path, capsys):
    state = BoringModule().state_dict()
    state["extra.weight"] = state.pop("net.1.bias")
    ckpt = save_checkpoint_file({"state_dict": state}, tmp_path / "keys.pth", network="boring")
    assert run("evaluate", {**FAST, "results_dir": tmp_path, "evaluate.checkpoint": ckpt}) == 2
    err = capsys.readouterr().err
    assert "1 missing key(s) e.g. ['net.1.bias']" in err and "1 unexpected key(s) e.g. ['extra.weight']" in err
