"""networks.common.tensorrt_engine: the checks that run anywhere, and the build/run path where a GPU and TensorRT
exist (skipped elsewhere, with the reason)."""
from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from networks.common.errors import ConfigError
from networks.common.tensorrt_engine import (
    LayerPrecision,
    batch_range,
    is_qdq_onnx,
    parse_layers_precision,
    require_tensorrt,
    tensorrt_missing,
)

HAVE_TRT = not tensorrt_missing()
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="needs the tensorrt package and a CUDA GPU")


def _save(tmp_path, nodes, name, inits=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], list(inits))
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_require_tensorrt_names_every_missing_piece_in_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        require_tensorrt("gen_trt_engine.trt_engine")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("gen_trt_engine.trt_engine")
    assert "tensorrt" in msg and "CUDA GPU" in msg and "onnx_file" in msg


def _installed_tensorrt(monkeypatch, version: str) -> None:
    """Pretend ``tensorrt`` ``version`` is installed (only its version is read before a GPU is known)."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))


def test_require_tensorrt_with_the_package_but_no_gpu_names_only_the_gpu(monkeypatch):
    _installed_tensorrt(monkeypatch, "10.3.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA GPU") as err:
        require_tensorrt("evaluate.trt_engine")
    assert "pip install tensorrt" not in str(err.value)


def test_require_tensorrt_passes_when_both_exist(monkeypatch):
    _installed_tensorrt(monkeypatch, "10.3.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    require_tensorrt("evaluate.trt_engine")


def test_tensorrt_8_is_refused_with_its_version_before_any_build(monkeypatch):
    """TensorRT 8 has no strongly typed networks and parses ONNX only into an explicit-batch network, which this
    module (TensorRT 10's API) does not ask for: refused at load with the version found, not at build time."""
    _installed_tensorrt(monkeypatch, "8.6.1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError) as err:
        require_tensorrt("gen_trt_engine.trt_engine")
    msg = str(err.value)
    assert "\n" not in msg and "TensorRT 10 or newer" in msg and "8.6.1" in msg and "CUDA GPU" not in msg


def test_layers_precision_entries_parse_and_names_may_hold_colons():
    got = parse_layers_precision(["/post_processor/Div:fp32", "a:b/Add_1:FP16"], "f")
    assert got == [LayerPrecision("/post_processor/Div", "fp32"), LayerPrecision("a:b/Add_1", "fp16")]
    assert parse_layers_precision([], "f") == []


@pytest.mark.parametrize("entry", ["/post_processor/Div", "/x:int8", ":fp32", "/x:"])
def test_a_bad_layers_precision_entry_is_one_line_naming_the_field(entry):
    with pytest.raises(ConfigError) as err:
        parse_layers_precision(["/ok:fp32", entry], "gen_trt_engine.tensorrt.layers_precision")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("gen_trt_engine.tensorrt.layers_precision") and repr(entry) in msg


def test_qdq_detection_looks_for_quantize_dequantize_nodes(tmp_path):
    plain = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], "plain.onnx")
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("z", TensorProto.INT8, [], [0])
    qdq = _save(tmp_path, [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                           helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq.onnx", [scale, zero])
    assert not is_qdq_onnx(plain)
    assert is_qdq_onnx(qdq)


def test_batch_range_follows_a_static_batch_and_checks_the_order():
    assert batch_range(1, 2, 4, None, "t") == (1, 2, 4)
    assert batch_range(1, 1, 4, 2, "t") == (2, 2, 2)
    with pytest.raises(ConfigError, match="fixed batch of 8"):
        batch_range(1, 1, 4, 8, "gen_trt_engine.tensorrt")
    with pytest.raises(ConfigError, match="min_batch_size <= opt_batch_size"):
        batch_range(2, 1, 4, None, "gen_trt_engine.tensorrt")


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, y.sum(1) / (y.abs().sum(1) + 1)


def _export_tiny(tmp_path):
    torch.manual_seed(0)
    model = _Tiny().eval()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(path), input_names=["inputs"],
                      output_names=["a", "b"], dynamic_axes={"inputs": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    return model, path


@needs_trt
@pytest.mark.parametrize("data_type", ["FP32", "FP16"])
def test_engine_matches_onnxruntime_and_writes_its_timing_cache(tmp_path, data_type):
    import onnxruntime as ort

    from networks.common.tensorrt_engine import TrtSession, build_engine

    _, path = _export_tiny(tmp_path)
    report = build_engine(path, tmp_path / "tiny.engine", data_type=data_type, batch=(1, 2, 3),
                          fp32_select=lambda names: [n for n in names if "Div" in n], timing_cache=tmp_path / "cache.bin")
    assert (tmp_path / "cache.bin").stat().st_size > 0 and report.forced_fp32
    session = TrtSession(tmp_path / "tiny.engine")
    assert session.hw == (16, 16) and session.max_batch == 3
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)  # 2 chunks of <= 3
    got = session.run({"inputs": x})
    want = dict(zip(["a", "b"], ort.InferenceSession(str(path)).run(None, {"inputs": x}), strict=True))
    tol = 1e-4 if data_type == "FP32" else 2e-2
    for name in ("a", "b"):
        np.testing.assert_allclose(got[name], want[name], atol=tol, rtol=tol)


@needs_trt
def test_an_unknown_layers_precision_name_is_refused(tmp_path):
    from networks.common.tensorrt_engine import build_engine

    _, path = _export_tiny(tmp_path)
    with pytest.raises(ConfigError, match="no layer named '/nope'"):
        build_engine(path, tmp_path / "t.engine", layers_precision=[LayerPrecision("/nope", "fp32")])
