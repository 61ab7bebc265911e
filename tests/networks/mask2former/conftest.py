"""Shared fixtures of the Mask2Former tests: one small synthetic dataset per session and the tiny spec."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def m2f_synthetic(tmp_path_factory):
    """``networks.common.synthetic.generate`` output (6 train, 4 val images, 96–128 px)."""
    from networks.common.synthetic import generate

    return generate(tmp_path_factory.mktemp("m2f_synth"), seed=0, num_train=6, num_val=4, image_size=96)


def make_tiny_cfg(data: dict, kind: str = "coco_panoptic", archives: bool = True, mode: str = "panoptic"):
    """configs/mask2former/tiny.yaml with its dataset paths pointed at ``data`` (a ``generate`` result)."""
    from networks.mask2former.config import ExperimentConfig

    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                          OmegaConf.load(REPO / "configs" / "mask2former" / "tiny.yaml"))
    cfg.model.mode = mode
    cfg.dataset.label_map = str(data["train"]["label_map"])
    for split in ("train", "val"):
        p = data[split]
        s = cfg.dataset[split]
        s.type = kind
        s.img_dir = str(p["images_archive"] if archives else p["images"])
        s.panoptic_json = str(p["panoptic_json"])
        s.panoptic_dir = str(p["panoptic_archive"] if archives else p["panoptic_dir"])
        s.instance_json = str(p["annotations"])
        s.annot_file = str(p["semantic_jsonl"])
        s.root_dir = str(p["dir"])
    cfg.dataset.test.img_dir = str(data["val"]["images"])
    return cfg


@pytest.fixture
def tiny_cfg(m2f_synthetic):
    """The tiny spec on the session's synthetic data (coco_panoptic from archives, panoptic mode)."""
    return make_tiny_cfg(m2f_synthetic)
