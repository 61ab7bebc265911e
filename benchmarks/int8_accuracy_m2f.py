"""What int8 costs Mask2Former in accuracy on a *trained* panoptic model (issue 12), through the CLI.

Trains ``configs/mask2former/learn.yaml`` as ``tests/networks/mask2former/test_learning.py`` does (synthetic data
seed 0: 64 training and 16 held-out images of 128 px, the spec's epochs and seed), then runs ``export`` (128 ×
128, panoptic outputs), ``quantize`` five times (static int8 of the ONNX, calibrated on the 64 training images,
by ONNX Runtime in its own and in TensorRT's layout and by ModelOpt; torchao weight-only int8 and ModelOpt
simulated static int8 of the checkpoint, which is then exported as a QDQ graph) and ``evaluate`` on the held-out
images: the checkpoint, the fp32 ONNX file, each int8 QDQ file and each quantized checkpoint.  The held-out
images are 128 × 128, so the graph's input is the checkpoint's test resize.

A panoptic ONNX graph reports no mIoU, so the same checkpoint is also exported with ``model.mode=semantic``,
quantized (ONNX Runtime's layout and ModelOpt's) and evaluated in semantic mode (:func:`semantic_rows`): mIoU and
pixel accuracy of the checkpoint, the fp32 semantic graph and its int8 files.

Writes ``benchmarks/results/int8_accuracy_m2f.json`` (PQ, PQ_th, PQ_st, mIoU per runtime; the semantic rows; file
sizes) and prints it.  About 5 minutes on 2 CPU cores.  ``INT8_ACC_DIR`` keeps the run files (default: a
temporary folder).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.int8_runs import (  # noqa: E402
    INT8_FILES,
    evaluate_runtimes,
    export_quantized,
    main,
    quantize_checkpoints,
    quantize_int8_files,
    sizes_mb,
)

REPO = Path(__file__).resolve().parents[1]
KEYS = ("PQ", "PQ_th", "PQ_st", "mIoU")
NUM_TRAIN, NUM_VAL, SIZE = 64, 16, 128  # test_learning's


def semantic_rows(tao, root: Path, ckpt: Path, calib_images: str) -> dict[str, dict[str, float]]:
    """Semantic-mode ``export`` (128 × 128) of ``ckpt``, its static int8 PTQ (ONNX Runtime's layout and ModelOpt's,
    calibrated on ``calib_images``) and ``evaluate`` of the checkpoint and the three graphs with
    ``model.mode=semantic``, into ``root/semantic``; ``{runtime: {mIoU, pixel_accuracy}}``."""
    base = root / "semantic"
    onnx = base / "m2f_semantic.onnx"
    tao("export", "model.mode=semantic", f"results_dir={base / 'export'}", f"export.checkpoint={ckpt}",
        f"export.onnx_file={onnx}", f"export.input_height={SIZE}", f"export.input_width={SIZE}")
    sources = [("checkpoint", [f"evaluate.checkpoint={ckpt}"]),
               ("onnx_fp32", [f"evaluate.onnx_file={onnx}", "evaluate.checkpoint=null"])]
    for name in ("onnx_int8", "onnx_int8_modelopt"):
        folder, settings, file_name = INT8_FILES[name]
        tao("quantize", "model.mode=semantic", f"results_dir={base / folder}", f"quantize.model_path={onnx}",
            "quantize.mode=static_ptq", *settings, f"quantize.calib_images={NUM_TRAIN}",
            f"dataset.quant_calibration_dataset.images_dir={calib_images}")
        qfile = base / folder / "quantize" / file_name.format(stem=onnx.stem)
        sources.append((name, [f"evaluate.onnx_file={qfile}", "evaluate.checkpoint=null"]))
    out = {}
    for name, source in sources:
        tao("evaluate", "model.mode=semantic", f"results_dir={base / name}", *source)
        metrics = json.loads((base / name / "evaluate" / "metrics.json").read_text())
        out[name] = {k: round(float(metrics[k]), 4) for k in ("mIoU", "pixel_accuracy")}
    return out


def run(root: Path) -> dict:
    from networks.common.synthetic import generate
    from tao_cli.cli import run_model
    from tests.networks.mask2former.test_learning import _data_overrides

    data = generate(root / "data", seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=SIZE)
    spec = str(REPO / "configs" / "mask2former" / "learn.yaml")
    common = _data_overrides(data)

    def tao(action: str, *overrides: str) -> None:
        code = run_model("mask2former", action, spec, [*common, *overrides])
        if code != 0:
            raise SystemExit(f"{action} failed (exit {code})")

    tao("train", f"results_dir={root / 'train'}")
    ckpt = root / "train" / "train" / "mask2former_model_latest.pth"
    onnx = root / "m2f.onnx"
    tao("export", f"results_dir={root / 'export'}", f"export.checkpoint={ckpt}", f"export.onnx_file={onnx}",
        f"export.input_height={SIZE}", f"export.input_width={SIZE}")
    calibration = (f"quantize.calib_images={NUM_TRAIN}",
                   f"dataset.quant_calibration_dataset.images_dir={data['train']['images']}")
    int8 = quantize_int8_files(tao, root, onnx, *calibration)
    checkpoints = quantize_checkpoints(tao, root, ckpt, *calibration)
    int8["onnx_int8_modelopt_pytorch_export"] = export_quantized(
        tao, root, checkpoints["modelopt_pytorch_int8"], f"export.input_height={SIZE}", f"export.input_width={SIZE}")
    report = json.loads((root / "qt" / "quantize" / "quantize_report.json").read_text())
    out: dict = {"spec": "configs/mask2former/learn.yaml", "train_images": NUM_TRAIN, "held_out_images": NUM_VAL,
                 "calibration_images": NUM_TRAIN, "graph_hw": [SIZE, SIZE],
                 **sizes_mb(onnx_fp32=onnx, **int8, checkpoint=ckpt,
                            **{f"{k}_checkpoint": v for k, v in checkpoints.items()}),
                 "torchao_int8_linear_layers": report["quantized_linear_layers"]}
    out.update(evaluate_runtimes(tao, root, KEYS, ckpt, onnx, int8, checkpoints))
    out["semantic"] = semantic_rows(tao, root, ckpt, str(data["train"]["images"]))
    return out


if __name__ == "__main__":
    main(run, "int8_accuracy_m2f.json", "int8_acc_m2f_")
