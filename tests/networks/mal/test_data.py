"""MAL data pipeline: TAO's crop geometry (mal.md §9 #8/#9), the train filter, and the batch formats."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from networks.common.context import RunContext
from networks.common.errors import DataError
from networks.mal.config import ExperimentConfig
from networks.mal.data import (
    BoxRecord,
    MALDataModule,
    box_mask_crop,
    expand_box,
    filter_train_records,
    load_records,
    random_margins,
    wrap_crop,
    zero_pad_crop,
)

S = 32


def make_coco(root: Path, *, with_seg: bool = True) -> dict:
    """Two RGB images (48x40 and 40x48) with five boxes: three normal, one crowd, one degenerate/outside."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = [{"id": 1, "file_name": "a.png", "width": 48, "height": 40},
              {"id": 2, "file_name": "b.png", "width": 40, "height": 48}]
    for im in images:
        arr = rng.integers(0, 255, size=(im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(arr).save(img_dir / im["file_name"])
    boxes = [(1, [4, 5, 20, 16], 0), (1, [30, 2, 16, 30], 0), (2, [0, 0, 40, 48], 0),
             (2, [10, 10, 12, 12], 1), (2, [35, 50, 10, 0], 0)]
    anns = []
    for i, (image_id, bbox, crowd) in enumerate(boxes, start=1):
        ann = {"id": 100 + i, "image_id": image_id, "category_id": 7 if i % 2 else 3, "bbox": bbox,
               "area": bbox[2] * bbox[3], "iscrowd": crowd}
        if with_seg:
            x, y, w, h = bbox
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]] if w > 0 and h > 0 else []
        anns.append(ann)
    coco = {"info": {"x": 1}, "images": images, "annotations": anns,
            "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]}
    (root / "ann.json").write_text(json.dumps(coco))
    return coco


def make_cfg(root: Path, **over):
    cfg = OmegaConf.structured(ExperimentConfig)
    for k in ("train", "val"):
        OmegaConf.update(cfg, f"dataset.{k}_ann_path", str(root / "ann.json"))
        OmegaConf.update(cfg, f"dataset.{k}_img_dir", str(root / "images"))
    OmegaConf.update(cfg, "inference.ann_path", str(root / "ann.json"))
    OmegaConf.update(cfg, "inference.img_dir", str(root / "images"))
    OmegaConf.update(cfg, "dataset.crop_size", S)
    OmegaConf.update(cfg, "dataset.min_obj_size", 10.0)
    OmegaConf.update(cfg, "dataset.num_workers_per_gpu", 0)
    OmegaConf.update(cfg, "train.batch_size", 2)
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    return cfg


# ------------------------------------------------------------------------------------------------- geometry
def test_wrap_crop_matches_tao_reference():
    img = np.arange(30).reshape(5, 6)
    crop = wrap_crop(img, [-2, -1, 3, 2])
    assert crop.shape == (3, 5)
    assert crop[0].tolist() == [28, 29, 24, 25, 26]
    assert crop[1].tolist() == [4, 5, 0, 1, 2]
    rgb = np.stack([img, img + 100, img + 200], -1)
    assert wrap_crop(rgb, [-2, -1, 3, 2])[..., 2].tolist() == (crop + 200).tolist()


def test_wrap_crop_is_periodic_tiling_not_padding():
    img = np.arange(30).reshape(5, 6)
    big = wrap_crop(img, [-6, -5, 12, 10])  # three periods wide, three tall
    assert (big == np.tile(img, (3, 3))).all()
    zp = zero_pad_crop(img, [-2, -1, 3, 2])
    assert zp[0].tolist() == [0] * 5 and zp[1].tolist() == [0, 0, 0, 1, 2]


def test_expand_box_matches_tao_reference():
    ext, ext_h, ext_w = expand_box([10, 20, 110, 70], [0.5 * 0.6] * 4)
    assert ext.tolist() == [-5, 12, 126, 79]
    assert (ext_h, ext_w) == (67, 131)
    assert ext.dtype == np.int64


def test_expand_box_zero_margin_adds_one_pixel():
    ext, h, w = expand_box([3.0, 4.0, 10.0, 9.0], [0, 0, 0, 0])
    assert ext.tolist() == [3, 4, 11, 10] and (h, w) == (6, 8)


def test_box_mask_inclusive_end_and_modes():
    # box x 1..3.5, y 1..2 on a 4x6 image: rows int(1)..int(2) and cols int(1)..int(3.5), inclusive
    full = box_mask_crop((1.0, 1.0, 3.5, 2.0), (4, 6), [0, 0, 6, 4], wrap=False)
    expect = np.zeros((4, 6), np.uint8)
    expect[1:3, 1:4] = 1
    assert (full == expect).all()
    # a window leaving the image: wrap tiles the box mask, zero padding does not
    win = [-6, 0, 6, 4]
    assert (box_mask_crop((1.0, 1.0, 3.5, 2.0), (4, 6), win, wrap=True) == wrap_crop(expect, win)).all()
    assert (box_mask_crop((1.0, 1.0, 3.5, 2.0), (4, 6), win, wrap=False) == zero_pad_crop(expect, win)).all()


def test_random_margins_gates_sum_to_full_range():
    np.random.seed(0)
    for _ in range(50):
        m = random_margins([0.0, 1.2])
        assert (m >= 0).all() and (m <= 1.2).all()
    np.random.seed(1)
    a = random_margins([1.0, 1.0])  # constant margins: left+right gates sum to 1
    assert a[0] + a[2] == pytest.approx(1.0) and a[1] + a[3] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------- filter
def _rec(bbox, crowd=0, w=100, h=80):
    return BoxRecord(1, 1, "x.png", h, w, tuple(float(v) for v in bbox), 1, 1, crowd)


def test_train_filter_rules_and_crowd():
    recs = [
        _rec([0, 0, 50, 50]),          # kept
        _rec([10, 10, 50, 50], 1),     # crowd
        _rec([-1, 0, 50, 50]),         # outside (x < 0)
        _rec([60, 40, 41, 40]),        # outside (x + w > W)
        _rec([0, 0, 2, 500]),          # w <= 2 (also outside) -> outside counted first
        _rec([0, 0, 2.5, 30]),         # thin but inside -> kept only if > 2
        _rec([0, 0, 32, 64]),          # area == 2048 -> dropped (strict)
        _rec([0, 0, 33, 64]),          # area 2112 -> kept
    ]
    kept, reasons = filter_train_records(recs, 2048.0, 1e10)
    assert [r.bbox for r in kept] == [(0.0, 0.0, 50.0, 50.0), (0.0, 0.0, 33.0, 64.0)]
    assert reasons["crowd"] == 1 and reasons["outside the image"] == 3
    assert reasons["area <= dataset.min_obj_size"] == 2
    kept2, reasons2 = filter_train_records(recs, 0.0, 2500.0)
    assert (0.0, 0.0, 50.0, 50.0) not in [r.bbox for r in kept2]  # 2500 is not < 2500
    assert reasons2["area >= dataset.max_obj_size"] == 1


def test_train_dataset_excludes_crowd_and_logs_real_count(tmp_path, caplog):
    make_coco(tmp_path)
    dm = MALDataModule(make_cfg(tmp_path), RunContext("train", tmp_path))
    with caplog.at_level("INFO", logger="tao"):
        dm.setup("fit")
    ids = [r.ann_id for r in dm.train_dataset.records]
    assert ids == [101, 102, 103]  # 104 is crowd, 105 is degenerate/outside
    assert "3 of 5 boxes" in caplog.text and "2 filtered" in caplog.text
    # eval keeps every annotation, crowd and degenerate included, in file order
    assert [r.ann_id for r in dm.val_dataset.records] == [101, 102, 103, 104, 105]


def test_load_records_compact_ids_and_errors(tmp_path):
    coco = make_coco(tmp_path)
    recs, _ = load_records(str(tmp_path / "ann.json"), field="f")
    assert [r.compact_category_id for r in recs] == [2, 1, 2, 1, 2]  # 1 + index in 'categories'
    coco["annotations"][0]["image_id"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match="unknown image_id"):
        load_records(str(tmp_path / "bad.json"), field="f")
    with pytest.raises(DataError, match="dataset.train_ann_path"):
        load_records(str(tmp_path / "missing.json"), field="dataset.train_ann_path")


def test_missing_image_is_a_data_error(tmp_path):
    make_coco(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(DataError, match="b.png"):
        MALDataModule(make_cfg(tmp_path), RunContext("train", tmp_path)).setup("fit")


def test_load_mask_requires_segmentation(tmp_path):
    make_coco(tmp_path, with_seg=False)
    with pytest.raises(DataError, match="segmentation"):
        MALDataModule(make_cfg(tmp_path), RunContext("train", tmp_path)).setup("test")
    dm = MALDataModule(make_cfg(tmp_path, **{"dataset.load_mask": False}), RunContext("train", tmp_path))
    dm.setup("test")
    assert next(iter(dm.test_dataloader()))["gt_mask"] == [None, None, None]


# ----------------------------------------------------------------------------------------------------- batches
def test_train_batch_format(tmp_path):
    make_coco(tmp_path)
    torch.manual_seed(0)
    np.random.seed(0)
    dm = MALDataModule(make_cfg(tmp_path), RunContext("train", tmp_path))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "timage", "mask", "bbox", "compact_category_id", "ann_id"}
    assert batch["image"].shape == (2, 3, S, S) and batch["image"].dtype == torch.float32
    assert batch["timage"].shape == (2, 3, S, S)
    assert batch["mask"].shape == (2, 1, S, S) and batch["mask"].dtype == torch.float32
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0} and batch["mask"].sum() > 0
    assert batch["bbox"].shape == (2, 4) and batch["bbox"].dtype == torch.float32
    assert batch["ann_id"].dtype == torch.int64 and batch["compact_category_id"].shape == (2,)
    # bbox stays in original-image xyxy
    by_id = {101: [4, 5, 24, 21], 102: [30, 2, 46, 32], 103: [0, 0, 40, 48]}
    for aid, box in zip(batch["ann_id"].tolist(), batch["bbox"].tolist(), strict=True):
        assert box == by_id[aid]
    # normalised with ImageNet statistics: values leave [0, 1]
    assert batch["timage"].min() < 0


