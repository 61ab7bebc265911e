"""Evaluate writes ground truth | prediction pictures of the first ``evaluate.num_overlays`` images (every mode)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from networks.common.context import RunContext
from networks.mask2former.data import Mask2FormerDataModule
from networks.mask2former.module import Mask2FormerModule

from .conftest import make_tiny_cfg


@pytest.mark.parametrize("mode", ["panoptic", "semantic", "instance"])
def test_evaluate_writes_side_by_side_overlays(mode, m2f_synthetic, tmp_path):
    import pytorch_lightning as pl

    cfg = make_tiny_cfg(m2f_synthetic, mode=mode)
    cfg.evaluate.num_overlays = 3  # of 4 validation images
    torch.manual_seed(0)
    module = Mask2FormerModule(cfg, RunContext(action="evaluate", run_dir=tmp_path))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.test(module, Mask2FormerDataModule(cfg, RunContext("evaluate", Path("."))), verbose=False)
    pngs = sorted((tmp_path / "overlays").glob("*.png"))
    assert [p.name for p in pngs] == ["000001.png", "000002.png", "000003.png"]
    for p in pngs:
        (src,) = m2f_synthetic["val"]["images"].glob(p.stem + ".*")
        w0, h0 = Image.open(src).size
        pic = np.asarray(Image.open(p).convert("RGB"))
        # Two panels at the original size side by side, under a title strip.
        assert 2 * w0 <= pic.shape[1] <= 2 * w0 + max(4, w0 // 20)
        assert h0 < pic.shape[0] <= 1.3 * h0
        # The ground-truth panel shows the label-map colours of the objects (filled tags / outlines).
        assert (pic[:, :w0] == (220, 50, 50)).all(-1).sum() + (pic[:, :w0] == (60, 180, 75)).all(-1).sum() \
            + (pic[:, :w0] == (70, 90, 230)).all(-1).sum() + (pic[:, :w0] == (135, 206, 235)).all(-1).sum() > 20
    assert module.kpi  # metrics are still computed


def test_zero_disables_and_no_run_dir_writes_nothing(m2f_synthetic, tmp_path):
    import pytorch_lightning as pl

    cfg = make_tiny_cfg(m2f_synthetic)
    cfg.evaluate.num_overlays = 0
    module = Mask2FormerModule(cfg, RunContext(action="evaluate", run_dir=tmp_path))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_test_batches=1)
    trainer.test(module, Mask2FormerDataModule(cfg, RunContext("evaluate", Path("."))), verbose=False)
    assert not (tmp_path / "overlays").exists()
