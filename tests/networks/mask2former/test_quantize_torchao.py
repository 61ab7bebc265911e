"""``tao model mask2former quantize`` with TAO's default backend: torchao weight-only int8 of a trained checkpoint.

A seeded tiny semantic checkpoint labels ``dataset.val`` with its own predictions (so its mIoU is 1.0 and a broken
quantized model shows), the real ``quantize`` action writes ``quantized_model_torchao.pth``, and ``evaluate`` runs
that file as its ``checkpoint``.  The layer-selection rules and the refusals are checked on their own.
"""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from .test_onnx_eval import _tao, evaluate_each, quantize_checkpoint

pytest.importorskip("torchao")

#: mIoU drop allowed against the fp32 checkpoint on its self-labelled set (measured: 1.0 vs 1.0); a model whose
#: int8 weights are mis-scaled predicts near chance and fails.
MIOU_DROP = 0.02


@pytest.fixture(scope="module")
def quantized(m2f_synthetic, tmp_path_factory):
    """(spec, fp32 checkpoint, quantize run dir) after a successful quantize run with TAO's quantize defaults."""
    spec, ckpt, run = quantize_checkpoint(m2f_synthetic, tmp_path_factory.mktemp("m2f_torchao"))
    q = OmegaConf.load(spec).quantize
    assert (q.get("backend", "torchao"), q.get("mode", "weight_only_ptq")) == ("torchao", "weight_only_ptq")
    return spec, ckpt, run


def test_quantize_writes_int8_linear_weights(quantized):
    from torchao.quantization import Int8Tensor

    from tao_cli.engine.checkpoints import load_checkpoint

    _, ckpt, run = quantized
    out = run / "quantized_model_torchao.pth"
    obj, src = load_checkpoint(out, expected_network="mask2former"), load_checkpoint(ckpt)
    record = obj["quantization"]
    assert record["backend"] == "torchao" and record["dtype"] == "int8" and record["source"] == str(ckpt.resolve())
    assert set(obj["state_dict"]) == set(src["state_dict"])  # criterion buffers kept, nothing added
    weights = {m + ".weight" for m in record["modules"]}
    assert weights and all(isinstance(obj["state_dict"][k], Int8Tensor) for k in weights)
    assert all(not isinstance(v, Int8Tensor) for k, v in obj["state_dict"].items() if k not in weights)
    # every nn.Linear by default: the Swin blocks' and the decoder's
    assert any(".backbone." in m for m in record["modules"]) and any("predictor" in m for m in record["modules"])
    for k in weights:  # per-output-channel int8 of the fp32 weight: error within half a step of its scale
        w, q = src["state_dict"][k], obj["state_dict"][k].dequantize()
        step = w.abs().amax(dim=1, keepdim=True) / 127
        assert ((w - q).abs() <= step / 2 + 1e-6).all(), k
    report = json.loads((run / "quantize_report.json").read_text())
    assert report["quantized_linear_layers"] == report["linear_layers"] == len(record["modules"])
    assert report["model_tensors_mb_int8"] < 0.5 * report["model_tensors_mb_fp32"]
    last = json.loads((run / "status.json").read_text().splitlines()[-1])
    assert last["status"] == "SUCCESS" and last["outputs"]["quantized_model"] == str(out)


def test_evaluate_runs_the_int8_checkpoint(quantized, monkeypatch, capfd, tmp_path):
    spec, ckpt, run = quantized
    monkeypatch.chdir(tmp_path)
    metrics = evaluate_each(monkeypatch, capfd, spec, tmp_path, {
        "fp32": f"evaluate.checkpoint={ckpt}", "int8": f"evaluate.checkpoint={run / 'quantized_model_torchao.pth'}"})
    log = (tmp_path / "int8" / "evaluate" / "evaluate.log").read_text()
    assert "weight-only quantized model" in log
    assert metrics["fp32"]["mIoU"] > 0.9  # self-labelled
    assert metrics["int8"]["mIoU"] >= metrics["fp32"]["mIoU"] - MIOU_DROP, metrics


def test_loading_makes_int8_layers(quantized):
    """The engine's loader gives the module int8 layers (not dequantized fp32 copies) and the forward uses them:
    outputs are close to the fp32 model's but not equal to them."""
    from torchao.quantization import Int8Tensor

    from networks.mask2former.config import ExperimentConfig
    from networks.mask2former.module import Mask2FormerModule
    from tao_cli.engine.actions import load_into

    spec, ckpt, run = quantized
    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.load(spec))
    fp32, int8 = Mask2FormerModule(cfg).eval(), Mask2FormerModule(cfg).eval()
    load_into(fp32, ckpt, None, "mask2former")
    load_into(int8, run / "quantized_model_torchao.pth", None, "mask2former")
    qkv = int8.model.backbone.layers[0].blocks[0].attn.qkv
    assert isinstance(qkv.weight, Int8Tensor)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fp32.model(x)["pred_masks"], int8.model(x)["pred_masks"]
    diff = (a - b).abs().max().item()
    assert 0 < diff < 0.05 * a.abs().max().item(), diff


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        self.b = torch.nn.Linear(4, 4)
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.attn = torch.nn.MultiheadAttention(4, 1)  # its out_proj is not quantizable


