"""Acceptance: the tiny Mask Grounding DINO learns the synthetic shapes from text prompts on this CPU.

16 synthetic images (circle/square/triangle, prompts "circle . square . triangle ." with their ODVG labels),
trained for at most 6 minutes (Lightning ``max_time``) and evaluated on the same 16 images with the COCO file:
bbox mAP50 ≥ 0.1 and segm mAP50 ≥ 0.05, each at least 5× the untrained model's.  One intra-op thread: on a
shared 2-core machine the thread pool's hand-offs cost more than the tiny model's arithmetic.
"""
from __future__ import annotations

import logging
import time

import pytest
import torch

from networks.common.context import RunContext
from networks.mask_grounding_dino.data import MaskGDinoDataModule
from networks.mask_grounding_dino.module import MaskGDinoModule

from .conftest import make_tiny_cfg

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover
    import lightning.pytorch as pl  # type: ignore

TRAIN_MINUTES = 6
MAX_EPOCHS = 150


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def test_tiny_model_learns_shapes(tmp_path, one_thread):
    from networks.common.synthetic import generate

    data = generate(tmp_path / "data", seed=0, num_train=16, num_val=0, image_size=128)
    cfg = make_tiny_cfg({"train": data["train"], "val": data["train"]}, val_split="val")
    pl.seed_everything(int(cfg.train.seed), workers=True)
    ctx = RunContext("train", tmp_path / "run", log=logging.getLogger("test"))
    module = MaskGDinoModule(cfg, ctx)
    dm = MaskGDinoDataModule(cfg, ctx)

    _trainer().test(module, datamodule=dm, verbose=False)
    before = dict(module.kpi)

    module.train()  # Lightning keeps the eval mode that test() left behind
    start = time.monotonic()
    fit = _trainer(max_epochs=MAX_EPOCHS, max_time={"minutes": TRAIN_MINUTES},
                   gradient_clip_val=cfg.train.clip_grad_norm, check_val_every_n_epoch=MAX_EPOCHS + 1,
                   num_sanity_val_steps=0)
    fit.fit(module, datamodule=dm)
    train_s = time.monotonic() - start
    _trainer().test(module, datamodule=dm, verbose=False)
    after = dict(module.kpi)
    report = f"untrained {before}, trained {after} after {train_s:.0f} s, {fit.current_epoch} epochs"
    print(report)
    assert train_s <= TRAIN_MINUTES * 60 + 30, report
    assert after["bbox_val_mAP50"] >= max(0.1, 5 * before["bbox_val_mAP50"]), report
    assert after["segm_val_mAP50"] >= max(0.05, 5 * before["segm_val_mAP50"]), report
