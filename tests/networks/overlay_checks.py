"""Shared checks for evaluate's ground truth | prediction pictures (every network writes them the same way)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def run_test(module, datamodule, run_dir: Path, **trainer_kwargs) -> list[Path]:
    """``trainer.test`` on CPU without loggers or checkpoints; returns the sorted ``run_dir/overlays/*.png``."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir,
                         **trainer_kwargs)
    trainer.test(module, datamodule=datamodule, verbose=False)
    return sorted((Path(run_dir) / "overlays").glob("*.png"))


def side_by_side(png: Path, images_dir: Path) -> tuple[np.ndarray, int]:
    """The picture as RGB ``[H, W, 3]`` and the source image's width, after checking the layout: two panels at
    the source image's size side by side, under a title strip."""
    (src,) = Path(images_dir).glob(png.stem + ".*")
    w0, h0 = Image.open(src).size
    pic = np.asarray(Image.open(png).convert("RGB"))
    assert 2 * w0 <= pic.shape[1] <= 2 * w0 + max(4, w0 // 20)
    assert h0 < pic.shape[0] <= 1.3 * h0
    return pic, w0
