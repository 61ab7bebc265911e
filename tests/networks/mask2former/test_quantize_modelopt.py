"""``tao model mask2former quantize`` with TAO's ModelOpt PyTorch backend (``backend: modelopt.pytorch``): static
int8 PTQ of a trained checkpoint with ModelOpt's simulated-int8 quantizers, calibrated on images.

A seeded tiny semantic checkpoint labels ``dataset.val`` with its own predictions (so its mIoU is 1.0 and a broken
quantized model shows), the real ``quantize`` action writes ``quantized_model_modelopt.pth``, and ``evaluate`` runs
that file as its ``checkpoint``.  The layer-selection rules and the refusals are checked on their own.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from .test_onnx_eval import _tao, evaluate_each, quantize_checkpoint
from .test_quantize_torchao import _Toy

pytest.importorskip("modelopt")
pytest.importorskip("requests")

CALIB = 3
#: mIoU drop allowed against the fp32 checkpoint on its self-labelled set (measured: 1.0 vs 1.0); a model whose
#: activations or weights are mis-scaled predicts near chance and fails.
MIOU_DROP = 0.05


@pytest.fixture(scope="module")
def quantized(m2f_synthetic, tmp_path_factory):
    """(spec, fp32 checkpoint, quantize run dir) after a successful modelopt.pytorch quantize run."""
    return quantize_checkpoint(m2f_synthetic, tmp_path_factory.mktemp("m2f_modelopt_torch"),
                               "quantize.backend=modelopt.pytorch", "quantize.mode=static_ptq",
                               f"quantize.calib_images={CALIB}")


def test_quantize_writes_calibrated_quantizers_and_modelopt_state(quantized):
    from tao_cli.engine.checkpoints import load_checkpoint

    _, ckpt, run = quantized
    out = run / "quantized_model_modelopt.pth"
    obj, src = load_checkpoint(out, expected_network="mask2former"), load_checkpoint(ckpt)
    record = obj["quantization"]
    assert record["backend"] == "modelopt.pytorch" and record["root"] == "model"
    assert record["source"] == str(ckpt.resolve()) and record["modelopt_state"]["modelopt_state_dict"]
    state = obj["state_dict"]
    amax = {k for k in state if k.endswith("_amax")}
    assert set(state) - amax == set(src["state_dict"])  # the model's tensors plus the quantizers' ranges
    for k in set(src["state_dict"]):  # weights stay fp32 (simulated int8 happens in the forward)
        assert torch.equal(state[k], src["state_dict"][k]), k
    # every Linear/Conv2d by default: weights per output channel, inputs per tensor, all calibrated (finite, > 0)
    assert {k.rsplit(".", 2)[0] for k in amax} == set(record["modules"])
    for k in amax:  # weights: per output channel, their absolute maximum (0 for a zero-initialised layer)
        a = state[k]
        if ".weight_quantizer." in k:
            w = src["state_dict"][k.replace(".weight_quantizer._amax", ".weight")]
            assert a.numel() == w.shape[0]
            assert torch.allclose(a.flatten(), w.abs().flatten(1).amax(1), rtol=1e-6), k
        else:  # inputs: one calibrated range per tensor
            assert a.numel() == 1 and torch.isfinite(a).all() and (a > 0).all(), k
    report = json.loads((run / "quantize_report.json").read_text())
    assert report["calibration_images"] == CALIB
    assert report["quantized_layers"] == report["quantizable_layers"] == len(record["modules"])
    assert any(".backbone." in m for m in record["modules"]) and any("predictor" in m for m in record["modules"])
    last = json.loads((run / "status.json").read_text().splitlines()[-1])
    assert last["status"] == "SUCCESS" and last["outputs"]["quantized_model"] == str(out)


def test_evaluate_runs_the_modelopt_checkpoint(quantized, monkeypatch, capfd, tmp_path):
    spec, ckpt, run = quantized
    monkeypatch.chdir(tmp_path)
    metrics = evaluate_each(monkeypatch, capfd, spec, tmp_path, {
        "fp32": f"evaluate.checkpoint={ckpt}", "int8": f"evaluate.checkpoint={run / 'quantized_model_modelopt.pth'}"})
    log = (tmp_path / "int8" / "evaluate" / "evaluate.log").read_text()
    assert "ModelOpt simulated-int8 quantized model" in log
    assert metrics["fp32"]["mIoU"] > 0.9  # self-labelled
    assert metrics["int8"]["mIoU"] >= metrics["fp32"]["mIoU"] - MIOU_DROP, metrics


def test_loading_restores_the_quantizers(quantized):
    """The engine's loader re-inserts ModelOpt's quantizers with their calibrated ranges, and the forward uses them:
    outputs are close to the fp32 model's but not equal to them; a field that needs fp32 weights refuses the file."""
    from networks.common.errors import CheckpointError
    from networks.mask2former.config import ExperimentConfig
    from networks.mask2former.module import Mask2FormerModule
    from tao_cli.engine.actions import load_into

    spec, ckpt, run = quantized
    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.load(spec))
    fp32, int8 = Mask2FormerModule(cfg).eval(), Mask2FormerModule(cfg).eval()
    load_into(fp32, ckpt, None, "mask2former")
    load_into(int8, run / "quantized_model_modelopt.pth", None, "mask2former")
    qkv = int8.model.backbone.layers[0].blocks[0].attn.qkv
    assert qkv.weight_quantizer.is_enabled and qkv.input_quantizer.is_enabled
    assert float(qkv.input_quantizer.amax) > 0
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fp32.model(x)["pred_masks"], int8.model(x)["pred_masks"]
    diff = (a - b).abs().max().item()
    assert 0 < diff < 0.1 * a.abs().max().item(), diff

    from networks.mask2former.export import load_model_weights
    from networks.mask2former.model import build_model

    with pytest.raises(CheckpointError, match="quantized model"):  # where fp32 weights are needed (train)
        load_model_weights(build_model(cfg.model), str(run / "quantized_model_modelopt.pth"),
                           field="train.pretrained_model_path", loader=lambda p: torch.load(p, weights_only=False),
                           model_cfg=cfg.model)


