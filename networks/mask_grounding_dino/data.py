"""Mask Grounding DINO data: ODVG training sources, COCO evaluation data, inference images, transforms, collate.

Sources (``docs/formats.md``; TAO §2):

* **ODVG** JSON lines (``train_data_sources[i].json_file``).  A source with ``label_map`` holds detection
  records ``{"file_name", "detection": {"instances": [{"bbox": xyxy px, "label", "mask"}]}}``; one without holds
  grounding records ``{"file_name", "grounding": {"regions": [{"bbox", "phrase", "mask"}]}}``.  ``mask`` is a
  polygon list or a COCO RLE (compressed or not).  Detection prompt: the labels present plus negatives sampled
  from the label map up to ``max_labels``, shuffled, ``"cat . dog ."``; negatives that would not fit in
  ``model.max_text_len`` tokens are dropped.  Grounding prompt: the unique phrases in first-appearance order;
  boxes, phrases **and masks** are shuffled together (TAO shuffles masks separately from their boxes).
  A grounding record without regions is a **no-target** referring sample (GRES): its prompt is its ``caption``;
  every training target carries ``empty`` (True when no target is left in the sample).
* **Referring** evaluation (val/test ``data_type`` other than ``"OD"`` with an ODVG grounding JSON-lines file):
  one expression per line, prompt = its ``caption``, ground truth = the merged mask of its regions (none for a
  no-target expression).  See :func:`eval_kind` for how the evaluator is chosen.
* **COCO** JSON (val/test): the prompt lists the categories in the order of the ``categories`` list, and a
  label is the **position** of its ``category_id`` in that list, so 1-based and 0-based ids both work (TAO uses
  the raw id as the index and needs ids 0..C-1).  Crowd annotations are not training targets (COCOeval ignores
  them by itself).
* **Inference**: images of ``infer_data_sources.image_dir`` (folder, list of folders, or archive) prompted with
  ``captions`` (category names, lower-cased; a string is split only in TAO's ``"cat . dog ."`` form), or per
  image from a JSON-lines file named by ``captions: inference.jsonl`` (or tao-cli's ``json_file``): lines
  ``{"file_name", "caption"}`` or TAO's VG records; ``classmap`` (label_map.txt) names the classes otherwise.

Bad input raises a one-line :class:`DataError` naming the file and line: a line that is not a JSON object, a
label missing from the label map, a record without masks, the categories present in a record needing more than
``max_text_len`` tokens.  Boxes outside the image are clipped and counted (one warning per source).

Transforms (§2.7): horizontal flip, random resize / resize-crop-resize (or the LSJ square crop when
``fixed_random_crop`` is set), normalisation with ``input_mean/std``; boxes become cxcywh normalised by the
resized, **unpadded** size.  :class:`Collator` pads a batch to its largest image rounded up to 32 and returns
``pixel_mask`` [B, H, W] (True = valid pixel) — not TAO's fourth input channel — plus the tokenised prompts.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover
    import lightning.pytorch as pl  # type: ignore

from networks.common.coco_io import load_odvg_label_map
from networks.common.errors import ConfigError, DataError
from networks.common.io import iter_json_lines, read_json
from networks.common.sampling import KeyedConcatDataset, private_generator, sample_random, training_loader
from networks.common.serialized import SerializedList
from networks.common.sources import IMAGE_EXTENSIONS, list_images, read_rgb
from networks.mask_grounding_dino.chunking import chunk_names, expand_views, prompt_token_count
from networks.mask_grounding_dino.config import eval_source
from networks.mask_grounding_dino.text import build_caption, load_tokenizer, positive_map, tokenize
from networks.ops.padding import pad_images

__all__ = [
    "SIZE_DIVISIBILITY",
    "load_odvg_label_map",
    "OdvgRecord",
    "read_odvg",
    "Transform",
    "OdvgDataset",
    "CocoDataset",
    "ReferringDataset",
    "eval_kind",
    "eval_dataset",
    "PredictDataset",
    "split_phrases",
    "read_classmap",
    "Collator",
    "MaskGDinoDataModule",
    "prompt_token_count",
]

log = logging.getLogger(__name__)

SIZE_DIVISIBILITY = 32


# ------------------------------------------------------------------------------------------- reading
@dataclass
class OdvgRecord:
    """One ODVG line: image file, boxes (xyxy px as written), per-box class key (detection) or phrase
    (grounding), raw mask encodings, and where it came from (``file:line``)."""

    file_name: str
    boxes: list[list[float]]
    keys: list[str]
    masks: list[Any]
    where: str
    grounding: bool
    height: int | None = None
    width: int | None = None
    extra: dict = field(default_factory=dict)


def read_odvg(path: str | os.PathLike, label_map: dict[str, str] | None, field: str, *,
              repair: bool = True) -> list[OdvgRecord]:
    """Parse an ODVG JSON-lines file.  ``label_map`` given → detection records, else grounding records.

    Each line is checked by the shared ODVG rules (:func:`networks.common.dataset_rules.odvg_record_problems`,
    what ``tao dataset validate`` reports); the first error is a :class:`DataError` naming ``<file>:<line>``
    (non-JSON lines, missing keys, labels not in the label map, items without ``mask``, boxes that are not 4
    finite numbers or are inverted, bad polygons or RLE), and a detection file in which no record has an
    instance is one naming ``<file>``.  With ``repair`` (training) an instance/region whose polygon has a ring
    of fewer than 3 points is skipped and a box outside its image is clipped when the image is read, one warning
    each; without it (evaluation ground truth) both are errors.  A grounding record without regions is kept as
    a no-target expression when it has a ``caption`` (in ``extra["caption"]``) and skipped otherwise (one
    warning with the count).
    """
    from networks.common.dataset_rules import odvg_line_problems, raise_first, warn_repaired

    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise DataError(field, f"'{path}' does not exist", "point json_file at an ODVG .jsonl file")
    kind = "detection" if label_map is not None else "grounding"
    records: list[OdvgRecord] = []
    repaired = []
    empty_regions = 0
    for where, obj, problems in odvg_line_problems(p, label_map=label_map, kind=kind):
        fixed = raise_first(problems, repair=repair)
        repaired += fixed
        dropped = {pr.item for pr in fixed if pr.rule == "polygon_short"}
        items = obj[kind].get("instances" if kind == "detection" else "regions", [])
        kept = [(j, it) for j, it in enumerate(items) if j not in dropped]
        boxes = [[float(v) for v in it["bbox"]] for _, it in kept]
        keys = [str(it["label"]) if kind == "detection" else str(it["phrase"]).strip() for _, it in kept]
        masks = [it["mask"] for _, it in kept]
        h, w = obj.get("height"), obj.get("width")
        caption = str(obj[kind].get("caption") or "").strip().rstrip(".").strip() if kind == "grounding" else ""
        if kind == "grounding" and not boxes and not caption:  # also when every region was dropped
            empty_regions += 1
            continue
        records.append(OdvgRecord(str(obj["file_name"]), boxes, keys, masks, where, kind == "grounding",
                                  int(h) if h else None, int(w) if w else None,
                                  {"caption": caption} if kind == "grounding" else {}))
    # boxes are clipped when the image is read (_clip_boxes): the image size is known only then for every line
    warn_repaired(repaired, str(p), log, noun="instance(s)" if kind == "detection" else "region(s)")
    if empty_regions:
        log.warning("%s: skipped %d grounding records without regions nor caption.", p, empty_regions)
    if label_map is not None and records and not any(r.boxes for r in records):
        raise DataError(str(p), "has no annotations: no record has an instance, there is nothing to learn from",
                        "check that this is the right file")
    return records


def _read_rgb(path: Path, where: str) -> Image.Image:
    return read_rgb(path, where=where, hint="check image_dir and the record's file_name", exif_transpose=True)


def _decode_masks(encodings: Sequence[Any], h: int, w: int, where: str) -> np.ndarray:
    from networks.common.coco_io import ann_to_mask

    if not encodings:
        return np.zeros((0, h, w), dtype=np.uint8)
    return np.stack([ann_to_mask(e, h, w, where=where) for e in encodings]).astype(np.uint8)


# --------------------------------------------------------------------------------------- transforms
def _size_with_aspect(h: int, w: int, size: int, max_size: int | None) -> tuple[int, int]:
    """(h', w') whose shorter side is ``size`` unless the longer side would exceed ``max_size`` (DETR rule)."""
    if max_size is not None:
        mn, mx = float(min(h, w)), float(max(h, w))
        if mx / mn * size > max_size:
            size = int(round(max_size * mn / mx))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


class Transform:
    """Geometric + photometric pipeline on (PIL image, boxes xyxy px [N,4], masks uint8 [N,H,W]).

    ``mode``: ``train`` (TAO's flip + random resize / resize-crop-resize, or LSJ), ``eval`` (resize shorter side
    to ``test_random_resize``, longer ≤ ``random_resize_max_size``) or ``fixed`` (resize to ``fixed_wh``).
    :meth:`__call__` returns (image tensor [3,h,w] normalised, boxes cxcywh normalised by (w,h), masks, (h,w)).
    """

    def __init__(self, aug: Any, mode: str, fixed_wh: tuple[int, int] | None = None):
        self.mode = mode
        self.scales = [int(s) for s in aug.scales]
        self.max_size = int(aug.random_resize_max_size)
        self.resize_before_crop = [int(s) for s in aug.train_random_resize]
        self.crop_min = int(aug.train_random_crop_min)
        self.crop_max = int(aug.train_random_crop_max)
        self.flip_prob = float(aug.horizontal_flip_prob)
        self.test_size = int(aug.test_random_resize)
        self.lsj = int(aug.fixed_random_crop) if aug.fixed_random_crop else None
        self.fixed_wh = fixed_wh
        self.mean = torch.as_tensor(list(aug.input_mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.as_tensor(list(aug.input_std), dtype=torch.float32).view(3, 1, 1)

    @staticmethod
    def resize(img: Image.Image, boxes: np.ndarray, masks: np.ndarray, hw: tuple[int, int]):
        """Resize to ``hw`` (h, w): image bilinear, boxes scaled, masks nearest."""
        h, w = hw
        W0, H0 = img.size
        if (H0, W0) == (h, w):
            return img, boxes, masks
        img = img.resize((w, h), Image.BILINEAR)
        if len(boxes):
            boxes = boxes * np.array([w / W0, h / H0, w / W0, h / H0], dtype=np.float32)
        if masks.shape[0]:
            t = torch.from_numpy(masks[:, None].astype(np.float32))
            masks = (F.interpolate(t, size=(h, w), mode="nearest")[:, 0] > 0.5).numpy().astype(np.uint8)
        else:
            masks = np.zeros((0, h, w), dtype=np.uint8)
        return img, boxes, masks

    def _resize_short(self, img, boxes, masks, size: int, max_size: int | None):
        W0, H0 = img.size
        return self.resize(img, boxes, masks, _size_with_aspect(H0, W0, size, max_size))

    @staticmethod
    def crop(img: Image.Image, boxes: np.ndarray, masks: np.ndarray, top: int, left: int, h: int, w: int,
             keep_ids: np.ndarray):
        """Crop to the window; boxes clipped, boxes left without area dropped (with their masks and ids)."""
        img = img.crop((left, top, left + w, top + h))
        masks = masks[:, top:top + h, left:left + w]
        if len(boxes):
            boxes = boxes - np.array([left, top, left, top], dtype=np.float32)
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, masks, keep_ids = boxes[keep], masks[keep], keep_ids[keep]
        return img, boxes, masks, keep_ids

    def __call__(self, img: Image.Image, boxes: np.ndarray, masks: np.ndarray, rng: random.Random):
        """Apply the pipeline; returns (image [3,h,w], boxes cxcywh normalised [N,4], masks [N,h,w], kept ids)."""
        ids = np.arange(len(boxes))
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if self.mode == "train":
            if rng.random() < self.flip_prob:
                W = img.size[0]
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
                masks = masks[:, :, ::-1].copy()
                if len(boxes):
                    boxes = boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], dtype=np.float32) + \
                        np.array([W, 0, W, 0], dtype=np.float32)
            if self.lsj:
                S = self.lsj
                W0, H0 = img.size
                scale = rng.uniform(0.1, 2.0) * S / max(H0, W0)
                img, boxes, masks = self.resize(img, boxes, masks, (max(1, round(H0 * scale)),
                                                                    max(1, round(W0 * scale))))
                W1, H1 = img.size
                ch, cw = min(S, H1), min(S, W1)
                top, left = rng.randint(0, H1 - ch), rng.randint(0, W1 - cw)
                img, boxes, masks, ids = self.crop(img, boxes, masks, top, left, ch, cw, ids)
            elif rng.random() < 0.5:
                img, boxes, masks = self._resize_short(img, boxes, masks, rng.choice(self.scales), self.max_size)
            else:
                img, boxes, masks = self._resize_short(img, boxes, masks, rng.choice(self.resize_before_crop), None)
                W1, H1 = img.size
                cw = rng.randint(min(W1, self.crop_min), min(W1, self.crop_max))
                ch = rng.randint(min(H1, self.crop_min), min(H1, self.crop_max))
                top, left = rng.randint(0, H1 - ch), rng.randint(0, W1 - cw)
                img, boxes, masks, ids = self.crop(img, boxes, masks, top, left, ch, cw, ids)
                img, boxes, masks = self._resize_short(img, boxes, masks, rng.choice(self.scales), self.max_size)
        elif self.mode == "fixed" and self.fixed_wh is not None:
            img, boxes, masks = self.resize(img, boxes, masks, (int(self.fixed_wh[1]), int(self.fixed_wh[0])))
        else:
            img, boxes, masks = self._resize_short(img, boxes, masks, self.test_size, self.max_size)
        W, H = img.size
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        x = (x - self.mean) / self.std
        b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if len(b):
            b = torch.stack([(b[:, 0] + b[:, 2]) / 2 / W, (b[:, 1] + b[:, 3]) / 2 / H,
                             (b[:, 2] - b[:, 0]) / W, (b[:, 3] - b[:, 1]) / H], dim=1)
        return x, b, torch.from_numpy(np.ascontiguousarray(masks)).to(torch.uint8), ids


# ----------------------------------------------------------------------------------------- datasets
class _NameTokens:
    """Cached token counts of category names / phrases (without special tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        if name not in self.cache:
            self.cache[name] = len(self.tokenizer(name, add_special_tokens=False)["input_ids"])
        return self.cache[name]


def _clip_boxes(boxes: list[list[float]], w: int, h: int) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    b[:, 0::2] = b[:, 0::2].clip(0, w)
    b[:, 1::2] = b[:, 1::2].clip(0, h)
    return b


class OdvgDataset(Dataset):
    """Training samples of one ODVG source (see module doc).  Item: ``image`` [3,h,w], ``target``
    (``labels`` [M] into ``names``, ``boxes`` [M,4] cxcywh normalised, ``masks`` [M,h,w] uint8, ``size`` (h,w),
    ``orig_size``), ``names`` (prompt categories/phrases), ``image_id``, ``file_name``."""

    def __init__(self, source: Any, index: int, transform: Transform, tokenizer, max_text_len: int,
                 max_labels: int):
        from networks.common.sources import resolve_dir

        key = f"dataset.train_data_sources[{index}]"
        self.root = resolve_dir(source.get("image_dir"), field=f"{key}.image_dir")
        lm_path = source.get("label_map")
        self.label_map = load_odvg_label_map(lm_path, f"{key}.label_map") if lm_path else None
        # one byte buffer: DataLoader workers read it without copying it page by page (serialized.py)
        self.records = SerializedList(read_odvg(source.get("json_file"), self.label_map, f"{key}.json_file"))
        if not self.records:
            raise DataError(f"{key}.json_file", f"'{source.get('json_file')}' holds no usable records")
        self.transform = transform
        self.max_text_len = int(max_text_len)
        self.max_labels = int(max_labels)
        self.tokens = _NameTokens(tokenizer)

    def __len__(self) -> int:
        return len(self.records)

    def _detection_prompt(self, rec: OdvgRecord, rng: random.Random) -> tuple[list[str], list[int]]:
        pos = list(dict.fromkeys(rec.keys))
        others = [k for k in self.label_map if k not in set(pos)]
        neg = rng.sample(others, max(0, min(len(others), self.max_labels - len(pos))))
        need = prompt_token_count([self.tokens(self.label_map[k]) for k in pos])
        if need > self.max_text_len:
            raise DataError(rec.where, f"the {len(pos)} categories present need {need} prompt tokens, more than "
                            f"model.max_text_len={self.max_text_len}",
                            "raise model.max_text_len or shorten the label-map names")
        # Negatives that do not fit are dropped (TAO would silently clip the prompt, losing positives too).
        budget = self.max_text_len - need
        kept_neg = []
        for k in neg:
            n = self.tokens(self.label_map[k]) + 1
            if n <= budget:
                kept_neg.append(k)
                budget -= n
        keys = pos + kept_neg
        rng.shuffle(keys)
        slot = {k: i for i, k in enumerate(keys)}
        return [self.label_map[k] for k in keys], [slot[k] for k in rec.keys]

    def _grounding_prompt(self, rec: OdvgRecord) -> tuple[list[str], list[int]]:
        # A no-target expression (no regions) is prompted with its caption.
        phrases = list(dict.fromkeys(rec.keys)) or [rec.extra.get("caption") or "object"]
        need = prompt_token_count([self.tokens(p) for p in phrases])
        if need > self.max_text_len:
            raise DataError(rec.where, f"the {len(phrases)} phrases need {need} prompt tokens, more than "
                            f"model.max_text_len={self.max_text_len}", "raise model.max_text_len or shorten phrases")
        slot = {p: i for i, p in enumerate(phrases)}
        return phrases, [slot[p] for p in rec.keys]

    def __getitem__(self, index: int) -> dict:
        from networks.common.sources import resolve_member

        rec = self.records[index]
        rng = sample_random(index)
        img = _read_rgb(resolve_member(self.root, rec.file_name), rec.where)
        W, H = img.size
        masks = _decode_masks(rec.masks, H, W, rec.where)
        boxes = _clip_boxes(rec.boxes, W, H)
        order = list(range(len(boxes)))
        if rec.grounding:
            # Boxes, phrases and masks move together (TAO shuffles only boxes and phrases).
            rng.shuffle(order)
        boxes, masks = boxes[order], masks[order]
        keys = [rec.keys[i] for i in order]
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) if len(boxes) else np.zeros(0, bool)
        boxes, masks = boxes[valid], masks[valid]
        keys = [k for k, v in zip(keys, valid, strict=True) if v]
        rec_view = OdvgRecord(rec.file_name, [], keys, [], rec.where, rec.grounding, extra=rec.extra)
        names, labels = self._grounding_prompt(rec_view) if rec.grounding else self._detection_prompt(rec_view, rng)
        x, b, m, kept = self.transform(img, boxes, masks, rng)
        labels_t = torch.as_tensor([labels[i] for i in kept], dtype=torch.long)
        h, w = x.shape[-2:]
        # empty: nothing the prompt names is in the sample (a no-target expression, or every target cropped away);
        # the ReLA no-target loss reads it.
        return {"image": x, "names": names, "image_id": int(index), "file_name": rec.file_name,
                "target": {"labels": labels_t, "boxes": b, "masks": m, "size": (int(h), int(w)),
                           "orig_size": (int(H), int(W)), "image_id": int(index), "empty": bool(len(kept) == 0)}}


