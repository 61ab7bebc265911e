"""ODVG/COCO/inference data: prompts, targets, transforms, collate, and one-line errors on bad input."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from networks.common.context import RunContext
from networks.common.errors import DataError
from networks.mask_grounding_dino.data import (
    CocoDataset,
    Collator,
    MaskGDinoDataModule,
    OdvgDataset,
    PredictDataset,
    Transform,
    read_odvg,
)


def _aug(tiny_cfg):
    return tiny_cfg.dataset.augmentation


def _box_of_mask(m: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(m, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_detection_prompts_and_targets(tiny_cfg, tokenizer):
    src = tiny_cfg.dataset.train_data_sources[0]
    ds = OdvgDataset(src, 0, Transform(_aug(tiny_cfg), "eval"), tokenizer, 256, max_labels=3)
    lm = json.load(open(src.label_map))
    lines = [json.loads(x) for x in open(src.json_file)]
    for i in range(len(ds)):
        s = ds[i]
        assert sorted(s["names"]) == sorted(lm.values())  # positives + negatives = max_labels = all 3
        inst = lines[i]["detection"]["instances"]
        got = sorted(s["names"][k] for k in s["target"]["labels"].tolist())
        assert got == sorted(lm[str(x["label"])] for x in inst)
        b = s["target"]["boxes"]
        assert ((b >= 0) & (b <= 1)).all() and s["target"]["masks"].shape[0] == len(inst)
        h, w = s["image"].shape[-2:]
        assert s["target"]["masks"].shape[-2:] == (h, w)


def test_max_labels_limits_negatives(tiny_cfg, tokenizer):
    src = tiny_cfg.dataset.train_data_sources[0]
    ds = OdvgDataset(src, 0, Transform(_aug(tiny_cfg), "eval"), tokenizer, 256, max_labels=1)
    for i in range(len(ds)):
        s = ds[i]
        present = {s["names"][k] for k in s["target"]["labels"].tolist()}
        assert len(s["names"]) == max(1, len(present)) and present <= set(s["names"])


def test_grounding_masks_follow_their_boxes(mgd_synthetic, tiny_cfg, tokenizer):
    p = mgd_synthetic["train"]
    src = OmegaConf.create({"image_dir": str(p["images"]), "json_file": str(p["vg"])})
    ds = OdvgDataset(src, 0, Transform(_aug(tiny_cfg), "eval"), tokenizer, 256, max_labels=50)
    torch.manual_seed(3)
    checked = 0
    for i in range(len(ds)):
        s = ds[i]
        t = s["target"]
        h, w = s["image"].shape[-2:]
        for box, m in zip(t["boxes"], t["masks"], strict=True):
            if not m.any():
                continue
            cx, cy, bw, bh = box.tolist()
            xyxy = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
            assert np.allclose(_box_of_mask(m), xyxy, atol=3.0)
            checked += 1
        assert all(" " in n or n.isalpha() for n in s["names"])  # phrases such as "red circle"
    assert checked >= 3


def test_coco_zero_and_one_based_ids_agree(mgd_synthetic, tiny_cfg):
    p = mgd_synthetic["val"]
    tf = Transform(_aug(tiny_cfg), "eval")
    one = CocoDataset({"image_dir": str(p["images"]), "json_file": str(p["annotations"])}, "val", tf)
    zero = CocoDataset({"image_dir": str(p["images"]), "json_file": str(p["annotations_0based"])}, "val", tf)
    assert one.names == zero.names == ["circle", "square", "triangle"]
    for i in range(len(one)):
        a, b = one[i], zero[i]
        assert torch.equal(a["target"]["labels"], b["target"]["labels"])
        assert a["category_ids"] == [1, 2, 3] and b["category_ids"] == [0, 1, 2]


def test_collate_pads_and_returns_pixel_mask(tiny_cfg, tokenizer):
    src = tiny_cfg.dataset.train_data_sources[0]
    ds = OdvgDataset(src, 0, Transform(_aug(tiny_cfg), "train"), tokenizer, 256, max_labels=3)
    batch = Collator(tokenizer, 256)([ds[i] for i in range(4)])
    B, C, H, W = batch["images"].shape
    assert C == 3 and H % 32 == 0 and W % 32 == 0
    assert batch["pixel_mask"].shape == (B, H, W) and batch["pixel_mask"].dtype == torch.bool
    for i, (h, w) in enumerate(batch["image_sizes"]):
        assert batch["pixel_mask"][i].sum() == h * w and batch["pixel_mask"][i, :h, :w].all()
        t = batch["targets"][i]
        assert t["masks"].shape[-2:] == (H, W)
        assert t["positive_map"].shape == (len(batch["names"][i]), 256)
        assert torch.equal(t["positive_map"].sum(-1) > 0, torch.ones(len(batch["names"][i]), dtype=torch.bool))
    L = batch["input_ids"].shape[1]
    assert batch["text_self_attention_masks"].shape == (B, L, L) and batch["position_ids"].shape == (B, L)


def test_train_transform_flip_keeps_masks_and_boxes_aligned(tiny_cfg):
    from PIL import Image

    aug = OmegaConf.merge(_aug(tiny_cfg), {"horizontal_flip_prob": 1.0})
    tf = Transform(aug, "train")
    img = Image.new("RGB", (120, 100))
    masks = np.zeros((1, 100, 120), np.uint8)
    masks[0, 10:40, 5:30] = 1
    for seed in range(5):
        x, b, m, kept = tf(img, np.array([[5, 10, 30, 40]], np.float32), masks, random.Random(seed))
        h, w = x.shape[-2:]
        if len(kept):
            cx, cy, bw, bh = b[0].tolist()
            assert np.allclose(_box_of_mask(m[0]), [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                                                    (cy + bh / 2) * h], atol=3.0)


def _write(tmp_path, lines: list[str]):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_bad_json_line_names_file_and_line(tmp_path):
    good = json.dumps({"file_name": "a.jpg", "detection": {"instances": []}})
    f = _write(tmp_path, [good, "{not json"])
    with pytest.raises(DataError) as err:
        read_odvg(f, {"0": "circle"}, "json_file")
    assert err.value.subject == f"{f}:2" and "\n" not in str(err.value)


def test_label_missing_from_label_map(tmp_path):
    inst = {"bbox": [0, 0, 5, 5], "label": 7, "mask": [[0, 0, 5, 0, 5, 5]]}
    f = _write(tmp_path, [json.dumps({"file_name": "a.jpg", "detection": {"instances": [inst]}})])
    with pytest.raises(DataError) as err:
        read_odvg(f, {"0": "circle"}, "json_file")
    assert err.value.subject == f"{f}:1 instance 0" and "label 7" in str(err.value)


def test_box_outside_image_warned_and_counted(tmp_path, caplog):
    inst = {"bbox": [-4, 0, 50, 5], "label": 0, "mask": [[0, 0, 5, 0, 5, 5]]}
    rec = {"file_name": "a.jpg", "height": 20, "width": 20, "detection": {"instances": [inst, inst]}}
    f = _write(tmp_path, [json.dumps(rec)])
    with caplog.at_level(logging.WARNING):
        recs = read_odvg(f, {"0": "circle"}, "json_file")
    assert len(recs) == 1 and "2 instance(s) clipped to the image" in caplog.text and f"{f}:1 instance 0" in caplog.text


def test_prompt_longer_than_max_text_len_is_data_error(tmp_path, tokenizer, tiny_cfg):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.jpg")
    names = {str(i): f"very long category name number {i}" for i in range(6)}
    (tmp_path / "lm.json").write_text(json.dumps(names))
    inst = [{"bbox": [0, 0, 5, 5], "label": i, "mask": [[0, 0, 5, 0, 5, 5]]} for i in range(6)]
    f = _write(tmp_path, [json.dumps({"file_name": "a.jpg", "detection": {"instances": inst}})])
    src = OmegaConf.create({"image_dir": str(tmp_path), "json_file": str(f), "label_map": str(tmp_path / "lm.json")})
    ds = OdvgDataset(src, 0, Transform(_aug(tiny_cfg), "eval"), tokenizer, 16, max_labels=6)
    with pytest.raises(DataError) as err:
        ds[0]
    assert err.value.subject == f"{f}:1" and "max_text_len=16" in str(err.value)


def test_negatives_dropped_to_fit(tmp_path, tokenizer, tiny_cfg):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.jpg")
    names = {str(i): f"category name {i}" for i in range(20)}
    (tmp_path / "lm.json").write_text(json.dumps(names))
    inst = [{"bbox": [0, 0, 5, 5], "label": 3, "mask": [[0, 0, 5, 0, 5, 5]]}]
    f = _write(tmp_path, [json.dumps({"file_name": "a.jpg", "detection": {"instances": inst}})])
    src = OmegaConf.create({"image_dir": str(tmp_path), "json_file": str(f), "label_map": str(tmp_path / "lm.json")})
    ds = OdvgDataset(src, 0, Transform(_aug(tiny_cfg), "eval"), tokenizer, 24, max_labels=20)
    s = ds[0]
    assert "category name 3" in s["names"] and len(s["names"]) < 20
    batch = Collator(tokenizer, 24)([s])
    assert (batch["targets"][0]["positive_map"].sum(-1) > 0).all()


def test_inference_per_image_captions(mgd_synthetic, tiny_cfg, tmp_path):
    p = mgd_synthetic["val"]
    files = sorted(x.name for x in p["images"].iterdir())
    jl = tmp_path / "infer.jsonl"
    jl.write_text(json.dumps({"file_name": files[0], "captions": ["Red Circle", "square"]}) + "\n"
                  + json.dumps({"file_name": files[1], "captions": ["triangle"]}) + "\n")
    ds = PredictDataset({"image_dir": str(p["images"]), "json_file": str(jl)}, Transform(_aug(tiny_cfg), "eval"))
    assert len(ds) == 2 and ds[0]["names"] == ["red circle", "square"] and ds[1]["names"] == ["triangle"]
    jl.write_text(json.dumps({"file_name": "missing.jpg", "captions": ["x"]}) + "\n")
    with pytest.raises(DataError) as err:
        PredictDataset({"image_dir": str(p["images"]), "json_file": str(jl)}, Transform(_aug(tiny_cfg), "eval"))
    assert err.value.subject == f"{jl}:1"


def test_datamodule_loaders(tiny_cfg):
    dm = MaskGDinoDataModule(tiny_cfg, RunContext("train", Path(".")))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape[0] == min(tiny_cfg.dataset.batch_size, len(dm.train_dataset))
    vb = next(iter(dm.val_dataloader()))
    assert vb["captions"][0] == "circle . square . triangle ." and vb["category_ids"][0] == [1, 2, 3]
    dm = MaskGDinoDataModule(tiny_cfg, RunContext("inference", Path(".")))
    dm.setup("predict")
    pb = next(iter(dm.predict_dataloader()))
    assert pb["names"][0] == ["circle", "square", "triangle"] and "paths" in pb
