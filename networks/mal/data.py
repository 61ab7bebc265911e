"""MAL data pipeline (TAO ``cv/mal/datasets``): one sample per COCO box, cropped around the box.

Coordinates: COCO boxes are ``[x, y, w, h]`` pixels; everything else here is ``xyxy`` pixels in the
*original* image unless named "crop".  Crop windows (``ext_box``) are integer ``[x0, y0, x1, y1)`` with an
exclusive end and may extend past the image: the image is then tiled periodically (wrap-around, TAO's
``custom_crop_image``), never padded.  Tensors are CHW float32; images are normalised with ImageNet statistics.

Train sample (default collate): ``image`` [3,S,S] student view (colour-jittered), ``timage`` [3,S,S] teacher
view, ``mask`` [1,S,S] crop-space box mask (0/1 float), ``bbox`` [4] original xyxy float32,
``compact_category_id``, ``ann_id``.

Val/test/predict sample (:func:`collate_eval`): ``image`` [3,S,S], ``boxmask`` [1,S,S] (zero outside the image),
``bbox`` [4] original xyxy, ``ext_box`` [4] int64, ``image_hw`` [2] int64 (H, W), ``category_id``,
``compact_category_id``, ``ann_id``, ``image_id``, ``iscrowd`` and ``gt_mask`` (full-image uint8 H×W, or None).
"""
from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from networks.common.coco_io import ann_to_mask, load_coco
from networks.common.dataset_rules import validate_coco
from networks.common.errors import DataError
from networks.common.sampling import private_generator, seeded_globals, training_loader
from networks.common.serialized import SerializedList
from networks.common.sources import read_rgb, resolve_dir

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BoxRecord",
    "load_records",
    "filter_train_records",
    "wrap_crop",
    "zero_pad_crop",
    "expand_box",
    "box_mask_crop",
    "random_margins",
    "MALTrainDataset",
    "MALEvalDataset",
    "collate_eval",
    "MALDataModule",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_log = logging.getLogger("tao")


# --------------------------------------------------------------------------------------------------- records
@dataclass
class BoxRecord:
    """One COCO annotation joined with its image: the unit MAL trains on and predicts for.

    ``bbox`` is the raw COCO ``[x, y, w, h]`` (pixels, float); ``height``/``width`` come from the image entry;
    ``compact_category_id`` is 1 + the category's index in the JSON's ``categories`` list (TAO convention).
    """

    ann_id: int
    image_id: int
    file_name: str
    height: int
    width: int
    bbox: tuple[float, float, float, float]
    category_id: int
    compact_category_id: int
    iscrowd: int
    segmentation: Any = None

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        """The box as ``(x0, y0, x1, y1)`` pixels in the original image."""
        x, y, w, h = self.bbox
        return (x, y, x + w, y + h)


def load_records(ann_path: str, *, field: str, need_segmentation: bool = False,
                 need_annotations: bool = False) -> tuple[list[BoxRecord], dict]:
    """Read a COCO JSON and return ``(records, coco_dict)``: one :class:`BoxRecord` per annotation, in file order.

    The file is checked by the shared COCO rules (:func:`networks.common.dataset_rules.validate_coco`, the
    rules ``tao dataset validate`` reports), with ``bbox`` required: a :class:`DataError` names the file and
    record for duplicate or missing ids, unknown ``image_id``/``category_id``, an image without a positive
    size, a bbox that is not 4 finite numbers or is negative; with ``need_segmentation`` an annotation without
    ``segmentation``, and a polygon of fewer than 3 points; with ``need_annotations`` a file without
    annotations.  Boxes outside their image are let through: training drops them (:func:`filter_train_records`,
    TAO's filter) and inference labels what is inside the image.
    """
    coco = validate_coco(load_coco(ann_path, field=field), ann_path, need_bbox=True,
                         need_segmentation=need_segmentation, need_annotations=need_annotations,
                         tolerate=("bbox_outside_image",),
                         segmentation_hint="set dataset.load_mask=false (inference.load_mask for inference) for "
                                           "box-only annotations")
    images = {img["id"]: img for img in coco["images"]}
    cat_index = {cat["id"]: i + 1 for i, cat in enumerate(coco["categories"])}
    records: list[BoxRecord] = []
    for ann in coco["annotations"]:
        img = images[ann["image_id"]]
        records.append(BoxRecord(
            ann_id=int(ann["id"]), image_id=int(img["id"]), file_name=str(img["file_name"]),
            height=int(img["height"]), width=int(img["width"]), bbox=tuple(float(v) for v in ann["bbox"]),
            category_id=int(ann["category_id"]), compact_category_id=cat_index[ann["category_id"]],
            iscrowd=int(ann.get("iscrowd", 0) or 0), segmentation=ann.get("segmentation")))
    return records, coco


