"""``tao model mask2former quantize``: static int8 PTQ of an exported tiny semantic model with ONNX Runtime.

One module fixture exports a seeded tiny semantic model (as test_onnx_eval.py does), labels ``dataset.val`` with
the checkpoint's own predictions (so mIoU is high and a broken quantized graph shows), then runs the real
``quantize`` action through the ``tao`` entry point.  The tests read its outputs, evaluate the fp32 and the QDQ
file, and check the refusals at ``--dry-run``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from networks.common.onnx_quantize import int8_weight_nodes

from .test_onnx_eval import _main, _tao, evaluate_each, export_tiny, self_label

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CALIB = 3  # fewer than the 4 validation images: the count must be honoured
#: mIoU of the QDQ graph vs the fp32 graph on the self-labelled set: measured 1.0 vs 0.9994 on the tiny model
#: (fp32 mIoU is 1.0 by construction); loose so that calibration noise does not flake while a graph whose
#: activations are wrongly scaled (mIoU near chance) still fails.
MIOU_DROP = 0.05


@pytest.fixture(scope="module")
def quantized(m2f_synthetic, tmp_path_factory):
    """(spec, fp32 onnx, quantize run dir) after a successful quantize run."""
    import _pytest.monkeypatch

    root = tmp_path_factory.mktemp("m2f_quant")
    mp = _pytest.monkeypatch.MonkeyPatch()
    try:
        mp.chdir(root)
        spec, ckpt, onnx_path = export_tiny(mp, m2f_synthetic, "semantic", root)
        cfg = self_label(mp, spec, ckpt, m2f_synthetic, "semantic", root)
        images = Path(m2f_synthetic["val"]["images"])
        cfg.quantize.backend, cfg.quantize.mode = "onnxruntime", "static_ptq"
        cfg.quantize.device = "cpu"
        cfg.quantize.calib_images = CALIB
        cfg.dataset.quant_calibration_dataset.images_dir = str(images)
        OmegaConf.save(cfg, spec)
        _main(mp, "model", "mask2former", "quantize", "-e", str(spec), f"results_dir={root / 'results'}",
              f"quantize.model_path={onnx_path}")
    finally:
        mp.undo()
    return spec, onnx_path, root / "results" / "quantize"


def test_quantize_writes_a_standard_qdq_graph(quantized):
    import onnx

    from networks.mask2former.quantize import TAO_FP32_PATTERNS

    _, onnx_path, run = quantized
    qdq, named = run / "semantic_int8_qdq.onnx", run / "semantic_named.onnx"
    assert qdq.is_file() and named.is_file()
    model = onnx.load(str(qdq))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    assert [o.name for o in model.graph.output] == ["pred_masks"]
    assert [i.name for i in onnx.load(str(named)).graph.input] == ["inputs"]

    report = json.loads((run / "quantize_report.json").read_text())
    assert report["calibration_images"] == CALIB
    assert report["quantized_onnx"] == str(qdq) and report["model_path"] == str(onnx_path.resolve())
    assert report["int8_mb"] < report["fp32_mb"]
    excluded = set(report["excluded_nodes"])
    assert report["num_excluded_nodes"] == len(excluded) > 0
    cross = [n for n in excluded if TAO_FP32_PATTERNS[0] in n]
    assert cross and any(n == "/Einsum" for n in excluded)  # TAO's fp32 layers and the post-processor
    assert not any(n.startswith("/model/backbone/") for n in excluded)

    # excluded weight layers keep fp32 weights; quantized ones read int8 weights through DequantizeLinear
    int8 = {n.name for n in int8_weight_nodes(model)}
    assert int8 and not int8 & excluded
    assert any(n.startswith("/model/backbone/") for n in int8)
    last = json.loads((run / "status.json").read_text().splitlines()[-1])
    assert last["status"] == "SUCCESS" and last["outputs"]["quantized_onnx"] == str(qdq)


def test_evaluate_from_qdq_is_close_to_fp32(quantized, monkeypatch, capfd, tmp_path):
    spec, onnx_path, run = quantized
    monkeypatch.chdir(tmp_path)
    metrics = evaluate_each(monkeypatch, capfd, spec, tmp_path, {
        "fp32": f"evaluate.onnx_file={onnx_path}", "int8": f"evaluate.onnx_file={run / 'semantic_int8_qdq.onnx'}"})
    assert metrics["int8"]["runtime"]["onnx_file"].endswith("_int8_qdq.onnx")
    assert metrics["fp32"]["mIoU"] > 0.5  # self-labelled: the fp32 graph agrees with its own labels
    assert metrics["int8"]["mIoU"] >= metrics["fp32"]["mIoU"] - MIOU_DROP, metrics


# ----------------------------------------------------------------------------------------- int8 layouts
def _zero_points(model) -> dict[str, list]:
    """Q/DQ zero points of ``model``: {"activation": [...], "weight": [...]} as numpy arrays (a weight's DQ reads
    an initializer)."""
    from onnx import numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    out = {"activation": [], "weight": []}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 2 and node.input[2] in consts:
            kind = "weight" if node.input[0] in consts else "activation"
            out[kind].append(numpy_helper.to_array(consts[node.input[2]]))
    return out


def test_cpu_layout_runs_on_onnx_runtime_integer_kernels(quantized, tmp_path):
    """quantize.device=cpu: uint8 activations, int8 symmetric weights, and ONNX Runtime's graph optimizer turns
    every quantized MatMul into an integer kernel (an int8-activation or output-quantized MatMul layout leaves
    fp32 MatMuls that dequantize their weights at every run, slower than the fp32 file)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    _, _, run = quantized
    qdq = run / "semantic_int8_qdq.onnx"
    zps = _zero_points(onnx.load(str(qdq)))
    assert zps["activation"] and all(z.dtype == np.uint8 for z in zps["activation"])
    # weights int8, Conv biases int32 (scale = input scale x weight scale), both with zero point 0
    assert zps["weight"] and all(z.dtype in (np.int8, np.int32) and not z.any() for z in zps["weight"])
    assert any(z.dtype == np.int8 for z in zps["weight"])
    assert json.loads((run / "quantize_report.json").read_text())["target_runtime"] == "onnxruntime"

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(qdq), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    consts = {t.name for t in optimized.graph.initializer}
    producer = {o: n for n in optimized.graph.node for o in n.output}
    ops = [n.op_type for n in optimized.graph.node]
    assert ops.count("MatMulIntegerToFloat") > 5, sorted(set(ops))
    # no fp32 MatMul/Conv left reading an int8 weight through a DequantizeLinear (the self-attention out_proj
    # Gemms are: the exporter shares their all-zero bias with a LayerNorm's, so ONNX Runtime leaves that bias in
    # fp32 and cannot fuse them; 2 small [queries x C] products per decoder layer)
    slow = [n.name for n in optimized.graph.node if n.op_type in ("MatMul", "Conv")
            and any(i in producer and producer[i].op_type == "DequantizeLinear" and producer[i].input[0] in consts
                    for i in n.input)]
    assert not slow, slow


