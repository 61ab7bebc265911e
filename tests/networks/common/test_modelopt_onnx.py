"""networks.common.modelopt_onnx: the helpers around ModelOpt's ONNX quantizer (the end-to-end runs are in the
networks' test_quantize.py)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from networks.common.modelopt_onnx import calibration_eps, exact_names_pattern, regex_matches, stack_feeds


def test_exact_names_pattern_matches_only_those_names():
    names = ["/model/a/MatMul", "/model/a/MatMul_1", "x.y(z)", "/model/b/Conv"]
    [pattern] = exact_names_pattern(["/model/a/MatMul", "x.y(z)", "/model/a/MatMul"])
    assert [n for n in names if re.match(pattern, n)] == ["/model/a/MatMul", "x.y(z)"]
    assert exact_names_pattern([]) == []


def test_regex_matches_is_re_match_at_the_start():
    names = ["/model/backbone/Conv", "/model/head/Conv", "/backbone/Conv"]
    assert regex_matches(names, ["/model/.*/Conv$"]) == names[:2]
    assert regex_matches(names, ["backbone"]) == []  # re.match anchors at the start: no substring search
    assert regex_matches(names, ["", "/back"]) == names[2:]


def test_calibration_eps_follow_the_device_and_the_providers():
    cpu_only = ["CPUExecutionProvider"]
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert calibration_eps("cuda", cpu_only) == ["cpu"]
    assert calibration_eps("cpu", cpu_only) == ["cpu"]
    assert calibration_eps("cuda", gpu) == ["cuda:0", "cpu"]
    assert calibration_eps("cuda:1", gpu) == ["cuda:1", "cpu"]


def test_stack_feeds_concatenates_along_the_batch_axis():
    feeds = iter([{"a": np.zeros((1, 2)), "b": np.ones((1, 3))}, {"a": np.ones((1, 2)), "b": np.zeros((1, 3))}])
    out = stack_feeds(feeds)
    assert out["a"].shape == (2, 2) and out["b"].shape == (2, 3) and out["a"][1].all()
    with pytest.raises(ValueError):
        stack_feeds(iter([]))


def test_onnx_runtime_quantization_restored_after_modelopt(tmp_path):
    """ModelOpt's quantize replaces ONNX Runtime's calibrator factory and methods and edits its QDQ registry;
    all of it is put back on exit."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("modelopt.onnx.quantization")
    from onnxruntime.quantization import calibrate, registry
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    from networks.common.modelopt_onnx import ort_quantization_restored

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    path = tmp_path / "toy.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(path), input_names=["x"], dynamo=False)
    before = (calibrate.create_calibrator, MinMaxCalibrater.compute_data, dict(registry.QDQRegistry))
    from modelopt.onnx.quantization import quantize

    with ort_quantization_restored():
        quantize(str(path), calibration_data={"x": np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(
            np.float32)}, calibration_method="max", calibration_eps=["cpu"], output_path=str(tmp_path / "q.onnx"),
            high_precision_dtype="fp32", log_level="ERROR")
        patched = (calibrate.create_calibrator, MinMaxCalibrater.compute_data, dict(registry.QDQRegistry))
        assert patched[0] is not before[0] and patched[1] is not before[1] and patched[2] != before[2]
    assert calibrate.create_calibrator is before[0] and MinMaxCalibrater.compute_data is before[1]
    assert dict(registry.QDQRegistry) == before[2]
    assert (tmp_path / "q.onnx").is_file()
