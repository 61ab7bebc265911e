"""``tao model mask_grounding_dino quantize``: static int8 PTQ of an exported tiny model with ONNX Runtime.

The module fixture reuses test_onnx_eval.py's export and self-labelled test set (calibration images: the same
96×96 images with their COCO file), then runs the real ``quantize`` action through the ``tao`` entry point.
The tests read its outputs, evaluate the QDQ file, and check the refusals at ``--dry-run``.
"""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from tests.networks.mask2former.test_onnx_eval import _main, _tao

from .test_onnx_eval import NET, SIZE, _dry, exported  # noqa: F401 - exported is the module fixture used below

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CALIB = 2  # fewer than the 4 test images: the count must be honoured
#: Largest relative L2 difference of the image / text features between fp32 and weight-only int8 (set from a
#: measurement, see the torchao test); a wrong scale or a transposed weight moves them by far more.
FEATURE_TOL = 0.05
#: The same for ModelOpt's simulated int8 of weights and inputs (measured 0.056 image, 0.142 text: BERT's
#: activations have outliers that one per-tensor scale cannot hold).
MODELOPT_FEATURE_TOL = 0.2


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


def _evaluate_each(monkeypatch, capfd, spec, tmp_path, sources: dict[str, str]) -> dict[str, dict]:
    """``{name: metrics.json}`` of one ``evaluate`` per ``{name: model source override}``; prints their mAP50s."""
    metrics = {}
    for name, source in sources.items():
        code, _, err = _tao(monkeypatch, capfd, "model", NET, "evaluate", "-e", str(spec),
                            f"results_dir={tmp_path / name}", source)
        assert code == 0, err[-3000:]
        metrics[name] = json.loads((tmp_path / name / "evaluate" / "metrics.json").read_text())
    with capfd.disabled():
        print("\n" + "; ".join(f"{n}: bbox mAP50 {m['bbox_val_mAP50']:.3f}, segm mAP50 {m['segm_val_mAP50']:.3f}"
                               for n, m in metrics.items()))
    return metrics


def test_evaluate_from_qdq_writes_metrics(quantized, monkeypatch, capfd, tmp_path):
    """The QDQ file evaluates through the CLI. Its AP is printed beside the fp32 file's but not asserted: on this
    untrained model int8 error spreads over the whole graph (mAP50 0.83 → 0.09). The trained tiny model's figures
    (benchmarks/int8_accuracy_mgd.py) are in docs/mask_grounding_dino.md."""
    spec, onnx_path, run = quantized
    monkeypatch.chdir(tmp_path)
    qdq = run / "mgd_int8_qdq.onnx"
    metrics = _evaluate_each(monkeypatch, capfd, spec, tmp_path, {"fp32": f"evaluate.onnx_file={onnx_path}",
                                                                  "int8": f"evaluate.onnx_file={qdq}"})
    assert metrics["int8"]["runtime"]["onnx_file"] == str(qdq)
    assert isinstance(metrics["int8"]["segm_val_mAP"], float) and isinstance(metrics["int8"]["bbox_val_mAP"], float)


# ----------------------------------------------------------------------------------------- refusals
_CAL = "dataset.quant_calibration_data_sources"


#: (override, field named, words in the line): TAO's modelopt backends, then the other refusals (torchao: below)
_REFUSALS = [("quantize.backend=modelopt.pytorch quantize.algorithm=entropy", "quantize.algorithm", "absolute maximum"),
             ("quantize.backend=modelopt.onnx quantize.algorithm=awq_clip", "quantize.algorithm", "int4")] + [
    ("quantize.mode=weight_only_ptq", "quantize.mode", "static_ptq"),
    ("quantize.algorithm=awq_lite", "quantize.algorithm", "minmax"),
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
    code, lines = _dry(monkeypatch, capfd, spec, "quantize", *_quantize_args(tmp_path, onnx_path),
                       *override.split())
    assert (code, len(lines)) == (2, 1), lines
    assert field in lines[0] and words in lines[0], lines[0]


def _quantize_args(tmp_path, onnx_path) -> list[str]:
    return [f"results_dir={tmp_path}", f"quantize.model_path={onnx_path}", "quantize.backend=onnxruntime",
            "quantize.mode=static_ptq"]


def test_modelopt_onnx_quantizes_for_tensorrt_and_evaluates(quantized, monkeypatch, capfd, tmp_path):
    """backend modelopt.onnx (device cpu): ModelOpt's symmetric int8 file with this network's fp32 families and
    the -inf attention logits kept out, which tao-cli then evaluates."""
    import numpy as np
    import onnx

    import networks.common.tensorrt_engine as trt_engine

    pytest.importorskip("modelopt.onnx.quantization")
    spec, onnx_path, _ = quantized
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", NET, "quantize", "-e", str(spec), f"results_dir={tmp_path}",
                        f"quantize.model_path={onnx_path}", "quantize.backend=modelopt.onnx",
                        "quantize.mode=static_ptq", "quantize.device=cpu", f"quantize.calib_images={CALIB}")
    assert code == 0, err[-3000:]
    run = tmp_path / "quantize"
    qfile = run / "quantized_model.onnx"
    model = onnx.load(str(qfile))
    assert not {n.domain for n in model.graph.node} - {"", "ai.onnx"}
    assert [o.name for o in model.graph.output] == ["pred_logits", "pred_boxes", "pred_masks"]
    assert trt_engine.qdq_tensorrt_problem(qfile) is None
    report = json.loads((run / "quantize_report.json").read_text())
    assert report["backend"] == "modelopt.onnx" and report["calibration_images"] == CALIB
    excluded = set(report["excluded_nodes"])
    assert report["unbounded_tensors"] and set(report["excluded_for_unbounded_range"]) <= excluded
    assert any("GridSample" in n for n in excluded) and any("class_embed" in n for n in excluded)
    assert report["int8_weight_layers"].get("MatMul", 0) > 10
    inits = {i.name: i for i in model.graph.initializer}
    scales = [onnx.numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
              if n.op_type == "QuantizeLinear" and n.input[1] in inits]
    assert scales and all(np.isfinite(s).all() and (s > 0).all() for s in scales)
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:  # excluded weight layers read no int8 weight
        if node.name in excluded and node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1:
            assert getattr(producer.get(node.input[1]), "op_type", None) != "DequantizeLinear", node.name
    metrics = _evaluate_each(monkeypatch, capfd, spec, tmp_path, {"modelopt": f"evaluate.onnx_file={qfile}"})
    assert isinstance(metrics["modelopt"]["segm_val_mAP"], float)


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