class CocoDataset(Dataset):
    """Evaluation samples from a COCO instances file; every image gets the prompt of all categories (in
    ``categories`` order).  Item as :class:`OdvgDataset` plus ``category_ids`` (COCO id per prompt slot)."""

    def __init__(self, source: Any, key: str, transform: Transform):
        from networks.common.coco_io import load_coco
        from networks.common.dataset_rules import validate_coco
        from networks.common.sources import resolve_dir

        self.root = resolve_dir(source.get("image_dir"), field=f"{key}.image_dir")
        self.json_file = str(source.get("json_file"))
        # Refused here, before any score: duplicate image ids, annotations of unknown images, negative or missing
        # boxes, missing segmentations, polygons of fewer than 3 points and a file without annotations.
        coco = validate_coco(load_coco(self.json_file, field=f"{key}.json_file"), self.json_file,
                             need_segmentation=True, need_bbox=True, need_annotations=True)
        cats = coco["categories"]
        if not cats:
            raise DataError(self.json_file, "has no categories", "the prompt is built from the category names")
        self.category_ids = [c["id"] for c in cats]
        self.names = [str(c.get("name", c["id"])) for c in cats]
        self.slot = {cid: i for i, cid in enumerate(self.category_ids)}
        anns: dict[Any, list[dict]] = {img["id"]: [] for img in coco["images"]}
        for a in coco["annotations"]:  # the rules above resolved every image_id and category_id
            anns[a["image_id"]].append(a)
        # (image entry, its annotations) per image, in one byte buffer: workers share it without copying it
        self.items = SerializedList((img, anns[img["id"]]) for img in coco["images"])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        from networks.common.coco_io import ann_to_mask
        from networks.common.sources import resolve_member

        info, anns = self.items[index]
        where = f"{self.json_file}: image {info['id']}"
        img = _read_rgb(resolve_member(self.root, info["file_name"]), where)
        W, H = img.size
        anns = [a for a in anns if not a.get("iscrowd", 0)]
        boxes = np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                            for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes = _clip_boxes(boxes, W, H)
        masks = np.stack([ann_to_mask(a["segmentation"], H, W, where=f"{where}, annotation {a.get('id')}")
                          for a in anns]).astype(np.uint8) if anns else np.zeros((0, H, W), np.uint8)
        labels = np.asarray([self.slot[a["category_id"]] for a in anns], dtype=np.int64)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, masks, labels = boxes[valid], masks[valid], labels[valid]
        x, b, m, kept = self.transform(img, boxes, masks, random.Random(0))
        h, w = x.shape[-2:]
        return {"image": x, "names": self.names, "category_ids": self.category_ids, "image_id": info["id"],
                "file_name": info["file_name"],
                "target": {"labels": torch.as_tensor(labels[kept], dtype=torch.long), "boxes": b, "masks": m,
                           "size": (int(h), int(w)), "orig_size": (int(H), int(W)), "image_id": info["id"]}}


