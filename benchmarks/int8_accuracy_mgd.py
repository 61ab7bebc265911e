"""What static int8 PTQ costs Mask Grounding DINO in accuracy on a *trained* model (issue 12), through the CLI.

The quantize tests use an untrained model, on which int8 error spreads over the whole graph; this script measures
a model that has learned something.  It trains configs/mask_grounding_dino/tiny.yaml as
``tests/networks/mask_grounding_dino/test_learning.py`` does (synthetic data seed 0: 32 training and 16 held-out
images of 128 px, 480 optimizer steps, the spec's seed), saves the checkpoint, then runs ``export`` (128 × 128),
``quantize`` twice (ONNX Runtime static int8 of the ONNX, calibrated on the 32 training images; torchao weight-only
int8 of the checkpoint) and ``evaluate`` four times on the held-out images: the checkpoint, the fp32 ONNX file, the
int8 QDQ file and the weight-only int8 checkpoint.  ``dataset.augmentation
.random_resize_max_size`` is 128 so that the checkpoint's test resize is the graph's when an image is square.

Writes ``benchmarks/results/int8_accuracy_mgd.json`` (bbox / segm mAP and mAP50 per runtime, file sizes) and
prints it.  About 5 minutes on 2 CPU cores.  ``INT8_ACC_DIR`` keeps the run files (default: a temporary folder).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.int8_runs import evaluate_runtimes, main, quantize_both_layouts, sizes_mb  # noqa: E402

KEYS = ("bbox_val_mAP50", "segm_val_mAP50", "bbox_val_mAP", "segm_val_mAP")
TRAIN_STEPS = 480  # test_learning.TRAIN_STEPS


def _train(cfg, root: Path, ckpt: Path) -> None:
    import pytorch_lightning as pl

    from networks.common.context import RunContext
    from networks.mask_grounding_dino.data import MaskGDinoDataModule
    from networks.mask_grounding_dino.module import MaskGDinoModule
    from tao_cli.engine.checkpoints import save_checkpoint_file

    pl.seed_everything(int(cfg.train.seed), workers=True)
    module = MaskGDinoModule(cfg, RunContext("train", root / "run", log=logging.getLogger("int8_accuracy_mgd")))
    fit = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, max_steps=TRAIN_STEPS, max_epochs=-1,
                     gradient_clip_val=cfg.train.clip_grad_norm, limit_val_batches=0, num_sanity_val_steps=0)
    fit.fit(module, datamodule=MaskGDinoDataModule(cfg, RunContext("train", root / "run")))
    save_checkpoint_file({"state_dict": module.state_dict()}, ckpt, network="mask_grounding_dino")


def run(root: Path) -> dict:
    from omegaconf import OmegaConf

    from networks.common.synthetic import generate
    from tao_cli.cli import run_model
    from tests.networks.mask_grounding_dino.conftest import make_tiny_cfg

    data = generate(root / "data", seed=0, num_train=32, num_val=16, image_size=128)
    cfg = make_tiny_cfg(data)
    ckpt = root / "mgd.pth"
    _train(cfg, root, ckpt)
    cfg.dataset.augmentation.random_resize_max_size = 128
    cfg.dataset.quant_calibration_data_sources = {"image_dir": str(data["train"]["images"]),
                                                  "json_file": str(data["train"]["annotations"])}
    cfg.results_dir = str(root / "results")
    spec = root / "spec.yaml"
    OmegaConf.save(cfg, spec)

    def tao(action: str, *overrides: str) -> None:
        code = run_model("mask_grounding_dino", action, str(spec), list(overrides))
        if code != 0:
            raise SystemExit(f"{action} failed (exit {code})")

    onnx = root / "mgd.onnx"
    tao("export", f"results_dir={root / 'export'}", f"export.checkpoint={ckpt}", f"export.onnx_file={onnx}",
        "export.input_height=128", "export.input_width=128")
    qdq, qdq_trt = quantize_both_layouts(tao, root, onnx, "quantize.calib_images=32")
    tao("quantize", f"results_dir={root / 'qt'}", f"quantize.model_path={ckpt}", "quantize.device=cpu")  # torchao
    weight_only = root / "qt" / "quantize" / "quantized_model_torchao.pth"
    report = json.loads((root / "qt" / "quantize" / "quantize_report.json").read_text())
    out: dict = {"train_steps": TRAIN_STEPS, "held_out_images": 16, "calibration_images": 32, "graph_hw": [128, 128],
                 **sizes_mb(onnx_fp32=onnx, onnx_int8=qdq, checkpoint=ckpt, torchao_weight_only=weight_only),
                 "torchao_int8_linear_layers": report["quantized_linear_layers"]}
    out.update(evaluate_runtimes(tao, root, KEYS, ckpt, onnx, qdq, qdq_trt, weight_only))
    return out


if __name__ == "__main__":
    main(run, "int8_accuracy_mgd.json", "int8_acc_mgd_")
