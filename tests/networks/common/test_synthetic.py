"""The synthetic dataset: determinism, COCO/panoptic/semantic/ODVG consistency, archives, default sizes."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from networks.common.coco_io import ann_to_mask, load_panoptic_png
from networks.common.sources import resolve_dir
from networks.common.synthetic import CATEGORIES, generate

TEXT_FILES = ["annotations.json", "annotations_0based.json", "annotations_panoptic.json", "label_map.json", "semantic.jsonl",
              "annotations_odvg.jsonl", "annotations_odvg_labelmap.json", "annotations_vg.jsonl"]


def test_same_seed_gives_identical_bytes(tmp_path):
    a = generate(tmp_path / "a", seed=7, num_train=6, num_val=3)
    b = generate(tmp_path / "b", seed=7, num_train=6, num_val=3)
    c = generate(tmp_path / "c", seed=8, num_train=6, num_val=3)
    for split in ("train", "val"):
        for name in TEXT_FILES + ["images.tar.gz", "images_panoptic.tar.gz"]:
            assert (a[split]["dir"] / name).read_bytes() == (b[split]["dir"] / name).read_bytes(), name
        for img in sorted(a[split]["images"].iterdir()):
            assert img.read_bytes() == (b[split]["images"] / img.name).read_bytes()
    assert a["train"]["annotations"].read_bytes() != c["train"]["annotations"].read_bytes()


def test_default_generation_sizes(tmp_path):
    out = generate(tmp_path / "d", seed=0)
    for split, n in (("train", 48), ("val", 16)):
        files = sorted(p.name for p in out[split]["images"].glob("*.jpg"))
        listed = sorted(im["file_name"] for im in json.loads(out[split]["annotations"].read_text())["images"])
        assert len(files) == n and listed == files, split


def test_coco_instances_load_and_match_masks(synth):
    for split in ("train", "val"):
        p = synth[split]["annotations"]
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(p))
        assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == [1, 2, 3]
        data = json.loads(p.read_text())
        kinds = set()
        n_empty = 0
        for im in data["images"]:
            w, h = Image.open(synth[split]["images"] / im["file_name"]).size
            assert (w, h) == (im["width"], im["height"]) and w in (128, 160) and h in (128, 160)
            anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
            n_empty += not anns
            union = np.zeros((h, w), np.int32)
            for a in anns:
                assert a["id"] > 0 and a["category_id"] in (1, 2, 3)
                m = ann_to_mask(a["segmentation"], h, w)
                # area is the visible mask area; bbox (xywh) is its tight box and lies inside the image.
                assert a["area"] == float(m.sum()) > 0
                ys, xs = np.nonzero(m)
                assert a["bbox"] == [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
                union += m
                seg = a["segmentation"]
                kinds.add("crowd-rle" if a["iscrowd"] else "polygon" if isinstance(seg, list) else "rle")
                if a["iscrowd"]:
                    assert isinstance(seg["counts"], list)
            assert union.max() <= 1  # visible masks are disjoint
        assert kinds == {"polygon", "rle", "crowd-rle"}
        assert n_empty >= 1


def test_zero_based_coco_copy(synth):
    a = json.loads(synth["val"]["annotations"].read_text())
    z = json.loads(synth["val"]["annotations_0based"].read_text())
    assert [c["id"] for c in z["categories"]] == [0, 1, 2]
    assert [c["name"] for c in z["categories"]] == [c["name"] for c in a["categories"]]
    assert [x["category_id"] + 1 for x in z["annotations"]] == [x["category_id"] for x in a["annotations"]]
    assert z["images"] == a["images"]


def test_panoptic_png_ids_match_segments_info(synth):
    split = synth["val"]
    data = json.loads(split["panoptic_json"].read_text())
    assert {c["id"]: c["isthing"] for c in data["categories"]} == {1: 1, 2: 1, 3: 1, 4: 0, 5: 0}
    inst = json.loads(split["annotations"].read_text())
    for ann, im in zip(data["annotations"], data["images"], strict=False):
        assert ann["image_id"] == im["id"]
        ids = load_panoptic_png(split["panoptic_dir"] / ann["file_name"])
        labels, counts = np.unique(ids, return_counts=True)
        assert 0 not in labels  # every pixel is labelled
        segs = {s["id"]: s for s in ann["segments_info"]}
        assert set(labels.tolist()) == set(segs)
        for lab, cnt in zip(labels.tolist(), counts.tolist(), strict=False):
            assert segs[lab]["area"] == cnt
        # Thing segments are the instance annotations (same id, category, crowd flag, area).
        things = {a["id"]: a for a in inst["annotations"] if a["image_id"] == im["id"]}
        assert {k for k, s in segs.items() if s["category_id"] <= 3} == set(things)
        for k, a in things.items():
            assert (segs[k]["category_id"], segs[k]["iscrowd"], float(segs[k]["area"])) == (
                a["category_id"], a["iscrowd"], a["area"])
        # Semantic PNG = category of each pixel's panoptic segment.
        sem = np.asarray(Image.open(split["semantic_dir"] / ann["file_name"]))
        cat_of = np.vectorize({k: s["category_id"] for k, s in segs.items()}.get)
        np.testing.assert_array_equal(sem, cat_of(ids))


def test_label_map_semantic_jsonl_and_archives(synth, tmp_path, monkeypatch):
    split = synth["train"]
    lm = json.loads(split["label_map"].read_text())
    assert [(c["id"], c["name"], c["isthing"]) for c in lm] == [(c["id"], c["name"], c["isthing"]) for c in CATEGORIES]
    lines = [json.loads(x) for x in split["semantic_jsonl"].read_text().splitlines()]
    assert len(lines) == 12
    for rec in lines:
        assert (split["dir"] / rec["img"]).is_file() and (split["dir"] / rec["segm"]).is_file()
    monkeypatch.setenv("TAO_CACHE_DIR", str(tmp_path / "cache"))
    images = resolve_dir(split["images_archive"], field="img_dir")
    assert sorted(p.name for p in images.glob("*.jpg")) == sorted(p.name for p in split["images"].glob("*.jpg"))
    pans = resolve_dir(split["panoptic_archive"], field="panoptic_dir")
    assert sorted(p.name for p in pans.glob("*.png")) == sorted(p.name for p in split["panoptic_dir"].glob("*.png"))


def test_odvg_records(synth):
    split = synth["train"]
    assert json.loads(split["odvg_labelmap"].read_text()) == {"0": "circle", "1": "square", "2": "triangle"}
    inst = json.loads(split["annotations"].read_text())
    by_image = {}
    for a in inst["annotations"]:
        if not a["iscrowd"]:
            by_image.setdefault(a["image_id"], []).append(a)
    names = {im["file_name"]: im for im in inst["images"]}
    od = [json.loads(x) for x in split["odvg"].read_text().splitlines()]
    assert len(od) == len(inst["images"])
    for rec in od:
        im = names[rec["file_name"]]
        assert (rec["height"], rec["width"]) == (im["height"], im["width"])
        anns = by_image.get(im["id"], [])
        assert len(rec["detection"]["instances"]) == len(anns)
        for inst_rec, a in zip(rec["detection"]["instances"], anns, strict=False):
            x, y, w, h = a["bbox"]
            assert inst_rec["bbox"] == [x, y, x + w, y + h]  # xyxy
            assert inst_rec["label"] == a["category_id"] - 1
            assert inst_rec["mask"] == a["segmentation"]
    vg = [json.loads(x) for x in split["vg"].read_text().splitlines()]
    assert vg and all(r["grounding"]["regions"] for r in vg)
    colours = {"red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "gray", "white", "black"}
    for r in vg:
        for reg in r["grounding"]["regions"]:
            colour, shape = reg["phrase"].split(" ")
            assert colour in colours and shape in ("circle", "square", "triangle")
            assert reg["phrase"] in r["grounding"]["caption"]


def test_rejects_tiny_images(tmp_path):
    with pytest.raises(ValueError):
        generate(tmp_path, image_size=16)