class ReferringDataset(Dataset):
    """Referring evaluation samples: one per line of an ODVG grounding JSON-lines file (``docs/formats.md``).

    Item as :class:`OdvgDataset` (prompt = the expression, every region labelled 0, ``target["empty"]``) plus
    ``referring`` = ``{"expression_id" (0-based line order), "caption", "gt_union" (compressed RLE of the merged
    region masks at the original size; all-zero for a no-target expression)}``.
    """

    def __init__(self, source: Any, key: str, transform: Transform):
        from networks.common.sources import resolve_dir

        self.root = resolve_dir(source.get("image_dir"), field=f"{key}.image_dir")
        self.json_file = str(source.get("json_file"))
        self.records = SerializedList(read_odvg(self.json_file, None, f"{key}.json_file", repair=False))
        if not self.records:
            raise DataError(f"{key}.json_file", f"'{self.json_file}' holds no referring expressions")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        from networks.common.coco_io import mask_to_rle
        from networks.common.sources import resolve_member

        rec = self.records[index]
        img = _read_rgb(resolve_member(self.root, rec.file_name), rec.where)
        W, H = img.size
        masks = _decode_masks(rec.masks, H, W, rec.where)
        union = masks.any(0) if len(masks) else np.zeros((H, W), dtype=bool)
        boxes = _clip_boxes(rec.boxes, W, H)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) if len(boxes) else np.zeros(0, bool)
        boxes, masks = boxes[valid], masks[valid]
        caption = rec.extra.get("caption") or (rec.keys[0] if rec.keys else "object")
        x, b, m, kept = self.transform(img, boxes, masks, random.Random(0))
        h, w = x.shape[-2:]
        return {"image": x, "names": [caption], "image_id": int(index), "file_name": rec.file_name,
                "referring": {"expression_id": int(index), "caption": caption, "gt_union": mask_to_rle(union)},
                "target": {"labels": torch.zeros(len(kept), dtype=torch.long), "boxes": b, "masks": m,
                           "size": (int(h), int(w)), "orig_size": (int(H), int(W)), "image_id": int(index),
                           "empty": bool(len(kept) == 0)}}