def test_export_writes_the_quantizers_as_qdq_and_evaluate_runs_it(quantized, monkeypatch, capfd, tmp_path):
    """``export`` of the ModelOpt checkpoint: ModelOpt's quantizers become symmetric int8 Q/DQ pairs (standard
    operators, a file TensorRT builds strongly typed), and ``evaluate`` from it scores as the checkpoint does."""
    import numpy as np
    import onnx

    import networks.common.tensorrt_engine as trt_engine

    spec, ckpt, run = quantized
    monkeypatch.chdir(tmp_path)
    qdq = tmp_path / "modelopt_qdq.onnx"
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "export", "-e", str(spec),
                        f"results_dir={tmp_path}", f"export.checkpoint={run / 'quantized_model_modelopt.pth'}",
                        f"export.onnx_file={qdq}", "export.input_height=64", "export.input_width=64")
    assert code == 0, err[-3000:]
    model = onnx.load(str(qdq))
    ops = [n.op_type for n in model.graph.node]
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert ops.count("QuantizeLinear") >= 2 * len(json.loads((run / "quantize_report.json").read_text())["modules"])
    assert trt_engine.qdq_tensorrt_problem(qdq) is None
    zero_points = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if "zero_point" in t.name]
    consts = {o: n for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    zero_points += [onnx.numpy_helper.to_array(consts[n.input[2]].attribute[0].t) for n in model.graph.node
                    if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in consts]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    metrics = evaluate_each(monkeypatch, capfd, spec, tmp_path, {
        "int8_checkpoint": f"evaluate.checkpoint={run / 'quantized_model_modelopt.pth'}",
        "int8_onnx": f"evaluate.onnx_file={qdq}"})
    assert metrics["int8_onnx"]["mIoU"] >= metrics["int8_checkpoint"]["mIoU"] - 0.01, metrics


def _layer(name: str, weights: str = "int8", activations: str = "int8", axis=None):
    return OmegaConf.create({"module_name": name, "weights": {"dtype": weights, "quant_axis": axis},
                             "activations": {"dtype": activations, "quant_axis": None}})


@pytest.mark.parametrize("layers, skip, expected", [
    # every Linear and Conv2d by default (weights per channel, inputs per tensor), never MHA's out_proj
    ([], [], {"a.0": (0, None), "a.1": (0, None), "b": (0, None), "conv": (0, None)}),
    ([], ["a.*", "Conv2d"], {"b": (0, None)}),
    ([_layer("a.*")], [], {"a.0": (0, None), "a.1": (0, None)}),
    ([_layer("Linear", activations="native"), _layer("a.1", "native", "int8")], [],
     {"a.0": (0, False), "a.1": (False, None), "b": (0, False)}),  # in order; native removes a part
    ([_layer("conv", axis=1)], [], {"conv": (1, None)}),
])
def test_layer_selection(layers, skip, expected):
    from networks.common.modelopt_torch import select_quantizers

    got = select_quantizers(_Toy(), layers, skip)
    assert {n: (s["weights"], s["inputs"]) for n, s in got.items()} == expected


def test_layer_selection_names_an_entry_that_matches_nothing():
    from networks.common.errors import ConfigError
    from networks.common.modelopt_torch import select_quantizers

    with pytest.raises(ConfigError, match=r"quantize.layers\[0\].module_name"):
        select_quantizers(_Toy(), [_layer("backbone.*")], [])
    with pytest.raises(ConfigError, match=r"quantize.skip_names\[1\]"):
        select_quantizers(_Toy(), [], ["a.*", "attn.out_proj"])


@pytest.mark.parametrize("overrides, field", [
    (["quantize.mode=weight_only_ptq"], "quantize.mode"),
    (["quantize.algorithm=entropy"], "quantize.algorithm"),
    (["quantize.layers=[{module_name: 'Linear', weights: {dtype: fp8_e4m3fn}}]"], "quantize.layers[0].weights.dtype"),
    (["quantize.layers=[{module_name: 'Linear', activations: {observer_or_fake_quant: minmax}}]"],
     "quantize.layers[0].activations"),
    (["+quantize.backend_kwargs.x=1"], "quantize.backend_kwargs"),
    (["quantize.device=trt"], "quantize.device"),
    (["quantize.model_path="], "quantize.model_path"),
    (["dataset.quant_calibration_dataset.images_dir="], "dataset.quant_calibration_dataset.images_dir"),
], ids=["mode", "algorithm", "fp8", "observer", "backend_kwargs", "trt", "no-model", "no-images"])
def test_refusals_at_dry_run(quantized, overrides, field, monkeypatch, capfd, tmp_path):
    spec, ckpt, _ = quantized
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "quantize", "-e", str(spec), "--dry-run",
                        f"results_dir={tmp_path}", f"quantize.model_path={ckpt}", "quantize.backend=modelopt.pytorch",
                        "quantize.mode=static_ptq", *overrides)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert field in lines[0], lines[0]


def test_missing_package_is_one_line_at_dry_run(quantized, monkeypatch, capfd, tmp_path):
    import importlib.util

    spec, ckpt, _ = quantized
    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "requests" else real(name, *a))
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "quantize", "-e", str(spec), "--dry-run",
                        f"results_dir={tmp_path}", f"quantize.model_path={ckpt}", "quantize.backend=modelopt.pytorch",
                        "quantize.mode=static_ptq")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "quantize.backend" in lines[0] and "requests" in lines[0] and "tao-cli[modelopt]" in lines[0], lines[0]
    assert sys.modules  # the test changed nothing global beyond monkeypatch
