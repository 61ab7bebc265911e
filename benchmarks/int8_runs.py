"""What the int8-accuracy scripts (``int8_accuracy_m2f``, ``int8_accuracy_mgd``) share: the four evaluations
through the CLI, the file sizes, and the run-and-write entry point."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def sizes_mb(**files: Path) -> dict[str, float]:
    """``{<name>_mb: size in MB}`` of each file (links resolved)."""
    return {f"{name}_mb": round(Path(path).resolve().stat().st_size / 2**20, 2) for name, path in files.items()}


#: The static int8 files the scripts score: name → (run folder, quantize overrides beyond the calibration fields,
#: file name; ``{stem}`` is the fp32 file's).  ONNX Runtime's layout (device cpu), TensorRT's layout written by
#: ONNX Runtime (device trt) and by ModelOpt (backend modelopt.onnx, fp32 elsewhere with device cpu); the
#: TensorRT files are scored in ONNX Runtime too: it simulates the engine's int8.
INT8_FILES = {
    "onnx_int8": ("q", ["quantize.backend=onnxruntime", "quantize.device=cpu"], "{stem}_int8_qdq.onnx"),
    "onnx_int8_tensorrt_layout": ("q_trt", ["quantize.backend=onnxruntime", "quantize.device=trt"],
                                  "{stem}_int8_qdq.onnx"),
    "onnx_int8_modelopt": ("q_modelopt", ["quantize.backend=modelopt.onnx", "quantize.device=cpu"],
                           "quantized_model.onnx"),
}


def quantize_int8_files(tao: Callable[..., None], root: Path, onnx: Path, *overrides: str) -> dict[str, Path]:
    """Static int8 PTQ of ``onnx`` into each :data:`INT8_FILES` entry under ``root``; ``overrides``: the
    calibration fields.  Returns ``{name: QDQ file}``."""
    files = {}
    for name, (folder, settings, file_name) in INT8_FILES.items():
        tao("quantize", f"results_dir={root / folder}", f"quantize.model_path={onnx}", "quantize.mode=static_ptq",
            *settings, *overrides)
        files[name] = root / folder / "quantize" / file_name.format(stem=onnx.stem)
    return files


def quantize_checkpoints(tao: Callable[..., None], root: Path, ckpt: Path, *overrides: str) -> dict[str, Path]:
    """The PyTorch backends on the trained checkpoint ``ckpt``: torchao weight-only int8 (TAO's default section)
    into ``root/qt`` and ModelOpt's simulated static int8 (calibrated: ``overrides`` are the calibration fields)
    into ``root/qm``.  Returns ``{name: quantized checkpoint}``."""
    tao("quantize", f"results_dir={root / 'qt'}", f"quantize.model_path={ckpt}", "quantize.device=cpu")
    tao("quantize", f"results_dir={root / 'qm'}", f"quantize.model_path={ckpt}", "quantize.device=cpu",
        "quantize.backend=modelopt.pytorch", "quantize.mode=static_ptq", *overrides)
    return {"torchao_weight_only_int8": root / "qt" / "quantize" / "quantized_model_torchao.pth",
            "modelopt_pytorch_int8": root / "qm" / "quantize" / "quantized_model_modelopt.pth"}


def export_quantized(tao: Callable[..., None], root: Path, checkpoint: Path, *overrides: str) -> Path:
    """``export`` of ModelOpt's quantized checkpoint (its quantizers become Q/DQ pairs: the file TensorRT builds in
    TAO's ModelOpt flow) into ``root/modelopt_export.onnx``; ``overrides``: the graph size."""
    onnx = root / "modelopt_export.onnx"
    tao("export", f"results_dir={root / 'qm_export'}", f"export.checkpoint={checkpoint}", f"export.onnx_file={onnx}",
        *overrides)
    return onnx


def evaluate_runtimes(tao: Callable[..., None], root: Path, keys: tuple[str, ...], ckpt: Path, onnx: Path,
                      int8_files: dict[str, Path], checkpoints: dict[str, Path]) -> dict[str, dict[str, float]]:
    """``evaluate`` of the checkpoint, the fp32 ONNX, each static int8 file and each quantized checkpoint
    (``{name: path}``), each into ``root/<name>``; ``{name: {key: value}}`` from each metrics.json.
    ``tao(action, *overrides)`` runs one action of the network (and fails the script on a non-zero exit)."""
    out = {}
    sources = [("checkpoint", f"evaluate.checkpoint={ckpt}"), ("onnx_fp32", f"evaluate.onnx_file={onnx}"),
               *((name, f"evaluate.onnx_file={path}") for name, path in int8_files.items()),
               *((name, f"evaluate.checkpoint={path}") for name, path in checkpoints.items())]
    for name, source in sources:
        extra = [] if source.startswith("evaluate.checkpoint=") else ["evaluate.checkpoint=null"]
        tao("evaluate", f"results_dir={root / name}", source, *extra)
        metrics = json.loads((root / name / "evaluate" / "metrics.json").read_text())
        out[name] = {k: None if metrics.get(k) is None else round(float(metrics[k]), 4) for k in keys}
    return out


def main(run: Callable[[Path], dict], result_name: str, prefix: str) -> None:
    """``run(root)`` in ``INT8_ACC_DIR`` (kept) or a temporary folder; writes ``results/<result_name>`` and
    prints it."""
    keep = os.environ.get("INT8_ACC_DIR")
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(keep) if keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        out = run(root)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / result_name).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
