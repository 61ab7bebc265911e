"""ONNX export: per-mode outputs of the tiny model match PyTorch under onnxruntime; dynamic batch; opset check."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from networks.common.errors import ConfigError
from networks.mask2former.config import ExperimentConfig
from networks.mask2former.export import OUTPUT_NAMES, export_onnx, onnx_parity

from .conftest import REPO

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny_model():
    from networks.mask2former.model import build_model

    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                          OmegaConf.load(REPO / "configs" / "mask2former" / "tiny.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    # Give the class head some spread so that thresholds/top-k are not decided by ties.
    with torch.no_grad():
        head = model.sem_seg_head.predictor.class_embed
        head.weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("mode", ["semantic", "instance", "panoptic"])
def test_onnx_matches_pytorch(tiny_model, mode, tmp_path):
    path = export_onnx(tiny_model, mode, tmp_path / f"{mode}.onnx", (64, 96), batch_size=-1, opset=17, topk=10)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["inputs"]
    assert [o.name for o in graph.output] == OUTPUT_NAMES[mode]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ops = {n.op_type for n in graph.node}
    assert "GridSample" in ops and not any(n.domain not in ("", "ai.onnx") for n in graph.node)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))  # batch 2 through the dynamic axis
    diffs = onnx_parity(tiny_model, mode, path, x, topk=10)
    assert set(diffs) == set(OUTPUT_NAMES[mode])
    assert max(diffs.values()) < 1e-4, diffs


def test_semantic_output_shape(tiny_model, tmp_path):
    import onnxruntime as ort

    path = export_onnx(tiny_model, "semantic", tmp_path / "s.onnx", (64, 64), batch_size=1)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (probs,) = sess.run(None, {"inputs": torch.zeros(1, 3, 64, 64).numpy()})
    assert probs.shape == (1, 5, 64, 64)


def test_low_opset_and_bad_size_are_config_errors(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(tiny_model, "semantic", tmp_path / "x.onnx", (64, 64), opset=16)
    with pytest.raises(ConfigError, match="multiple of 32"):
        export_onnx(tiny_model, "semantic", tmp_path / "x.onnx", (60, 64))
    assert not (tmp_path / "x.onnx").exists()


def test_run_action_export_from_checkpoint(tmp_path, tiny_model):
    import networks.mask2former as m2f
    from networks.common.context import RunContext

    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                          OmegaConf.load(REPO / "configs" / "mask2former" / "tiny.yaml"))
    ckpt = tmp_path / "model.pth"
    state = {f"model.{k}": v for k, v in tiny_model.state_dict().items()}
    state["criterion.empty_weight"] = torch.ones(6)
    torch.save({"state_dict": state, "epoch": 0, "tao_model": "mask2former"}, ckpt)
    cfg.export.checkpoint = str(ckpt)
    cfg.export.onnx_file = str(tmp_path / "out" / "m2f.onnx")
    cfg.export.input_height = cfg.export.input_width = 64
    cfg.model.mode = "semantic"
    out = m2f.run_action("export", cfg, RunContext(action="export", run_dir=tmp_path))
    assert Path(out["onnx_file"]).is_file() and out["outputs"] == ["pred_masks"]
    assert out["max_abs_diff"] < 1e-4
    cfg.export.checkpoint = str(tmp_path / "missing.pth")
    from networks.common.errors import CheckpointError

    with pytest.raises(CheckpointError):
        m2f.run_action("export", cfg, RunContext(action="export", run_dir=tmp_path))
