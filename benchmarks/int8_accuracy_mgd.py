"""What static int8 PTQ costs Mask Grounding DINO in accuracy on a *trained* model (issue 12), through the CLI.

The quantize tests use an untrained model, on which int8 error spreads over the whole graph; this script measures
a model that has learned something.  It trains configs/mask_grounding_dino/tiny.yaml as
``tests/networks/mask_grounding_dino/test_learning.py`` does (synthetic data seed 0: 32 training images of 128 or
160 px a side, 480 optimizer steps, the spec's seed) and holds out 64 images (the test's 16 and 48 more: with 16,
one image moved mAP50 by more than the 0.02 being measured), saves the checkpoint, then runs ``export`` (128 × 128),
``quantize`` five times (static int8 of the ONNX, calibrated on the 32 training images, by ONNX Runtime in its
own and in TensorRT's layout and by ModelOpt; torchao weight-only int8 and ModelOpt simulated static int8 of the
checkpoint, which is then exported as a QDQ graph) and ``evaluate`` on the held-out images: the checkpoint, the
fp32 ONNX file, each int8 QDQ file and each quantized checkpoint.  ``dataset.augmentation.random_resize_max_size``
is 128 so that the checkpoint's test resize is the graph's when an image is square.

Writes ``benchmarks/results/int8_accuracy_mgd.json`` (bbox / segm mAP and mAP50 per runtime, file sizes, and the
agreement of each int8 file's outputs with the fp32 file's: :func:`agreement`, a finer figure than mAP on 64
images) and prints it.  About 10 minutes on 2 CPU cores.  ``INT8_ACC_DIR`` keeps the run files (default: a
temporary folder).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.int8_runs import (  # noqa: E402
    evaluate_runtimes,
    export_quantized,
    main,
    quantize_checkpoints,
    quantize_int8_files,
    sizes_mb,
)

KEYS = ("bbox_val_mAP50", "segm_val_mAP50", "bbox_val_mAP", "segm_val_mAP")
TRAIN_STEPS = 480  # test_learning.TRAIN_STEPS
HELD_OUT = 64


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


def agreement(cfg, images: dict, fp32: Path, int8: Path, top: int = 10) -> dict[str, float]:
    """How closely ``int8`` reproduces ``fp32`` on ``images`` (``{"images": dir, "annotations": COCO file}``; the
    prompt is the file's categories), both run as ``evaluate`` feeds them.  Queries are matched one to one
    (Hungarian, on box IoU minus 5 × score difference: the two files may rank the same proposals differently);
    over each image's ``top`` fp32 queries: ``box_iou`` (mean IoU of the matched boxes), ``mask_iou`` (of the
    masks at logit > 0, 1 where both are empty) and ``score_abs_diff`` (best class probability)."""
    import numpy as np
    import torch
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_convert, box_iou

    from networks.common.onnx_runtime import inference_session
    from networks.mask_grounding_dino.quantize import _calibration_batches

    cfg = copy.deepcopy(cfg)
    cfg.dataset.quant_calibration_data_sources = {"image_dir": str(images["images"]),
                                                  "json_file": str(images["annotations"])}
    feeds = list(_calibration_batches(cfg, str(fp32), 10**6)[0])
    outs = [[s.run(None, f) for f in feeds] for s in (inference_session(str(p), ["CPUExecutionProvider"])
                                                       for p in (fp32, int8))]
    box, mask, score = [], [], []
    for (l0, b0, m0), (l1, b1, m1) in zip(*outs, strict=True):
        for r in range(l0.shape[0]):
            s0 = (1 / (1 + np.exp(-l0[r]))).max(-1)
            s1 = (1 / (1 + np.exp(-l1[r]))).max(-1)
            iou = box_iou(*(box_convert(torch.from_numpy(b[r]), "cxcywh", "xyxy") for b in (b0, b1))).numpy()
            rows, cols = linear_sum_assignment(np.abs(s0[:, None] - s1[None, :]) * 5 - iou)
            keep = np.argsort(-s0)[:top]
            match = cols[np.argsort(rows)][keep]
            a, b = m0[r].reshape(len(s0), -1)[keep] > 0, m1[r].reshape(len(s1), -1)[match] > 0
            union = (a | b).sum(1)
            box.append(iou[keep, match].mean())
            mask.append(np.where(union == 0, 1.0, (a & b).sum(1) / np.maximum(union, 1)).mean())
            score.append(np.abs(s0[keep] - s1[match]).mean())
    return {"box_iou": round(float(np.mean(box)), 4), "mask_iou": round(float(np.mean(mask)), 4),
            "score_abs_diff": round(float(np.mean(score)), 4)}


def run(root: Path) -> dict:
    from omegaconf import OmegaConf

    from networks.common.synthetic import generate
    from tao_cli.cli import run_model
    from tests.networks.mask_grounding_dino.conftest import make_tiny_cfg

    data = generate(root / "data", seed=0, num_train=32, num_val=HELD_OUT, image_size=128)
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
    int8 = quantize_int8_files(tao, root, onnx, "quantize.calib_images=32")
    checkpoints = quantize_checkpoints(tao, root, ckpt, "quantize.calib_images=32")
    int8["onnx_int8_modelopt_pytorch_export"] = export_quantized(
        tao, root, checkpoints["modelopt_pytorch_int8"], "export.input_height=128", "export.input_width=128")
    report = json.loads((root / "qt" / "quantize" / "quantize_report.json").read_text())
    out: dict = {"train_steps": TRAIN_STEPS, "held_out_images": HELD_OUT, "calibration_images": 32,
                 "graph_hw": [128, 128],
                 **sizes_mb(onnx_fp32=onnx, **int8, checkpoint=ckpt,
                            **{f"{k}_checkpoint": v for k, v in checkpoints.items()}),
                 "torchao_int8_linear_layers": report["quantized_linear_layers"]}
    out.update(evaluate_runtimes(tao, root, KEYS, ckpt, onnx, int8, checkpoints))
    out["agreement_with_fp32_onnx"] = {name: agreement(cfg, data["val"], onnx, path) for name, path in int8.items()}
    return out


if __name__ == "__main__":
    main(run, "int8_accuracy_mgd.json", "int8_acc_mgd_")
