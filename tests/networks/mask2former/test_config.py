"""Mask2Former spec: TAO defaults, a TAO spec + the seed overrides load unchanged, and the cross-field checks."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import networks.mask2former as m2f
from networks.common.errors import ConfigError
from networks.common.tensorrt_engine import tensorrt_missing
from networks.mask2former.config import ExperimentConfig, check, swin_dims
from tao_cli.spec import load_spec

HAVE_TRT = not tensorrt_missing()

REPO = Path(__file__).resolve().parents[3]

# A TAO-style spec as users write it for COCO instance segmentation (field names of tao-core mask2former).
TAO_SPEC = textwrap.dedent("""
    results_dir: /results
    dataset:
      contiguous_id: False
      label_map: /data/coco/label_map.json
      train:
        type: 'coco'
        name: "coco_2017_train_panoptic"
        instance_json: "/data/coco/annotations/instances_train2017.json"
        img_dir: "/data/coco/train2017"
        batch_size: 16
        num_workers: 20
      val:
        type: 'coco'
        name: "coco_2017_val_panoptic"
        instance_json: "/data/coco/annotations/instances_val2017.json"
        img_dir: "/data/coco/val2017"
        batch_size: 1
        num_workers: 2
      test:
        img_dir: /data/coco/val2017
        batch_size: 1
      augmentation:
        train_min_size: [1024]
        train_max_size: 2560
        train_crop_size: [1024, 1024]
        test_min_size: 800
        test_max_size: 2560
      pixel_mean: [0.485, 0.456, 0.406]
      pixel_std: [0.229, 0.224, 0.225]
    train:
      precision: 'fp16'
      num_gpus: 1
      checkpoint_interval: 1
      validation_interval: 1
      num_epochs: 50
      clip_grad_norm: 0.01
      clip_grad_norm_type: 2.0
      clip_grad_type: full
      freeze: []
      optim:
        lr_scheduler: "MultiStep"
        milestones: [44, 48]
        type: "AdamW"
        lr: 0.0001
        weight_decay: 0.05
    model:
      object_mask_threshold: 0.
      overlap_threshold: 0.8
      test_topk_per_image: 100
      mode: "instance"
      backbone:
        type: "swin"
        pretrained_weights: /pretrained/swin_tiny_patch4_window7_224_22k.pth
        swin:
          type: "tiny"
          window_size: 7
          ape: False
          pretrain_img_size: 224
      mask_former:
        num_object_queries: 100
      sem_seg_head:
        norm: "GN"
        num_classes: 80
    export:
      input_channel: 3
      input_width: 1024
      input_height: 1024
      opset_version: 17
      batch_size: -1
      on_cpu: False
