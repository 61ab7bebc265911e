"""What :func:`run_static_ptq` promises about calibration and about the nodes it keeps in fp32, on hand-built graphs.

The graph: one input ``x`` read by two MatMuls, ``quantized`` and ``kept`` (the network's exclusion names the second),
as a decoder output feeds both a quantized box head and an fp32 mask controller in Mask Grounding DINO.  The
calibration data is heavy-tailed (Student t, 2 degrees of freedom), where an entropy range is narrower than the
min-max one.
"""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _shared_input_graph(path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), n) for n in ("w1", "w2")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="quantized"),
         helper.make_node("MatMul", ["x", "w2"], ["y2"], name="kept")],
        "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["n", 16]) for y in ("y1", "y2")], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def _calibration() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_t(2, size=(64, 16)).astype(np.float32)} for _ in range(8)]


def _quantize(tmp_path, algorithm: str, kept: list[str]) -> tuple[dict, dict]:
    from networks.common.onnx_quantize import run_static_ptq

    src = tmp_path / "shared.onnx"
    if not src.exists():
        _shared_input_graph(src)
    calib = _calibration()
    q = SimpleNamespace(backend="onnxruntime", model_path=str(src), skip_names=[], device="cpu", algorithm=algorithm)
    ctx = SimpleNamespace(run_dir=tmp_path / algorithm, log=logging.getLogger("test"))
    out = run_static_ptq(q, ctx, lambda names: [n for n in names if n in kept],
                         lambda _: (lambda: iter(calib), len(calib)), "random", [], "test")
    return out, json.loads((tmp_path / algorithm / "quantize_report.json").read_text())


def _activation_scale(path) -> float:
    from onnx import numpy_helper

    model = onnx.load(str(path))
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    (q,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
    return float(consts[q.input[1]])


def test_a_node_kept_in_fp32_reads_the_fp32_tensor_its_quantized_sibling_shares(tmp_path):
    out, report = _quantize(tmp_path, "minmax", ["kept"])
    model = onnx.load(out["quantized_onnx"])
    nodes = {n.name: n for n in model.graph.node}
    assert nodes["kept"].input[0] == "x"  # not the DequantizeLinear copy the quantized MatMul reads
    assert nodes["quantized"].input[0] != "x"
    assert report["fp32_inputs_restored"] == 1

    x = _calibration()[0]
    want = ort.InferenceSession(str(tmp_path / "shared.onnx"), providers=["CPUExecutionProvider"]).run(None, x)
    got = ort.InferenceSession(out["quantized_onnx"], providers=["CPUExecutionProvider"]).run(None, x)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)  # exactly the fp32 product
    assert np.abs(got[0] - want[0]).max() > 1e-3  # the other one is int8


def test_entropy_calibration_is_not_min_max(tmp_path):
    """ONNX Runtime's own entropy calibrator (128 bins into 128) returns the min-max range: the two algorithms
    wrote the same file.  Ours folds 2048 bins into 128, so a heavy tail is clipped."""
    minmax, _ = _quantize(tmp_path, "minmax", [])
    entropy, report = _quantize(tmp_path, "entropy", [])
    assert _activation_scale(entropy["quantized_onnx"]) < 0.8 * _activation_scale(minmax["quantized_onnx"])
    cache = json.loads((tmp_path / "entropy" / "calibration_cache.json").read_text())
    assert "entropy" in json.dumps(cache).lower() and report["calibration_cache"].endswith("calibration_cache.json")


def _tied_weights_graph(path) -> None:
    """``x @ w`` twice (a tied weight the exporter reaches through Identity) and a Conv whose bias is shared the
    same way, as torch.onnx writes equal tensors once."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "k"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["w_tied"], name="tie"),
         helper.make_node("Identity", ["b"], ["b_tied"], name="tie_bias"),
         helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
         helper.make_node("MatMul", ["h", "w_tied"], ["y"], name="second"),
         helper.make_node("Conv", ["img", "k", "b_tied"], ["z"], name="conv", pads=[1, 1, 1, 1])],
        "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16]),
                 helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_tied_weights_are_quantized_per_layer_and_the_conv_runs_in_int8(tmp_path):
    """A weight behind an Identity is quantized like any weight (int8 stored, one scale per channel), not
    re-quantized as an activation at run time, and a bias behind one lets ONNX Runtime fuse the Conv (QLinearConv);
    without the copies ONNX Runtime reads the tied weight as an activation and runs the Conv in fp32."""
    from networks.common.onnx_quantize import int8_weight_nodes, run_static_ptq
    from networks.common.onnx_runtime import inference_session

    src = tmp_path / "tied.onnx"
    _tied_weights_graph(src)
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((8, 16)).astype(np.float32),
              "img": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(4)]
    q = SimpleNamespace(backend="onnxruntime", model_path=str(src), skip_names=[], device="cpu", algorithm="minmax")
    ctx = SimpleNamespace(run_dir=tmp_path / "run", log=logging.getLogger("test"))
    out = run_static_ptq(q, ctx, lambda names: [], lambda _: (lambda: iter(calib), len(calib)), "random", [], "test")
    report = json.loads((tmp_path / "run" / "quantize_report.json").read_text())
    assert report["shared_weights_copied"] == 2

    model = onnx.load(out["quantized_onnx"])
    assert {n.name for n in int8_weight_nodes(model)} == {"first", "second", "conv"}
    assert not [n for n in model.graph.node if n.op_type == "Identity"]
    optimized = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    session = inference_session(out["quantized_onnx"], ["CPUExecutionProvider"], options)
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(optimized)).graph.node}

    feeds = calib[0]
    got = session.run(None, feeds)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, r in zip(got, ref, strict=True):
        assert np.abs(g - r).max() <= 0.05 * np.abs(r).max()


@pytest.mark.parametrize("algorithm, passes", [("minmax", 2), ("entropy", 3)])
def test_the_calibration_set_is_built_once_and_read_once_per_pass(tmp_path, algorithm, passes):
    """``calibration`` (a network's dataset, its preprocessing and its "fewer images than calib_images" warning)
    runs once; its feeds are read by the range probe, then once for minmax and twice for entropy."""
    from networks.common.onnx_quantize import run_static_ptq

    src = tmp_path / "shared.onnx"
    _shared_input_graph(src)
    calib, built, read = _calibration(), [], []

    def calibration(path):
        built.append(path)

        def feeds():
            read.append(1)
            return iter(calib)

        return feeds, len(calib)

    q = SimpleNamespace(backend="onnxruntime", model_path=str(src), skip_names=[], device="cpu", algorithm=algorithm)
    ctx = SimpleNamespace(run_dir=tmp_path / "q", log=logging.getLogger("test"))
    out = run_static_ptq(q, ctx, lambda names: [], calibration, "random", [], "test")
    assert len(built) == 1 and len(read) == passes and out["calibration_images"] == len(calib)
