"""ONNX Runtime sessions run with the intra-op thread count the engine chose for the run (torch's), not ONNX
Runtime's default of one pinned thread per physical core: evaluate / inference (:class:`OnnxSession`), the
export parity check and the quantize action's calibration sessions."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from .test_qdq_session import _static_linear

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture
def torch_threads():
    """Set torch's intra-op thread count for the test (the engine's choice), restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _image_graph(path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["inputs"], ["out"], name="relu")], "image",
                              [helper.make_tensor_value_info("inputs", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.mark.parametrize("threads", [1, 2])
def test_onnx_session_takes_the_run_thread_count(tmp_path, torch_threads, threads, caplog):
    from networks.common.onnx_runtime import OnnxSession, describe_onnx

    path = tmp_path / "image.onnx"
    _image_graph(path)
    torch_threads(threads)
    session = OnnxSession(path, describe_onnx(path, "evaluate.onnx_file"))
    assert session.session.get_session_options().intra_op_num_threads == threads
    assert session.describe()["intra_op_threads"] == threads
    with caplog.at_level(logging.INFO):
        session.log_start(logging.getLogger("test"))
    assert f"{threads} intra-op thread(s)" in caplog.text


class _Recorder:
    """Stands in for ``onnxruntime.InferenceSession``: records (model path, intra-op threads) of each session
    that runs."""

    def __init__(self, real):
        self.real = real
        self.ran: list[tuple[str, int]] = []

    def __call__(self, path, sess_options=None, *args, **kwargs):
        session = self.real(path, sess_options, *args, **kwargs)
        threads = session.get_session_options().intra_op_num_threads
        recorder, run = self, session.run

        def recorded_run(*a, **k):
            recorder.ran.append((str(path), threads))
            return run(*a, **k)

        session.run = recorded_run
        return session


CALIB = 3


def _quantize_with_one_thread(tmp_path, torch_threads, monkeypatch, **section) -> tuple[dict, _Recorder]:
    """``run_static_ptq`` of the hand-built linear graph on :data:`CALIB` random batches with the run's threads at
    1 and the quantize ``section`` fields; (its report, the recorder of the sessions that ran)."""
    from networks.common.onnx_quantize import run_static_ptq

    src = tmp_path / "linear.onnx"
    _static_linear(src)
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((1, 8, 16)).astype(np.float32)} for _ in range(CALIB)]
    recorder = _Recorder(ort.InferenceSession)
    monkeypatch.setattr(ort, "InferenceSession", recorder)
    torch_threads(1)
    q = SimpleNamespace(model_path=str(src), skip_names=[], device="cpu", **section)
    ctx = SimpleNamespace(run_dir=tmp_path / "q", log=logging.getLogger("test"))
    out = run_static_ptq(q, ctx, lambda names: [], lambda _: (lambda: iter(calib), len(calib)), "random", [], "none")
    return out, recorder


@pytest.mark.parametrize("algorithm", ["minmax", "entropy"])
def test_calibration_sessions_take_the_run_thread_count(tmp_path, torch_threads, monkeypatch, algorithm):
    _, recorder = _quantize_with_one_thread(tmp_path, torch_threads, monkeypatch, backend="onnxruntime",
                                            algorithm=algorithm)
    # the range probe, then the calibrator (one pass for min-max, two for entropy), each batch a run
    calibration = [threads for path, threads in recorder.ran if "range_probe" in path or "augmented" in path]
    assert len(calibration) >= 2 * CALIB, recorder.ran
    assert set(calibration) == {1}, recorder.ran


def test_export_parity_session_takes_the_run_thread_count(tmp_path, torch_threads, monkeypatch):
    from networks.common.onnx_export import onnx_parity

    path = tmp_path / "image.onnx"
    _image_graph(path)
    recorder = _Recorder(ort.InferenceSession)
    monkeypatch.setattr(ort, "InferenceSession", recorder)
    torch_threads(1)
    diffs = onnx_parity(torch.nn.ReLU(), path, (torch.randn(1, 3, 8, 8),), ["inputs"], ["out"])
    assert diffs == {"out": 0.0}
    assert recorder.ran == [(str(path), 1)]


def test_modelopt_calibration_sessions_take_the_run_thread_count(tmp_path, torch_threads, monkeypatch):
    """ModelOpt makes its ONNX Runtime sessions itself; inside the backend they start with the run's count, and
    ``onnxruntime.SessionOptions`` is ONNX Runtime's own again afterwards."""
    pytest.importorskip("modelopt.onnx.quantization")
    real_options = ort.SessionOptions
    out, recorder = _quantize_with_one_thread(tmp_path, torch_threads, monkeypatch, backend="modelopt.onnx",
                                              algorithm="minmax", backend_kwargs={})
    assert Path(out["quantized_onnx"]).is_file()
    assert recorder.ran and {threads for _, threads in recorder.ran} == {1}, recorder.ran
    assert ort.SessionOptions is real_options