def test_teacher_view_is_the_clean_student_crop(tmp_path):
    make_coco(tmp_path)
    dm = MALDataModule(make_cfg(tmp_path), RunContext("train", tmp_path))
    dm.setup("fit")
    ds = dm.train_dataset
    ds.student_aug = lambda img: img  # no photometric jitter: both views must coincide
    sample = ds[0]
    assert torch.equal(sample["image"], sample["timage"])


def test_train_sampling_is_reproducible(tmp_path):
    make_coco(tmp_path)
    dm = MALDataModule(make_cfg(tmp_path), RunContext("train", tmp_path))
    dm.setup("fit")
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        np.random.seed(3)
        import random
        random.seed(3)
        outs.append(dm.train_dataset[1])
    assert torch.equal(outs[0]["image"], outs[1]["image"]) and torch.equal(outs[0]["mask"], outs[1]["mask"])


def test_eval_batch_format_and_geometry(tmp_path):
    make_coco(tmp_path)
    dm = MALDataModule(make_cfg(tmp_path, **{"evaluate.batch_size": 5}), RunContext("train", tmp_path))
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (5, 3, S, S)
    assert batch["boxmask"].shape == (5, 1, S, S)
    assert batch["bbox"].shape == (5, 4) and batch["bbox"].dtype == torch.float32
    assert batch["ext_box"].shape == (5, 4) and batch["ext_box"].dtype == torch.int64
    assert batch["image_hw"].tolist() == [[40, 48], [40, 48], [48, 40], [48, 40], [48, 40]]
    assert batch["ann_id"].tolist() == [101, 102, 103, 104, 105]
    assert batch["image_id"].tolist() == [1, 1, 2, 2, 2]
    assert batch["category_id"].tolist() == [7, 3, 7, 3, 7]
    assert batch["compact_category_id"].tolist() == [2, 1, 2, 1, 2]
    assert batch["iscrowd"].tolist() == [0, 0, 0, 1, 0]
    # fixed 0.3 margin: box [4,5,24,21] -> [1, 2, 28, 25) (floor/ceil, +1 right/bottom)
    ext, _, _ = expand_box([4, 5, 24, 21], [0.3] * 4)
    assert batch["ext_box"][0].tolist() == ext.tolist() == [1, 2, 28, 25]
    gt = batch["gt_mask"]
    assert isinstance(gt, list) and gt[0].shape == (40, 48) and gt[0].dtype == np.uint8
    assert gt[0][5:21, 4:24].all() and gt[0].sum() == 16 * 20
    # the whole-image box: its crop leaves the image, the zero-padded box mask does not cover the margin
    bm = batch["boxmask"][2, 0]
    assert bm[S // 2, S // 2] == 1 and bm[0, 0] == 0
    # degenerate box outside the image: kept, empty box mask
    assert batch["boxmask"][4].sum() == 0


def test_predict_uses_inference_section(tmp_path, caplog):
    make_coco(tmp_path, with_seg=False)
    dm = MALDataModule(make_cfg(tmp_path, **{"inference.batch_size": 4}), RunContext("train", tmp_path))
    with caplog.at_level("WARNING", logger="tao"):
        dm.setup("predict")  # inference.load_mask defaults to false: no segmentation needed
    assert "1 of 5 boxes" in caplog.text
    batches = list(dm.predict_dataloader())
    assert [len(b["ann_id"]) for b in batches] == [4, 1]


def test_archive_image_dir(tmp_path, monkeypatch):
    import tarfile

    make_coco(tmp_path)
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "images", arcname="images")
    monkeypatch.setenv("TAO_CACHE_DIR", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, **{"dataset.val_img_dir": str(tmp_path / "images.tar.gz")})
    dm = MALDataModule(cfg, RunContext("train", tmp_path))
    dm.setup("test")
    assert dm.val_dataset[0]["image"].shape == (3, S, S)