def test_trt_layout_is_symmetric_int8_and_gen_trt_engine_refuses_the_cpu_layout(quantized, monkeypatch, capfd,
                                                                                tmp_path):
    """quantize.device=trt writes what TensorRT builds (int8 Q/DQ with zero point 0); gen_trt_engine refuses the
    ONNX Runtime layout in one line that says how to get the other."""
    import onnx

    import networks.common.tensorrt_engine as trt_engine

    spec, onnx_path, run = quantized
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "quantize", "-e", str(spec),
                        f"results_dir={tmp_path}", f"quantize.model_path={onnx_path}", "quantize.device=trt")
    assert code == 0, err[-3000:]
    trt_file = tmp_path / "quantize" / "semantic_int8_qdq.onnx"
    zps = _zero_points(onnx.load(str(trt_file)))
    assert zps["activation"] and all(z.dtype.name == "int8" and not z.any() for z in zps["activation"])
    assert json.loads((tmp_path / "quantize" / "quantize_report.json").read_text())["target_runtime"] == "tensorrt"
    assert trt_engine.qdq_tensorrt_problem(trt_file) is None
    assert "uint8" in trt_engine.qdq_tensorrt_problem(run / "semantic_int8_qdq.onnx")

    monkeypatch.setattr(trt_engine, "require_tensorrt", lambda *a, **k: None)  # the check after TensorRT's
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "gen_trt_engine", "-e", str(spec), "--dry-run",
                        f"results_dir={tmp_path}", f"gen_trt_engine.onnx_file={run / 'semantic_int8_qdq.onnx'}",
                        f"gen_trt_engine.trt_engine={tmp_path / 'm.engine'}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "gen_trt_engine.onnx_file" in lines[0] and "quantize.device=trt" in lines[0], lines[0]
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "gen_trt_engine", "-e", str(spec), "--dry-run",
                        f"results_dir={tmp_path}", f"gen_trt_engine.onnx_file={trt_file}",
                        f"gen_trt_engine.trt_engine={tmp_path / 'm.engine'}")
    assert code == 0, err


