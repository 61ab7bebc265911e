"""MAL acceptance 1: the TAO example spec from the issue runs unchanged apart from paths.

* with the paths pointing at the synthetic set and ``train.num_epochs=1 model.arch=vit-deit-tiny/16
  dataset.crop_size=128``: train, evaluate and inference run to completion through the real CLI;
* with only its paths changed (vit-mae-base/16, crop 512 as written) ``--dry-run`` exits 0 and writes nothing;
* with a path that does not exist, ``--dry-run`` reports it in one line (exit 2).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from networks.common.coco_io import ann_to_mask
from networks.common.synthetic import generate
from tao_cli.paths import configs_dir

SPEC = configs_dir() / "mal" / "spec_example.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mal_tao_spec")
    generate(root / "synthetic", seed=3, num_train=12, num_val=6, image_size=128)
    return root


def _paths(data: Path, results: Path) -> list[str]:
    syn = data / "synthetic"
    return [f"results_dir={results}",
            f"dataset.train_ann_path={syn / 'train' / 'annotations.json'}",
            f"dataset.train_img_dir={syn / 'train' / 'images.tar.gz'}",
            f"dataset.val_ann_path={syn / 'val' / 'annotations.json'}",
            f"dataset.val_img_dir={syn / 'val' / 'images'}",
            f"inference.ann_path={syn / 'val' / 'annotations.json'}",
            f"inference.img_dir={syn / 'val' / 'images'}"]


def _tao(monkeypatch, capfd, *argv: str) -> tuple[int, str, str]:
    from tao_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["tao", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capfd.readouterr()
    return int(exc.value.code or 0), out, err


def test_example_spec_dry_run_as_written(data, tmp_path, monkeypatch, capfd):
    results = tmp_path / "results"
    code, out, err = _tao(monkeypatch, capfd, "model", "mal", "train", "-e", str(SPEC), "--dry-run",
                          *_paths(data, results))
    assert code == 0, err
    assert "vit-mae-base/16" in out and "crop_size: 512" in out
    assert not results.exists()


def test_example_spec_dry_run_reports_missing_path(data, tmp_path, monkeypatch, capfd):
    code, _, err = _tao(monkeypatch, capfd, "model", "mal", "train", "-e", str(SPEC), "--dry-run",
                        *_paths(data, tmp_path / "r"), "dataset.train_ann_path=/nonexistent/a.json")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1
    assert "dataset.train_ann_path" in lines[0] and "/nonexistent/a.json" in lines[0]


@pytest.mark.slow
def test_example_spec_train_evaluate_inference(data, tmp_path, monkeypatch, capfd):
    results = tmp_path / "results"
    # TAO's rule: the spec's intervals (5) may not exceed num_epochs, so a 1-epoch run lowers them too
    small = ["train.num_epochs=1", "train.checkpoint_interval=1", "train.validation_interval=1",
             "model.arch=vit-deit-tiny/16", "dataset.crop_size=128",
             "dataset.min_obj_size=256", "dataset.num_workers_per_gpu=0"]
    code, _, err = _tao(monkeypatch, capfd, "model", "mal", "train", "-e", str(SPEC), *_paths(data, results),
                        *small)
    assert code == 0, err
    ckpt = results / "train" / "mal_model_latest.pth"
    assert ckpt.exists()
    code, _, err = _tao(monkeypatch, capfd, "model", "mal", "evaluate", "-e", str(SPEC), *_paths(data, results),
                        *small, f"evaluate.checkpoint={ckpt}")
    assert code == 0, err
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    assert "AP50" in metrics
    code, _, err = _tao(monkeypatch, capfd, "model", "mal", "inference", "-e", str(SPEC), *_paths(data, results),
                        *small, f"inference.checkpoint={ckpt}")
    assert code == 0, err
    out = json.loads((results / "inference" / "out.json").read_text())
    src = json.loads((data / "synthetic" / "val" / "annotations.json").read_text())
    assert [a["id"] for a in out["annotations"]] == [a["id"] for a in src["annotations"]]
    assert all("segmentation" in a and "score" in a for a in out["annotations"])
    # evaluate's mIoU recomputed from inference's own masks (same checkpoint, both the student without TTA):
    # IoU of each annotation's mask with its ground truth, averaged per category, then over categories (TAO)
    gt = {a["id"]: a for a in src["annotations"]}
    hw = {im["id"]: (im["height"], im["width"]) for im in src["images"]}
    per_category = defaultdict(list)
    for a in out["annotations"]:
        h, w = hw[a["image_id"]]
        pred = ann_to_mask(a["segmentation"], h, w).astype(bool)
        true = ann_to_mask(gt[a["id"]]["segmentation"], h, w).astype(bool)
        per_category[a["category_id"]].append((pred & true).sum() / (pred | true).sum())
    expected = float(np.mean([np.mean(v) for v in per_category.values()]))
    assert metrics["mIoU"] == pytest.approx(expected, abs=1e-6)
    assert any((results / "inference" / "overlays").glob("*.png"))
