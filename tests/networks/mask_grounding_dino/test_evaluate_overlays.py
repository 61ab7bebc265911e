"""Evaluate writes ground truth | prediction pictures (boxes, masks, phrases) of the first N images."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from networks.common.context import RunContext
from networks.common.visualize import palette
from networks.mask_grounding_dino.data import MaskGDinoDataModule
from networks.mask_grounding_dino.module import MaskGDinoModule

from .conftest import make_tiny_cfg


def test_evaluate_writes_side_by_side_overlays(mgd_synthetic, tmp_path):
    import pytorch_lightning as pl

    cfg = make_tiny_cfg(mgd_synthetic)
    cfg.evaluate.num_overlays = 8  # more than the 4 test images: one picture per image
    cfg.evaluate.conf_threshold = 0.0
    torch.manual_seed(0)
    module = MaskGDinoModule(cfg, RunContext("evaluate", tmp_path, log=logging.getLogger("test")))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.test(module, datamodule=MaskGDinoDataModule(cfg, RunContext("evaluate", Path("."))), verbose=False)
    pngs = sorted((tmp_path / "overlays").glob("*.png"))
    assert [p.name for p in pngs] == ["000001.png", "000002.png", "000003.png", "000004.png"]
    tags = np.asarray(palette(3))
    for p in pngs:
        (src,) = mgd_synthetic["val"]["images"].glob(p.stem + ".*")
        w0, h0 = Image.open(src).size
        pic = np.asarray(Image.open(p).convert("RGB"))
        assert 2 * w0 <= pic.shape[1] <= 2 * w0 + max(4, w0 // 20)
        assert h0 < pic.shape[0] <= 1.3 * h0
        right = pic[:, pic.shape[1] - w0:]
        # conf_threshold 0: the top detections are drawn with their phrase tags in the prompt-slot colours.
        assert (right[:, :, None, :] == tags[None, None]).all(-1).any(-1).sum() > 30
    assert "bbox_val_mAP" in module.kpi