# ----------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides, field, words", [
    (["quantize.backend=modelopt.pytorch", "quantize.algorithm=entropy"], "quantize.algorithm", "absolute maximum"),
    (["quantize.backend=torchao"], "quantize.mode", "weight_only_ptq"),  # torchao quantizes weights only
    (["quantize.mode=weight_only_ptq"], "quantize.mode", "static_ptq"),
    (["quantize.algorithm=awq_lite"], "quantize.algorithm", "minmax"),
    (["quantize.model_path="], "quantize.model_path", "export"),
    (["quantize.model_path=/nonexistent/m.onnx"], "quantize.model_path", "does not exist"),
    (["dataset.quant_calibration_dataset.images_dir="], "dataset.quant_calibration_dataset.images_dir", "empty"),
    (["dataset.quant_calibration_dataset.images_dir=/nonexistent/calib"],
     "dataset.quant_calibration_dataset.images_dir", "nonexistent"),
], ids=["modelopt.pytorch", "torchao", "weight_only", "algorithm", "no-model", "missing-model",
        "no-images", "missing-images"])
def test_quantize_refusals_at_dry_run(quantized, overrides, field, words, monkeypatch, capfd, tmp_path):
    spec, onnx_path, _ = quantized
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "quantize", "-e", str(spec), "--dry-run",
                        f"results_dir={tmp_path}", f"quantize.model_path={onnx_path}", *overrides)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert field in lines[0] and words in lines[0], lines[0]


def test_quantize_dry_run_ok_and_tao_defaults_still_load(quantized, monkeypatch, capfd, tmp_path):
    spec, onnx_path, _ = quantized
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "quantize", "-e", str(spec), "--dry-run",
                        f"results_dir={tmp_path}", f"quantize.model_path={onnx_path}")
    assert code == 0, err
    # TAO's default quantize section (torchao, weight-only) does not stop another action
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "evaluate", "-e", str(spec), "--dry-run",
                        f"results_dir={tmp_path}", f"evaluate.onnx_file={onnx_path}", "quantize.backend=torchao",
                        "quantize.mode=weight_only_ptq")
    assert code == 0, err


def test_excluded_nodes_rules():
    from networks.mask2former.quantize import excluded_nodes

    ours = ["/model/backbone/Conv", "/model/sem_seg_head/predictor/transformer_cross_attention_layers.0/MatMul",
            "/model/sem_seg_head/predictor/transformer_self_attention_layers.0/MatMul", "/Einsum", "Constant_7"]
    assert excluded_nodes(ours, []) == ours[1:2] + ours[3:]
    assert excluded_nodes(ours, ["self_attention"]) == ours[1:]
    assert excluded_nodes(ours, ["backbone"], default=False) == ours[:1]
    # a graph named as TAO's exporter names it: only TAO's patterns, not "everything outside /model/"
    tao = ["/backbone/Conv", "/sem_seg_head/predictor/transformer_cross_attention_layers.1/Add",
           "/post_processor/Div", "/post_processor/Sigmoid"]
    assert excluded_nodes(tao, []) == tao[1:3]


# ----------------------------------------------------------------------------------------- backend modelopt.onnx
@pytest.fixture(scope="module")
def modelopt_quantized(quantized, tmp_path_factory):
    """quantize run dir of ``backend: modelopt.onnx`` (device cpu) on the module's spec and fp32 file."""
    import _pytest.monkeypatch

    pytest.importorskip("modelopt.onnx.quantization")
    spec, onnx_path, _ = quantized
    root = tmp_path_factory.mktemp("m2f_modelopt")
    mp = _pytest.monkeypatch.MonkeyPatch()
    try:
        mp.chdir(root)
        _main(mp, "model", "mask2former", "quantize", "-e", str(spec), f"results_dir={root}",
              f"quantize.model_path={onnx_path}", "quantize.backend=modelopt.onnx", "quantize.algorithm=minmax")
    finally:
        mp.undo()
    return root / "quantize"