def _looks_like_odvg_lines(path: Path) -> bool:
    """True when the first non-blank line of ``path`` is a JSON object with ``file_name`` (JSON lines); a COCO
    file's first line is either not a whole JSON value or an object with ``images``."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        return False
                    return isinstance(obj, dict) and "file_name" in obj
    except OSError:
        return False
    return False


def eval_kind(source: Any, key: str) -> str:
    """Which evaluator a val/test source selects: ``"coco"`` or ``"referring"``.

    ``data_type`` ``"OD"`` → COCO (the file must be a COCO instances JSON).  Any other value (TAO's val default
    ``"VG"``, ``""``, ``"RES"``, ...) → referring when ``json_file`` holds ODVG grounding JSON lines; with a COCO
    instances file, ``"VG"`` and ``""`` keep the COCO evaluator (TAO's default ``"VG"`` sits next to COCO files in
    every existing spec) and any other value is a :class:`DataError`.
    """
    data_type = str(source.get("data_type") or "").strip()
    path = Path(os.path.expanduser(str(source.get("json_file"))))
    lines = _looks_like_odvg_lines(path)
    if data_type.upper() == "OD":
        if lines:
            raise DataError(f"{key}.json_file", f"'{path}' holds JSON lines, but data_type 'OD' selects the COCO "
                            "evaluator", "give a COCO instances file, or data_type: VG for referring data")
        return "coco"
    if lines:
        return "referring"
    if data_type.upper() in ("", "VG"):
        return "coco"
    raise DataError(f"{key}.json_file", f"data_type '{data_type}' selects the referring evaluator, but '{path}' is "
                    "not ODVG grounding JSON lines", "give a referring .jsonl file, or data_type: OD for COCO data")


def eval_dataset(source: Any, key: str, transform: Transform) -> Dataset:
    """:class:`CocoDataset` or :class:`ReferringDataset` for a val/test source, by :func:`eval_kind`."""
    if eval_kind(source, key) == "referring":
        log.info("%s: referring evaluation (data_type '%s', ODVG grounding lines)", key, source.get("data_type"))
        return ReferringDataset(source, key, transform)
    return CocoDataset(source, key, transform)


def split_phrases(text: str) -> list[str]:
    """Phrases of one caption string.  Only TAO's prompt form — phrases separated by `` . `` (``"cat . dog ."``)
    — is split; any other text is one expression (``"the red square on the left."``), its final ``.`` dropped."""
    import re

    text = str(text).strip()
    if re.search(r"\s\.(\s|$)", text):
        return [p.strip() for p in text.split(".") if p.strip()]
    text = text.rstrip(".").strip()
    return [text] if text else []


def is_caption_file(value: Any) -> bool:
    """True when an ``infer_data_sources.captions`` value names a JSON-lines file rather than giving phrases."""
    return isinstance(value, str) and value.strip().lower().endswith(".jsonl")


def _clean_captions(captions: Any, where: str) -> list[str]:
    """Lower-cased, stripped, de-duplicated phrases from a list of phrases or one caption string
    (:func:`split_phrases`)."""
    if isinstance(captions, str):
        captions = split_phrases(captions)
    elif not isinstance(captions, (list, tuple)) and hasattr(captions, "__iter__"):
        captions = list(captions)  # OmegaConf ListConfig
    if not isinstance(captions, (list, tuple)):
        raise DataError(where, f"captions must be a list of phrases, got {type(captions).__name__}")
    out = [str(c).strip().lower() for c in captions if str(c).strip()]
    return list(dict.fromkeys(out))


def read_classmap(path: Any, where: str) -> list[str]:
    """Class names of an ``infer_data_sources.classmap`` file: a text file with one name per line (TAO's
    ``label_map.txt``; blank lines skipped), or JSON — an ODVG label map ``{"0": "cat", ...}`` (in key order),
    a list of names, or a list of ``{"id", "name"}`` (in list order)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise DataError(where, f"'{path}' does not exist", "point classmap at a label_map.txt (one name per line)")
    if p.suffix.lower() == ".json":
        data = read_json(p)
        if isinstance(data, dict):
            keys = sorted(data, key=lambda k: (0, int(k)) if str(k).lstrip("-").isdigit() else (1, str(k)))
            names = [data[k] for k in keys]
        elif isinstance(data, list):
            names = [d.get("name") if isinstance(d, dict) else d for d in data]
        else:
            raise DataError(where, "must be a JSON object or list of class names")
    else:
        try:
            names = p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(where, f"cannot read '{path}' ({exc})") from None
    out = _clean_captions([str(n) for n in names if n is not None], where)
    if not out:
        raise DataError(where, f"'{path}' holds no class names")
    return out


