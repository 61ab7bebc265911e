"""Evaluate writes ground truth | prediction pictures of the first ``evaluate.num_overlays`` images (every mode)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from networks.common.context import RunContext
from networks.mask2former.data import Mask2FormerDataModule
from networks.mask2former.module import Mask2FormerModule

from ..overlay_checks import run_test, side_by_side
from .conftest import make_tiny_cfg


@pytest.mark.parametrize("mode", ["panoptic", "semantic", "instance"])
def test_evaluate_writes_side_by_side_overlays(mode, m2f_synthetic, tmp_path):

    cfg = make_tiny_cfg(m2f_synthetic, mode=mode)
    cfg.evaluate.num_overlays = 3  # of 4 validation images
    torch.manual_seed(0)
    module = Mask2FormerModule(cfg, RunContext(action="evaluate", run_dir=tmp_path))
    pngs = run_test(module, Mask2FormerDataModule(cfg, RunContext("evaluate", Path("."))), tmp_path)
    assert [p.name for p in pngs] == ["000001.png", "000002.png", "000003.png"]
    for p in pngs:
        pic, w0 = side_by_side(p, m2f_synthetic["val"]["images"])
        # The ground-truth panel shows the label-map colours of the objects (filled tags / outlines).
        assert (pic[:, :w0] == (220, 50, 50)).all(-1).sum() + (pic[:, :w0] == (60, 180, 75)).all(-1).sum() \
            + (pic[:, :w0] == (70, 90, 230)).all(-1).sum() + (pic[:, :w0] == (135, 206, 235)).all(-1).sum() > 20
    assert module.kpi  # metrics are still computed


def test_zero_disables_and_no_run_dir_writes_nothing(m2f_synthetic, tmp_path):

    cfg = make_tiny_cfg(m2f_synthetic)
    cfg.evaluate.num_overlays = 0
    module = Mask2FormerModule(cfg, RunContext(action="evaluate", run_dir=tmp_path))
    run_test(module, Mask2FormerDataModule(cfg, RunContext("evaluate", Path("."))), tmp_path, limit_test_batches=1)
    assert not (tmp_path / "overlays").exists()
