"""Issue 10: spec fields that used to be accepted and ignored now act (or are refused in one line).

Each test sets one field to a non-default value and checks that the value reaches the code: the MAL cosine
floor (``train.min_lr``), Mask2Former's clipping norm (``train.clip_grad_norm_type``), scheduler monitor
(``train.optim.monitor_name``) and ``model.export`` (refused outside
export); Grounding DINO's inference source (a ``captions`` .jsonl file,
``classmap``, phrase splitting) and the key check of every data-source dict; ``wandb.reinit/sync_tensorboard/
save_code``; fsdp's precision; TAO's interval rule; ``trt_engine`` without TensorRT.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from networks.common.context import RunContext
from networks.common.errors import ConfigError, DataError


# ------------------------------------------------------------------------------------------------ MAL
def _mal_cfg(**overrides):
    from networks.mal.config import ExperimentConfig

    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.model.arch = "vit-deit-tiny/16"
    for key, value in {"model.mask_head_hidden_channel": 16, "model.mask_head_out_channel": 16,
                       "train.batch_size": 2, "train.num_epochs": 4, "train.lr": 1e-4, "train.warmup_epochs": 1,
                       **overrides}.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_mal_min_lr_is_the_cosine_floor():
    from networks.mal.module import MALModule

    ctx = RunContext(action="train", run_dir=Path("."))
    default = MALModule(_mal_cfg(), ctx)
    assert default.min_lr == pytest.approx(default.lr * 0.2)  # TAO: lr_scaled x min_lr_rate
    mod = MALModule(_mal_cfg(**{"train.min_lr": 1e-5}), ctx)
    assert mod.min_lr == pytest.approx(1e-5)
    # the last step of the schedule lands on the floor, mid-way is above it
    assert mod.lr_at_step(399, 100) == pytest.approx(1e-5, rel=1e-3)
    assert mod.lr_at_step(250, 100) > 1e-5


# ------------------------------------------------------------------------------------------ Mask2Former
def _m2f_module(**overrides):
    from networks.mask2former.config import ExperimentConfig
    from networks.mask2former.module import Mask2FormerModule

    cfg = OmegaConf.structured(ExperimentConfig)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return Mask2FormerModule(cfg, None, model=torch.nn.Linear(2, 2, bias=False))


@pytest.mark.parametrize("norm_type, expected", [(1.0, [3 / 7, 4 / 7]), ("inf", [0.75, 1.0])])
def test_mask2former_clip_grad_norm_type_is_the_clipping_norm(norm_type, expected):
    mod = _m2f_module(**{"train.clip_grad_norm_type": norm_type})
    weight = mod.model.weight
    weight.grad = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    opt = torch.optim.SGD([weight], lr=0.1)
    mod.configure_gradient_clipping(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert weight.grad[0].tolist() == pytest.approx(expected, rel=1e-4)


def test_mask2former_clip_grad_norm_type_refuses_a_non_norm():
    from networks.mask2former.config import clip_norm_type

    assert clip_norm_type("inf") == float("inf") and clip_norm_type(1) == 1.0
    with pytest.raises(ConfigError, match="train.clip_grad_norm_type"):
        clip_norm_type("l2")
    from networks.mask2former.config import ExperimentConfig, check

    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.train.clip_grad_norm_type, cfg.train.distributed_strategy = "inf", "fsdp"
    with pytest.raises(ConfigError, match="train.clip_grad_norm_type"):  # FSDP shards: only its own L2 norm
        check(cfg, "train")


@pytest.mark.parametrize("name, metric", [("train_loss", "train/loss_epoch"), ("val_loss", "val/loss")])
def test_mask2former_monitor_name_is_the_scheduler_monitor(name, metric):
    mod = _m2f_module(**{"train.optim.monitor_name": name})
    assert mod.configure_optimizers()["lr_scheduler"]["monitor"] == metric


def test_mask2former_model_export_true_is_refused_outside_export():
    from networks.mask2former.config import ExperimentConfig, check

    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.model.export = True
    with pytest.raises(ConfigError, match="model.export"):
        check(cfg, "train")


# ---------------------------------------------------------------------------------- Grounding DINO data
def test_split_phrases_only_splits_a_string_of_phrases():
    from networks.mask_grounding_dino.data import split_phrases

    assert split_phrases("cat . dog . hot dog .") == ["cat", "dog", "hot dog"]
    assert split_phrases("the red square on the left.") == ["the red square on the left"]
    assert split_phrases("blue triangle, green square.") == ["blue triangle, green square"]


@pytest.fixture()
def infer_dir(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(images / name)
    return tmp_path


def test_captions_jsonl_file_is_read_per_image(infer_dir):
    from networks.mask_grounding_dino.data import PredictDataset

    lines = [{"file_name": "a.png", "caption": "the red square."},
             {"file_name": "b.png", "grounding": {"caption": "cat . dog .", "regions": []}}]  # TAO's VG record
    jsonl = infer_dir / "inference.jsonl"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ds = PredictDataset({"image_dir": str(infer_dir / "images"), "captions": str(jsonl)}, transform=None)
    assert [(rel, caps) for _, rel, caps in ds.items] == [("a.png", ["the red square"]), ("b.png", ["cat", "dog"])]


def test_classmap_names_the_classes(infer_dir):
    from networks.mask_grounding_dino.data import PredictDataset

    (infer_dir / "label_map.txt").write_text("Circle\nsquare\n\n")
    jsonl = infer_dir / "inference.jsonl"
    jsonl.write_text(json.dumps({"file_name": "a.png"}) + "\n" + json.dumps({"file_name": "b.png", "caption": "x"}))
    src = {"image_dir": str(infer_dir / "images"), "captions": str(jsonl),
           "classmap": str(infer_dir / "label_map.txt")}
    ds = PredictDataset(src, transform=None)
    assert [caps for _, _, caps in ds.items] == [["circle", "square"], ["x"]]  # no caption on a line: classmap
    only = PredictDataset({"image_dir": str(infer_dir / "images"), "classmap": str(infer_dir / "label_map.txt")},
                          transform=None)
    assert {tuple(c) for _, _, c in only.items} == {("circle", "square")}
    with pytest.raises(DataError, match="classmap"):
        PredictDataset({"image_dir": str(infer_dir / "images"), "classmap": str(infer_dir / "nope.txt")},
                       transform=None)


@pytest.mark.parametrize("field, value, bad", [
    ("infer_data_sources", {"image_dir": "x", "captions": ["a"], "clasmap": "m.txt"},
     "dataset.infer_data_sources.clasmap"),
    ("val_data_sources", {"image_dir": "x", "json_file": "y", "data_typ": "OD"}, "dataset.val_data_sources.data_typ"),
    ("test_data_sources", {"image_dir": "x", "json_file": "y", "labelmap": "z"}, "dataset.test_data_sources.labelmap"),
    ("train_data_sources", [{"image_dir": "x", "json_file": "y"}, {"image_dir": "x", "jsonfile": "y"}],
     "dataset.train_data_sources[1].jsonfile"),
    ("quant_calibration_data_sources", {"image_dir": "x", "json": "y"}, "dataset.quant_calibration_data_sources.json"),
])
def test_unknown_keys_in_data_sources_are_refused(field, value, bad):
    from networks.mask_grounding_dino.config import ExperimentConfig, check

    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.dataset[field] = value
    with pytest.raises(ConfigError) as exc:
        check(cfg, "train")
    assert str(exc.value).startswith(bad + ":")


# --------------------------------------------------------------------------------------- engine fields
def test_wandb_reinit_sync_tensorboard_save_code_reach_wandb_init(monkeypatch, tmp_path):
    import pytorch_lightning.loggers as pl_loggers

    from networks.mal.config import ExperimentConfig
    from tao_cli.engine import trainer

    seen = {}

    class SpyLogger:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
    monkeypatch.setattr(pl_loggers, "WandbLogger", SpyLogger)
    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.wandb.enable, cfg.wandb.reinit, cfg.wandb.sync_tensorboard, cfg.wandb.save_code = True, True, True, True
    trainer._loggers(cfg, "train", tmp_path)
    assert (seen["reinit"], seen["sync_tensorboard"], seen["save_code"]) == (True, True, True)


def test_fsdp_forces_fp16_on_cuda_and_bf16_on_cpu():
    from networks.mask2former.config import ExperimentConfig
    from tao_cli.engine.trainer import decide_precision

    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.train.precision = "fp32"
    assert decide_precision(cfg, "train", "cuda") == "32-true"
    cfg.train.distributed_strategy = "fsdp"
    assert decide_precision(cfg, "train", "cuda") == "16-mixed"
    assert decide_precision(cfg, "train", "cpu") == "bf16-mixed"


@pytest.mark.parametrize("overrides, key", [
    ({"train.num_epochs": 2, "train.validation_interval": 3}, "train.validation_interval"),
    ({"train.num_epochs": 2, "train.checkpoint_interval": 3}, "train.checkpoint_interval"),
])
def test_intervals_above_num_epochs_are_refused(overrides, key):
    from networks.mal.config import ExperimentConfig
    from tao_cli.engine.plan import check_intervals

    cfg = OmegaConf.structured(ExperimentConfig)
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    with pytest.raises(ConfigError) as exc:
        check_intervals(cfg, "train")
    assert str(exc.value).startswith(key + ":")
    cfg.train.checkpoint_interval_unit = "step"  # a step interval is not compared with epochs
    cfg.train.validation_interval = 1
    check_intervals(cfg, "train")
    check_intervals(cfg, "evaluate")


def test_grounding_dino_embed_init_tgt_false_starts_from_encoder_features():
    from transformers import BertConfig

    from networks.mask_grounding_dino.model import build_model
    from networks.mask_grounding_dino.text_encoder import BertTextEncoder

    def tiny(embed_init_tgt: bool):
        m = {"backbone": "swin_custom", "swin": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8],
                                                 "window_size": 2, "drop_path_rate": 0.0},
             "hidden_dim": 64, "nheads": 4, "num_queries": 6, "enc_layers": 1, "dec_layers": 2,
             "dim_feedforward": 64, "max_text_len": 16, "num_feature_levels": 4,
             "return_interm_indices": [1, 2, 3, 4], "embed_init_tgt": embed_init_tgt}
        bert = BertTextEncoder.from_config(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                      intermediate_size=64))
        torch.manual_seed(0)
        return build_model({"model": m}, text_encoder=bert).eval()

    on, off = tiny(True), tiny(False)
    assert hasattr(on.transformer, "tgt_embed") and not hasattr(off.transformer, "tgt_embed")
    shared = {k: v for k, v in on.state_dict().items() if "tgt_embed" not in k}
    assert set(shared) == set(off.state_dict())
    off.load_state_dict(shared)
    ids = torch.tensor([[101, 4937, 1012, 3899, 1012, 102]])
    block = torch.eye(6, dtype=torch.bool)[None]
    args = (torch.randn(1, 3, 64, 64), torch.ones(1, 64, 64, dtype=torch.bool), ids, torch.ones_like(ids),
            torch.zeros_like(ids), torch.zeros_like(ids), block)
    with torch.no_grad():
        a, b = on(*args), off(*args)
    assert torch.isfinite(b["pred_boxes"]).all()
    # the same selected proposals, different content queries: the decoder output differs
    assert torch.equal(a["interm_outputs"]["pred_boxes"], b["interm_outputs"]["pred_boxes"])
    assert not torch.allclose(a["pred_logits"], b["pred_logits"])  # boxes start equal: zero-init box deltas


def test_outline_width_sets_the_box_outline_of_overlays():
    """``inference.outline_width`` reaches the overlay drawing (Grounding DINO's predict_step passes it)."""
    import inspect

    import numpy as np

    from networks.common.visualize import overlay_masks
    from networks.mask_grounding_dino import module

    image = np.zeros((100, 100, 3), np.uint8)

    def red_pixels(width):
        out = overlay_masks(image, [], [(255, 0, 0)], boxes=[[20, 20, 80, 80]], box_width=width)
        return int((out[..., 0] == 255).sum())

    assert red_pixels(5) > 4 * red_pixels(1) > 0
    assert "box_width=int(inf.outline_width)" in inspect.getsource(module.MaskGDinoModule.predict_step)


@pytest.mark.parametrize("name, metric", [("train_loss", "train/loss_epoch"), ("val_loss", "val/loss")])
def test_grounding_dino_monitor_name_is_the_scheduler_monitor(name, metric):
    from networks.mask_grounding_dino.config import ExperimentConfig
    from networks.mask_grounding_dino.module import MaskGDinoModule

    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.train.optim.monitor_name = name
    mod = MaskGDinoModule(cfg, None, model=torch.nn.Linear(2, 2))
    assert mod.configure_optimizers()["lr_scheduler"]["monitor"] == metric
