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


def quantize_both_layouts(tao: Callable[..., None], root: Path, onnx: Path, *overrides: str) -> tuple[Path, Path]:
    """Static int8 PTQ of ``onnx`` in ONNX Runtime's layout (``quantize.device=cpu``) and TensorRT's
    (``quantize.device=trt``), into ``root/q`` and ``root/q_trt``; ``overrides``: the calibration fields.  Returns
    the two QDQ files (the TensorRT one is scored in ONNX Runtime too: it simulates the engine's int8)."""
    files = []
    for folder, device in (("q", "cpu"), ("q_trt", "trt")):
        tao("quantize", f"results_dir={root / folder}", f"quantize.model_path={onnx}", "quantize.backend=onnxruntime",
            "quantize.mode=static_ptq", f"quantize.device={device}", *overrides)
        files.append(root / folder / "quantize" / f"{onnx.stem}_int8_qdq.onnx")
    return files[0], files[1]


def evaluate_runtimes(tao: Callable[..., None], root: Path, keys: tuple[str, ...], ckpt: Path, onnx: Path,
                      qdq: Path, qdq_trt: Path, weight_only: Path) -> dict[str, dict[str, float]]:
    """``evaluate`` of the checkpoint, the fp32 ONNX, the static int8 QDQ ONNX (ONNX Runtime's and TensorRT's
    layouts) and the torchao weight-only checkpoint, each into ``root/<name>``; ``{name: {key: value}}`` from each
    metrics.json.  ``tao(action, *overrides)`` runs one action of the network (and fails the script on a non-zero
    exit)."""
    out = {}
    for name, source in (("checkpoint", f"evaluate.checkpoint={ckpt}"), ("onnx_fp32", f"evaluate.onnx_file={onnx}"),
                         ("onnx_int8", f"evaluate.onnx_file={qdq}"),
                         ("onnx_int8_tensorrt_layout", f"evaluate.onnx_file={qdq_trt}"),
                         ("torchao_weight_only_int8", f"evaluate.checkpoint={weight_only}")):
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
