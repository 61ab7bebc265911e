"""Evaluate writes ground truth | prediction mask pictures of the first ``evaluate.num_overlays`` images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

REPO = Path(__file__).resolve().parents[3]


def test_evaluate_writes_side_by_side_overlays(tmp_path, monkeypatch):
    import pytorch_lightning as pl

    import networks.mal as mal
    from networks.common.context import RunContext
    from networks.common.synthetic import generate

    monkeypatch.setenv("TAO_CACHE_DIR", str(tmp_path / "cache"))
    paths = generate(tmp_path / "data", seed=0, num_train=1, num_val=3, image_size=64)
    cfg = OmegaConf.merge(OmegaConf.structured(mal.ExperimentConfig), OmegaConf.load(REPO / "configs/mal/tiny.yaml"))
    cfg.dataset.train_ann_path = cfg.dataset.val_ann_path = str(paths["val"]["annotations"])
    cfg.dataset.train_img_dir = cfg.dataset.val_img_dir = str(paths["val"]["images"])
    cfg.dataset.load_mask = True
    cfg.evaluate.num_overlays = 2
    run_dir = tmp_path / "evaluate"
    run_dir.mkdir()
    ctx = RunContext(action="evaluate", run_dir=run_dir)
    module = mal.build_module(cfg, ctx)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.test(module, datamodule=mal.build_datamodule(cfg, ctx), verbose=False)
    coco = json.loads(Path(paths["val"]["annotations"]).read_text())
    with_boxes = [im for im in coco["images"] if any(a["image_id"] == im["id"] for a in coco["annotations"])]
    expected = [Path(im["file_name"]).stem + ".png" for im in with_boxes[:2]]
    pngs = sorted((run_dir / "overlays").glob("*.png"))
    assert [p.name for p in pngs] == sorted(expected)
    for p in pngs:
        w0, h0 = Image.open(paths["val"]["images"] / next(im["file_name"] for im in with_boxes
                                                         if Path(im["file_name"]).stem == p.stem)).size
        pic = np.asarray(Image.open(p).convert("RGB"))
        assert 2 * w0 <= pic.shape[1] <= 2 * w0 + max(4, w0 // 20)
        assert h0 < pic.shape[0] <= 1.35 * h0
        left, right = pic[:, :w0], pic[:, pic.shape[1] - w0:]
        assert not np.array_equal(left, right)  # ground-truth masks vs (untrained) predicted masks
    assert "mIoU" in module.kpi