# ------------------------------------------------------------------------------------------ photometric (real)
# The student view's photometric augmentation (mal.md §4.2 step 3, data._StudentJitter): ColorJitter(brightness
# 0.4, contrast 0.4, saturation 0.2, hue 0.1) with probability 0.5 — factors b, c ∈ [0.6, 1.4], hue shift within
# ±0.1 turn (±36°) — then grayscale with probability 0.2, then a Gaussian blur (radius U(0.1, 2)) w.p. 0.5.
# Images with known structure let each factor be read back from the output.

def _seeded(aug, img, seed):
    import random

    torch.manual_seed(seed)
    random.seed(seed)
    return aug(img.copy())


def test_student_photometric_jitter_factors_probabilities_and_determinism(tmp_path):
    import colorsys

    make_coco(tmp_path)
    dm = MALDataModule(make_cfg(tmp_path), RunContext("train", tmp_path))
    dm.setup("fit")
    aug = dm.train_dataset.student_aug  # the instance the dataset applies

    # two grey levels (100 | 156, mean 128): saturation, hue, grayscale leave grey alone and the corners are far
    # from the edge the blur touches, so hi + lo = 256·b and hi − lo = 56·b·c
    grey = np.full((32, 32, 3), 100, np.uint8)
    grey[:, 16:] = 156
    grey_img = Image.fromarray(grey)
    red_img = Image.fromarray(np.full((8, 8, 3), (200, 30, 30), np.uint8))
    n = 300
    bs, cs, hues, gray_count = [], [], [], 0
    for seed in range(n):
        out = _seeded(aug, grey_img, seed)
        assert out.size == grey_img.size and out.mode == "RGB"
        a = np.asarray(out).astype(float)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()  # grey stays grey
        lo, hi = a[0, 0, 0], a[0, 31, 0]
        b = (hi + lo) / 256.0
        bs.append(b)
        cs.append((hi - lo) / (56.0 * b))
        r, g, bl = np.asarray(_seeded(aug, red_img, seed))[4, 4].astype(float) / 255.0
        if r == g == bl:
            gray_count += 1
        else:
            h = colorsys.rgb_to_hsv(r, g, bl)[0]
            hues.append(min(h, 1.0 - h) * 360.0)  # angular distance from red, degrees
    bs, cs = np.array(bs), np.array(cs)
    jittered = (np.abs(bs - 1) > 0.01) | (np.abs(cs - 1) > 0.02)
    # factors inside the documented ranges (with uint8 rounding), and spread over them
    assert bs.min() >= 0.6 - 0.01 and bs.max() <= 1.4 + 0.01, (bs.min(), bs.max())
    assert cs.min() >= 0.6 - 0.05 and cs.max() <= 1.4 + 0.05, (cs.min(), cs.max())  # rounding: ±1/(56·b)
    assert bs.min() < 0.7 and bs.max() > 1.3 and cs.min() < 0.7 and cs.max() > 1.3
    assert max(hues) <= 36.0 + 3.0 and max(hues) > 20.0, max(hues)
    # ColorJitter w.p. 0.5, grayscale w.p. 0.2 (300 draws: ±3.5 standard deviations)
    assert 0.4 <= jittered.mean() <= 0.6, jittered.mean()
    assert 0.12 <= gray_count / n <= 0.28, gray_count / n

    # deterministic for a seed; different seeds give different images
    colour = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    first = [np.asarray(_seeded(aug, colour, s)) for s in range(6)]
    again = [np.asarray(_seeded(aug, colour, s)) for s in range(6)]
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert len({x.tobytes() for x in first}) > 1
    assert any(not np.array_equal(x, np.asarray(colour)) for x in first)


