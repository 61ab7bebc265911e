"""MAL post-processing: paste-back, thresholds and the pseudo-label JSON (completeness, RLE, atomicity)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import networks.mal.postprocess as inf
from networks.mal.postprocess import (
    bin_threshold,
    clip_to_box,
    encode_prediction,
    paste_back,
    resolve_label_dump_path,
    write_overlays,
    write_pseudo_labels,
)


# ------------------------------------------------------------------------------------------------ paste_back
def test_paste_back_inside_image_equals_bilinear_resize():
    prob = torch.rand(1, 16, 16)
    out = paste_back(prob, torch.tensor([[2, 3, 22, 13]]), torch.tensor([[20, 30]]))
    assert len(out) == 1 and out[0].shape == (20, 30) and out[0].dtype == np.float32
    ref = F.interpolate(prob[None], size=(10, 20), mode="bilinear", align_corners=False)[0, 0].numpy()
    assert np.allclose(out[0][3:13, 2:22], ref, atol=1e-6)
    out[0][3:13, 2:22] = 0
    assert (out[0] == 0).all()


def test_paste_back_clips_window_outside_image():
    prob = torch.ones(2, 1, 8, 8)  # [N,1,S,S] is accepted too
    boxes = np.array([[-5, -2, 5, 8], [8, 8, 20, 20]])
    out = paste_back(prob, boxes, np.array([[10, 10], [10, 12]]))
    expect0 = np.zeros((10, 10), np.float32)
    expect0[0:8, 0:5] = 1
    assert (out[0] == expect0).all()
    assert out[1].shape == (10, 12) and out[1][8:, 8:].min() == 1 and out[1][:8].max() == 0
    # window entirely outside: empty canvas
    assert paste_back(torch.ones(1, 4, 4), [[30, 30, 40, 40]], [[10, 10]])[0].sum() == 0


def test_paste_back_offset_crop_takes_the_matching_part():
    prob = torch.arange(64, dtype=torch.float32).reshape(1, 8, 8) / 64
    full = F.interpolate(prob[None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0].numpy()
    out = paste_back(prob, [[-4, -6, 12, 10]], [[10, 10]])[0]
    assert np.allclose(out[0:10, 0:10], full[6:16, 4:14], atol=1e-6)


@pytest.mark.parametrize("area,expected", [(0.0, 0.1), (1.0, 0.1), (1024.0, 0.1), (1024.5, 0.2), (9216.0, 0.2),
                                           (9216.1, 0.3), (1e12, 0.3)])
def test_bin_threshold_half_open_bins(area, expected):
    assert bin_threshold(area, [0.1, 0.2, 0.3]) == expected
    assert bin_threshold(area, [0.4]) == 0.4


def test_bin_threshold_rejects_two_values():
    with pytest.raises(ValueError):
        bin_threshold(10.0, [0.1, 0.2])


def test_clip_to_box_keeps_one_pixel_grown_box():
    m = np.ones((10, 12), bool)
    out = clip_to_box(m, [2.5, 3.0, 4.0, 2.0])  # cols int(2.5)..int(6.5), rows 3..5 inclusive
    assert out.sum() == 5 * 3 and out[3:6, 2:7].all()


# --------------------------------------------------------------------------------------- pseudo-label writing
def _input_json():
    return {
        "info": {"description": "t"},
        "licenses": [],
        "images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 20},
                   {"id": 2, "file_name": "b.png", "width": 16, "height": 24},
                   {"id": 3, "file_name": "c.png", "width": 16, "height": 16}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 5, "bbox": [2.0, 3.0, 10.0, 8.0], "area": 80.0, "iscrowd": 0,
             "extra": "keep me"},
            {"id": 3, "image_id": 2, "category_id": 5, "bbox": [0.0, 0.0, 16.0, 24.0], "area": 384.0,
             "iscrowd": 1},
            {"id": 11, "image_id": 1, "category_id": 6, "bbox": [25.0, 15.0, 10.0, 0.0], "area": 0.0,
             "iscrowd": 0},
        ],
        "categories": [{"id": 5, "name": "five"}, {"id": 6, "name": "six"}],
    }


def _predictions(coco, seed=0):
    rng = np.random.default_rng(seed)
    imgs = {i["id"]: i for i in coco["images"]}
    preds = []
    for a in coco["annotations"]:
        im = imgs[a["image_id"]]
        preds.append({"ann_id": a["id"], "image_id": a["image_id"],
                      "prob": rng.random((im["height"], im["width"])).astype(np.float32)})
    return preds


def test_pseudo_labels_complete_valid_and_inside_box(tmp_path):
    coco = _input_json()
    preds = _predictions(coco)
    out = tmp_path / "sub" / "pl.json"
    summary = write_pseudo_labels(coco, list(reversed(preds)), out, mask_thres=[0.5])
    assert summary["annotations"] == 3 and summary["missing"] == 0 and summary["path"] == str(out)
    data = json.loads(out.read_text())
    assert [a["id"] for a in data["annotations"]] == [7, 3, 11]  # order and ids preserved
    assert data["images"] == coco["images"] and data["categories"] == coco["categories"]
    assert data["info"] == coco["info"] and data["licenses"] == []
    a0, a1, a2 = data["annotations"]
    assert a0["extra"] == "keep me" and a0["bbox"] == [2.0, 3.0, 10.0, 8.0]
    assert a1["iscrowd"] == 1 and a0["iscrowd"] == 0  # not forced to 0
    imgs = {i["id"]: i for i in coco["images"]}
    probs = {p["ann_id"]: p["prob"] for p in preds}
    for a in data["annotations"]:
        seg = a["segmentation"]
        assert isinstance(seg["counts"], str)
        m = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
        im = imgs[a["image_id"]]
        assert m.shape == (im["height"], im["width"])
        assert a["area"] == int(m.sum())
        grown = clip_to_box(np.ones_like(m, bool), a["bbox"])
        assert not (m.astype(bool) & ~grown).any()
        expect = clip_to_box(probs[a["id"]] > 0.5, a["bbox"])
        assert (m.astype(bool) == expect).all()
        if a["area"]:
            assert a["score"] == pytest.approx(float(probs[a["id"]][expect].mean()), rel=1e-5)
        else:
            assert a["score"] == 0.0
    # degenerate box (h = 0 at the bottom-right corner): a one-row clipped mask at most
    assert a2["area"] <= 5
    # pycocotools can load the result (and its index works)
    c = COCO(str(out))
    assert sorted(c.getAnnIds()) == [3, 7, 11]
    assert c.annToMask(c.loadAnns([7])[0]).shape == (20, 30)


def test_compact_records_and_duplicates(tmp_path):
    coco = _input_json()
    preds = _predictions(coco)
    boxes = {a["id"]: a["bbox"] for a in coco["annotations"]}
    compact = [encode_prediction(p, boxes[p["ann_id"]], [0.5]) for p in preds]
    dup = dict(preds[0], prob=np.zeros_like(preds[0]["prob"]))  # later duplicate: ignored
    write_pseudo_labels(coco, compact + [dup], tmp_path / "a.json")
    write_pseudo_labels(coco, preds, tmp_path / "b.json", mask_thres=[0.5])
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())


def test_explicit_binary_mask_and_iou_are_used(tmp_path):
    coco = _input_json()
    preds = _predictions(coco)
    preds[0]["mask"] = np.ones((20, 30), bool)
    preds[0]["iou"] = 0.75
    write_pseudo_labels(coco, preds, tmp_path / "pl.json")
    a = json.loads((tmp_path / "pl.json").read_text())["annotations"][0]
    assert a["area"] == 11 * 9 and a["iou"] == 0.75  # clipped to the grown box [2..12] x [3..11]


def test_missing_prediction_gets_empty_mask(tmp_path):
    coco = _input_json()
    preds = _predictions(coco)[:2]
    summary = write_pseudo_labels(coco, preds, tmp_path / "pl.json")
    assert summary["missing"] == 1
    a = json.loads((tmp_path / "pl.json").read_text())["annotations"][2]
    assert a["area"] == 0 and a["segmentation"]["size"] == [20, 30]


def test_crash_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    coco = _input_json()
    out = tmp_path / "pl.json"
    out.write_text("old")

    def boom(obj, fh, *a, **k):
        fh.write('{"images": [')
        raise RuntimeError("disk full")

    monkeypatch.setattr(inf.json, "dump", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_pseudo_labels(coco, _predictions(coco), out)
    assert out.read_text() == "old"  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pl.json"]  # no temp file left
    out.unlink()
    with pytest.raises(RuntimeError):
        write_pseudo_labels(coco, _predictions(coco), out)
    assert list(tmp_path.iterdir()) == []


def test_label_dump_path_resolution(tmp_path):
    assert resolve_label_dump_path("x.json", tmp_path) == tmp_path / "x.json"
    assert resolve_label_dump_path(str(tmp_path / "abs.json"), "/elsewhere") == tmp_path / "abs.json"


def test_overlays_written_for_first_images(tmp_path):
    coco = _input_json()
    for im in coco["images"]:
        Image.fromarray(np.full((im["height"], im["width"], 3), 90, np.uint8)).save(tmp_path / im["file_name"])
    write_pseudo_labels(coco, _predictions(coco), tmp_path / "pl.json", mask_thres=[0.5])
    out = json.loads((tmp_path / "pl.json").read_text())
    paths = write_overlays(out, tmp_path, tmp_path / "overlays", 1)
    assert len(paths) == 1 and paths[0].exists()
    assert Image.open(paths[0]).size == (30, 20)
    paths = write_overlays(out, tmp_path, tmp_path / "overlays", 8)
    assert len(paths) == 2  # image 3 has no annotation
    assert write_overlays(out, tmp_path, tmp_path / "none", 0) == []


# ------------------------------------------------------------------------------------------- whole predict path
def test_predict_path_writes_complete_pseudo_labels(tmp_path, monkeypatch):
    """build_datamodule + build_module + Trainer.predict on a tiny synthetic split (untrained weights)."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    import networks.mal as mal
    from networks.common.context import RunContext
    from networks.common.synthetic import generate

    monkeypatch.setenv("TAO_CACHE_DIR", str(tmp_path / "cache"))
    paths = generate(tmp_path / "data", seed=0, num_train=1, num_val=3, image_size=64)
    cfg = OmegaConf.merge(OmegaConf.structured(mal.ExperimentConfig),
                          OmegaConf.load(Path(__file__).resolve().parents[3] / "configs/mal/tiny.yaml"))
    cfg.inference.ann_path = str(paths["val"]["annotations"])
    cfg.inference.img_dir = str(paths["val"]["images_archive"])  # an archive works as an image dir
    cfg.inference.load_mask = True
    cfg.inference.num_overlays = 2
    mal.check(cfg, "inference")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ctx = RunContext(action="inference", run_dir=run_dir)
    module = mal.build_module(cfg, ctx)
    dm = mal.build_datamodule(cfg, ctx)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(module, datamodule=dm)
    out = run_dir / cfg.inference.label_dump_path
    src = json.loads(Path(paths["val"]["annotations"]).read_text())
    data = json.loads(out.read_text())
    assert [a["id"] for a in data["annotations"]] == [a["id"] for a in src["annotations"]]
    assert [a["iscrowd"] for a in data["annotations"]] == [a["iscrowd"] for a in src["annotations"]]
    assert all("iou" in a and "score" in a for a in data["annotations"])
    coco = COCO(str(out))
    for a in data["annotations"]:
        m = coco.annToMask(a)
        img = coco.imgs[a["image_id"]]
        assert m.shape == (img["height"], img["width"]) and int(m.sum()) == a["area"]
        assert not (m.astype(bool) & ~clip_to_box(np.ones_like(m, bool), a["bbox"])).any()
    assert len(list((run_dir / "overlays").glob("*.png"))) == 2
