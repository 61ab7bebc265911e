"""``tao dataset stats``: every figure against values computed independently with pycocotools' index and
COCOeval's own area ranges, on the synthetic set with planted records (crowd, empty image, areas on the bin
edges, an unknown category, an orphan annotation)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import Params
from reliability.cli import tao_exit_code

from networks.common.dataset_stats import coco_stats
from networks.common.errors import DataError
from networks.common.synthetic import generate


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=5, num_train=12, num_val=3)
    return root


def _planted(synth) -> dict:
    doc = json.loads((synth / "train" / "annotations.json").read_text())
    first = doc["annotations"][0]
    next_id = max(a["id"] for a in doc["annotations"]) + 1
    # an extra empty image, a planted crowd, and areas exactly on COCOeval's closed bin edges
    doc["images"].append({"id": 900, "file_name": "x.jpg", "width": 10, "height": 10})
    doc["annotations"] += [
        {**first, "id": next_id, "iscrowd": 1, "area": 5000.0},
        {**first, "id": next_id + 1, "iscrowd": 0, "area": 32.0 ** 2},
        {**first, "id": next_id + 2, "iscrowd": 0, "area": 96.0 ** 2},
        {**first, "id": next_id + 3, "iscrowd": 0, "area": 96.0 ** 2 + 0.5, "category_id": 3},
    ]
    return doc


def _independent(doc: dict) -> dict:
    """The same figures from pycocotools' COCO index and COCOeval's area ranges, one annotation at a time."""
    coco = COCO()
    coco.dataset = copy.deepcopy(doc)
    coco.createIndex()
    ranges = dict(zip(Params(iouType="segm").areaRngLbl, Params(iouType="segm").areaRng, strict=True))
    per_image = [len(coco.imgToAnns[i]) for i in coco.getImgIds()]
    sizes = {}
    for label in ("small", "medium", "large"):
        lo, hi = ranges[label]
        # COCOeval.evaluateImg ignores a GT when it is crowd or when area < lo or area > hi
        sizes[label] = sum(1 for a in coco.anns.values() if not a["iscrowd"] and not (a["area"] < lo or a["area"] > hi))
    return {
        "images": len(coco.imgs),
        "annotations": len(coco.anns),
        "crowd": sum(1 for a in coco.anns.values() if a["iscrowd"]),
        "empty_images": sum(1 for n in per_image if n == 0),
        "sizes": sizes,
        "per_image": per_image,
        "instances": {c: len(coco.getAnnIds(catIds=[c])) for c in coco.getCatIds()},
        "crowd_per_class": {c: sum(1 for a in coco.anns.values() if a["category_id"] == c and a["iscrowd"])
                            for c in coco.getCatIds()},
        "images_per_class": {c: len(coco.getImgIds(catIds=[c])) for c in coco.getCatIds()},
    }


def test_stats_match_pycocotools_on_planted_set(synth):
    doc = _planted(synth)
    got = coco_stats(doc)
    want = _independent(doc)
    for key in ("images", "annotations", "crowd", "empty_images", "sizes"):
        assert got[key] == want[key], key
    # the plants are visible: ≥ 2 crowds (synthetic image 2 + planted), ≥ 2 empty images (last + planted)
    assert got["crowd"] >= 2 and got["empty_images"] >= 2
    # area 32² counts in small and medium, 96² in medium and large (COCOeval's closed intervals)
    assert got["sizes"]["small"] + got["sizes"]["medium"] + got["sizes"]["large"] == \
        got["annotations"] - got["crowd"] + 2
    per_image = np.array(want["per_image"])
    assert got["boxes_per_image"] == {"min": int(per_image.min()), "median": float(np.median(per_image)),
                                      "max": int(per_image.max()), "mean": float(per_image.mean())}
    assert got["boxes_per_image_histogram"] == np.bincount(per_image).tolist()
    names = {c["id"]: c["name"] for c in doc["categories"]}
    assert got["classes"] == [{"id": c, "name": names[c], "instances": want["instances"][c],
                               "crowd": want["crowd_per_class"][c], "images": want["images_per_class"][c]}
                              for c in [c["id"] for c in doc["categories"]]]
    assert got["orphan_image"] == 0 and got["unknown_category"] == 0


def test_unknown_category_and_orphan_are_counted_not_attributed(synth):
    doc = _planted(synth)
    base = coco_stats(doc)
    first = doc["annotations"][0]
    doc["annotations"] += [{**first, "id": 10_001, "category_id": 77},
                           {**first, "id": 10_002, "image_id": 4242}]
    got = coco_stats(doc)
    assert (got["unknown_category"], got["orphan_image"]) == (1, 1)
    assert got["boxes_per_image"]["max"] >= base["boxes_per_image"]["max"]
    # the orphan is not attributed to any image, the unknown-category one to no class
    assert sum(got["boxes_per_image_histogram"][k] * k for k in range(len(got["boxes_per_image_histogram"]))) == \
        got["annotations"] - 1
    assert sum(c["instances"] for c in got["classes"]) == got["annotations"] - 1


def test_panoptic_segments_count_as_annotations(synth):
    doc = json.loads((synth / "train" / "annotations_panoptic.json").read_text())
    got = coco_stats(doc)
    segs = [s for a in doc["annotations"] for s in a["segments_info"]]
    assert got["format"] == "coco_panoptic"
    assert got["annotations"] == len(segs)
    assert got["crowd"] == sum(1 for s in segs if s.get("iscrowd"))
    assert [c["instances"] for c in got["classes"]] == \
        [sum(1 for s in segs if s["category_id"] == c["id"]) for c in doc["categories"]]


def test_bad_area_names_the_record(synth):
    doc = _planted(synth)
    victim = doc["annotations"][3]
    del victim["area"]
    with pytest.raises(DataError, match=rf"^annotation id {victim['id']}: 'area' is '<missing>'"):
        coco_stats(doc)
    victim["area"] = "big"
    with pytest.raises(DataError, match=rf"^f.json: annotation id {victim['id']}: 'area' is 'big'"):
        coco_stats(doc, "f.json")
    doc["annotations"][5] = [1, 2]
    with pytest.raises(DataError, match=r"^f.json: annotations\[5\]: is a JSON list, expected an object"):
        coco_stats(doc, "f.json")
    doc = _planted(synth)
    doc["images"][4]["id"] = "x4"
    with pytest.raises(DataError, match=r"^f.json: images\[4\]: id 'x4' is not an integer"):
        coco_stats(doc, "f.json")


def test_cli_stats_writes_json_and_plots(synth, tmp_path, capsys):
    doc = _planted(synth)
    path = tmp_path / "planted.json"
    path.write_text(json.dumps(doc))
    assert tao_exit_code("dataset", "stats", str(path), "--plot", str(tmp_path / "plots"),
                         "--json", str(tmp_path / "stats.json")) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "stats.json").read_text())
    assert report["file"] == str(path)
    assert {k: report[k] for k in ("images", "crowd", "empty_images", "sizes")} == \
        {k: coco_stats(doc)[k] for k in ("images", "crowd", "empty_images", "sizes")}
    assert "circle" in out and str(report["images"]) in out
    for name in ("classes.png", "boxes_per_image.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_stats_refuses_odvg_and_missing_file(synth, tmp_path, capsys):
    assert tao_exit_code("dataset", "stats", str(synth / "train" / "annotations_odvg.jsonl")) == 2
    assert tao_exit_code("dataset", "stats", str(tmp_path / "nope.json")) == 2
    err = capsys.readouterr().err
    assert "annotations_odvg.jsonl: is a JSON-lines (ODVG) file" in err
    assert "nope.json' does not exist" in err
