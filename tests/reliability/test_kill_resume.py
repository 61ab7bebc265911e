"""Exact resume: a training run SIGKILLed at three seeded points after its first checkpoint, and rerun each
time, ends with the same weights and optimizer state as an unbroken run (max |Δ| ≤ 1e-7 on CPU fp32), with 0
and with 2 DataLoader workers, for every network.

Every run is a separate ``tao`` process (``kill_after_steps.py``); the rerun is the same command, which resumes
from the latest checkpoint in the results dir.  The chain (kill, rerun, kill, rerun, kill, rerun to the end)
exercises three resumes in one go.
"""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from networks.common.synthetic import generate
from tao_cli.engine.checkpoints import load_checkpoint
from tao_cli.paths import configs_dir

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

KILLER = Path(__file__).with_name("kill_after_steps.py")
REPO = Path(__file__).resolve().parents[2]
TOL = 1e-7


def _mal(data: dict) -> tuple[str, list[str]]:
    tr, va = data["train"], data["val"]
    return "mal_model", [
        "model", "mal", "train", "-e", str(configs_dir() / "mal" / "demo.yaml"),
        f"dataset.train_ann_path={tr['annotations']}", f"dataset.train_img_dir={tr['images']}",
        f"dataset.val_ann_path={va['annotations']}", f"dataset.val_img_dir={va['images']}",
        "train.num_epochs=4", "train.batch_size=4", "train.checkpoint_interval=1", "train.validation_interval=2",
        "train.loss_mil_step=2", "train.loss_crf_step=4", "train.crf_num_iter=2"]


def _workers_mal(n: int) -> list[str]:
    return [f"dataset.num_workers_per_gpu={n}"]


def _mask2former(data: dict) -> tuple[str, list[str]]:
    tr, va = data["train"], data["val"]
    return "mask2former_model", [
        "model", "mask2former", "train", "-e", str(configs_dir() / "mask2former" / "tiny.yaml"),
        f"dataset.label_map={tr['label_map']}", f"dataset.train.img_dir={tr['images']}",
        f"dataset.train.panoptic_json={tr['panoptic_json']}", f"dataset.train.panoptic_dir={tr['panoptic_archive']}",
        f"dataset.val.img_dir={va['images']}", f"dataset.val.panoptic_json={va['panoptic_json']}",
        f"dataset.val.panoptic_dir={va['panoptic_archive']}", "train.num_epochs=4", "train.checkpoint_interval=1",
        "train.validation_interval=2", "model.mask_former.train_num_points=256"]


def _workers_mask2former(n: int) -> list[str]:
    return [f"dataset.train.num_workers={n}", f"dataset.val.num_workers={n}"]


def _grounding_dino(data: dict) -> tuple[str, list[str]]:
    tr, va = data["train"]["dir"], data["val"]["dir"]
    return "mask_gdino_model", [
        "model", "mask_grounding_dino", "train", "-e", str(configs_dir() / "mask_grounding_dino" / "tiny.yaml"),
        f"dataset.train_data_sources=[{{image_dir: {tr / 'images'}, json_file: {tr / 'annotations_odvg.jsonl'}, "
        f"label_map: {tr / 'annotations_odvg_labelmap.json'}}}]",
        f"dataset.val_data_sources={{image_dir: {va / 'images'}, json_file: {va / 'annotations.json'}}}",
        "dataset.batch_size=2", "train.num_epochs=4", "train.checkpoint_interval=1", "train.validation_interval=2"]


def _workers_grounding_dino(n: int) -> list[str]:
    return [f"dataset.workers={n}"]


NETWORKS = {"mal": (_mal, _workers_mal), "mask2former": (_mask2former, _workers_mask2former),
            "mask_grounding_dino": (_grounding_dino, _workers_grounding_dino)}


def _run(argv: list[str], results: Path, workers: list[str], kill_after: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PL_", "LOCAL_RANK", "RANK"))}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(KILLER), str(kill_after), *argv, f"results_dir={results}", *workers]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def _latest_step(train_dir: Path) -> int:
    steps = [int(m.group(1)) for p in train_dir.glob("model_epoch_*_step_*.pth")
             if (m := re.search(r"_step_(\d+)\.pth$", p.name))]
    return max(steps, default=0)


def _tensors(obj, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _max_diff(a: dict, b: dict) -> float:
    ta, tb = dict(_tensors(a)), dict(_tensors(b))
    assert ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))[:5]
    worst = 0.0
    for k, x in ta.items():
        y = tb[k]
        assert x.shape == y.shape and x.dtype == y.dtype, k
        if x.numel():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("net", sorted(NETWORKS))
def test_killed_three_times_and_rerun_equals_unbroken(tmp_path, net, workers):
    build, worker_args = NETWORKS[net]
    data = generate(tmp_path / "data", seed=3, num_train=4, num_val=2, image_size=64)
    ckpt_name, argv = build(data)
    extra = worker_args(workers)
    whole = tmp_path / "whole"
    done = _run(argv, whole, extra, 0)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = _latest_step(whole / "train")
    first = min(int(re.search(r"_step_(\d+)", p.name).group(1)) for p in (whole / "train").glob("model_epoch_*"))
    points = sorted(random.Random(f"{net}-{workers}").sample(range(first + 1, steps), 3))
    broken = tmp_path / "broken"
    for point in points:
        start = _latest_step(broken / "train")
        killed = _run(argv, broken, extra, point - start)
        assert killed.returncode == -9, (point, start, killed.stderr[-3000:])
    final = _run(argv, broken, extra, 0)
    assert final.returncode == 0, final.stderr[-3000:]
    a = load_checkpoint(whole / "train" / f"{ckpt_name}_latest.pth")
    b = load_checkpoint(broken / "train" / f"{ckpt_name}_latest.pth")
    assert a["global_step"] == b["global_step"] == steps
    weights = _max_diff(a["state_dict"], b["state_dict"])
    optim = _max_diff(a["optimizer_states"], b["optimizer_states"])
    print(f"{net} workers={workers} kill points {points}: max|Δ| weights {weights:.3g}, optimizer {optim:.3g}")
    assert weights <= TOL and optim <= TOL, (points, weights, optim)