def test_photometric_jitter_changes_only_the_student_image(tmp_path):
    import random

    make_coco(tmp_path)
    dm = MALDataModule(make_cfg(tmp_path), RunContext("train", tmp_path))
    dm.setup("fit")
    ds = dm.train_dataset
    real_aug = ds.student_aug

    def sample(seed, aug):
        ds.student_aug = aug
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        return ds[1]

    changed = 0
    for seed in range(8):
        jit, plain = sample(seed, real_aug), sample(seed, lambda img: img)
        again = sample(seed, real_aug)
        assert torch.equal(jit["image"], again["image"])  # reproducible for a seed
        for key in ("timage", "mask", "bbox", "compact_category_id", "ann_id"):
            assert torch.equal(jit[key], plain[key]), key  # geometry, mask, box and teacher view untouched
        assert jit["image"].shape == plain["image"].shape == (3, S, S)
        assert jit["image"].dtype == plain["image"].dtype == torch.float32
        assert torch.equal(plain["image"], plain["timage"])
        changed += not torch.equal(jit["image"], jit["timage"])
    assert changed >= 2


def test_evaluation_samples_have_no_photometric_jitter(tmp_path):
    import random

    make_coco(tmp_path)
    dm = MALDataModule(make_cfg(tmp_path), RunContext("train", tmp_path))
    dm.setup("test")
    images = []
    for seed in range(4):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        images.append(dm.val_dataset[0]["image"])
    assert all(torch.equal(images[0], x) for x in images[1:])
    assert not hasattr(dm.val_dataset, "student_aug")