def test_torchao_weight_only_int8_of_the_checkpoint(exported, monkeypatch, capfd, tmp_path):  # noqa: F811
    """TAO's default quantize section (backend torchao, weight_only_ptq) on the trained checkpoint: every
    quantizable nn.Linear (Swin, BERT, transformer, mask controller) gets int8 weights, and ``evaluate`` runs the written
    file as its checkpoint.  Its mAP is printed, not asserted: on this untrained model the self-labels are
    near-ties of random logits, so any change of the weights reorders them (the static int8 ONNX above: 0.83 →
    0.09; weight-only int8 measured 0.83 → 0.50 bbox).  The forward's outputs are compared instead; the trained
    model's figures are in docs/mask_grounding_dino.md (benchmarks/int8_accuracy_mgd.py)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8Tensor

    from tao_cli.engine.checkpoints import load_checkpoint

    spec, ckpt, _, _ = exported
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", NET, "quantize", "-e", str(spec), f"results_dir={tmp_path / 'q'}",
                        f"quantize.model_path={ckpt}", "quantize.device=cpu")
    assert code == 0, err[-3000:]
    out = tmp_path / "q" / "quantize" / "quantized_model_torchao.pth"
    obj = load_checkpoint(out, expected_network=NET)
    modules = obj["quantization"]["modules"]
    for part in ("model.backbone.", "model.bert.", "model.transformer.", "model.controller."):
        assert any(m.startswith(part) for m in modules), part
    assert all(isinstance(obj["state_dict"][m + ".weight"], Int8Tensor) for m in modules)
    metrics = _evaluate_each(monkeypatch, capfd, spec, tmp_path, {"fp32": f"evaluate.checkpoint={ckpt}",
                                                                  "int8": f"evaluate.checkpoint={out}"})
    assert all(isinstance(metrics["int8"][k], float) for k in ("bbox_val_mAP50", "segm_val_mAP50"))

    # the forward the evaluation ran: int8 layers in the module, and the image and text features (before the
    # query selection, whose top-k reorders on near-ties) near the fp32 model's, not equal to them
    drift = _feature_drift(spec, ckpt, out, lambda model: isinstance(
        model.bert.encoder.layer[0].attention.self.query.weight, Int8Tensor))
    for part, rel in drift.items():
        with capfd.disabled():
            print(f"{part}: largest relative |fp32 - int8| over its outputs {rel:.4f}")
        assert 0 < rel < FEATURE_TOL, (part, rel)


def _feature_drift(spec, ckpt, quantized, is_quantized) -> dict[str, float]:
    """{part: largest relative L2 difference between the fp32 checkpoint's and the quantized checkpoint's outputs of
    that part} for the Swin body and BERT, on one exported example through the engine's loader;
    ``is_quantized(loaded model)`` must hold for the quantized one (its quantized layers are in place)."""
    from networks.mask_grounding_dino.config import ExperimentConfig
    from networks.mask_grounding_dino.export import ExportWrapper, _example
    from networks.mask_grounding_dino.module import MaskGDinoModule
    from networks.mask_grounding_dino.text import load_tokenizer
    from tao_cli.engine.actions import load_into

    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.load(spec))
    example = _example(load_tokenizer(cfg.model.text_encoder_type), 1, (96, 96), int(cfg.model.max_text_len))
    parts = ("backbone.0.body", "bert")
    feats = {}
    for name, path in (("fp32", ckpt), ("int8", quantized)):
        module = MaskGDinoModule(cfg).eval()
        load_into(module, path, None, NET)
        got = feats[name] = {}
        hooks = [module.model.get_submodule(part).register_forward_hook(
            lambda m, i, o, part=part, got=got: got.update({part: _tensors(o)})) for part in parts]
        with torch.no_grad():
            ExportWrapper(module.model)(*example)
        for h in hooks:
            h.remove()
        if name == "int8":
            assert is_quantized(module.model)
    drift = {}
    for part in parts:
        pairs = list(zip(feats["fp32"][part], feats["int8"][part], strict=True))
        drift[part] = max(((a - b).norm() / a.norm()).item() for a, b in pairs if a.is_floating_point() and a.norm() > 0)
    return drift


def _tensors(obj) -> list:
    """Every tensor in a module output (tensors, sequences, mappings, objects with tensor attributes)."""
    if torch.is_tensor(obj):
        return [obj.detach().float()]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return [t for o in vars(obj).values() for t in _tensors(o)] if hasattr(obj, "__dict__") else []


def test_modelopt_pytorch_static_int8_of_the_checkpoint(exported, monkeypatch, capfd, tmp_path):  # noqa: F811
    """TAO's ModelOpt PyTorch backend (modelopt.pytorch, static_ptq) on the trained checkpoint: ModelOpt's
    simulated-int8 quantizers on every nn.Linear / nn.Conv2d (Swin, BERT, transformer, heads), calibrated on the
    calibration images, and ``evaluate`` runs the written file as its checkpoint.  mAP is printed, not asserted
    (near-ties on this untrained model, see the torchao test); the features before the query selection are
    compared instead, and must differ from fp32's (the quantizers run) by little."""
    pytest.importorskip("modelopt")
    pytest.importorskip("requests")
    from tao_cli.engine.checkpoints import load_checkpoint

    spec, ckpt, _, _ = exported
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", NET, "quantize", "-e", str(spec), f"results_dir={tmp_path / 'q'}",
                        f"quantize.model_path={ckpt}", "quantize.device=cpu", "quantize.backend=modelopt.pytorch",
                        "quantize.mode=static_ptq", f"quantize.calib_images={CALIB}")
    assert code == 0, err[-3000:]
    out = tmp_path / "q" / "quantize" / "quantized_model_modelopt.pth"
    obj = load_checkpoint(out, expected_network=NET)
    modules = obj["quantization"]["modules"]
    for part in ("model.backbone.", "model.bert.", "model.transformer.", "model.controller."):
        assert any(m.startswith(part) for m in modules), part
    inputs = [k for k in obj["state_dict"] if k.endswith("input_quantizer._amax")]
    # every quantized layer's input range calibrated (shared box heads appear under each of their names too)
    assert {k.rsplit(".", 2)[0] for k in inputs} >= set(modules) and all(float(obj["state_dict"][k]) > 0
                                                                        for k in inputs)
    report = json.loads((tmp_path / "q" / "quantize" / "quantize_report.json").read_text())
    assert report["calibration_images"] == CALIB
    metrics = _evaluate_each(monkeypatch, capfd, spec, tmp_path, {"fp32": f"evaluate.checkpoint={ckpt}",
                                                                  "int8": f"evaluate.checkpoint={out}"})
    assert all(isinstance(metrics["int8"][k], float) for k in ("bbox_val_mAP50", "segm_val_mAP50"))

    drift = _feature_drift(spec, ckpt, out, lambda model: bool(
        model.bert.encoder.layer[0].attention.self.query.input_quantizer.is_enabled))
    for part, rel in drift.items():
        with capfd.disabled():
            print(f"{part}: largest relative |fp32 - ModelOpt int8| over its outputs {rel:.4f}")
        assert 0 < rel < MODELOPT_FEATURE_TOL, (part, rel)

    # export writes the quantizers as symmetric int8 Q/DQ pairs (standard operators, a file TensorRT builds
    # strongly typed), which evaluate runs
    import onnx

    import networks.common.tensorrt_engine as trt_engine

    qdq = tmp_path / "modelopt_qdq.onnx"
    code, _, err = _tao(monkeypatch, capfd, "model", NET, "export", "-e", str(spec), f"results_dir={tmp_path}",
                        f"export.checkpoint={out}", f"export.onnx_file={qdq}", f"export.input_height={SIZE}",
                        f"export.input_width={SIZE}")
    assert code == 0, err[-3000:]
    graph = onnx.load(str(qdq), load_external_data=False)
    assert not {n.domain for n in graph.graph.node} - {"", "ai.onnx"}
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) >= 2 * len(modules)
    assert trt_engine.qdq_tensorrt_problem(qdq) is None
    onnx_metrics = _evaluate_each(monkeypatch, capfd, spec, tmp_path, {"int8_onnx": f"evaluate.onnx_file={qdq}"})
    assert isinstance(onnx_metrics["int8_onnx"]["segm_val_mAP"], float)
