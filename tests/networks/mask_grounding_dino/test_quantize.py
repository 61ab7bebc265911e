"""``tao model mask_grounding_dino quantize``: static int8 PTQ of an exported tiny model with ONNX Runtime.

The module fixture reuses test_onnx_eval.py's export and self-labelled test set (calibration images: the same
96×96 images with their COCO file), then runs the real ``quantize`` action through the ``tao`` entry point.
The tests read its outputs, evaluate the QDQ file, and check the refusals at ``--dry-run``.
"""
from __future__ import annotations

import json

import pytest

from tests.networks.mask2former.test_onnx_eval import _main, _tao

from .test_onnx_eval import NET, _dry, exported  # noqa: F401 - exported is the module fixture used below

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CALIB = 2  # fewer than the 4 test images: the count must be honoured


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):  # noqa: F811 - the imported fixture
    """(spec, fp32 onnx, quantize run dir) after a successful quantize run."""
    import _pytest.monkeypatch

    spec, _, onnx_path, _ = exported
    root = tmp_path_factory.mktemp("mgd_quant")
    mp = _pytest.monkeypatch.MonkeyPatch()
    try:
        mp.chdir(root)
        _main(mp, "model", NET, "quantize", "-e", str(spec), f"results_dir={root / 'results'}",
              f"quantize.model_path={onnx_path}", "quantize.backend=onnxruntime", "quantize.mode=static_ptq",
              "quantize.device=cpu", f"quantize.calib_images={CALIB}")
    finally:
        mp.undo()
    return spec, onnx_path, root / "results" / "quantize"


