"""``tao model mask2former gen_trt_engine``: refused at load in one line where TensorRT or a GPU is missing (every
machine CI has), checked field by field where they exist, and built end to end where a GPU and TensorRT exist."""
from __future__ import annotations

import json

import pytest

from networks.common.tensorrt_engine import tensorrt_missing

from .test_onnx_eval import _main, _tao, export_tiny

pytest.importorskip("onnx")

HAVE_TRT = not tensorrt_missing()


@pytest.fixture(scope="module")
def exported(m2f_synthetic, tmp_path_factory):
    """(spec, fp32 ONNX of a tiny semantic model, dynamic batch)."""
    import _pytest.monkeypatch

    root = tmp_path_factory.mktemp("m2f_trt")
    mp = _pytest.monkeypatch.MonkeyPatch()
    try:
        mp.chdir(root)
        spec, _, onnx_path = export_tiny(mp, m2f_synthetic, "semantic", root)
    finally:
        mp.undo()
    return spec, onnx_path


def _dry_run(monkeypatch, capfd, spec, tmp_path, *overrides):
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "gen_trt_engine", "-e", str(spec), "--dry-run",
                        f"results_dir={tmp_path / 'r'}", *overrides)
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.mark.skipif(HAVE_TRT, reason="checks the refusal on a machine without TensorRT or a GPU")
def test_without_tensorrt_the_dry_run_refuses_in_one_line(exported, monkeypatch, capfd, tmp_path):
    spec, onnx_path = exported
    code, lines = _dry_run(monkeypatch, capfd, spec, tmp_path, f"gen_trt_engine.onnx_file={onnx_path}",
                           f"gen_trt_engine.trt_engine={tmp_path / 'm.engine'}")
    assert code == 2 and len(lines) == 1, lines
    assert "gen_trt_engine" in lines[0] and ("tensorrt" in lines[0] or "CUDA GPU" in lines[0]), lines[0]
    assert "tao-deploy" not in lines[0]
    assert not (tmp_path / "r").exists() and not (tmp_path / "m.engine").exists()


@pytest.mark.parametrize("overrides, field, words", [
    (["gen_trt_engine.tensorrt.layers_precision=[/x:int8]"], "gen_trt_engine.tensorrt.layers_precision", "'/x:int8'"),
    (["gen_trt_engine.tensorrt.min_batch_size=4", "gen_trt_engine.tensorrt.max_batch_size=2"],
     "gen_trt_engine.tensorrt.min_batch_size", "min_batch_size <= opt_batch_size"),
    (["gen_trt_engine.onnx_file=/nonexistent/m.onnx"], "gen_trt_engine.onnx_file", "does not exist"),
], ids=["precision", "batch-order", "missing-onnx"])
def test_the_spec_checks_behind_the_tensorrt_check(exported, overrides, field, words, monkeypatch, capfd, tmp_path):
    """With TensorRT and a GPU pretended present, each bad field is still one line at --dry-run: the action's
    checks are wired, not just the package test."""
    monkeypatch.setattr("networks.common.tensorrt_engine.require_tensorrt", lambda *a, **k: None)
    spec, onnx_path = exported
    code, lines = _dry_run(monkeypatch, capfd, spec, tmp_path, f"gen_trt_engine.onnx_file={onnx_path}",
                           f"gen_trt_engine.trt_engine={tmp_path / 'm.engine'}", *overrides)
    assert code == 2 and len(lines) == 1, lines
    assert field in lines[0] and words in lines[0], lines[0]


def test_fp32_layers_are_the_quantize_exclusions_of_the_export(exported):
    """The engine forces to fp32 what quantize keeps in fp32: TAO's cross-attention layers and the post-processor
    of a tao-cli export, and nothing of the backbone."""
    import onnx

    from networks.mask2former.quantize import excluded_nodes

    _, onnx_path = exported
    names = [n.name for n in onnx.load(str(onnx_path)).graph.node]
    forced = set(excluded_nodes(names, []))
    assert any("transformer_cross_attention_layers" in n for n in forced)
    assert any(not n.startswith("/model/") for n in forced)
    assert not any(n.startswith("/model/backbone/") for n in forced)


def _build(monkeypatch, spec, onnx_path, tmp_path, *extra):
    """``gen_trt_engine`` through the CLI into ``tmp_path/m.engine`` (run dir ``tmp_path/r``); the engine path."""
    monkeypatch.chdir(tmp_path)
    engine = tmp_path / "m.engine"
    _main(monkeypatch, "model", "mask2former", "gen_trt_engine", "-e", str(spec), f"results_dir={tmp_path / 'r'}",
          f"gen_trt_engine.onnx_file={onnx_path}", f"gen_trt_engine.trt_engine={engine}", *extra)
    return engine


@pytest.mark.skipif(not HAVE_TRT, reason="needs the tensorrt package and a CUDA GPU")
def test_builds_an_engine_through_the_cli(exported, monkeypatch, tmp_path):
    spec, onnx_path = exported
    engine = _build(monkeypatch, spec, onnx_path, tmp_path, "gen_trt_engine.tensorrt.data_type=FP16",
                    f"gen_trt_engine.timing_cache={tmp_path / 'cache.bin'}")
    report = json.loads((tmp_path / "r" / "gen_trt_engine" / "gen_trt_engine_report.json").read_text())
    assert engine.stat().st_size > 0 and report["forced_fp32_layers"] > 0 and report["data_type"] == "FP16"
    assert (tmp_path / "cache.bin").stat().st_size > 0


@pytest.mark.skipif(not HAVE_TRT, reason="needs the tensorrt package and a CUDA GPU")
def test_evaluate_from_the_engine_equals_evaluate_from_the_onnx(exported, monkeypatch, tmp_path):
    spec, onnx_path = exported
    engine = _build(monkeypatch, spec, onnx_path, tmp_path)
    metrics = {}
    for key, value in (("onnx_file", onnx_path), ("trt_engine", engine)):
        _main(monkeypatch, "model", "mask2former", "evaluate", "-e", str(spec), f"results_dir={tmp_path / key}",
              f"evaluate.{key}={value}", "evaluate.checkpoint=null")
        metrics[key] = json.loads((tmp_path / key / "evaluate" / "metrics.json").read_text())
    assert metrics["trt_engine"]["runtime"]["name"] == "tensorrt"
    numbers = {k for k, v in metrics["onnx_file"].items() if isinstance(v, float)}
    assert numbers and all(abs(metrics["trt_engine"][k] - metrics["onnx_file"][k]) <= 1e-3 for k in numbers)