def test_modelopt_onnx_writes_tensorrt_int8_with_tao_fp32_layers_kept(modelopt_quantized):
    """ModelOpt's file: TAO's name, standard operators, symmetric int8 (what TensorRT builds), fp32 elsewhere
    (device cpu), TAO's fp32 layers and the post-processor un-quantized, the backbone quantized."""
    import numpy as np
    import onnx

    import networks.common.tensorrt_engine as trt_engine
    from networks.mask2former.quantize import TAO_FP32_PATTERNS

    run = modelopt_quantized
    qfile = run / "quantized_model.onnx"
    assert qfile.is_file() and (run / "semantic_named.onnx").is_file()
    assert not list(run.glob(".*tmp*")), "temporary files left behind"
    model = onnx.load(str(qfile))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert [o.name for o in model.graph.output] == ["pred_masks"]
    zps = _zero_points(model)
    assert zps["activation"] and all(z.dtype == np.int8 and not z.any() for z in zps["activation"])
    assert trt_engine.qdq_tensorrt_problem(qfile) is None
    floats = {t.data_type for t in model.graph.initializer} - {onnx.TensorProto.INT8, onnx.TensorProto.INT64,
                                                                onnx.TensorProto.INT32}
    assert floats == {onnx.TensorProto.FLOAT}, floats  # device cpu: no fp16 conversion

    report = json.loads((run / "quantize_report.json").read_text())
    assert report["backend"] == "modelopt.onnx" and report["target_runtime"] == "tensorrt"
    assert report["calibration_method"] == "max" and report["high_precision_dtype"] == "fp32"
    assert report["calibration_eps"] == ["cpu"] and report["calibration_images"] == CALIB
    assert report["quantized_onnx"] == str(qfile)  # not smaller: ModelOpt (dq_only false, as TAO) keeps fp32 weights
    excluded = set(report["excluded_nodes"])
    int8 = {n.name for n in int8_weight_nodes(model)}  # weight -> QuantizeLinear -> DequantizeLinear -> node
    cross = [n.name for n in model.graph.node
             if n.op_type in ("MatMul", "Gemm", "Conv") and TAO_FP32_PATTERNS[0] in n.name]
    assert cross and all(n in excluded and n not in int8 for n in cross)
    assert any(n.startswith("/model/backbone/") for n in int8)
    assert all(n.startswith("/model/") for n in int8)  # not the post-processor


def test_evaluate_from_modelopt_file_is_close_to_fp32(quantized, modelopt_quantized, monkeypatch, capfd, tmp_path):
    spec, onnx_path, _ = quantized
    monkeypatch.chdir(tmp_path)
    metrics = evaluate_each(monkeypatch, capfd, spec, tmp_path, {
        "fp32": f"evaluate.onnx_file={onnx_path}",
        "int8": f"evaluate.onnx_file={modelopt_quantized / 'quantized_model.onnx'}"})
    assert metrics["fp32"]["mIoU"] > 0.5
    assert metrics["int8"]["mIoU"] >= metrics["fp32"]["mIoU"] - MIOU_DROP, metrics


def test_modelopt_gpu_file_is_fp16_and_evaluates_on_the_cpu(quantized, monkeypatch, capfd, tmp_path):
    """quantize.device=cuda (TAO's default) writes ModelOpt's file for a GPU: the layers left un-quantized in fp16,
    as ModelOpt and TAO make it (logged).  ONNX Runtime 1.31's CPU provider crashed the process on it at its full
    optimization level; evaluate runs it on the CPU and scores as the fp32 file does."""
    import onnx

    from networks.common.onnx_runtime import has_fp16

    pytest.importorskip("modelopt.onnx.quantization")
    spec, onnx_path, _ = quantized
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "quantize", "-e", str(spec),
                        f"results_dir={tmp_path}", f"quantize.model_path={onnx_path}",
                        "quantize.backend=modelopt.onnx", "quantize.device=cuda")
    assert code == 0, err[-3000:]
    qfile = tmp_path / "quantize" / "quantized_model.onnx"
    assert has_fp16(qfile) and not has_fp16(onnx_path)
    assert json.loads((tmp_path / "quantize" / "quantize_report.json").read_text())["high_precision_dtype"] == "fp16"
    assert "un-quantized to fp16" in (tmp_path / "quantize" / "quantize.log").read_text()
    assert {t.data_type for t in onnx.load(str(qfile)).graph.initializer} & {onnx.TensorProto.FLOAT16}
    metrics = evaluate_each(monkeypatch, capfd, spec, tmp_path, {"fp32": f"evaluate.onnx_file={onnx_path}",
                                                                 "fp16_int8": f"evaluate.onnx_file={qfile}"})
    assert metrics["fp16_int8"]["mIoU"] >= metrics["fp32"]["mIoU"] - MIOU_DROP, metrics


