"""``inference_session`` keeps a static-shape QDQ graph on ONNX Runtime's integer kernels.

The graph is built by hand: ``[1, 8, 16] @ W + b`` (what ``nn.Linear`` exports with a fixed batch), quantized by
the ``quantize`` action's :func:`run_static_ptq` in ONNX Runtime's layout.  ONNX Runtime's ``MatMulAddFusion``
would turn that MatMul + Add into an fp32 Gemm before its QDQ fusions run.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _static_linear(path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"), helper.make_node("Add", ["xw", "b"], ["y"],
                                                                                    name="add")],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])], [w, b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def _optimized_ops(path, tmp_path, make_session) -> list[str]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    make_session(str(path), opts)
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def test_static_qdq_linear_runs_an_integer_kernel(tmp_path):
    from networks.common.onnx_quantize import run_static_ptq
    from networks.common.onnx_runtime import inference_session

    src = tmp_path / "linear.onnx"
    _static_linear(src)
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((1, 8, 16)).astype(np.float32)} for _ in range(4)]
    q = SimpleNamespace(backend="onnxruntime", model_path=str(src), skip_names=[], device="cpu", algorithm="minmax")
    ctx = SimpleNamespace(run_dir=tmp_path / "q", log=logging.getLogger("test"))
    out = run_static_ptq(q, ctx, lambda names: [], lambda _: (lambda: iter(calib), len(calib)), "random", [], "none")
    qdq = out["quantized_onnx"]

    ops = _optimized_ops(qdq, tmp_path, lambda p, o: inference_session(p, ["CPUExecutionProvider"], o))
    assert "MatMulIntegerToFloat" in ops and "Gemm" not in ops, ops
    # what a default session does with the same file: the reason inference_session exists
    plain = _optimized_ops(qdq, tmp_path, lambda p, o: ort.InferenceSession(p, o, providers=["CPUExecutionProvider"]))
    assert "MatMulIntegerToFloat" not in plain, plain

    x = calib[0]["x"]
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = inference_session(qdq, ["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