""")

SEED_OVERRIDES = [
    "model.sem_seg_head.num_classes=90",
    "dataset.contiguous_id=True",
    "dataset.train.img_dir=/data/coco/images.tar.gz",
    "dataset.train.instance_json=/data/coco/annotations.json",
    "dataset.val.img_dir=/data/coco/images.tar.gz",
    "dataset.val.instance_json=/data/coco/annotations.json",
    "dataset.label_map=/data/coco/label_map.json",
    "model.backbone.pretrained_weights=null",
    "train.num_gpus=1",
    "train.num_epochs=10",
    "train.checkpoint_interval=5",
    "train.optim.lr=0.0002",
    "train.precision=fp32",
    "results_dir=/results/m2f",
]


def test_defaults_follow_tao():
    c = OmegaConf.structured(ExperimentConfig)
    assert c.model_name == "mask2former"
    assert c.model.mode == "panoptic" and c.model.object_mask_threshold == 0.4 and c.model.overlap_threshold == 0.5
    assert c.model.test_topk_per_image == 100
    assert c.model.backbone.type == "swin" and c.model.backbone.pretrained_weights is None
    sw = c.model.backbone.swin
    assert (sw.type, sw.embed_dim, list(sw.depths), sw.window_size, sw.drop_path_rate) == ("tiny", 96, [2, 2, 6, 2], 7, 0.3)
    assert c.model.backbone.efficientvit.name == "l0"
    h = c.model.sem_seg_head
    assert (h.num_classes, h.convs_dim, h.mask_dim, h.transformer_enc_layers, h.norm) == (200, 256, 256, 6, "GN")
    mf = c.model.mask_former
    assert (mf.num_object_queries, mf.hidden_dim, mf.dec_layers, mf.dim_feedforward) == (100, 256, 10, 2048)
    assert (mf.class_weight, mf.mask_weight, mf.dice_weight, mf.no_object_weight) == (2.0, 5.0, 5.0, 0.1)
    assert (mf.train_num_points, mf.oversample_ratio, mf.importance_sample_ratio) == (12544, 3.0, 0.75)
    ds = c.dataset
    assert ds.train.type == "ade" and ds.train.batch_size == 1 and list(ds.train.target_size) == []
    assert list(ds.augmentation.train_min_size) == [640] and ds.augmentation.train_max_size == 2560
    assert list(ds.augmentation.train_crop_size) == [640, 640] and ds.augmentation.test_max_size == 640
    assert ds.contiguous_id is False and ds.label_map == "" and ds.pin_memory is True
    tr = c.train
    assert (tr.clip_grad_norm, tr.clip_grad_type, tr.precision, tr.distributed_strategy) == (0.1, "full", "fp32", "ddp")
    assert (tr.optim.type, tr.optim.lr, tr.optim.backbone_multiplier, tr.optim.weight_decay) == ("AdamW", 2e-4, 0.1, 0.05)
    assert tr.optim.lr_scheduler == "MultiStep" and list(tr.optim.milestones) == [88, 96]
    assert tr.iters_per_epoch is None and list(tr.freeze) == []
    assert "format" not in c.export
    assert (c.export.input_height, c.export.input_width, c.export.opset_version) == (544, 960, 17)
    assert c.gen_trt_engine.tensorrt.data_type == "FP32"
    assert c.quantize.backend == "torchao"


def test_tao_spec_with_seed_overrides_loads(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TAO_SPEC)
    cfg = load_spec(ExperimentConfig, "train", spec, SEED_OVERRIDES, check=check)
    assert cfg.model.sem_seg_head.num_classes == 90
    assert cfg.dataset.contiguous_id is True
    assert cfg.dataset.train.img_dir == "/data/coco/images.tar.gz"
    assert cfg.train.num_epochs == 10 and cfg.train.num_gpus == 1
    assert cfg.model.mode == "instance" and cfg.train.optim.milestones == [44, 48]


def _cfg(**dotlist):
    c = OmegaConf.structured(ExperimentConfig)
    c.dataset.label_map = "lm.json"
    for split in ("train", "val"):
        c.dataset[split].annot_file = "a.jsonl"
    c.export.checkpoint = "x.pth"
    c.export.onnx_file = "x.onnx"
    return OmegaConf.merge(c, OmegaConf.from_dotlist([f"{k}={v}" for k, v in dotlist.items()]))


def test_efficientvit_is_rejected():
    with pytest.raises(ConfigError, match="not supported yet"):
        check(_cfg(**{"model.backbone.type": "efficientvit"}), "train")


@pytest.mark.parametrize("action", ["train", "evaluate", "inference"])
def test_label_map_required(action):
    c = _cfg()
    c.dataset.label_map = ""
    with pytest.raises(ConfigError) as err:
        check(c, action)
    assert err.value.subject == "dataset.label_map"


def test_export_opset_too_low():
    with pytest.raises(ConfigError, match="opset"):
        check(_cfg(**{"export.opset_version": 13}), "export")


def test_missing_split_field_named():
    c = _cfg(**{"dataset.train.type": "coco_panoptic"})
    with pytest.raises(ConfigError) as err:
        check(c, "train")
    assert err.value.subject.startswith("dataset.train.")


def test_custom_swin_and_variants():
    c = _cfg(**{"model.backbone.swin.type": "custom", "model.backbone.swin.embed_dim": 32,
                "model.backbone.swin.depths": "[1,1,1,1]", "model.backbone.swin.num_heads": "[1,2,4,8]"})
    assert swin_dims(c.model.backbone.swin) == (32, [1, 1, 1, 1], [1, 2, 4, 8])
    check(c, "train")
    c.model.backbone.swin.type = "base"
    assert swin_dims(c.model.backbone.swin) == (128, [2, 2, 18, 2], [4, 8, 16, 32])
    bad = _cfg(**{"model.backbone.swin.type": "custom", "model.backbone.swin.embed_dim": 30,
                  "model.backbone.swin.num_heads": "[4,4,4,4]"})
    with pytest.raises(ConfigError, match="divisible"):
        check(bad, "train")


def test_package_contract():
    assert (m2f.NAME, m2f.TITLE, m2f.CHECKPOINT_NAME) == ("mask2former", "Mask2Former", "mask2former_model")
    assert list(m2f.ACTIONS)[:4] == ["train", "evaluate", "inference", "export"]
    if not HAVE_TRT:  # quantize and gen_trt_engine have their own tests (test_quantize.py, test_tensorrt.py)
        with pytest.raises(ConfigError, match="needs the tensorrt Python package|needs a CUDA GPU"):
            m2f.run_action("gen_trt_engine", _cfg(), None)
    c = _cfg()
    c.evaluate.checkpoint = "e.pth"
    assert m2f.input_paths(c, "evaluate") == {"dataset.label_map": "lm.json", "dataset.val.annot_file": "a.jsonl",
                                              "evaluate.checkpoint": "e.pth"}
