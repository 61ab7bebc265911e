"""``tao model mask_grounding_dino gen_trt_engine`` and evaluate from its engine: refused at load in one line where
TensorRT or a GPU is missing (every machine CI has), checked field by field where they exist, and built and run
end to end where a GPU and TensorRT exist (those tests are skipped here)."""
from __future__ import annotations

import json

import pytest

from networks.common.tensorrt_engine import tensorrt_missing
from tests.networks.mask2former.test_onnx_eval import _main

from .test_onnx_eval import NET, _dry, exported  # noqa: F401 - exported is the module fixture used below

pytest.importorskip("onnx")

HAVE_TRT = not tensorrt_missing()


def _gen_dry(monkeypatch, capfd, spec, tmp_path, onnx_path, *overrides):
    monkeypatch.chdir(tmp_path)
    return _dry(monkeypatch, capfd, spec, "gen_trt_engine", f"results_dir={tmp_path / 'r'}",
                f"gen_trt_engine.onnx_file={onnx_path}", f"gen_trt_engine.trt_engine={tmp_path / 'm.engine'}",
                *overrides)


@pytest.mark.skipif(HAVE_TRT, reason="checks the refusal on a machine without TensorRT or a GPU")
def test_without_tensorrt_the_dry_run_refuses_in_one_line(exported, monkeypatch, capfd, tmp_path):  # noqa: F811
    spec, _, onnx_path, _ = exported
    code, lines = _gen_dry(monkeypatch, capfd, spec, tmp_path, onnx_path)
    assert code == 2 and len(lines) == 1, lines
    assert "gen_trt_engine" in lines[0] and ("tensorrt" in lines[0] or "CUDA GPU" in lines[0]), lines[0]
    assert "tao-deploy" not in lines[0]
    assert not (tmp_path / "r").exists() and not (tmp_path / "m.engine").exists()


@pytest.mark.skipif(HAVE_TRT, reason="checks the refusal on a machine without TensorRT or a GPU")
@pytest.mark.parametrize("action", ["evaluate", "inference"])
def test_trt_engine_without_tensorrt_is_one_line(exported, action, monkeypatch, capfd, tmp_path):  # noqa: F811
    spec, _, _, _ = exported
    monkeypatch.chdir(tmp_path)
    code, lines = _dry(monkeypatch, capfd, spec, action, f"results_dir={tmp_path}",
                       f"{action}.trt_engine={tmp_path / 'm.engine'}")
    assert code == 2 and len(lines) == 1, lines
    assert f"{action}.trt_engine" in lines[0] and "tensorrt" in lines[0].lower(), lines[0]
    assert "not supported" not in lines[0]  # the network runs engines; what is missing is TensorRT or a GPU


@pytest.mark.parametrize("overrides, field, words", [
    (["gen_trt_engine.tensorrt.layers_precision=[/x:int8]"], "gen_trt_engine.tensorrt.layers_precision", "'/x:int8'"),
    (["gen_trt_engine.tensorrt.min_batch_size=4", "gen_trt_engine.tensorrt.max_batch_size=2"],
     "gen_trt_engine.tensorrt.min_batch_size", "min_batch_size <= opt_batch_size"),
    (["gen_trt_engine.onnx_file=/nonexistent/m.onnx"], "gen_trt_engine.onnx_file", "does not exist"),
    (["model.max_text_len=128"], "gen_trt_engine.onnx_file", "256 text tokens"),
], ids=["precision", "batch-order", "missing-onnx", "text-length"])
def test_the_spec_checks_behind_the_tensorrt_check(exported, overrides, field, words, monkeypatch, capfd,  # noqa: F811
                                                   tmp_path):
    """With TensorRT and a GPU pretended present, each bad field is still one line at --dry-run: the action's
    checks (and the export contract of this network, its text window included) are wired."""
    monkeypatch.setattr("networks.common.tensorrt_engine.require_tensorrt", lambda *a, **k: None)
    spec, _, onnx_path, _ = exported
    code, lines = _gen_dry(monkeypatch, capfd, spec, tmp_path, onnx_path, *overrides)
    assert code == 2 and len(lines) == 1, lines
    assert field in lines[0] and words in lines[0], lines[0]


def test_fp32_layers_are_the_quantize_exclusions_of_the_export(exported):  # noqa: F811
    """The engine forces to fp32 what quantize keeps in fp32 (text-encoder softmax, deformable sampling, the
    heads' last layers, query selection), and nothing of the Swin backbone."""
    import onnx

    from networks.mask_grounding_dino.quantize import excluded_nodes

    _, _, onnx_path, _ = exported
    names = [n.name for n in onnx.load(str(onnx_path)).graph.node]
    forced = set(excluded_nodes(names, []))
    assert any("/model/bert/" in n and "Softmax" in n for n in forced)
    assert any("GridSample" in n for n in forced)
    assert not any(n.startswith("/model/body/") for n in forced)


@pytest.mark.skipif(not HAVE_TRT, reason="needs the tensorrt package and a CUDA GPU")
def test_engine_evaluates_like_the_onnx_file(exported, monkeypatch, tmp_path):  # noqa: F811
    spec, _, onnx_path, _ = exported
    monkeypatch.chdir(tmp_path)
    engine = tmp_path / "m.engine"
    _main(monkeypatch, "model", NET, "gen_trt_engine", "-e", str(spec), f"results_dir={tmp_path / 'r'}",
          f"gen_trt_engine.onnx_file={onnx_path}", f"gen_trt_engine.trt_engine={engine}",
          f"gen_trt_engine.timing_cache={tmp_path / 'cache.bin'}")
    report = json.loads((tmp_path / "r" / "gen_trt_engine" / "gen_trt_engine_report.json").read_text())
    assert engine.stat().st_size > 0 and report["forced_fp32_layers"] > 0
    metrics = {}
    for key, value in (("onnx_file", onnx_path), ("trt_engine", engine)):
        _main(monkeypatch, "model", NET, "evaluate", "-e", str(spec), f"results_dir={tmp_path / key}",
              f"evaluate.{key}={value}")
        metrics[key] = json.loads((tmp_path / key / "evaluate" / "metrics.json").read_text())
    assert metrics["trt_engine"]["runtime"]["name"] == "tensorrt"
    numbers = {k for k, v in metrics["onnx_file"].items() if isinstance(v, float)}
    assert numbers and all(abs(metrics["trt_engine"][k] - metrics["onnx_file"][k]) <= 1e-3 for k in numbers)
