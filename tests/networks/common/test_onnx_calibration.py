"""Entropy calibration in the memory of one batch (:mod:`networks.common.onnx_calibration`) against ONNX Runtime's
own all-at-once calibration, on a hand-built graph whose later calibration batches have wider ranges than the first
(the case where feeding ONNX Runtime batch by batch re-bins its histograms and changes the thresholds)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

WIDTH = 256


def _graph(path) -> None:
    """x [n, WIDTH] -> MatMul -> Relu -> MatMul -> y: three calibrated activations (x, the hidden layer, y)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / 16).astype(np.float32), n)
               for n in ("w1", "w2")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="second")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTH])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def _feeds(count: int, rows: int = 64) -> list[dict[str, np.ndarray]]:
    """Heavy-tailed batches whose scale grows batch by batch."""
    rng = np.random.default_rng(1)
    return [{"x": (rng.standard_t(2, size=(rows, WIDTH)) * (1 + k)).astype(np.float32)} for k in range(count)]


def _calibrator(tmp_path, name: str):
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    src = tmp_path / "mlp.onnx"
    if not src.exists():
        _graph(src)
    return create_calibrator(str(src), ["MatMul"], augmented_model_path=str(tmp_path / f"{name}_augmented.onnx"),
                             calibrate_method=CalibrationMethod.Entropy, providers=["CPUExecutionProvider"],
                             extra_options={"num_bins": 512, "num_quantized_bins": 128})  # 2048/256 in quantize


def _reader(feeds):
    from networks.common.onnx_quantize import feed_reader

    return feed_reader(iter(feeds))


def _ranges(calibrator) -> dict[str, tuple[np.ndarray, ...]]:
    data = calibrator.compute_data()
    return {name: (np.asarray(t.range_value[0]), np.asarray(t.range_value[1]), np.asarray(t.hist),
                   np.asarray(t.bins)) for name, t in data.data.items()}


def test_two_passes_give_onnx_runtime_all_at_once_thresholds_and_histograms(tmp_path, capsys):
    from networks.common.onnx_calibration import collect_histograms

    feeds = _feeds(6)
    at_once = _calibrator(tmp_path, "at_once")
    at_once.collect_data(_reader(feeds))
    expected = _ranges(at_once)

    ours = _calibrator(tmp_path, "ours")
    calls = []
    collect_histograms(ours, lambda: calls.append(1) or iter(feeds))
    got = _ranges(ours)
    assert len(calls) == 2
    assert list(got) == list(expected) and {"x", "h", "r", "y"} <= set(got)
    for name in expected:
        for g, e in zip(got[name], expected[name], strict=True):
            assert g.dtype == e.dtype and np.array_equal(g, e), name

    # batch by batch, ONNX Runtime's merge re-bins around the first batch's range: other histograms, other thresholds
    by_batch = _calibrator(tmp_path, "by_batch")
    for feed in feeds:
        by_batch.collect_data(_reader([feed]))
    rebinned = _ranges(by_batch)
    assert any(rebinned[n][3].shape != expected[n][3].shape or not np.array_equal(rebinned[n][1], expected[n][1])
               for n in expected)
    capsys.readouterr()  # ONNX Runtime prints its progress


def _peak_mib(collect) -> float:
    tracemalloc.start()
    try:
        collect()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_memory_stays_at_one_batch_where_onnx_runtime_keeps_every_batch(tmp_path, capsys):
    from networks.common.onnx_calibration import collect_histograms

    rows = 512
    few, many = _feeds(2, rows=rows), _feeds(12, rows=rows)
    batch_mib = 4 * rows * WIDTH * 4 / 2**20  # x, h, r and y of one batch: 2 MiB

    def onnx_runtime(feeds):
        return lambda: _calibrator(tmp_path, f"ort{len(feeds)}").collect_data(_reader(feeds))

    def two_pass(feeds):
        return lambda: collect_histograms(_calibrator(tmp_path, f"ours{len(feeds)}"), lambda: iter(feeds))

    _peak_mib(onnx_runtime(few))  # one-time allocations of the first session
    # the measurement sees ONNX Runtime's calibrator keep every batch until the end (10 more batches) ...
    assert _peak_mib(onnx_runtime(many)) - _peak_mib(onnx_runtime(few)) > 5 * batch_mib
    # ... and the two-pass collection keep none
    assert _peak_mib(two_pass(many)) - _peak_mib(two_pass(few)) < 0.5 * batch_mib
    capsys.readouterr()


def test_an_empty_calibration_set_is_refused_as_onnx_runtime_does(tmp_path, capsys):
    from networks.common.onnx_calibration import collect_histograms

    with pytest.raises(ValueError, match="No data is collected"):
        collect_histograms(_calibrator(tmp_path, "empty"), lambda: iter([]))
    with pytest.raises(ValueError, match="No data is collected"):
        _calibrator(tmp_path, "ort_empty").collect_data(_reader([]))
    capsys.readouterr()


@pytest.mark.parametrize("workers", [1, 2])
def test_entropy_ranges_in_worker_processes_equal_onnx_runtime_compute_data(tmp_path, capsys, workers):
    from networks.common.onnx_calibration import collect_histograms, entropy_ranges

    calibrator = _calibrator(tmp_path, "search")
    collect_histograms(calibrator, lambda: iter(_feeds(3)))
    got = entropy_ranges(calibrator.collector, workers)
    expected = calibrator.compute_data()
    assert list(got.data) == list(expected.data) and len(got.data) == 4
    for name, want in expected.data.items():
        have = got.data[name]
        for field in ("lowest", "highest", "hist", "bins"):
            a, b = np.asarray(getattr(have, field)), np.asarray(getattr(want, field))
            assert a.dtype == b.dtype and np.array_equal(a, b), (name, field)
    capsys.readouterr()