_CAPTION_LINE = ('each line is {"file_name": ..., "caption": "..."} (or "captions": [...]), or a VG record '
                 '{"file_name": ..., "grounding": {"caption": ...}}')


def _line_captions(obj: dict, where: str) -> list[str] | None:
    """The phrases one caption-file line gives its image (None when it gives none): ``captions`` (list or
    string), ``caption``, or TAO's VG record ``grounding.caption`` (else its regions' phrases)."""
    for name in ("captions", "caption"):
        if obj.get(name) not in (None, "", []):
            return _clean_captions(obj[name], f"{where}: {name}")
    grounding = obj.get("grounding")
    if isinstance(grounding, dict):
        if str(grounding.get("caption") or "").strip():
            return _clean_captions(grounding["caption"], f"{where}: grounding.caption")
        phrases = [r.get("phrase") for r in grounding.get("regions") or [] if isinstance(r, dict)]
        phrases = [p for p in phrases if p]
        if phrases:
            return _clean_captions(phrases, f"{where}: grounding.regions")
    return None


class PredictDataset(Dataset):
    """Inference images with their prompt.

    ``source`` is ``infer_data_sources``: ``image_dir`` (folder, list of folders, or archive) and the prompt —
    ``captions`` as a list of phrases (or one string of phrases, :func:`split_phrases`) for every image, or
    ``captions`` naming a ``.jsonl`` file (or tao-cli's ``json_file``) with one line per image
    (``{"file_name", "caption"}`` or TAO's VG record); ``classmap`` (a label-map file, :func:`read_classmap`)
    gives the class names used where no caption is given.  Each item is (path, name relative to its root, phrases).
    """

    def __init__(self, source: Any, transform: Transform, key: str = "dataset.infer_data_sources"):
        from networks.common.sources import resolve_dir

        dirs = source.get("image_dir")
        dirs = [dirs] if isinstance(dirs, str) else [d for d in (dirs or []) if d]
        if not dirs:
            raise ConfigError(f"{key}.image_dir", "is empty", "point it at a folder or archive of images")
        self.roots = [resolve_dir(d, field=f"{key}.image_dir") for d in dirs]
        captions = source.get("captions") or []
        json_file, json_key = source.get("json_file"), f"{key}.json_file"
        if is_caption_file(captions):
            if json_file:
                raise ConfigError(f"{key}.captions", "names a captions file and json_file is set too",
                                  "give the per-image captions once")
            json_file, json_key, captions = captions, f"{key}.captions", []
        default = _clean_captions(captions, f"{key}.captions")
        classmap = source.get("classmap")
        if classmap:
            names = read_classmap(classmap, f"{key}.classmap")
            if default and default != names:
                raise ConfigError(f"{key}.classmap", "and captions both list the class names",
                                  "give the names once: captions or classmap")
            default = names
        #: the class names every image without its own caption is prompted with (classmap or captions)
        self.class_names = default
        self.items: list[tuple[Path, str, list[str]]] = []
        if json_file:
            from networks.common.sources import resolve_member

            p = Path(os.path.expanduser(str(json_file)))
            if not p.is_file():
                raise DataError(json_key, f"'{json_file}' does not exist")
            for where, obj in iter_json_lines(p, hint=_CAPTION_LINE):
                if not isinstance(obj, dict) or "file_name" not in obj:
                    raise DataError(where, "needs 'file_name'", _CAPTION_LINE)
                caps = _line_captions(obj, where)
                caps = default if caps is None else caps
                if not caps:
                    raise DataError(where, "has no caption and neither infer_data_sources.captions nor classmap "
                                    "lists class names")
                path = resolve_member(self.roots[0], obj["file_name"])
                if not path.is_file():
                    raise DataError(where, f"image '{obj['file_name']}' not found under {self.roots[0]}")
                self.items.append((path, str(obj["file_name"]), caps))
        else:
            if not default:
                raise ConfigError(f"{key}.captions", "is empty",
                                  "list the category names to detect, or give classmap (a label_map.txt)")
            for root in self.roots:
                for path in list_images(root):
                    self.items.append((path, str(path.relative_to(root)), default))
        if not self.items:
            raise DataError(f"{key}.image_dir", f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {dirs}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, rel, names = self.items[index]
        img = _read_rgb(path, str(path))
        W, H = img.size
        x, _, _, _ = self.transform(img, np.zeros((0, 4), np.float32), np.zeros((0, H, W), np.uint8),
                                    random.Random(0))
        h, w = x.shape[-2:]
        return {"image": x, "names": names, "image_id": index, "file_name": rel, "path": str(path),
                "target": {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4),
                           "masks": torch.zeros(0, h, w, dtype=torch.uint8), "size": (int(h), int(w)),
                           "orig_size": (int(H), int(W)), "image_id": index}}