def filter_train_records(records: Sequence[BoxRecord], min_obj_size: float, max_obj_size: float,
                         ) -> tuple[list[BoxRecord], Counter]:
    """TAO's training filter (``_filter_imgs``) plus crowd removal; returns ``(kept, reasons)``.

    Kept iff not crowd, inside the image (x ≥ 0, y ≥ 0, x+w ≤ W, y+h ≤ H), ``min < w·h < max`` (strict) and
    w > 2 and h > 2.  ``reasons`` counts each dropped box once, under the first failing rule.
    """
    kept, reasons = [], Counter()
    for r in records:
        x, y, w, h = r.bbox
        if r.iscrowd:
            reasons["crowd"] += 1
        elif x < 0 or y < 0 or x + w > r.width or y + h > r.height:
            reasons["outside the image"] += 1
        elif not (w > 2 and h > 2):
            reasons["w or h <= 2"] += 1
        elif not w * h > min_obj_size:
            reasons["area <= dataset.min_obj_size"] += 1
        elif not w * h < max_obj_size:
            reasons["area >= dataset.max_obj_size"] += 1
        else:
            kept.append(r)
    return kept, reasons


def _check_images(records: Sequence[BoxRecord], root: Path, ann_path: str) -> None:
    missing = sorted({r.file_name for r in records if not (root / r.file_name).is_file()})
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(str(root / missing[0]), f"image listed in {ann_path} does not exist "
                        f"({len(missing)} missing: {', '.join(missing[:3])}{more})",
                        "check the image directory and the file_name entries")


def _load_image(root: Path, rec: BoxRecord) -> Image.Image:
    path = root / rec.file_name
    img = read_rgb(path)
    if img.size != (rec.width, rec.height):
        raise DataError(str(path), f"is {img.size[0]}x{img.size[1]} but its COCO entry says "
                        f"{rec.width}x{rec.height}", "fix width/height in the annotation file")
    return img