def _layer(name: str, dtype: str = "int8"):
    return OmegaConf.create({"module_name": name, "weights": {"dtype": dtype}})


@pytest.mark.parametrize("layers, skip, expected", [
    ([], [], ["a.0", "a.1", "b"]),  # every nn.Linear by default, never the conv
    ([], ["a.*"], ["b"]),
    ([_layer("a.*")], [], ["a.0", "a.1"]),
    ([_layer("Linear"), _layer("a.1", "native")], [], ["a.0", "b"]),  # class names; native removes, in order
    ([_layer("Linear")], ["b"], ["a.0", "a.1"]),
])
def test_layer_selection(layers, skip, expected):
    from networks.common.torchao_quantize import select_modules

    assert select_modules(_Toy(), layers, skip) == expected


@pytest.mark.parametrize("layers, skip, field", [
    ([_layer("conv")], [], "quantize.layers[0].module_name"),  # a conv is not weight-only int8 here
    ([], ["nothing*"], "quantize.skip_names[0]"),
])
def test_a_pattern_that_matches_no_linear_is_an_error(layers, skip, field):
    from networks.common.errors import ConfigError
    from networks.common.torchao_quantize import select_modules

    with pytest.raises(ConfigError) as exc:
        select_modules(_Toy(), layers, skip)
    assert exc.value.subject == field


@pytest.mark.parametrize("extra, field", [
    (["quantize.mode=static_ptq"], "quantize.mode"),
    (["quantize.algorithm=entropy"], "quantize.algorithm"),
    (["quantize.layers=[{module_name: 'Linear', weights: {dtype: fp8_e4m3fn}}]"], "quantize.layers[0].weights.dtype"),
    (["quantize.layers=[{module_name: 'Linear', weights: {dtype: int8}, activations: {dtype: int8}}]"],
     "quantize.layers[0].activations.dtype"),
    (["quantize.layers=[{module_name: 'Linear', weights: {dtype: int8, quant_axis: 0}}]"],
     "quantize.layers[0].weights"),
    (["quantize.backend_kwargs={a: 1}"], "quantize.backend_kwargs"),
], ids=["static_ptq", "algorithm", "fp8", "activations", "quant_axis", "backend_kwargs"])
def test_refusals_at_dry_run(quantized, extra, field, monkeypatch, capfd, tmp_path):
    spec, ckpt, _ = quantized
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "quantize", "-e", str(spec), "--dry-run",
                        f"results_dir={tmp_path}", f"quantize.model_path={ckpt}", *extra)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and field in lines[0], err


def test_dry_run_passes_and_needs_no_calibration_images(quantized, monkeypatch, capfd, tmp_path):
    spec, ckpt, _ = quantized
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "quantize", "-e", str(spec), "--dry-run",
                        f"results_dir={tmp_path}", f"quantize.model_path={ckpt}",
                        "dataset.quant_calibration_dataset.images_dir=")
    assert code == 0, err


def test_export_of_the_quantized_file_is_refused(quantized, monkeypatch, capfd, tmp_path):
    """export (and any action that needs floating-point weights) names the file it was quantized from."""
    spec, ckpt, run = quantized
    monkeypatch.chdir(tmp_path)
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "export", "-e", str(spec),
                        f"results_dir={tmp_path}", f"export.checkpoint={run / 'quantized_model_torchao.pth'}",
                        f"export.onnx_file={tmp_path / 'x.onnx'}")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "quantized" in lines[0] and str(ckpt.resolve()) in lines[0], err
    assert not (tmp_path / "x.onnx").exists()


def test_without_torchao_the_dry_run_says_how_to_install_it(quantized, monkeypatch, capfd, tmp_path):
    from networks.common import torchao_quantize

    spec, ckpt, _ = quantized
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torchao_quantize, "_installed", lambda: False)
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "quantize", "-e", str(spec), "--dry-run",
                        f"results_dir={tmp_path}", f"quantize.model_path={ckpt}")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "quantize.backend" in lines[0] and "pip install 'torchao==0.18.0'" in lines[0], lines[0]