def _weight_source(model, node):
    """(producer op of ``node``'s second input after any Identity chain — None for an initializer, or
    "activation" when it is computed from the inputs); shared weights reach their MatMul through Identity."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    name = node.input[1]
    while name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    if name in inits:
        return None
    p = producer.get(name)
    if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits:
        return "DequantizeLinear"
    return "activation"


def test_quantize_writes_a_standard_qdq_graph_with_fp32_exclusions(quantized):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    _, onnx_path, run = quantized
    qdq, named = run / "mgd_int8_qdq.onnx", run / "mgd_named.onnx"
    model = onnx.load(str(qdq))
    count = {op: sum(n.op_type == op for n in model.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    assert named.is_file() and min(count.values()) > 10, count
    assert not {n.domain for n in model.graph.node} - {"", "ai.onnx"}  # standard operators only
    assert [o.name for o in model.graph.output] == ["pred_logits", "pred_boxes", "pred_masks"]
    assert [i.name for i in onnx.load(str(named)).graph.input][:2] == ["inputs", "input_ids"]

    report = json.loads((run / "quantize_report.json").read_text())
    excluded = set(report["excluded_nodes"])
    assert (report["calibration_images"], report["quantized_onnx"], report["model_path"]) == \
        (CALIB, str(qdq), str(onnx_path.resolve()))
    assert report["int8_mb"] < report["fp32_mb"] and report["num_excluded_nodes"] == len(excluded) > 0
    # masked attention logits hold -inf: their nodes stay fp32, so no int8 scale is infinite
    assert report["unbounded_tensors"] and set(report["excluded_for_unbounded_range"]) <= excluded
    inits = {i.name: i for i in model.graph.initializer}
    scales = [numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
              if n.op_type == "QuantizeLinear" and n.input[1] in inits]
    assert scales and all(np.isfinite(s).all() for s in scales)
    # every family the module docstring names is excluded, and the bulk of the network is not
    kinds = {"bert softmax": lambda n: n.startswith("/model/bert/") and n.endswith("/Softmax"),
             "bert layernorm": lambda n: n.startswith("/model/bert/") and "LayerNormalization" in n,
             "grid sample": lambda n: "GridSample" in n, "class embed": lambda n: "class_embed" in n,
             "last box layer": lambda n: "bbox_embed.0/layers.2" in n}
    for kind, pred in kinds.items():
        assert any(pred(n) for n in excluded), kind
    assert not any(n.startswith("/model/body/") for n in excluded)  # the Swin backbone is quantized

    # excluded weight layers read fp32 weights; quantized ones int8 weights through DequantizeLinear
    weighted = {n.name: _weight_source(model, n) for n in model.graph.node
                if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1}
    weighted = {k: v for k, v in weighted.items() if v != "activation"}
    fp32_weighted = [k for k in weighted if k in excluded]
    assert any("bbox_embed.0/layers.2" in k for k in fp32_weighted)
    assert all(weighted[k] is None for k in fp32_weighted), [k for k in fp32_weighted if weighted[k]]
    assert any(v == "DequantizeLinear" for k, v in weighted.items() if k.startswith("/model/body/"))
    last = json.loads((run / "status.json").read_text().splitlines()[-1])
    assert last["status"] == "SUCCESS" and last["outputs"]["quantized_onnx"] == str(qdq)


def test_evaluate_from_qdq_writes_metrics(quantized, monkeypatch, capfd, tmp_path):
    """The QDQ file evaluates through the CLI. Its AP is printed beside the fp32 file's but not asserted: on this
    untrained model int8 error spreads over the whole graph (mAP50 0.83 → 0.09). On the trained tiny model the
    int8 file keeps segm mAP50 (benchmarks/int8_accuracy_mgd.py; figures in docs/mask_grounding_dino.md)."""
    spec, onnx_path, run = quantized
    monkeypatch.chdir(tmp_path)
    qdq = run / "mgd_int8_qdq.onnx"
    metrics = {}
    for name, path in (("fp32", onnx_path), ("int8", qdq)):
        code, _, err = _tao(monkeypatch, capfd, "model", NET, "evaluate", "-e", str(spec),
                            f"results_dir={tmp_path / name}", f"evaluate.onnx_file={path}")
        assert code == 0, err[-3000:]
        metrics[name] = json.loads((tmp_path / name / "evaluate" / "metrics.json").read_text())
    with capfd.disabled():
        print("\n" + "; ".join(f"{n}: bbox mAP50 {m['bbox_val_mAP50']:.3f}, segm mAP50 {m['segm_val_mAP50']:.3f}"
                               for n, m in metrics.items()))
    assert metrics["int8"]["runtime"]["onnx_file"] == str(qdq)
    assert isinstance(metrics["int8"]["segm_val_mAP"], float) and isinstance(metrics["int8"]["bbox_val_mAP"], float)


# ----------------------------------------------------------------------------------------- refusals
_CAL = "dataset.quant_calibration_data_sources"


#: (override, field named, words in the line): every backend TAO lists but ONNX Runtime, then the other refusals
_REFUSALS = [(f"quantize.backend={b}", "quantize.backend", "not supported") for b in
             ("modelopt.onnx", "modelopt.pytorch", "torchao")] + [
    ("quantize.mode=weight_only_ptq", "quantize.mode", "static_ptq"),
    ("quantize.algorithm=awq_lite", "quantize.algorithm", "minmax"),
    ("quantize.device=trt", "quantize.device", "tao-deploy"),
    ("quantize.model_path=", "quantize.model_path", "export"),
    ("quantize.model_path=/nonexistent/m.onnx", "quantize.model_path", "does not exist"),
    (f"{_CAL}.image_dir=", f"{_CAL}.image_dir", "empty"),
    (f"{_CAL}.json_file=", f"{_CAL}.json_file", "prompt"),
    ("model.max_text_len=128", "quantize.model_path", "256 text tokens"),
]


@pytest.mark.parametrize("override, field, words", _REFUSALS, ids=[r[0] for r in _REFUSALS])
def test_quantize_refusals_at_dry_run(quantized, override, field, words, monkeypatch, capfd, tmp_path):
    spec, onnx_path, _ = quantized
    monkeypatch.chdir(tmp_path)
    code, lines = _dry(monkeypatch, capfd, spec, "quantize", *_quantize_args(tmp_path, onnx_path), override)
    assert (code, len(lines)) == (2, 1), lines
    assert field in lines[0] and words in lines[0], lines[0]


def _quantize_args(tmp_path, onnx_path) -> list[str]:
    return [f"results_dir={tmp_path}", f"quantize.model_path={onnx_path}", "quantize.backend=onnxruntime",
            "quantize.mode=static_ptq"]


def test_quantize_dry_run_ok_and_tao_defaults_do_not_stop_other_actions(quantized, monkeypatch, capfd, tmp_path):
    spec, onnx_path, _ = quantized
    monkeypatch.chdir(tmp_path)
    assert _dry(monkeypatch, capfd, spec, "quantize", *_quantize_args(tmp_path, onnx_path))[0] == 0
    # TAO's default quantize section (torchao, weight-only) is read by the quantize action only
    code, lines = _dry(monkeypatch, capfd, spec, "evaluate", f"results_dir={tmp_path}",
                       f"evaluate.onnx_file={onnx_path}")
    assert code == 0, lines


def test_excluded_nodes_rules():
    from networks.mask_grounding_dino.quantize import excluded_nodes

    names = ["/model/bert/encoder/layer.0/attention/self/Softmax",
             "/model/bert/encoder/layer.0/attention/self/query/MatMul",
             "/model/bert/encoder/layer.0/output/LayerNorm/LayerNormalization",
             "/model/body/layers.0/blocks.0/attn/Softmax",
             "/model/decoder/layers.0/cross_attn/GridSample_1",
             "/model/decoder/layers.0/cross_attn/value_proj/MatMul",
             "/model/class_embed.0/MatMul", "/model/bbox_embed.0/layers.2/MatMul", "/model/bbox_embed.0/layers.1/MatMul",
             "/model/enc_out_bbox_embed/layers.2/Add", "/model/controller/layers.2/MatMul", "/model/MatMul_1",
             "Identity_3"]
    want = [names[0], names[2], names[4], names[6], names[7], names[9], names[10], names[11]]
    assert excluded_nodes(names, []) == want
    assert excluded_nodes(names, ["value_proj"]) == sorted(want + [names[5]], key=names.index)
    assert excluded_nodes(names, ["body"], default=False) == [names[3]]