# ---------------------------------------------------------------------------------------------- crop helpers
def wrap_crop(array: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """Crop ``array`` (H×W or H×W×C) to the integer window ``[x0, y0, x1, y1)``, tiling the image periodically
    where the window leaves it (row ``-1`` is row ``H-1``, column ``W`` is column 0), as TAO's crop does."""
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = array.shape[:2]
    rows = np.arange(y0, y1) % h
    cols = np.arange(x0, x1) % w
    return array[rows[:, None], cols[None, :]]


def zero_pad_crop(array: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """Crop to ``[x0, y0, x1, y1)`` with zeros where the window leaves the image (used for the eval box mask)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = array.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0) + array.shape[2:], dtype=array.dtype)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = array[sy0:sy1, sx0:sx1]
    return out


def expand_box(box_xyxy: Sequence[float], margins: Sequence[float]) -> tuple[np.ndarray, int, int]:
    """TAO's ``_expand_box`` + rounding: grow each side of ``box_xyxy`` by ``margins[i]`` × its half extent.

    ``margins`` = (left, top, right, bottom).  Returns ``(ext_box, ext_h, ext_w)``: ``ext_box`` int64
    ``[x0, y0, x1, y1)`` with floor on x0/y0, ceil on x1/y1 and one extra pixel on the right/bottom.
    """
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    x1, y1 = max(x1, x0), max(y1, y0)  # degenerate (negative-size) boxes crop as zero-size ones
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    m0, m1, m2, m3 = (float(m) for m in margins)
    ext = np.array([
        math.floor(cx - (cx - x0) * (1 + m0)),
        math.floor(cy - (cy - y0) * (1 + m1)),
        math.ceil(cx + (x1 - cx) * (1 + m2) + 1),
        math.ceil(cy + (y1 - cy) * (1 + m3) + 1),
    ], dtype=np.int64)
    return ext, int(ext[3] - ext[1]), int(ext[2] - ext[0])


def _box_span(lo: float, hi: float) -> tuple[int, int]:
    # TAO fills mask[int(y):int(y+h)+1]: truncation toward zero, inclusive end.
    return int(lo), int(hi) + 1


def box_mask_crop(rec_xyxy: Sequence[float], image_hw: tuple[int, int], ext_box: Sequence[int], *,
                  wrap: bool) -> np.ndarray:
    """Crop of the full-image box mask (1 on ``[int(y0), int(y1)] × [int(x0), int(x1)]`` inclusive, clipped to
    the image) to ``ext_box``, as uint8 ``ext_h × ext_w``.  ``wrap`` tiles like :func:`wrap_crop`, else zeros
    outside the image like :func:`zero_pad_crop`.  Computed separably, never at full image size."""
    x0, y0, x1, y1 = rec_xyxy
    h, w = image_hw
    bx0, bx1 = _box_span(x0, x1)
    by0, by1 = _box_span(y0, y1)
    ex0, ey0, ex1, ey1 = (int(v) for v in ext_box)
    rows, cols = np.arange(ey0, ey1), np.arange(ex0, ex1)
    if wrap:
        rows, cols = rows % h, cols % w
    row_in = (rows >= max(by0, 0)) & (rows < min(by1, h)) & (rows >= 0) & (rows < h)
    col_in = (cols >= max(bx0, 0)) & (cols < min(bx1, w)) & (cols >= 0) & (cols < w)
    return (row_in[:, None] & col_in[None, :]).astype(np.uint8)


def random_margins(margin_rate: Sequence[float]) -> np.ndarray:
    """RandomCropV3 margins: four ``U(lo, hi)`` draws gated by ``[g0, g1, 1-g0, 1-g1]``, ``g ~ U(0,1)`` (np.random).

    So the left+right (and top+bottom) gates sum to one: the box is off-centre in the crop.
    """
    lo, hi = float(margin_rate[0]), float(margin_rate[1])
    m = np.random.uniform(lo, hi, size=4)
    g = np.random.uniform(0.0, 1.0, size=2)
    return m * np.array([g[0], g[1], 1.0 - g[0], 1.0 - g[1]])


def _resize(arr: np.ndarray, size: int) -> Image.Image:
    # PIL's bicubic, aspect ratio not kept (TAO resizes every crop to SxS).
    return Image.fromarray(arr).resize((size, size), Image.BICUBIC)


def _mask_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0))[None]


_NORMALIZE = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def _to_input(img: Image.Image) -> torch.Tensor:
    return _NORMALIZE(TF.to_tensor(img))


class _StudentJitter:
    """The student's photometric augmentation: ColorJitter(0.4, 0.4, 0.2, 0.1) w.p. 0.5, grayscale w.p. 0.2,
    Gaussian blur with radius U(0.1, 2.0) w.p. 0.5 (PIL images in and out)."""

    def __init__(self) -> None:
        self.jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.5)
        self.gray = T.RandomGrayscale(p=0.2)

    def __call__(self, img: Image.Image) -> Image.Image:
        img = self.gray(self.jitter(img))
        if random.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return img


# --------------------------------------------------------------------------------------------------- datasets
class MALTrainDataset(Dataset):
    """Training boxes (already filtered) with TAO's train transform; see the module docstring for the sample."""

    def __init__(self, records: Sequence[BoxRecord], img_root: Path, crop_size: int,
                 margin_rate: Sequence[float]):
        self.records = SerializedList(records)  # workers share it without copying (serialized.py)
        self.img_root = Path(img_root)
        self.crop_size = int(crop_size)
        self.margin_rate = [float(m) for m in margin_rate]
        self.student_aug = _StudentJitter()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        # The augmentations draw from the global generators; seeded from the sample key they depend on
        # (train.seed, epoch, position) only — not on the worker, the number of workers or a restart.
        with seeded_globals(idx):
            return self._augmented(idx)

    def _augmented(self, idx: int) -> dict[str, Any]:
        rec = self.records[idx]
        image = np.asarray(_load_image(self.img_root, rec))
        ext, _, _ = expand_box(rec.xyxy, random_margins(self.margin_rate))
        crop = _resize(wrap_crop(image, ext), self.crop_size)
        mask = _resize(box_mask_crop(rec.xyxy, image.shape[:2], ext, wrap=True), self.crop_size)
        if torch.rand(1).item() > 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            mask = mask.transpose(Image.FLIP_LEFT_RIGHT)
        student = self.student_aug(crop.copy())
        return {
            "image": _to_input(student),
            "timage": _to_input(crop),
            "mask": _mask_tensor(mask),
            "bbox": torch.tensor(rec.xyxy, dtype=torch.float32),
            "compact_category_id": torch.tensor(rec.compact_category_id, dtype=torch.int64),
            "ann_id": torch.tensor(rec.ann_id, dtype=torch.int64),
        }


class MALEvalDataset(Dataset):
    """Every box of a COCO file with TAO's deterministic test transform (fixed margin, wrap-cropped image,
    zero-padded box mask).  With ``load_mask`` the full-image GT mask is decoded into ``gt_mask``."""

    def __init__(self, records: Sequence[BoxRecord], img_root: Path, crop_size: int, test_margin: float,
                 load_mask: bool):
        self.records = SerializedList(records)  # workers share it without copying (serialized.py)
        self.img_root = Path(img_root)
        self.crop_size = int(crop_size)
        self.margins = [0.5 * float(test_margin)] * 4
        self.load_mask = bool(load_mask)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        rec = self.records[idx]
        image = np.asarray(_load_image(self.img_root, rec))
        hw = image.shape[:2]
        ext, _, _ = expand_box(rec.xyxy, self.margins)
        crop = _resize(wrap_crop(image, ext), self.crop_size)
        boxmask = _resize(box_mask_crop(rec.xyxy, hw, ext, wrap=False), self.crop_size)
        gt = None
        if self.load_mask:
            gt = ann_to_mask(rec.segmentation, rec.height, rec.width,
                             where=f"{rec.file_name}: annotation {rec.ann_id}")
        return {
            "image": _to_input(crop),
            "boxmask": _mask_tensor(boxmask),
            "bbox": torch.tensor(rec.xyxy, dtype=torch.float32),
            "ext_box": torch.from_numpy(ext),
            "image_hw": torch.tensor(hw, dtype=torch.int64),
            "category_id": torch.tensor(rec.category_id, dtype=torch.int64),
            "compact_category_id": torch.tensor(rec.compact_category_id, dtype=torch.int64),
            "ann_id": torch.tensor(rec.ann_id, dtype=torch.int64),
            "image_id": torch.tensor(rec.image_id, dtype=torch.int64),
            "iscrowd": torch.tensor(rec.iscrowd, dtype=torch.int64),
            "gt_mask": gt,
        }


def collate_eval(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensor fields of eval samples; ``gt_mask`` stays a list (full-image masks differ in size)."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


# ------------------------------------------------------------------------------------------------ datamodule
def _degenerate_count(records: Sequence[BoxRecord]) -> int:
    n = 0
    for r in records:
        x0, y0, x1, y1 = r.xyxy
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, r.width), min(y1, r.height)
        if cx1 - cx0 <= 0 or cy1 - cy0 <= 0:
            n += 1
    return n


class MALDataModule(pl.LightningDataModule):
    """Loaders for one action: ``fit`` (train + val), ``validate``/``test`` (val), ``predict`` (inference).

    Paths: train → ``dataset.train_*``; val/test → ``dataset.val_*``; predict → ``inference.ann_path/img_dir``
    with ``inference.load_mask``.  Image dirs may be archives.  Workers per process =
    ``dataset.num_workers_per_gpu``.  Batch sizes: train/val ``train.batch_size``, test
    ``evaluate.batch_size``, predict ``inference.batch_size``.
    """

    def __init__(self, cfg: Any, ctx: Any):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        self.log_: logging.Logger = getattr(ctx, "log", None) or _log
        self.train_dataset: MALTrainDataset | None = None
        self.val_dataset: MALEvalDataset | None = None
        self.predict_dataset: MALEvalDataset | None = None
        self.coco: dict[str, dict] = {}

    # -- building blocks ------------------------------------------------------------------------------------
    def build_train(self) -> MALTrainDataset:
        """Load and filter the training boxes; logs how many were kept and why others were dropped."""
        d = self.cfg.dataset
        records, coco = load_records(d.train_ann_path, field="dataset.train_ann_path")
        self.coco["train"] = coco
        kept, reasons = filter_train_records(records, float(d.min_obj_size), float(d.max_obj_size))
        detail = ", ".join(f"{n} {why}" for why, n in reasons.items())
        self.log_.info("MAL train: %d of %d boxes in %s kept%s", len(kept), len(records), d.train_ann_path,
                       f" ({len(records) - len(kept)} filtered: {detail})" if detail else "")
        if not kept:
            raise DataError("dataset.train_ann_path", f"no training box in {d.train_ann_path} passes the filter "
                            f"({detail or 'no annotations'})",
                            "lower dataset.min_obj_size or check the boxes (x,y,w,h inside the image, w,h > 2)")
        root = resolve_dir(d.train_img_dir, field="dataset.train_img_dir")
        _check_images(kept, root, d.train_ann_path)
        return MALTrainDataset(kept, root, d.crop_size, list(self.cfg.train.margin_rate))

    def build_eval(self, ann_path: str, img_dir: str, load_mask: bool, *, ann_field: str, img_field: str,
                   split: str) -> MALEvalDataset:
        """Every box of ``ann_path`` (no filter); the file must have annotations, and with ``load_mask`` each must
        have a segmentation without polygons of fewer than 3 points."""
        # No annotations is an error here, for inference too: MAL labels the given boxes, so an empty file
        # would give an empty label file (and an evaluation without boxes has nothing to score).
        records, coco = load_records(ann_path, field=ann_field, need_segmentation=load_mask, need_annotations=True)
        self.coco[split] = coco
        bad = _degenerate_count(records)
        if bad:
            self.log_.warning("MAL %s: %d of %d boxes in %s are empty or outside their image after clipping; "
                              "they are kept and get an empty or clipped mask", split, bad, len(records), ann_path)
        root = resolve_dir(img_dir, field=img_field)
        _check_images(records, root, ann_path)
        return MALEvalDataset(records, root, self.cfg.dataset.crop_size,
                              float(self.cfg.train.test_margin_rate[0]), load_mask)

    def _val(self) -> MALEvalDataset:
        d = self.cfg.dataset
        return self.build_eval(d.val_ann_path, d.val_img_dir, bool(d.load_mask), ann_field="dataset.val_ann_path",
                               img_field="dataset.val_img_dir", split="val")

    # -- Lightning hooks --------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (idempotent)."""
        if stage in (None, "fit"):
            if self.train_dataset is None:
                self.train_dataset = self.build_train()
        if stage in (None, "fit", "validate", "test") and self.val_dataset is None:
            self.val_dataset = self._val()
        if stage in (None, "predict") and self.predict_dataset is None:
            inf = self.cfg.inference
            self.predict_dataset = self.build_eval(
                inf.ann_path, inf.img_dir, bool(inf.load_mask), ann_field="inference.ann_path",
                img_field="inference.img_dir", split="inference")

    def _loader(self, ds: Dataset, batch_size: int, *, train: bool) -> DataLoader:
        workers = int(self.cfg.dataset.num_workers_per_gpu)
        if train:  # order and augmentations from (train.seed, epoch): exact resume (networks/common/sampling.py)
            return training_loader(ds, batch_size=batch_size, seed=self.cfg.train.seed, num_workers=workers,
                                   persistent_workers=False)
        return DataLoader(ds, batch_size=int(batch_size), num_workers=workers, collate_fn=collate_eval,
                          generator=private_generator())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.cfg.train.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, self.cfg.train.batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, self.cfg.evaluate.batch_size, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset, self.cfg.inference.batch_size, train=False)

    def categories(self, split: str) -> list[dict]:
        """The ``categories`` list of the JSON loaded for ``split`` ("train", "val", "inference")."""
        return list(self.coco[split]["categories"])