def test_onnx_runtime_backend_unchanged_after_a_modelopt_run(quantized, modelopt_quantized, monkeypatch, capfd,
                                                              tmp_path):
    """ModelOpt patches ONNX Runtime's quantizer in place; after a ModelOpt run in this process the onnxruntime
    backend must write the same bytes as before it."""
    spec, onnx_path, run = quantized
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "quantize", "-e", str(spec),
                        f"results_dir={tmp_path}", f"quantize.model_path={onnx_path}")
    assert code == 0, err[-3000:]
    again = (tmp_path / "quantize" / "semantic_int8_qdq.onnx").read_bytes()
    assert again == (run / "semantic_int8_qdq.onnx").read_bytes()


def test_modelopt_skip_names_are_regular_expressions_too(quantized, modelopt_quantized, monkeypatch, capfd,
                                                         tmp_path):
    """A TAO spec names ModelOpt's nodes_to_exclude by regular expression (re.match): every backbone Conv kept
    in fp32, and the backend_kwargs reach ModelOpt (op_types_to_quantize limits it to MatMul)."""
    import onnx

    pytest.importorskip("modelopt.onnx.quantization")
    spec, onnx_path, _ = quantized
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "quantize", "-e", str(spec),
                        f"results_dir={tmp_path}", f"quantize.model_path={onnx_path}",
                        "quantize.backend=modelopt.onnx", "quantize.skip_names=[/model/backbone/.*/Conv$]",
                        "+quantize.backend_kwargs.op_types_to_quantize=[MatMul,Conv]")
    assert code == 0, err[-3000:]
    run = tmp_path / "quantize"
    report = json.loads((run / "quantize_report.json").read_text())
    model = onnx.load(str(run / "quantized_model.onnx"))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("/model/backbone/")]
    assert convs and set(convs) <= set(report["excluded_nodes"])
    assert report["backend_kwargs"] == {"op_types_to_quantize": ["MatMul", "Conv"]}
    assert report["quantized_op_types"] == ["Conv", "MatMul"], report["int8_weight_layers"]
    default = json.loads((modelopt_quantized / "quantize_report.json").read_text())
    assert "Gemm" in default["int8_weight_layers"]  # ModelOpt's default also quantizes the Gemm layers


@pytest.mark.parametrize("overrides, field, words", [
    (["quantize.mode=weight_only_ptq"], "quantize.mode", "static_ptq"),
    (["quantize.algorithm=awq_lite"], "quantize.algorithm", "int4"),
    (["quantize.skip_names=['*Conv']"], "quantize.skip_names", "regular expression"),
    (["+quantize.backend_kwargs.calibration_methd=max"], "quantize.backend_kwargs.calibration_methd",
     "not an argument"),
    (["+quantize.backend_kwargs.onnx_path=x.onnx"], "quantize.backend_kwargs.onnx_path", "quantize.model_path"),
], ids=["mode", "algorithm", "regex", "unknown-kwarg", "owned-kwarg"])
def test_modelopt_refusals_at_dry_run(quantized, overrides, field, words, monkeypatch, capfd, tmp_path):
    pytest.importorskip("modelopt.onnx.quantization")
    spec, onnx_path, _ = quantized
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "quantize", "-e", str(spec), "--dry-run",
                        f"results_dir={tmp_path}", f"quantize.model_path={onnx_path}",
                        "quantize.backend=modelopt.onnx", *overrides)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert field in lines[0] and words in lines[0], lines[0]


def test_modelopt_missing_is_one_line_at_dry_run(quantized, monkeypatch, capfd, tmp_path):
    spec, onnx_path, _ = quantized
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", None)  # import fails as if not installed
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "quantize", "-e", str(spec), "--dry-run",
                        f"results_dir={tmp_path}", f"quantize.model_path={onnx_path}",
                        "quantize.backend=modelopt.onnx")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "quantize.backend" in lines[0] and "tao-cli[modelopt]" in lines[0], lines[0]
