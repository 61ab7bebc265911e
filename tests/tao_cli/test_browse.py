"""``tao dataset browse`` (tao_cli.browse.browse): N pictures of augmented training / evaluation samples with
their annotations drawn, for every network, on the synthetic dataset and the tiny specs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from networks.common.errors import ConfigError
from networks.common.visualize import palette
from tao_cli.browse import browse

REPO = Path(__file__).resolve().parents[2]
NETWORKS = ("mal", "mask2former", "mask_grounding_dino")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from networks.common.synthetic import generate

    return generate(tmp_path_factory.mktemp("browse_synth"), seed=0, num_train=6, num_val=4, image_size=96)


def _overrides(net: str, d: dict) -> list[str]:
    tr, va = d["train"], d["val"]
    if net == "mal":
        return [f"dataset.train_ann_path={tr['annotations']}", f"dataset.train_img_dir={tr['images']}",
                f"dataset.val_ann_path={va['annotations']}", f"dataset.val_img_dir={va['images']}"]
    if net == "mask2former":
        return [f"dataset.label_map={tr['label_map']}", f"dataset.train.panoptic_json={tr['panoptic_json']}",
                f"dataset.train.img_dir={tr['images']}", f"dataset.train.panoptic_dir={tr['panoptic_dir']}",
                f"dataset.val.panoptic_json={va['panoptic_json']}", f"dataset.val.img_dir={va['images']}",
                f"dataset.val.panoptic_dir={va['panoptic_dir']}"]
    return [f"dataset.train_data_sources=[{{image_dir:{tr['images']},json_file:{tr['odvg']},"
            f"label_map:{tr['odvg_labelmap']}}}]",
            f"dataset.val_data_sources.image_dir={va['images']}",
            f"dataset.val_data_sources.json_file={va['annotations']}",
            f"dataset.test_data_sources.image_dir={va['images']}",
            f"dataset.test_data_sources.json_file={va['annotations']}"]


def _annotation_colors(net: str, d: dict) -> np.ndarray:
    """The exact colours label tags are filled with for this network's samples."""
    if net == "mask2former":
        import json

        return np.asarray([c["color"] for c in json.loads(Path(d["train"]["label_map"]).read_text())])
    if net == "mal":
        return np.asarray([palette(cid + 1)[cid] for cid in (1, 2, 3)])
    return np.asarray(palette(3))  # three prompt slots: circle / square / triangle


def _count(picture: np.ndarray, colors: np.ndarray) -> int:
    return int((picture[:, :, None, :] == colors[None, None]).all(-1).any(-1).sum())


@pytest.mark.parametrize("net", NETWORKS)
@pytest.mark.parametrize("action", ["train", "evaluate"])
def test_browse_writes_n_annotated_pictures(net, action, synth, tmp_path):
    out = tmp_path / "browse"
    paths = browse(net, REPO / "configs" / net / "tiny.yaml", action, out, num=3, overrides=_overrides(net, synth))
    assert len(paths) == 3 and sorted(out.iterdir()) == sorted(paths)
    colors = _annotation_colors(net, synth)
    split = synth["train" if action == "train" else "val"]
    annotated = 0
    for p in paths:
        assert p.suffix == ".png" and p.stat().st_size > 0
        picture = np.asarray(Image.open(p).convert("RGB"))
        assert picture.shape[0] >= 32 and picture.shape[1] >= 32
        stem = p.stem.split("_", 1)[1].split("_ann")[0]
        (source,) = split["images"].glob(f"{stem}.*")
        original = np.asarray(Image.open(source).convert("RGB"))
        # Drawn annotation tags: many more pixels of the exact tag colours than the raw image has.
        annotated += _count(picture, colors) >= _count(original, colors) + 30
    # Some synthetic images have no objects, and a random crop may lose them all: one annotated picture is enough.
    assert annotated >= 1


def test_browse_rejects_bad_arguments(synth, tmp_path):
    spec = REPO / "configs" / "mal" / "tiny.yaml"
    with pytest.raises(ConfigError) as err:
        browse("mal", spec, "inference", tmp_path, overrides=_overrides("mal", synth))
    assert err.value.subject == "--action"
    with pytest.raises(ConfigError) as err:
        browse("mal", spec, "train", tmp_path, num=0, overrides=_overrides("mal", synth))
    assert err.value.subject == "--num"
