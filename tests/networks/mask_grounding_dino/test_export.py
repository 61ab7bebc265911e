"""ONNX export (TAO §6): TAO's input/output names and shapes, dynamic batch, onnxruntime parity with PyTorch."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from networks.common.context import RunContext
from networks.common.errors import CheckpointError
from networks.mask_grounding_dino.export import INPUT_NAMES, OUTPUT_NAMES, ExportWrapper, _example, run_export

from .conftest import make_tiny_cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory, mgd_synthetic):
    from networks.mask_grounding_dino.model import build_model

    tmp = tmp_path_factory.mktemp("mgd_export")
    cfg = make_tiny_cfg(mgd_synthetic)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ckpt = tmp / "model.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "tao_model": "mask_grounding_dino"},
               ckpt)
    cfg.export.checkpoint = str(ckpt)
    cfg.export.onnx_file = str(tmp / "mgd.onnx")
    ctx = RunContext("export", tmp, log=logging.getLogger("test"))
    result = run_export(cfg, ctx)
    return cfg, model, result


def test_onnx_names_shapes_and_standard_ops(exported):
    import onnx

    cfg, _, result = exported
    m = onnx.load(result["onnx_file"])
    assert [i.name for i in m.graph.input] == INPUT_NAMES and [o.name for o in m.graph.output] == OUTPUT_NAMES
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert shapes["inputs"] == ["batch_size", 3, 128, 128]
    assert shapes["attention_mask"] == ["batch_size", 256] and shapes["text_token_mask"] == ["batch_size", 256, 256]
    types = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    assert types["attention_mask"] == onnx.TensorProto.BOOL and types["text_token_mask"] == onnx.TensorProto.BOOL
    assert types["input_ids"] == onnx.TensorProto.INT64
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}
    assert result["max_abs_diff"] < 1e-3


def test_onnxruntime_matches_pytorch_dynamic_batch(exported):
    import onnxruntime as ort

    cfg, model, result = exported
    from networks.mask_grounding_dino.text import load_tokenizer

    tok = load_tokenizer(cfg.model.text_encoder_type)
    ex = _example(tok, 2, (128, 128), 256, seed=1, captions=["circle . square . triangle .", "a red circle ."])
    with torch.no_grad():
        ref = [t.numpy() for t in ExportWrapper(model).eval()(*ex)]
    sess = ort.InferenceSession(result["onnx_file"], providers=["CPUExecutionProvider"])
    got = sess.run(OUTPUT_NAMES, {n: t.numpy() for n, t in zip(INPUT_NAMES, ex, strict=True)})
    logits, boxes, masks = got
    assert logits.shape == (2, cfg.model.num_queries, 256) and boxes.shape == (2, cfg.model.num_queries, 4)
    assert masks.shape == (2, cfg.model.num_queries, 1, 32, 32)
    fin = np.isfinite(ref[0])
    assert np.array_equal(fin, np.isfinite(logits))
    assert np.abs(logits[fin] - ref[0][fin]).max() <= 1e-4
    assert np.abs(boxes - ref[1]).max() <= 1e-4
    # mask logits are unbounded (pixel-unit coordinates in the dynamic head): 1e-4 relative to their range
    scale = max(1.0, float(np.abs(ref[2]).max()))
    assert np.abs(masks - ref[2]).max() <= 1e-4 * scale
    from scipy.special import expit

    assert np.abs(expit(masks) - expit(ref[2])).max() <= 1e-4


def test_missing_checkpoint_is_checkpoint_error(exported, tmp_path):
    cfg, _, _ = exported
    cfg = cfg.copy()
    cfg.export.checkpoint = str(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError):
        run_export(cfg, RunContext("export", Path(tmp_path)))
