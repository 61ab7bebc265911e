"""Evaluate writes ground truth | prediction pictures (boxes, masks, phrases) of the first N images."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from networks.common.context import RunContext
from networks.common.visualize import palette
from networks.mask_grounding_dino.data import MaskGDinoDataModule
from networks.mask_grounding_dino.module import MaskGDinoModule

from ..overlay_checks import run_test, side_by_side
from .conftest import make_tiny_cfg


def test_evaluate_writes_side_by_side_overlays(mgd_synthetic, tmp_path):

    cfg = make_tiny_cfg(mgd_synthetic)
    cfg.evaluate.num_overlays = 8  # more than the 4 test images: one picture per image
    cfg.evaluate.conf_threshold = 0.0
    torch.manual_seed(0)
    module = MaskGDinoModule(cfg, RunContext("evaluate", tmp_path, log=logging.getLogger("test")))
    pngs = run_test(module, MaskGDinoDataModule(cfg, RunContext("evaluate", Path("."))), tmp_path)
    assert [p.name for p in pngs] == ["000001.png", "000002.png", "000003.png", "000004.png"]
    tags = np.asarray(palette(3))
    for p in pngs:
        pic, w0 = side_by_side(p, mgd_synthetic["val"]["images"])
        right = pic[:, pic.shape[1] - w0:]
        # conf_threshold 0: the top detections are drawn with their phrase tags in the prompt-slot colours.
        assert (right[:, :, None, :] == tags[None, None]).all(-1).any(-1).sum() > 30
    assert "bbox_val_mAP" in module.kpi