# ------------------------------------------------------------------------------------------- collate
class Collator:
    """Batch samples: pad images (batch max, rounded up to ``size_divisibility``), tokenise prompts.

    Returns ``images`` [B,3,H,W], ``pixel_mask`` [B,H,W] bool (True = valid pixel, from
    :func:`~networks.ops.padding.pad_images`), the :func:`tokenize` tensors
    (``input_ids``, ``attention_mask``, ``token_type_ids``, ``position_ids``, ``text_self_attention_masks``),
    ``targets`` (each with ``masks`` padded to [M,H,W] and ``positive_map`` [C, max_text_len]), ``names``,
    ``captions``, ``image_ids``, ``file_names``, ``orig_sizes``, ``image_sizes`` (h, w) and, when present,
    ``category_ids``, ``paths`` and ``referring`` (per-sample dicts of :class:`ReferringDataset`).

    ``chunk`` (evaluation and inference): a sample whose class names do not fit in ``max_text_len`` tokens is
    split into views, one per chunk of names (``networks/mask_grounding_dino/chunking.py``); the batch then
    holds one row per view and ``views``.  Without ``chunk`` (training, whose prompts are sampled to fit) names
    that do not fit are warned about once per prompt (they cannot be detected).  A name too long for the window
    on its own is warned about in both cases.  Tokenisation is cached per tuple of captions (``cache_size``
    batches, least recently used first out): a fixed prompt is tokenised once.
    """

    def __init__(self, tokenizer, max_text_len: int, size_divisibility: int = SIZE_DIVISIBILITY, *,
                 chunk: bool = False, cache_size: int = 8):
        from networks.common.lru import LRUDict

        self.tokenizer = tokenizer
        self.max_text_len = int(max_text_len)
        self.size_divisibility = int(size_divisibility)
        self.chunk = bool(chunk)
        self._tokens = _NameTokens(tokenizer)
        self._warned: set[str] = set()
        self._cache = LRUDict(cache_size)

    def _tokenize(self, captions: list[str], spans_list: list) -> tuple[dict, list[torch.Tensor]]:
        """:func:`tokenize` and the positive maps of a batch's captions, from the cache when seen before."""
        key = (tuple(captions), tuple(tuple(sp) for sp in spans_list))
        hit = self._cache.get(key)
        if hit is None:
            tok = tokenize(captions, self.tokenizer, self.max_text_len)
            hit = tok, [positive_map(spans_list[i], tok["offsets"][i], self.max_text_len) for i in range(len(captions))]
            self._cache.put(key, hit)
        return hit

    def __call__(self, samples: list[dict]) -> dict:
        views = None
        if self.chunk:
            ranges = [chunk_names(s["names"], self._tokens, self.max_text_len) for s in samples]
            if any(len(r) > 1 for r in ranges):
                samples, views = expand_views(samples, ranges)
        images, pixel_mask = pad_images([s["image"] for s in samples], self.size_divisibility)
        H, W = images.shape[-2:]
        captions, spans_list, targets = [], [], []
        for s in samples:
            cap, spans = build_caption(s["names"])
            captions.append(cap)
            spans_list.append(spans)
            t = dict(s["target"])
            m = t["masks"]
            t["masks"] = F.pad(m, (0, W - m.shape[-1], 0, H - m.shape[-2]))
            targets.append(t)
        tok, maps = self._tokenize(captions, spans_list)
        for i, t in enumerate(targets):
            pm = maps[i]
            t["positive_map"] = pm
            empty = (pm.sum(-1) == 0).nonzero().flatten().tolist()
            if empty and captions[i] not in self._warned:
                self._warned.add(captions[i])
                dropped = [samples[i]["names"][j] for j in empty]
                why = "longer than the whole text window" if self.chunk else "beyond the text window"
                log.warning("Prompt tokens %s (model.max_text_len=%d): categories %s cannot be detected "
                            "(TAO clips silently).", why, self.max_text_len, dropped[:20])
        batch = {"images": images, "pixel_mask": pixel_mask, "targets": targets,
                 "names": [s["names"] for s in samples], "captions": captions,
                 "image_ids": [s["image_id"] for s in samples], "file_names": [s["file_name"] for s in samples],
                 "orig_sizes": [s["target"]["orig_size"] for s in samples],
                 "image_sizes": [s["target"]["size"] for s in samples]}
        batch.update({k: v for k, v in tok.items() if k != "offsets"})
        if "category_ids" in samples[0]:
            batch["category_ids"] = [s["category_ids"] for s in samples]
        if "path" in samples[0]:
            batch["paths"] = [s["path"] for s in samples]
        if "referring" in samples[0]:
            batch["referring"] = [s["referring"] for s in samples]
        if views is not None:
            batch["views"] = views
        return batch


