"""Shared by the AutoML tests: a few synthetic images for MAL's tiny config, as spec overrides."""
from __future__ import annotations

import pytest

from networks.common.synthetic import generate


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    """``dataset.*`` overrides pointing MAL at 4 train / 2 val synthetic images (64 px)."""
    d = generate(tmp_path_factory.mktemp("syn"), seed=3, num_train=4, num_val=2, image_size=64)
    tr, va = d["train"], d["val"]
    return [f"dataset.train_ann_path={tr['annotations']}", f"dataset.train_img_dir={tr['images']}",
            f"dataset.val_ann_path={va['annotations']}", f"dataset.val_img_dir={va['images']}"]
