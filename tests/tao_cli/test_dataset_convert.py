"""``tao dataset convert``: exact conversions, round trips, one-line refusals, and COCO → ODVG → a training run.

The synthetic set's generator writes its ODVG file and semantic PNGs itself, independently of the converter, so
"converter output == generator output" checks the conventions (contiguous labels, crowd left out, xyxy boxes)
and not only self-consistency.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from networks.common.dataset_convert import xywh_to_xyxy, xyxy_to_xywh
from networks.common.synthetic import generate
from tao_cli.cli import app


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn")
    generate(root, seed=3, num_train=8, num_val=4, image_size=64)
    return root


def _tao(*args) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, ["dataset", "convert", *map(str, args)])
    return res.exit_code, res.stdout, res.stderr


def _one_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------ boxes
def test_box_arithmetic_round_trips_exactly():
    rng = random.Random(0)
    two_dec = [[round(rng.uniform(0, 640), 2) for _ in range(2)] + [round(rng.uniform(0, 300), 2) for _ in range(2)]
               for _ in range(3000)]
    two_dec += [[0.1, 0.1, 0.2, 0.2], [473.07, 395.93, 38.65, 28.67], [10, 20, 30, 40]]
    for b in two_dec:
        back = xyxy_to_xywh(xywh_to_xyxy(b))
        assert back == b and [type(v) for v in back] == [type(v) for v in b], b
    full = []
    for _ in range(3000):
        x1, y1 = rng.uniform(0, 1000), rng.uniform(0, 1000)
        full.append([x1, y1, x1 + rng.uniform(0, 500), y1 + rng.uniform(0, 1e-3)])
    for b in full:
        assert xywh_to_xyxy(xyxy_to_xywh(b)) == b, b
    # plain subtraction is what a plausible implementation does, and it is not exact on these sets
    assert any([x, y, x + (x2 - x), y + (y2 - y)] != [x, y, x2, y2] for x, y, x2, y2 in full) or \
        any([x, y, (x + w) - x, (y + h) - y] != [x, y, w, h] for x, y, w, h in two_dec)


# ------------------------------------------------------------------------------------------------ COCO ↔ ODVG
def test_coco_to_odvg_equals_the_generators_odvg(syn, tmp_path):
    tr = syn / "train"
    code, out, err = _tao("--from", "coco", "--to", "odvg", tr / "annotations.json", "--out", tmp_path / "a.jsonl")
    assert code == 0, err
    assert (tmp_path / "a.jsonl").read_bytes() == (tr / "annotations_odvg.jsonl").read_bytes()
    assert json.loads((tmp_path / "a_labelmap.json").read_text()) == \
        json.loads((tr / "annotations_odvg_labelmap.json").read_text()) == {"0": "circle", "1": "square", "2": "triangle"}
    crowd = sum(a["iscrowd"] for a in json.loads((tr / "annotations.json").read_text())["annotations"])
    assert crowd and f"left out {crowd} crowd annotation(s)" in out


def test_odvg_to_coco_to_odvg_is_identical(syn, tmp_path):
    tr = syn / "train"
    for cats in ([], ["--categories", tr / "annotations.json"]):
        coco = tmp_path / "c.json"
        code, _, err = _tao("--from", "odvg", "--to", "coco", tr / "annotations_odvg.jsonl", "--out", coco,
                            "--label-map", tr / "annotations_odvg_labelmap.json", *cats)
        assert code == 0, err
        code, _, err = _tao("--from", "coco", "--to", "odvg", coco, "--out", tmp_path / "b.jsonl",
                            "--label-map", tmp_path / "lm.json")
        assert code == 0, err
        assert (tmp_path / "b.jsonl").read_bytes() == (tr / "annotations_odvg.jsonl").read_bytes()
        assert (tmp_path / "lm.json").read_text() == (tr / "annotations_odvg_labelmap.json").read_text()
    # without --categories the ids are TAO's 0..C-1 and the file equals the generator's 0-based file (less crowd)
    code, _, err = _tao("--from", "odvg", "--to", "coco", tr / "annotations_odvg.jsonl", "--out", coco,
                        "--label-map", tr / "annotations_odvg_labelmap.json")
    zero = json.loads((tr / "annotations_0based.json").read_text())
    got = json.loads(coco.read_text())
    assert got["categories"] == [{"id": c["id"], "name": c["name"]} for c in zero["categories"]]
    keep = ("image_id", "category_id", "bbox", "area", "segmentation")
    assert [{k: a[k] for k in keep} for a in got["annotations"]] == \
        [{k: a[k] for k in keep} for a in zero["annotations"] if not a["iscrowd"]]


def test_coco_to_odvg_to_coco_keeps_every_carried_field(tmp_path):
    """Random 2-decimal boxes (COCO's own precision), polygons and RLEs, a category list not sorted by id."""
    rng = random.Random(1)
    cats = [{"id": 7, "name": "kite", "supercategory": "x"}, {"id": 2, "name": "cup", "supercategory": "y"}]
    images, anns = [], []
    for i in range(1, 6):
        images.append({"id": 100 + i, "file_name": f"im{i}.jpg", "height": 480, "width": 640})
        for _ in range(rng.randrange(0, 5)):
            x, y = round(rng.uniform(0, 500), 2), round(rng.uniform(0, 400), 2)
            w, h = round(rng.uniform(1, 100), 2), round(rng.uniform(1, 60), 2)
            seg = [[x, y, x + w, y, x + w, y + h]] if rng.random() < 0.5 else \
                {"size": [480, 640], "counts": [int(640 * x), 7, 480 * 640 - int(640 * x) - 7]}
            anns.append({"id": 1000 + len(anns), "image_id": 100 + i, "category_id": rng.choice([7, 2]),
                         "bbox": [x, y, w, h], "area": 1.0, "iscrowd": 0, "segmentation": seg})
    src = tmp_path / "src.json"
    src.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    assert _tao("--from", "coco", "--to", "odvg", src, "--out", tmp_path / "o.jsonl")[0] == 0
    assert json.loads((tmp_path / "o_labelmap.json").read_text()) == {"0": "kite", "1": "cup"}  # list position
    code, _, err = _tao("--from", "odvg", "--to", "coco", tmp_path / "o.jsonl", "--out", tmp_path / "back.json",
                        "--label-map", tmp_path / "o_labelmap.json", "--categories", src)
    assert code == 0, err
    back = json.loads((tmp_path / "back.json").read_text())
    assert back["categories"] == cats
    name_of = {im["id"]: im["file_name"] for im in images}
    bname = {im["id"]: im["file_name"] for im in back["images"]}
    assert [{k: im[k] for k in ("file_name", "height", "width")} for im in back["images"]] == \
        [{k: im[k] for k in ("file_name", "height", "width")} for im in images]
    carried = ("category_id", "bbox", "segmentation")
    assert [(bname[a["image_id"]], *(a[k] for k in carried)) for a in back["annotations"]] == \
        [(name_of[a["image_id"]], *(a[k] for k in carried)) for a in sorted(anns, key=lambda a: a["image_id"])]


def test_grounding_from_a_captions_file(syn, tmp_path):
    from networks.mask_grounding_dino.data import read_odvg

    tr = syn / "train"
    doc = json.loads((tr / "annotations.json").read_text())
    caps = {"annotations": [{"id": 1, "image_id": 1, "caption": "shapes on a field"},
                            {"id": 2, "image_id": 1, "caption": "second caption, not used"},
                            {"id": 3, "image_id": 3, "caption": "more shapes"},
                            {"id": 4, "image_id": 8, "caption": "the last image has no object"}]}
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    code, out, err = _tao("--from", "coco", "--to", "odvg_grounding", tr / "annotations.json",
                          "--out", tmp_path / "vg.jsonl", "--captions", tmp_path / "caps.json")
    assert code == 0, err
    lines = [json.loads(s) for s in (tmp_path / "vg.jsonl").read_text().splitlines()]
    assert [r["grounding"]["caption"] for r in lines] == ["shapes on a field", "more shapes"]
    names = {c["id"]: c["name"] for c in doc["categories"]}
    want = [[(names[a["category_id"]], a["segmentation"]) for a in doc["annotations"]
             if a["image_id"] == i and not a["iscrowd"]] for i in (1, 3)]
    assert [[(g["phrase"], g["mask"]) for g in r["grounding"]["regions"]] for r in lines] == want
    assert "1 captioned image(s) without a non-crowd annotation" in out
    assert len(read_odvg(tmp_path / "vg.jsonl", None, "json_file")) == 2  # the loader takes it


# ------------------------------------------------------------------------------------------------ panoptic → semantic
def _reference_semantic(png: Path, segments: list) -> np.ndarray:
    """panopticapi's decoding written out: id = R + 256 G + 256² B, then each segment's pixels get its category
    (crowd and VOID → 0, unlabelled in mIoU)."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.uint32)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    sem = np.zeros(ids.shape, dtype=np.int64)
    for s in segments:
        sem[ids == s["id"]] = 0 if s["iscrowd"] else s["category_id"]
    return sem


def test_panoptic_to_semantic_labels_match_the_panoptic_png(syn, tmp_path):
    tr = syn / "train"
    out = tmp_path / "sem"
    code, _, err = _tao("--from", "coco_panoptic", "--to", "semantic", tr / "annotations_panoptic.json",
                        "--out", out, "--panoptic-dir", tr / "panoptic", "--images", tr / "images")
    assert code == 0, err
    pan = json.loads((tr / "annotations_panoptic.json").read_text())
    crowd_seen = False
    for ann in pan["annotations"]:
        got = np.asarray(Image.open(out / "semantic" / ann["file_name"]))
        want = _reference_semantic(tr / "panoptic" / ann["file_name"], ann["segments_info"])
        assert np.array_equal(got, want), ann["file_name"]
        # where nothing is crowd the generator's own semantic PNG (its mIoU labels) is the same
        gen = np.asarray(Image.open(tr / "semantic" / ann["file_name"]))
        assert np.array_equal(got[got > 0], gen[got > 0])
        crowd_seen |= bool((got == 0).any())
    assert crowd_seen
    lines = [json.loads(s) for s in (out / "semantic.jsonl").read_text().splitlines()]
    assert all((out / ln["img"]).is_file() and (out / ln["segm"]).is_file() for ln in lines)
    assert [c["id"] for c in json.loads((out / "label_map.json").read_text())] == [c["id"] for c in pan["categories"]]


def test_panoptic_png_with_an_unlisted_segment_is_refused(syn, tmp_path):
    tr = syn / "train"
    pan = json.loads((tr / "annotations_panoptic.json").read_text())
    victim = pan["annotations"][2]
    dropped = victim["segments_info"].pop()
    (tmp_path / "p.json").write_text(json.dumps(pan))
    code, _, err = _tao("--from", "coco_panoptic", "--to", "semantic", tmp_path / "p.json", "--out", tmp_path / "s",
                        "--panoptic-dir", tr / "panoptic")
    line = _one_error(err)
    assert code == 2 and f"{victim['file_name']}: PNG has segment id(s) [{dropped['id']}]" in line


# ------------------------------------------------------------------------------------------------ refusals
def test_planted_errors_name_the_record(syn, tmp_path):
    tr = syn / "train"
    doc = json.loads((tr / "annotations.json").read_text())
    doc["annotations"][4]["category_id"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    code, _, err = _tao("--from", "coco", "--to", "odvg", tmp_path / "bad.json", "--out", tmp_path / "o.jsonl")
    aid = doc["annotations"][4]["id"]
    assert code == 2 and f"annotation id {aid}: refers to unknown category_id 99" in _one_error(err)
    assert not (tmp_path / "o.jsonl").exists()

    lines = (tr / "annotations_odvg.jsonl").read_text().splitlines()
    rec = json.loads(lines[2])
    rec["detection"]["instances"][0]["label"] = 7
    lines[2] = json.dumps(rec)
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = _tao("--from", "odvg", "--to", "coco", tmp_path / "bad.jsonl", "--out", tmp_path / "c.json",
                        "--label-map", tr / "annotations_odvg_labelmap.json")
    assert code == 2 and "bad.jsonl:3 instance 0: label 7 is not in the label map" in _one_error(err)
    assert not (tmp_path / "c.json").exists()

    code, _, err = _tao("--from", "odvg", "--to", "coco", tr / "annotations_odvg.jsonl", "--out", tmp_path / "c.json")
    assert code == 2 and "--label-map: is required" in _one_error(err)
    code, _, err = _tao("--from", "odvg", "--to", "semantic", tr / "annotations_odvg.jsonl", "--out", tmp_path / "x")
    assert code == 2 and "no conversion from 'odvg' to 'semantic'" in _one_error(err)
    code, _, err = _tao("--from", "coco", "--to", "odvg", tr / "annotations.json", "--out", tmp_path / "o.jsonl",
                        "--captions", tmp_path / "caps.json")
    assert code == 2 and "--captions: is not used when converting coco to odvg" in _one_error(err)


# ------------------------------------------------------------------------------------------------ trains
@pytest.mark.slow
def test_coco_to_odvg_trains_mask_grounding_dino(syn, tmp_path, capsys, one_thread):
    from tao_cli.cli import run_model
    from tao_cli.paths import configs_dir

    tr, va = syn / "train", syn / "val"
    assert _tao("--from", "coco", "--to", "odvg", tr / "annotations.json", "--out", tmp_path / "train.jsonl")[0] == 0
    # the evaluation file the other way round: ODVG → COCO with TAO's 0..C-1 ids
    assert _tao("--from", "odvg", "--to", "coco", va / "annotations_odvg.jsonl", "--out", tmp_path / "val.json",
                "--label-map", va / "annotations_odvg_labelmap.json")[0] == 0
    results = tmp_path / "results"
    overrides = [f"results_dir={results}", "train.num_epochs=1",
                 f"dataset.train_data_sources=[{{image_dir: {tr / 'images'}, json_file: {tmp_path / 'train.jsonl'}, "
                 f"label_map: {tmp_path / 'train_labelmap.json'}}}]",
                 f"dataset.val_data_sources={{image_dir: {va / 'images'}, json_file: {tmp_path / 'val.json'}}}",
                 f"dataset.test_data_sources={{image_dir: {va / 'images'}, json_file: {tmp_path / 'val.json'}}}"]
    code = run_model("mask_grounding_dino", "train", str(configs_dir() / "mask_grounding_dino" / "tiny.yaml"),
                     overrides)
    assert code == 0, capsys.readouterr().err
    assert (results / "train" / "mask_gdino_model_latest.pth").is_file()
    status = [json.loads(s) for s in (results / "train" / "status.json").read_text().splitlines() if s.strip()]
    assert status[-1].get("status") == "SUCCESS", status[-1]