# ---------------------------------------------------------------------------------------- datamodule
class MaskGDinoDataModule(pl.LightningDataModule):
    """Loaders for one action: train (+ val), evaluate (test or val COCO data), inference (images + captions).

    Batch size ``dataset.batch_size`` (``evaluate/inference.batch_size`` when > 0), ``dataset.workers`` workers.
    Train drops the last partial batch when there is more than one batch (as TAO).
    """

    def __init__(self, cfg: Any, ctx: Any):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        self.action: str = ctx.action
        self.tokenizer = load_tokenizer(cfg.model.text_encoder_type)
        self.collate = Collator(self.tokenizer, int(cfg.model.max_text_len))
        self.eval_collate = Collator(self.tokenizer, int(cfg.model.max_text_len), chunk=True)
        aug = cfg.dataset.augmentation
        self.train_tf = Transform(aug, "train")
        self.eval_tf = Transform(aug, "eval")
        inf = cfg.inference
        if self.action == "inference" and inf.input_width and inf.input_height:
            self.predict_tf = Transform(aug, "fixed", (int(inf.input_width), int(inf.input_height)))
        else:
            self.predict_tf = self.eval_tf
        self.train_dataset = self.val_dataset = self.predict_dataset = None

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (``fit``, ``validate``, ``test``, ``predict``)."""
        ds = self.cfg.dataset
        if stage in ("fit", None) and self.train_dataset is None:
            parts = [OdvgDataset(src, i, self.train_tf, self.tokenizer, self.cfg.model.max_text_len, ds.max_labels)
                     for i, src in enumerate(ds.train_data_sources)]
            self.train_dataset = parts[0] if len(parts) == 1 else KeyedConcatDataset(parts)
        if stage in ("fit", "validate", None) and self.val_dataset is None:
            self.val_dataset = eval_dataset(ds.val_data_sources, "dataset.val_data_sources", self.eval_tf)
        if stage == "test" and self.val_dataset is None:
            key, src = eval_source(self.cfg)
            self.val_dataset = eval_dataset(src, key, self.eval_tf)
        if stage == "predict" and self.predict_dataset is None:
            self.predict_dataset = PredictDataset(ds.infer_data_sources, self.predict_tf)

    def _loader(self, dataset, batch_size: int, shuffle: bool, drop_last: bool, workers: int | None = None):
        n = int(self.cfg.dataset.workers) if workers is None else workers
        pin = bool(self.cfg.dataset.pin_memory) and torch.accelerator.is_available()
        if shuffle:  # order and augmentations from (train.seed, epoch): exact resume (networks/common/sampling.py)
            return training_loader(dataset, batch_size=batch_size, seed=self.cfg.train.seed, num_workers=n,
                                   collate_fn=self.collate, drop_last=drop_last, pin_memory=pin)
        return DataLoader(dataset, batch_size=batch_size, drop_last=drop_last, num_workers=n,
                          collate_fn=self.eval_collate,
                          persistent_workers=n > 0, pin_memory=pin, generator=private_generator())

    def _bs(self, section: str | None) -> int:
        if section is not None:
            bs = int(getattr(self.cfg, section).batch_size)
            if bs > 0:
                return bs
        return int(self.cfg.dataset.batch_size)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        bs = self._bs(None)
        return self._loader(self.train_dataset, bs, True, len(self.train_dataset) > bs)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (every image; TAO uses no workers for validation)."""
        return self._loader(self.val_dataset, self._bs("evaluate" if self.action == "evaluate" else None),
                            False, False, workers=0)

    def test_dataloader(self) -> DataLoader:
        """``evaluate``: test_data_sources when set, else val_data_sources."""
        return self._loader(self.val_dataset, self._bs("evaluate"), False, False)

    def predict_dataloader(self) -> DataLoader:
        """Inference images."""
        return self._loader(self.predict_dataset, self._bs("inference"), False, False)
