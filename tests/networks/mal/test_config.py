"""MAL spec: TAO defaults, the TAO example spec, cross-field checks and the packaged configs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import networks.mal as mal
from networks.common.config import metadata_of
from networks.common.errors import ConfigError
from networks.mal.config import SUPPORTED_ARCHS, ExperimentConfig, check

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs" / "mal"


def _load(action, path=None, overrides=()):
    from tao_cli.spec import load_spec

    return load_spec(ExperimentConfig, action, path, list(overrides), check=check)


def _cfg(**dotted):
    cfg = OmegaConf.structured(ExperimentConfig)
    for key, value in dotted.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


def _with_paths(cfg):
    for key in ("dataset.train_ann_path", "dataset.train_img_dir", "dataset.val_ann_path", "dataset.val_img_dir",
                "inference.ann_path", "inference.img_dir"):
        OmegaConf.update(cfg, key, "x")
    return cfg


def test_defaults_are_taos_runtime_values():
    cfg = OmegaConf.structured(ExperimentConfig)
    assert cfg.model_name == "mal"
    assert cfg.results_dir == ""
    assert cfg.dataset.type == "coco" and cfg.dataset.crop_size == 512
    assert cfg.dataset.min_obj_size == 2048 and cfg.dataset.max_obj_size == 1e10
    assert cfg.dataset.num_workers_per_gpu == 2 and cfg.dataset.load_mask is True
    assert cfg.model.arch == "vit-mae-base/16" and list(cfg.model.frozen_stages) == [-1]
    assert cfg.model.teacher_momentum == 0.996 and cfg.model.mask_scale_ratio == 2.0
    t = cfg.train
    assert (t.batch_size, t.lr, t.min_lr_rate, t.wd, t.warmup_epochs) == (3, 1e-6, 0.2, 5e-4, 1)
    assert list(t.optim_betas) == [0.9, 0.9] and list(t.margin_rate) == [0.0, 1.2]
    assert list(t.test_margin_rate) == [0.6, 0.6] and list(t.mask_thres) == [0.1]
    assert (t.loss_mil_weight, t.loss_crf_weight, t.crf_num_iter, t.loss_crf_step, t.loss_mil_step) == (
        4.0, 0.5, 100, 4000, 1000)
    assert t.use_amp is True and t.accum_grad_batches == 1 and t.pretrained_model_path is None
    assert t.num_epochs == 10 and t.seed == 1234 and t.checkpoint_interval == 1
    assert cfg.evaluate.batch_size == 3 and cfg.evaluate.use_flip_test is False
    assert OmegaConf.is_missing(cfg.evaluate, "checkpoint")
    assert cfg.inference.label_dump_path == "instances_val2017_mal.json"
    assert cfg.inference.batch_size == 3 and cfg.inference.load_mask is False
    assert cfg.inference.num_overlays == 8


def test_crop_size_relaxation_is_recorded():
    field = {f.name: f for f in dataclasses.fields(ExperimentConfig().dataset)}["crop_size"]
    meta = metadata_of(field)
    assert meta["valid_min"] == 32 and meta["relaxed_from"] == {"valid_min": 256}
    arch = {f.name: f for f in dataclasses.fields(ExperimentConfig().model)}["arch"]
    assert metadata_of(arch)["valid_options"] == SUPPORTED_ARCHS


def test_tao_example_spec_loads_unchanged():
    cfg = _load("train", CONFIGS / "spec_example.yaml")
    assert cfg.results_dir == "/results"
    assert cfg.dataset.train_ann_path == "a.json" and cfg.dataset.crop_size == 512
    assert cfg.model.arch == "vit-mae-base/16"
    assert cfg.train.lr == pytest.approx(1.5e-6) and cfg.train.batch_size == 4
    assert cfg.train.loss_mil_weight == 4.0 and isinstance(cfg.train.loss_mil_weight, float)
    assert cfg.inference.label_dump_path == "out.json"
    # Fields the example leaves out keep TAO's defaults.
    assert cfg.train.min_lr_rate == 0.2 and cfg.dataset.min_obj_size == 2048


def test_example_spec_also_merges_with_plain_omegaconf():
    merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                             OmegaConf.load(CONFIGS / "spec_example.yaml"))
    check(merged, "train")
    assert merged.train.lr == pytest.approx(1.5e-6)


@pytest.mark.parametrize("arch", ["fan_small_12_p4_hybrid", "fan_tiny_8_p4_hybrid"])
def test_fan_arch_rejected_with_supported_list(arch):
    with pytest.raises(ConfigError) as err:
        check(_with_paths(_cfg(model__arch=arch)), "train")
    msg = str(err.value)
    assert "model.arch" in msg and "FAN" in msg
    assert all(a in msg for a in SUPPORTED_ARCHS)
    with pytest.raises(ConfigError) as err2:
        _load("train", CONFIGS / "spec_example.yaml", [f"model.arch={arch}"])
    assert "model.arch" in str(err2.value) and all(a in str(err2.value) for a in SUPPORTED_ARCHS)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_every_vit_arch_passes(arch):
    check(_with_paths(_cfg(model__arch=arch)), "train")


@pytest.mark.parametrize("key,value,subject", [
    ("train.mask_thres", [0.1, 0.2], "train.mask_thres"),
    ("train.mask_thres", [0.1, 0.2, 0.3, 0.4], "train.mask_thres"),
    ("train.margin_rate", [0.0], "train.margin_rate"),
    ("train.margin_rate", [0.0, 1.0, 2.0], "train.margin_rate"),
    ("train.crf_kernel_size", 4, "train.crf_kernel_size"),
    ("dataset.type", "voc", "dataset.type"),
    ("dataset.train_ann_path", "", "dataset.train_ann_path"),
    ("dataset.val_img_dir", "", "dataset.val_img_dir"),
])
def test_train_cross_field_checks(key, value, subject):
    cfg = _with_paths(_cfg())
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError) as err:
        check(cfg, "train")
    assert str(err.value).startswith(subject)


def test_three_thresholds_accepted():
    cfg = _with_paths(_cfg(train__mask_thres=[0.1, 0.2, 0.3]))
    check(cfg, "train")


def test_action_specific_paths():
    cfg = _cfg(dataset__val_ann_path="v.json", dataset__val_img_dir="v")
    check(cfg, "evaluate")  # train paths are not needed to evaluate
    with pytest.raises(ConfigError, match="inference.ann_path"):
        check(cfg, "inference")
    with pytest.raises(ConfigError, match="dataset.val_ann_path"):
        check(_cfg(), "evaluate")
    check(_cfg(inference__ann_path="a.json", inference__img_dir="i"), "inference")
    # warm-up >= epochs only matters for training
    check(_cfg(dataset__val_ann_path="v.json", dataset__val_img_dir="v", train__warmup_epochs=20), "evaluate")


def test_input_paths_per_action():
    cfg = _with_paths(_cfg())
    assert set(mal.input_paths(cfg, "train")) == {
        "dataset.train_ann_path", "dataset.train_img_dir", "dataset.val_ann_path", "dataset.val_img_dir"}
    OmegaConf.update(cfg, "train.pretrained_model_path", "w.pth")
    assert mal.input_paths(cfg, "train")["train.pretrained_model_path"] == "w.pth"
    assert set(mal.input_paths(cfg, "evaluate")) == {"dataset.val_ann_path", "dataset.val_img_dir"}
    assert set(mal.input_paths(cfg, "inference")) == {"inference.ann_path", "inference.img_dir"}


def test_package_contract():
    assert (mal.NAME, mal.TITLE, mal.CHECKPOINT_NAME) == ("mal", "MAL", "mal_model")
    assert list(mal.ACTIONS) == ["train", "evaluate", "inference"]
    assert all(isinstance(v, str) and v for v in mal.ACTIONS.values())


@pytest.mark.parametrize("name,action", [("train.yaml", "train"), ("inference.yaml", "inference"),
                                         ("demo.yaml", "train"), ("tiny.yaml", "train")])
def test_packaged_configs_load(name, action):
    overrides = ["inference.checkpoint=x.pth"] if action == "inference" else []
    cfg = _load(action, CONFIGS / name, overrides)
    assert cfg.model_name == "mal"


def test_packaged_evaluate_needs_checkpoint():
    with pytest.raises(ConfigError, match="evaluate.checkpoint"):
        _load("evaluate", CONFIGS / "evaluate.yaml")
    cfg = _load("evaluate", CONFIGS / "evaluate.yaml", ["evaluate.checkpoint=m.pth"])
    assert cfg.evaluate.checkpoint == "m.pth"
