"""MAL learning curve: train the demo model (configs/mal/demo.yaml settings) on the synthetic set for
``LEARN_MINUTES`` (default 30) and record val mIoU after every epoch next to the box-fill baseline.

Writes ``benchmarks/results/learn_mal.json`` (per-epoch mIoU, AP, steps, seconds) and ``learn_mal.png``.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from networks.common.context import RunContext
from networks.common.io import atomic_write_json
from networks.common.synthetic import generate
from tao_cli.paths import configs_dir

RESULTS = Path(__file__).resolve().parent / "results"


class _Curve(pl.Callback):
    def __init__(self):
        self.rows: list[dict] = []
        self.start = time.time()

    def on_validation_epoch_end(self, trainer, module):
        if trainer.sanity_checking or not module.kpi:
            return
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step,
               "seconds": round(time.time() - self.start, 1), "mIoU": module.kpi.get("mIoU"),
               "AP": module.kpi.get("AP"), "AP50": module.kpi.get("AP50")}
        self.rows.append(row)
        print(json.dumps(row), flush=True)


def _plot(rows: list[dict], baseline: float, path: Path) -> None:
    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    if rows:
        t_max = max(r["seconds"] for r in rows) or 1.0
        lo = min([baseline] + [r["mIoU"] for r in rows]) - 0.02
        hi = max([baseline] + [r["mIoU"] for r in rows]) + 0.02

        def xy(t, v):
            return pad + (w - 2 * pad) * t / t_max, h - pad - (h - 2 * pad) * (v - lo) / (hi - lo)

        d.line([xy(0, baseline), xy(t_max, baseline)], fill="gray", width=1)
        d.text((pad + 4, xy(0, baseline)[1] - 12), f"box fill {baseline:.3f}", fill="gray")
        d.line([xy(r["seconds"], r["mIoU"]) for r in rows], fill="blue", width=2)
        d.text((w - pad - 150, pad + 4), f"final mIoU {rows[-1]['mIoU']:.3f}", fill="blue")
        d.text((pad, h - pad + 8), f"0 .. {t_max / 60:.1f} min", fill="black")
        d.text((pad, pad - 16), f"MAL val mIoU (y: {lo:.2f}..{hi:.2f})", fill="black")
    img.save(path)


def main() -> None:
    from networks.mal.config import ExperimentConfig
    from networks.mal.data import MALDataModule
    from networks.mal.module import MALModule
    from networks.mal.postprocess import box_fill_miou

    minutes = float(os.environ.get("LEARN_MINUTES", "30"))
    torch.set_num_threads(int(os.environ.get("LEARN_THREADS", "1")))  # small ops: extra threads mostly add contention
    root = Path(tempfile.mkdtemp(prefix="learn_mal_"))
    generate(root, seed=0, num_train=96, num_val=32, image_size=128)
    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.load(configs_dir() / "mal" / "demo.yaml"))
    for key, value in {
        "dataset.train_ann_path": str(root / "train" / "annotations.json"),
        "dataset.train_img_dir": str(root / "train" / "images"),
        "dataset.val_ann_path": str(root / "val" / "annotations.json"),
        "dataset.val_img_dir": str(root / "val" / "images"),
        "dataset.num_workers_per_gpu": 0,
        "train.num_epochs": int(os.environ.get("LEARN_EPOCHS", "120")),
    }.items():
        OmegaConf.update(cfg, key, value)
    pl.seed_everything(int(cfg.train.seed), verbose=False)
    curve = _Curve()
    ctx = RunContext(action="train", run_dir=root / "run")
    module = MALModule(cfg, ctx)
    trainer = pl.Trainer(max_epochs=int(cfg.train.num_epochs), max_time={"minutes": minutes}, accelerator="auto",
                         devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[curve])
    trainer.fit(module, MALDataModule(cfg, ctx))
    baseline = box_fill_miou(str(root / "val" / "annotations.json"))
    result = {"minutes_budget": minutes, "box_fill_mIoU": baseline, "curve": curve.rows,
              "final": curve.rows[-1] if curve.rows else None,
              "gain_over_box_fill": (curve.rows[-1]["mIoU"] - baseline) if curve.rows else None,
              "settings": f"configs/mal/demo.yaml with train.num_epochs={int(cfg.train.num_epochs)}"}
    atomic_write_json(RESULTS / "learn_mal.json", result, indent=2)
    _plot(curve.rows, baseline, RESULTS / "learn_mal.png")
    print(f"MAL: final val mIoU {result['final']} vs box fill {baseline:.4f}; written to {RESULTS}")


if __name__ == "__main__":
    main()
