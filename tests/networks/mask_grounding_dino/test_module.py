"""LightningModule: optimiser groups, freeze, evaluation with thresholds, inference files."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch

from networks.common.context import RunContext
from networks.common.errors import ConfigError
from networks.mask_grounding_dino.data import MaskGDinoDataModule
from networks.mask_grounding_dino.module import MaskGDinoModule, param_groups

from .conftest import make_tiny_cfg

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover
    import lightning.pytorch as pl  # type: ignore


@pytest.fixture(scope="module")
def _shared_module(mgd_synthetic):
    """One tiny module for the file (building it is the slow part)."""
    torch.manual_seed(0)
    return MaskGDinoModule(make_tiny_cfg(mgd_synthetic), None)


@pytest.fixture
def tiny_module(_shared_module):
    """``(cfg, module)``: the shared module with its own copy of the spec (and no run context) for this test, so
    a test may change either without affecting the others, in any order."""
    module = _shared_module
    saved = module.cfg, module.ctx
    module.cfg, module.ctx = copy.deepcopy(saved[0]), None
    yield module.cfg, module
    module.cfg, module.ctx = saved


def _trainer():
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)


def test_param_groups_by_substring(tiny_module):
    cfg, module = tiny_module
    groups = {g["name"]: g for g in param_groups(module.model, 1e-3, 1e-4, 0.1, ["backbone.0", "bert"],
                                                  ["reference_points", "sampling_offsets"])}
    assert groups["backbone"]["lr"] == 1e-4 and groups["rest"]["lr"] == 1e-3
    assert abs(groups["linear_proj"]["lr"] - 1e-4) < 1e-12
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert all("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)]
               for p in groups["linear_proj"]["params"])
    assert all(names[id(p)].startswith(("backbone.0", "bert")) for p in groups["backbone"]["params"])
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(1 for p in module.model.parameters() if p.requires_grad)
    opt = module.configure_optimizers()
    assert opt["optimizer"].defaults["weight_decay"] == cfg.train.optim.weight_decay


def test_freeze(mgd_synthetic, tmp_path):
    cfg = make_tiny_cfg(mgd_synthetic)
    cfg.train.freeze = ["bert", "backbone.0"]
    m = MaskGDinoModule(cfg, RunContext("train", tmp_path))
    assert not any(p.requires_grad for p in m.model.bert.parameters())
    assert not any(p.requires_grad for p in m.model.backbone.parameters())
    assert any(p.requires_grad for p in m.model.transformer.parameters())
    cfg.train.freeze = ["nope"]
    with pytest.raises(ConfigError) as err:
        MaskGDinoModule(cfg, RunContext("train", tmp_path))
    assert err.value.subject == "train.freeze"


def test_evaluate_with_conf_threshold_reports_bbox_and_segm(tiny_module):
    cfg, module = tiny_module
    cfg.evaluate.conf_threshold = 0.5  # TAO raises KeyError in its segm evaluator here
    dm = MaskGDinoDataModule(cfg, RunContext("evaluate", Path(".")))
    _trainer().test(module, datamodule=dm, verbose=False)
    for k in ("bbox_val_mAP", "bbox_val_mAP50", "bbox_val_mAP75", "segm_val_mAP", "segm_val_mAP50", "val_loss"):
        assert k in module.kpi


def test_inference_writes_overlays_and_results(tiny_module, tmp_path):
    cfg, module = tiny_module
    cfg.inference.conf_threshold = 0.0
    module.ctx = RunContext("inference", tmp_path, log=logging.getLogger("test"))
    dm = MaskGDinoDataModule(cfg, module.ctx)
    _trainer().predict(module, datamodule=dm, return_predictions=False)
    pngs = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(pngs) == 4
    results = json.loads((tmp_path / "results.json").read_text())
    assert results and {"image_id", "file_name", "category_id", "category_name", "phrase", "score", "bbox",
                        "segmentation"} <= set(results[0])
    assert results[0]["category_name"] in ("circle", "square", "triangle")
    assert set(results[0]["segmentation"]) == {"size", "counts"} and len(results[0]["bbox"]) == 4
    assert module.outputs["num_images"] == 4


def test_pretrained_model_path_loaded_unless_resuming(mgd_synthetic, tmp_path):
    cfg = make_tiny_cfg(mgd_synthetic)
    torch.manual_seed(1)
    src = MaskGDinoModule(cfg, None)
    ckpt = tmp_path / "init.pth"
    torch.save({"state_dict": src.state_dict()}, ckpt)  # tao-cli layout: keys "model.<name>"
    cfg.train.pretrained_model_path = str(ckpt)
    key = "transformer.tgt_embed.weight"
    torch.manual_seed(2)
    loaded = MaskGDinoModule(cfg, RunContext("train", tmp_path))
    assert torch.equal(loaded.model.state_dict()[key], src.model.state_dict()[key])
    torch.manual_seed(2)
    resumed = MaskGDinoModule(cfg, RunContext("train", tmp_path, resuming=True))
    assert not torch.equal(resumed.model.state_dict()[key], src.model.state_dict()[key])
