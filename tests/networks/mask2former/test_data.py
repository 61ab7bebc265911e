"""Mask2Former data: the three dataset types on the synthetic set, augmentation, collate, label-map checks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from networks.common.context import RunContext
from networks.common.errors import DataError
from networks.mask2former.data import (
    Augmentation,
    Mask2FormerDataModule,
    Mask2FormerDataset,
    collate,
    expand_min_sizes,
    load_label_map,
    raise_if_error,
    resize_shortest_edge_shape,
)

from .conftest import make_tiny_cfg


@pytest.mark.parametrize("kind", ["coco_panoptic", "coco", "ade"])
def test_each_type_gives_consistent_batches(m2f_synthetic, kind):
    cfg = make_tiny_cfg(m2f_synthetic, kind=kind, archives=kind == "coco_panoptic")
    dm = Mask2FormerDataModule(cfg, RunContext("train", Path(".")))
    dm.setup("fit")
    assert len(dm.train_dataset) == 6 and len(dm.val_dataset) == 4
    batch = next(iter(dm.val_dataloader()))
    B, _, Hp, Wp = batch["images"].shape
    assert Hp % 32 == 0 and Wp % 32 == 0 and B == 2
    assert batch["pixel_mask"].shape == (B, Hp, Wp)
    for i, t in enumerate(batch["targets"]):
        h, w = batch["image_sizes"][i]
        assert batch["pixel_mask"][i, :h, :w].all() and not batch["pixel_mask"][i, h:, :].any()
        assert (batch["images"][i, :, h:, :] == 0).all() and (batch["images"][i, :, :, w:] == 0).all()
        assert t["masks"].dtype == torch.bool and t["masks"].shape[1:] == (Hp, Wp)
        assert len(t["labels"]) == t["masks"].shape[0]
        assert ((t["labels"] >= 1) & (t["labels"] <= 5)).all()
        assert not t["masks"][:, h:, :].any() and not t["masks"][:, :, w:].any()
        assert torch.allclose(t["valid_extent"], torch.tensor([w / Wp, h / Hp]))
        if kind != "ade":  # instance/segment masks are disjoint
            assert t["masks"].sum(0).max() <= 1
        gt = batch["gts"][i]
        assert gt["sem_seg"].shape == tuple(batch["orig_sizes"][i]) == gt["pan_ids"].shape
        assert set(np.unique(gt["sem_seg"]).tolist()) <= {0, 1, 2, 3, 4, 5}
    torch.manual_seed(0)
    train = next(iter(dm.train_dataloader()))
    h, w = train["images"].shape[-2:]
    # short side drawn from [64, 128, 192, 256], then a crop of at most 128 x 128
    assert h <= 128 and w <= 128 and h % 32 == 0 and w % 32 == 0


def test_semantic_map_agrees_with_masks(m2f_synthetic):
    cfg = make_tiny_cfg(m2f_synthetic, kind="coco_panoptic", archives=False)
    dm = Mask2FormerDataModule(cfg, RunContext("evaluate", Path(".")))
    dm.setup("test")
    s = dm.val_dataset[0]
    rebuilt = torch.zeros_like(s["sem_seg"])
    for m, lab in zip(s["masks"], s["labels"], strict=False):
        rebuilt[m] = lab
    assert torch.equal(rebuilt, s["sem_seg"])


def test_panoptic_crowd_pixels_are_ignored(m2f_synthetic):
    cfg = make_tiny_cfg(m2f_synthetic, kind="coco_panoptic", archives=False)
    ann = json.loads(m2f_synthetic["train"]["panoptic_json"].read_text())
    crowd = [(i, s) for i, a in enumerate(ann["annotations"]) for s in a["segments_info"] if s["iscrowd"]]
    assert crowd, "the synthetic set has a crowd region in image 2"
    idx, seg = crowd[0]
    ds = Mask2FormerDataset(cfg.dataset.train, "train", load_label_map(cfg.dataset.label_map, 5, False),
                            Augmentation(False, [10_000], 10_000), [0, 0, 0], [1, 1, 1], keep_gt=True)
    img, ids, seg_cls, info = ds.decode(ds.records[idx])
    assert seg["id"] not in seg_cls and not (ids == seg["id"]).any()
    assert info[seg["id"]]["iscrowd"] == 1


def test_unknown_category_ids_are_named(m2f_synthetic, tmp_path):
    lm = tmp_path / "label_map.json"
    cats = json.loads(m2f_synthetic["train"]["label_map"].read_text())
    lm.write_text(json.dumps([c for c in cats if c["id"] not in (2, 5)]))
    for kind in ("coco_panoptic", "coco"):
        cfg = make_tiny_cfg(m2f_synthetic, kind=kind, archives=False)
        cfg.dataset.label_map = str(lm)
        dm = Mask2FormerDataModule(cfg, RunContext("train", Path(".")))
        with pytest.raises(DataError) as err:
            dm.setup("fit")
        assert "[2" in err.value.problem and "label_map" in err.value.problem
    cfg = make_tiny_cfg(m2f_synthetic, kind="ade", archives=False)
    cfg.dataset.label_map = str(lm)
    dm = Mask2FormerDataModule(cfg, RunContext("train", Path(".")))
    dm.setup("fit")
    with pytest.raises(DataError, match=r"\[.*5.*\]"):
        for i in range(len(dm.train_dataset)):
            raise_if_error(dm.train_dataset[i])  # samples carry user errors out of DataLoader workers


def test_worker_errors_reach_the_user_as_data_errors(m2f_synthetic, tmp_path):
    """A DataError inside a DataLoader worker arrives as a DataError (exit code 2), not a RuntimeError."""
    lm = tmp_path / "label_map.json"
    cats = json.loads(m2f_synthetic["train"]["label_map"].read_text())
    lm.write_text(json.dumps([c for c in cats if c["id"] != 5]))
    cfg = make_tiny_cfg(m2f_synthetic, kind="ade", archives=False)
    cfg.dataset.label_map = str(lm)
    cfg.dataset.val.num_workers = 1
    dm = Mask2FormerDataModule(cfg, RunContext("evaluate", Path(".")))
    dm.setup("test")
    batch = next(iter(dm.val_dataloader()))
    with pytest.raises(DataError, match="semantic/000001.png"):
        dm.on_before_batch_transfer(batch, 0)


def test_label_map_vs_num_classes(m2f_synthetic):
    path = m2f_synthetic["train"]["label_map"]
    with pytest.raises(DataError, match=r"\[4, 5\].*num_classes"):
        load_label_map(path, 3, contiguous_id=False)
    with pytest.raises(DataError, match="num_classes=3"):
        load_label_map(path, 3, contiguous_id=True)
    lm = load_label_map(path, 5, contiguous_id=False)
    assert lm.thing_classes().tolist() == [True, True, True, False, False]
    assert lm.colors()[4].tolist() == [135, 206, 235]


def test_contiguous_ids_follow_label_map_order(tmp_path):
    lm = tmp_path / "lm.json"
    lm.write_text(json.dumps([{"id": 17, "name": "cat"}, {"id": 3, "name": "car", "isthing": 0}]))
    m = load_label_map(lm, 2, contiguous_id=True)
    assert (m.class_index(17), m.class_index(3)) == (1, 2)
    assert (m.category_id(1), m.category_id(2)) == (17, 3)
    assert m.thing_classes().tolist() == [True, False]


def test_resize_and_min_sizes_follow_tao():
    assert expand_min_sizes([640], [640, 640]) == list(range(320, 1281, 64))
    assert expand_min_sizes([], [512, 640]) == [512]
    assert resize_shortest_edge_shape(480, 640, 640, 640) == (480, 640)
    assert resize_shortest_edge_shape(100, 200, 300, 10_000) == (300, 600)
    assert resize_shortest_edge_shape(100, 400, 300, 800) == (200, 800)


def test_random_crop_respects_size_and_area_constraint():
    """TAO's crop: retry (up to 10 times) until no single non-zero id covers ≥ 60 % of the crop."""
    # rows 0-119: 32-px vertical stripes of ids 1 / 2 (any 64-px-wide window holds exactly 32 columns of each);
    # rows 120-199: id 3.  A 64×64 crop at row y0 is acceptable iff it reaches at most 38 rows into the id-3 part
    # (y0 ≤ 94, 69 % of the positions); an unconstrained crop is unacceptable 31 % of the time.
    ids = np.where((np.arange(300) // 32) % 2 == 0, 1, 2)[None].repeat(200, 0).astype(np.int64)
    ids[120:] = 3
    aug = Augmentation(True, [200], 1000, crop_size=[64, 64])
    for seed in range(40):
        img, out = aug(np.zeros((200, 300, 3), np.uint8), ids, np.random.default_rng(seed))
        assert img.shape == (64, 64, 3) and out.shape == (64, 64)
        _, counts = np.unique(out[out != 0], return_counts=True)
        assert len(counts) > 1 and counts.max() < 0.6 * counts.sum(), (seed, counts)
    # no acceptable crop exists (one id everywhere): after the 10 tries a crop of the crop size is still returned
    img, out = aug(np.zeros((200, 300, 3), np.uint8), np.ones((200, 300), np.int64), np.random.default_rng(0))
    assert img.shape == (64, 64, 3) and (out == 1).all()


def test_collate_pads_to_batch_max():
    a = {"image": torch.ones(3, 40, 50), "masks": torch.ones(1, 40, 50, dtype=torch.bool),
         "labels": torch.tensor([2]), "sem_seg": torch.full((40, 50), 2), "image_id": 1, "file_name": "a",
         "orig_size": (40, 50), "gt": None}
    b = dict(a, image=torch.ones(3, 70, 20), masks=torch.zeros(0, 70, 20, dtype=torch.bool),
             labels=torch.zeros(0, dtype=torch.int64), sem_seg=torch.zeros(70, 20, dtype=torch.int64))
    batch = collate([a, b])
    assert batch["images"].shape == (2, 3, 96, 64)
    assert batch["pixel_mask"][0, :40, :50].all() and batch["pixel_mask"][0, 40:].logical_not().all()
    assert batch["targets"][1]["masks"].shape == (0, 96, 64)
    assert batch["sem_seg"][0, 40:].eq(0).all()
