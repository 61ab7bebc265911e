"""Mask2Former datasets: label map, the three TAO dataset types, augmentation, collate and the DataModule.

Class indices: the model's class axis has C+1 entries, **index 0 = no-object** (TAO convention), real classes
are 1..C.  Category id → class index: with ``contiguous_id=False`` the category id itself (must be in 1..C);
with ``contiguous_id=True`` the position in the label map + 1.

Dataset types (``dataset.<split>.type``):

* ``ade``: JSONL lines ``{"img": path, "segm": path}`` (joined to ``root_dir``); the segm PNG holds category ids
  per pixel, 0 = ignore (255 too unless it is in the label map).  One target mask per class present.
* ``coco``: COCO instances JSON + ``img_dir``.  Non-crowd annotations are painted in file order, later ones
  overwrite earlier ones, so target masks are disjoint (TAO); crowd annotations are left out of training.
* ``coco_panoptic``: COCO panoptic JSON + PNG dir (``rgb2id``); crowd segments become ignore pixels.

``img_dir`` and ``panoptic_dir`` may be folders or archives (see :func:`networks.common.sources.resolve_dir`).

A sample is a dict: ``image`` float [3, h, w] normalised (``(img/255 - mean)/std``, RGB), ``masks`` bool
[N, h, w], ``labels`` int64 [N] (1..C), ``sem_seg`` int64 [h, w] (class index, 0 = ignore), ``image_id``,
``file_name``, ``orig_size`` (H0, W0) of the image file, and ``gt`` (evaluation only): the ground truth at the
**original** resolution (see :meth:`Mask2FormerDataset.full_res_gt`).  :func:`collate` pads a batch at the
bottom/right to a common size divisible by 32 – after normalisation, with 0 – and returns a ``pixel_mask``
(True = valid pixel).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from networks.common.errors import CheckpointError, ConfigError, DataError, TaoUserError
from networks.common.io import read_json
from networks.common.sampling import private_generator, sample_rng, training_loader
from networks.common.sources import IMAGE_EXTENSIONS, list_images, read_rgb
from networks.ops.padding import pad_images

__all__ = [
    "Category",
    "LabelMap",
    "load_label_map",
    "expand_min_sizes",
    "resize_shortest_edge_shape",
    "Augmentation",
    "Mask2FormerDataset",
    "PredictDataset",
    "collate",
    "Mask2FormerDataModule",
    "SIZE_DIVISIBILITY",
]

SIZE_DIVISIBILITY = 32


# ------------------------------------------------------------------------------------------ label map
@dataclass
class Category:
    """One label-map entry: dataset ``id``, ``name``, RGB ``color`` (0..255) and ``isthing``."""

    id: int
    name: str
    color: tuple[int, int, int]
    isthing: bool


class LabelMap:
    """The classes of a run and the mapping between dataset category ids and model class indices (1..C)."""

    def __init__(self, categories: list[Category], num_classes: int, contiguous: bool):
        self.categories = categories
        self.num_classes = int(num_classes)
        self.contiguous = bool(contiguous)
        self._by_id = {c.id: c for c in categories}
        if contiguous:
            self._id_to_index = {c.id: i + 1 for i, c in enumerate(categories)}
        else:
            self._id_to_index = {c.id: c.id for c in categories}
        self._index_to_cat = {v: self._by_id[k] for k, v in self._id_to_index.items()}

    def __len__(self) -> int:
        return len(self.categories)

    def has_id(self, category_id: int) -> bool:
        """Whether ``category_id`` is in the label map."""
        return int(category_id) in self._id_to_index

    def class_index(self, category_id: int) -> int:
        """Model class index (1..C) of a dataset category id; KeyError when it is not in the label map."""
        return self._id_to_index[int(category_id)]

    def category_id(self, class_index: int) -> int:
        """Dataset category id of a model class index (1..C); the index itself for unnamed classes."""
        cat = self._index_to_cat.get(int(class_index))
        return cat.id if cat is not None else int(class_index)

    def category(self, class_index: int) -> Category | None:
        """The label-map entry of a class index (1..C), or None for an unnamed class."""
        return self._index_to_cat.get(int(class_index))

    def name(self, class_index: int) -> str:
        """Display name of a class index (1..C)."""
        cat = self.category(class_index)
        return cat.name if cat is not None else f"class_{class_index}"

    def thing_classes(self) -> np.ndarray:
        """bool [C]: entry k tells whether class index k+1 is a thing (unnamed classes count as things)."""
        out = np.ones(self.num_classes, dtype=bool)
        for idx, cat in self._index_to_cat.items():
            out[idx - 1] = cat.isthing
        return out

    def has_stuff(self) -> bool:
        """True when any label-map class is stuff (isthing 0)."""
        return any(not c.isthing for c in self.categories)

    def colors(self) -> np.ndarray:
        """uint8 [C+1, 3] RGB colours indexed by class index (row 0 = black, for ignore/void)."""
        from networks.common.visualize import palette

        table = np.zeros((self.num_classes + 1, 3), dtype=np.uint8)
        fallback = palette(self.num_classes + 1, seed=7)
        for idx in range(1, self.num_classes + 1):
            cat = self._index_to_cat.get(idx)
            table[idx] = cat.color if cat is not None else fallback[idx]
        return table

    def coco_categories(self) -> list[dict]:
        """COCO ``categories`` list (dataset ids) for metrics and result files."""
        return [{"id": c.id, "name": c.name, "isthing": int(c.isthing), "color": list(c.color)}
                for c in self.categories]


def load_label_map(path: str | os.PathLike, num_classes: int, contiguous_id: bool,
                   field: str = "dataset.label_map") -> LabelMap:
    """Read a label-map JSON list ``[{"id", "name", "color"?, "isthing"?}]`` and check it against num_classes.

    Raises :class:`DataError` naming the file (and the offending ids) when the file is missing or malformed,
    ids repeat, or ids do not fit ``model.sem_seg_head.num_classes`` (1..C without ``contiguous_id``; at most C
    entries with it).
    """
    from networks.common.visualize import palette

    p = Path(os.path.expanduser(str(path)))
    data = read_json(path, field=field, hint="point it at a JSON list of categories")
    if isinstance(data, dict) and isinstance(data.get("categories"), list):
        data = data["categories"]
    if not isinstance(data, list) or not data:
        raise DataError(str(p), "must be a non-empty JSON list of {id, name, color, isthing}")
    colors = palette(len(data), seed=3)
    cats: list[Category] = []
    seen: set[int] = set()
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "id" not in entry:
            raise DataError(f"{p}[{i}]", "entry needs an integer 'id'")
        try:
            cid = int(entry["id"])
        except (TypeError, ValueError) as exc:
            raise DataError(f"{p}[{i}]", f"id {entry['id']!r} is not an integer") from exc
        if cid in seen:
            raise DataError(f"{p}[{i}]", f"id {cid} appears twice")
        seen.add(cid)
        color = entry.get("color")
        if not (isinstance(color, (list, tuple)) and len(color) == 3):
            color = colors[i]
        cats.append(Category(cid, str(entry.get("name", cid)), tuple(int(v) for v in color),
                             bool(int(entry.get("isthing", 1)))))
    if contiguous_id:
        if len(cats) > num_classes:
            raise DataError(str(p), f"has {len(cats)} categories but model.sem_seg_head.num_classes={num_classes}",
                            "set num_classes to at least the number of label-map entries")
    else:
        bad = sorted(c.id for c in cats if not 1 <= c.id <= num_classes)
        if bad:
            raise DataError(str(p), f"category ids {bad[:10]} are outside 1..{num_classes} "
                            f"(model.sem_seg_head.num_classes)",
                            "raise num_classes to the largest id or set dataset.contiguous_id=True")
    return LabelMap(cats, num_classes, contiguous_id)


# ------------------------------------------------------------------------------------------- records
@dataclass
class _Record:
    image_path: Path
    image_id: int
    file_name: str
    kind: str
    segm_path: Path | None = None
    annotations: list | None = None
    png_path: Path | None = None
    segments: list | None = None
    height: int | None = None
    width: int | None = None


def _unknown_ids_error(where: str, ids: set[int], label_map: LabelMap) -> DataError:
    known = sorted(c.id for c in label_map.categories)
    return DataError(where, f"category ids {sorted(ids)[:10]} are used by the annotations but are not in "
                     f"dataset.label_map (ids {known[:10]}{'...' if len(known) > 10 else ''})",
                     "add them to the label map (and num_classes) or fix the annotations")


def _load_records(split: Any, key: str, label_map: LabelMap) -> list[_Record]:
    """Records of one split.  COCO files are checked first by the shared rules (``networks/common/dataset_rules``,
    what ``tao dataset validate`` reports): an error names the file and record; in ``train`` a polygon of fewer
    than 3 points is skipped and a box outside its image clipped (one warning each), in ``val`` both are errors
    (they would make the metric wrong)."""
    from networks.common.coco_io import load_coco
    from networks.common.dataset_rules import validate_coco, validate_panoptic
    from networks.common.sources import resolve_dir

    kind = split.type
    if kind == "ade":
        annot = Path(os.path.expanduser(split.annot_file))
        if not annot.is_file():
            raise DataError(f"dataset.{key}.annot_file", f"'{split.annot_file}' does not exist")
        root = Path(os.path.expanduser(split.root_dir)) if split.root_dir else None
        records = []
        with open(annot, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{annot}:{lineno}", f"invalid JSON: {exc.msg}") from exc
                if not isinstance(obj, dict) or "img" not in obj or "segm" not in obj:
                    raise DataError(f"{annot}:{lineno}", "each line needs 'img' and 'segm' paths")
                img = Path(obj["img"]) if root is None else root / obj["img"]
                segm = Path(obj["segm"]) if root is None else root / obj["segm"]
                records.append(_Record(img, len(records) + 1, str(obj["img"]), kind, segm_path=segm))
        if not records:
            raise DataError(str(annot), "has no samples")
        return records

    img_dir = resolve_dir(split.img_dir, field=f"dataset.{key}.img_dir")
    if kind == "coco":
        data = validate_coco(load_coco(split.instance_json, field=f"dataset.{key}.instance_json"),
                             split.instance_json, need_segmentation=True, need_annotations=True,
                             train=key == "train")
        used = {int(a["category_id"]) for a in data["annotations"]}
        unknown = {c for c in used if not label_map.has_id(c)}
        if unknown:
            raise _unknown_ids_error(str(split.instance_json), unknown, label_map)
        by_image: dict[int, list] = {}
        for a in data["annotations"]:
            by_image.setdefault(int(a["image_id"]), []).append(a)
        return [_Record(img_dir / im["file_name"], int(im["id"]), im["file_name"], kind,
                        annotations=by_image.get(int(im["id"]), []), height=im.get("height"), width=im.get("width"))
                for im in data["images"]]

    data = validate_panoptic(load_coco(split.panoptic_json, field=f"dataset.{key}.panoptic_json"),
                             split.panoptic_json, need_annotations=True, train=key == "train")
    pan_dir = resolve_dir(split.panoptic_dir, field=f"dataset.{key}.panoptic_dir")
    used = {int(s["category_id"]) for a in data["annotations"] for s in a.get("segments_info", [])}
    unknown = {c for c in used if not label_map.has_id(c)}
    if unknown:
        raise _unknown_ids_error(str(split.panoptic_json), unknown, label_map)
    images = {int(im["id"]): im for im in data["images"]}
    records = []
    for i, a in enumerate(data["annotations"]):
        im = images.get(int(a["image_id"]))
        if im is None:
            raise DataError(f"{split.panoptic_json}: annotations[{i}]", f"image_id {a['image_id']} is not in 'images'")
        records.append(_Record(img_dir / im["file_name"], int(im["id"]), im["file_name"], kind,
                               png_path=pan_dir / a["file_name"], segments=a.get("segments_info", []),
                               height=im.get("height"), width=im.get("width")))
    return records


# -------------------------------------------------------------------------------------- augmentation
def expand_min_sizes(train_min_size: list[int], crop_size: list[int]) -> list[int]:
    """TAO's short-side choices: one value s → ``range(s//2, 2s+64, 64)``; [] → ``[min(crop_size)]``."""
    sizes = [int(s) for s in train_min_size]
    if len(sizes) == 1:
        s = sizes[0]
        return list(range(s // 2, 2 * s + 64, 64))
    if not sizes:
        return [int(min(crop_size))]
    return sizes


def resize_shortest_edge_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) when the short side becomes ``short`` and the long side is capped at ``max_size``."""
    scale = short / min(h, w)
    nh, nw = (short, scale * w) if h < w else (scale * h, short)
    if max(nh, nw) > max_size:
        s = max_size / max(nh, nw)
        nh, nw = nh * s, nw * s
    return int(nh + 0.5), int(nw + 0.5)


def _resize_nearest(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer map (any dtype), pixel-centre aligned."""
    H, W = arr.shape[:2]
    if (H, W) == (h, w):
        return arr
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(np.int64), W - 1)
    return arr[rows[:, None], cols[None, :]]


def _resize_image(img: np.ndarray, h: int, w: int) -> np.ndarray:
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


class Augmentation:
    """TAO's pipeline on (uint8 RGB image [H, W, 3], int64 id map [H, W]) pairs; numpy + PIL, no OpenCV.

    Train: optional resize to ``target_size`` → horizontal flip (p .5) → SSD colour jitter → resize shortest
    edge (random choice of ``min_sizes``, long side ≤ ``max_size``) → random crop ``crop_size`` [H, W] where
    no single id other than 0 covers ≥ 60 % (10 tries).  Test: optional ``target_size`` → resize shortest
    edge (``min_sizes[0]``, ``max_size``).  Ids are resized with nearest neighbour.
    """

    def __init__(self, train: bool, min_sizes: list[int], max_size: int, crop_size: list[int] | None = None,
                 target_size: list[int] | None = None, max_ratio: float = 0.6):
        self.train = train
        self.min_sizes = list(min_sizes)
        self.max_size = int(max_size)
        self.crop_size = list(crop_size) if crop_size else None
        ts = list(target_size or [])
        self.target_size = (ts * 2 if len(ts) == 1 else ts) or None  # [W, H]
        self.max_ratio = max_ratio

    def __call__(self, img: np.ndarray, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Return the augmented (image, id map)."""
        if self.target_size:
            w, h = self.target_size
            img, ids = _resize_image(img, h, w), _resize_nearest(ids, h, w)
        if self.train:
            if rng.random() < 0.5:
                img, ids = img[:, ::-1].copy(), ids[:, ::-1].copy()
            img = color_aug_ssd(img, rng)
            short = int(rng.choice(self.min_sizes))
        else:
            short = self.min_sizes[0]
        h, w = resize_shortest_edge_shape(img.shape[0], img.shape[1], short, self.max_size)
        img, ids = _resize_image(img, h, w), _resize_nearest(ids, h, w)
        if self.train and self.crop_size:
            img, ids = self._crop(img, ids, rng)
        return img, ids

    def _crop(self, img: np.ndarray, ids: np.ndarray, rng: np.random.Generator):
        H, W = ids.shape
        ch, cw = min(self.crop_size[0], H), min(self.crop_size[1], W)
        y0 = x0 = 0
        for _ in range(10):
            y0 = int(rng.integers(0, H - ch + 1))
            x0 = int(rng.integers(0, W - cw + 1))
            labels, cnt = np.unique(ids[y0:y0 + ch, x0:x0 + cw], return_counts=True)
            cnt = cnt[labels != 0]
            if len(cnt) > 1 and cnt.max() < cnt.sum() * self.max_ratio:
                break
        return img[y0:y0 + ch, x0:x0 + cw].copy(), ids[y0:y0 + ch, x0:x0 + cw].copy()


def color_aug_ssd(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SSD photometric distortion on uint8 RGB: brightness ±32, then contrast ×[.5,1.5] before or after
    saturation ×[.5,1.5] and hue ±18 (OpenCV units = ±36°); each step with probability .5."""
    out = img.astype(np.float32)

    def brightness(x):
        return x + rng.uniform(-32, 32) if rng.random() < 0.5 else x

    def contrast(x):
        return x * rng.uniform(0.5, 1.5) if rng.random() < 0.5 else x

    def sat_hue(x):
        do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
        if not (do_sat or do_hue):
            return x
        hsv = np.asarray(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
        if do_sat:
            hsv[..., 1] = hsv[..., 1] * rng.uniform(0.5, 1.5)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18) * 256.0 / 180.0) % 256.0
        hsv = np.clip(hsv, 0, 255).astype(np.uint8)
        return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB")).astype(np.float32)

    out = brightness(out)
    if rng.random() < 0.5:
        out = sat_hue(contrast(out))
    else:
        out = contrast(sat_hue(out))
    return np.clip(out, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ datasets
def _read_rgb(path: Path) -> np.ndarray:
    return np.array(read_rgb(path, hint="check img_dir / root_dir and the file names"))


def _map_ids(ids: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """int64 map ``mapping[id]`` per pixel (0 for ids not in ``mapping``); ids may be large (panoptic RGB ids)."""
    uniq, inverse = np.unique(ids, return_inverse=True)
    values = np.array([mapping.get(int(u), 0) for u in uniq], dtype=np.int64)
    return values[inverse].reshape(ids.shape)


def _normalise(img: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float() / 255.0
    return (x - torch.as_tensor(mean).view(3, 1, 1)) / torch.as_tensor(std).view(3, 1, 1)


class Mask2FormerDataset(Dataset):
    """Samples of one split (ade / coco / coco_panoptic) with augmentation; see the module docstring.

    Args:
        split: the ``dataset.<key>`` config section.
        key: ``train``, ``val`` or ``test`` (for error messages).
        label_map: classes of the run.
        augmentation: the (train or test) :class:`Augmentation`.
        pixel_mean, pixel_std: normalisation of img/255 (RGB).
        keep_gt: attach the original-resolution ground truth (``gt``) for evaluation.
    """

    def __init__(self, split: Any, key: str, label_map: LabelMap, augmentation: Augmentation,
                 pixel_mean: list[float], pixel_std: list[float], keep_gt: bool = False):
        self.key = key
        self.label_map = label_map
        self.aug = augmentation
        self.mean = np.asarray(pixel_mean, dtype=np.float32)
        self.std = np.asarray(pixel_std, dtype=np.float32)
        self.keep_gt = keep_gt
        from networks.common.serialized import SerializedList

        # one byte buffer: DataLoader workers read it without copying it page by page (serialized.py)
        self.records = SerializedList(_load_records(split, key, label_map))
        # Lookup category id -> class index for ade maps (values 0..65535).
        self._ade_lut: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records)

    # Decoding -----------------------------------------------------------------------------------
    def _ade_lookup(self) -> np.ndarray:
        if self._ade_lut is None:
            lut = np.full(65536, -1, dtype=np.int64)
            lut[0] = 0
            if not self.label_map.has_id(255):
                lut[255] = 0
            for c in self.label_map.categories:
                if 0 <= c.id < 65536:
                    lut[c.id] = self.label_map.class_index(c.id)
            self._ade_lut = lut
        return self._ade_lut

    def decode(self, rec: _Record) -> tuple[np.ndarray, np.ndarray, dict[int, int], dict[int, dict]]:
        """(RGB image, int64 id map (0 = ignore), {segment id: class index}, {segment id: GT segment info}).

        For ``ade`` the id map is the class-index map itself; for ``coco`` the ids are annotation order + 1
        (crowd annotations are absent from the map but listed in the info with ``iscrowd`` 1 and their own
        ids above the others); for ``coco_panoptic`` they are the PNG segment ids with crowd pixels set to 0.
        """
        from networks.common.coco_io import ann_to_mask, load_panoptic_png

        img = _read_rgb(rec.image_path)
        H, W = img.shape[:2]
        info: dict[int, dict] = {}
        if rec.kind == "ade":
            if not rec.segm_path.is_file():
                raise DataError(str(rec.segm_path), "segmentation PNG does not exist", "check root_dir and annot_file")
            with Image.open(rec.segm_path) as im:
                raw = np.asarray(im if im.mode in ("I", "I;16", "L") else im.convert("L")).astype(np.int64)
            if raw.shape != (H, W):
                raise DataError(str(rec.segm_path), f"size {raw.shape[::-1]} differs from image size {(W, H)}")
            lut = self._ade_lookup()
            ids = lut[np.clip(raw, 0, 65535)]
            if (ids < 0).any():
                bad = sorted(set(np.unique(raw[ids < 0]).tolist()))
                raise DataError(str(rec.segm_path), f"pixel values (category ids) {bad[:10]} are not in "
                                "dataset.label_map", "add them to the label map or fix the PNG")
            seg_cls = {int(c): int(c) for c in np.unique(ids) if c != 0}
            for c in seg_cls:
                cat = self.label_map.category(c)
                info[c] = {"id": c, "category_id": self.label_map.category_id(c), "iscrowd": 0,
                           "isthing": int(cat.isthing) if cat else 1}
            return img, ids, seg_cls, info

        if rec.kind == "coco":
            ids = np.zeros((H, W), dtype=np.int64)
            seg_cls = {}
            crowd = []
            for i, ann in enumerate(rec.annotations):
                where = f"{rec.file_name}: annotation id {ann.get('id')}"
                if ann.get("iscrowd", 0):
                    crowd.append(ann)
                    continue
                m = ann_to_mask(ann["segmentation"], H, W, where=where).astype(bool)
                ids[m] = i + 1
                seg_cls[i + 1] = self.label_map.class_index(int(ann["category_id"]))
                info[i + 1] = {"id": i + 1, "category_id": int(ann["category_id"]), "iscrowd": 0,
                               "isthing": 1}
            present = set(np.unique(ids).tolist())
            seg_cls = {k: v for k, v in seg_cls.items() if k in present}
            info = {k: v for k, v in info.items() if k in present}
            if self.keep_gt:
                # Crowd regions matter for evaluation (PQ ignores predictions on them; COCO AP too).
                next_id = len(rec.annotations) + 1
                for j, ann in enumerate(crowd):
                    m = ann_to_mask(ann["segmentation"], H, W).astype(bool) & (ids == 0)
                    info[next_id + j] = {"id": next_id + j, "category_id": int(ann["category_id"]),
                                         "iscrowd": 1, "isthing": 1, "_mask": m}
            for v in info.values():
                cat = self.label_map.category(self.label_map.class_index(v["category_id"]))
                v["isthing"] = int(cat.isthing) if cat else 1
            return img, ids, seg_cls, info

        ids = load_panoptic_png(rec.png_path)
        if ids.shape != (H, W):
            raise DataError(str(rec.png_path), f"size {ids.shape[::-1]} differs from image size {(W, H)}")
        seg_cls = {}
        keep = np.zeros(ids.shape, dtype=bool)
        for s in rec.segments:
            sid, cid = int(s["id"]), int(s["category_id"])
            cat = self.label_map.category(self.label_map.class_index(cid))
            info[sid] = {"id": sid, "category_id": cid, "iscrowd": int(s.get("iscrowd", 0)),
                         "isthing": int(cat.isthing) if cat else 1}
            if s.get("iscrowd", 0):
                continue
            seg_cls[sid] = self.label_map.class_index(cid)
            keep |= ids == sid
        full_ids = ids
        ids = np.where(keep, ids, 0)
        if self.keep_gt:
            for sid, v in info.items():
                if v["iscrowd"]:
                    v["_mask"] = full_ids == sid
        return img, ids, seg_cls, info

    def full_res_gt(self, rec: _Record, ids: np.ndarray, seg_cls: dict[int, int], info: dict[int, dict]) -> dict:
        """Ground truth at the image file's resolution, for metrics.

        ``sem_seg`` int64 [H0, W0] class index (0 = ignore); ``pan_ids`` int64 [H0, W0] segment ids (0 = void,
        crowd included) with ``segments`` ``[{id, category_id (dataset id), iscrowd, isthing}]``; and
        ``instances``: COCO annotations (compressed RLE, dataset category ids, ``area``, ``bbox`` xywh px).
        """
        from networks.common.coco_io import mask_to_rle, rle_area, rle_to_bbox

        sem = _map_ids(ids, seg_cls)
        pan = ids.copy()
        for sid, v in info.items():
            if "_mask" in v:
                pan[v.pop("_mask")] = sid
        segments = list(info.values())
        instances = []
        for seg in segments:
            if not seg["isthing"] and rec.kind != "coco":
                continue
            m = pan == seg["id"]
            if not m.any():
                continue
            rle = mask_to_rle(m)
            instances.append({"image_id": rec.image_id, "category_id": seg["category_id"],
                              "segmentation": rle, "area": float(rle_area(rle)), "bbox": rle_to_bbox(rle),
                              "iscrowd": int(seg["iscrowd"])})
        return {"sem_seg": sem, "pan_ids": pan, "segments": segments, "instances": instances,
                "height": int(ids.shape[0]), "width": int(ids.shape[1])}

    def __getitem__(self, index: int) -> dict:
        try:
            return self._load(index)
        except TaoUserError as exc:
            return _error_sample(exc)

    def _load(self, index: int) -> dict:
        rec = self.records[index]
        img, ids, seg_cls, info = self.decode(rec)
        orig_size = img.shape[:2]
        gt = self.full_res_gt(rec, ids, seg_cls, info) if self.keep_gt else None
        img, ids = self.aug(img, ids, sample_rng(index))
        present = [int(s) for s in np.unique(ids) if s != 0 and int(s) in seg_cls]
        if present:
            masks = torch.from_numpy(np.stack([ids == s for s in present]))
        else:
            masks = torch.zeros((0,) + ids.shape, dtype=torch.bool)
        labels = torch.as_tensor([seg_cls[s] for s in present], dtype=torch.int64)
        return {
            "image": _normalise(img, self.mean, self.std),
            "masks": masks,
            "labels": labels,
            "sem_seg": torch.from_numpy(_map_ids(ids, seg_cls)),
            "image_id": rec.image_id,
            "file_name": rec.file_name,
            "orig_size": (int(orig_size[0]), int(orig_size[1])),
            "gt": gt,
        }


class PredictDataset(Dataset):
    """Images of ``dataset.test.img_dir`` (folder or archive) with the test resize; no annotations."""

    def __init__(self, img_dir: str, augmentation: Augmentation, pixel_mean: list[float],
                 pixel_std: list[float], field: str = "dataset.test.img_dir"):
        from networks.common.sources import resolve_dir

        self.root = resolve_dir(img_dir, field=field)
        self.files = list_images(self.root)
        if not self.files:
            raise DataError(field, f"no images ({', '.join(IMAGE_EXTENSIONS)}) under '{img_dir}'")
        self.aug = augmentation
        self.mean = np.asarray(pixel_mean, dtype=np.float32)
        self.std = np.asarray(pixel_std, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        try:
            return self._load(index)
        except TaoUserError as exc:
            return _error_sample(exc)

    def _load(self, index: int) -> dict:
        path = self.files[index]
        img = _read_rgb(path)
        orig = img.shape[:2]
        dummy = np.zeros(orig, dtype=np.int64)
        img_aug, _ = self.aug(img, dummy, np.random.default_rng(0))
        return {"image": _normalise(img_aug, self.mean, self.std), "masks": torch.zeros((0,) + img_aug.shape[:2],
                dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.int64),
                "sem_seg": torch.zeros(img_aug.shape[:2], dtype=torch.int64), "image_id": index + 1,
                "file_name": str(path.relative_to(self.root)), "orig_size": (int(orig[0]), int(orig[1])),
                "gt": None, "path": str(path)}


_USER_ERRORS = {cls.__name__: cls for cls in (DataError, ConfigError, CheckpointError, TaoUserError)}


def _error_sample(exc: TaoUserError) -> dict:
    """A user error as plain data: DataLoader workers cannot re-create TaoUserError in the main process."""
    return {"_error": (type(exc).__name__, exc.subject, exc.problem, exc.hint)}


def raise_if_error(batch: dict) -> None:
    """Re-raise (in the main process) a user error that a worker turned into a batch (see :func:`collate`)."""
    if isinstance(batch, dict) and "_error" in batch:
        name, subject, problem, hint = batch["_error"]
        raise _USER_ERRORS.get(name, DataError)(subject, problem, hint)


def collate(samples: list[dict], size_divisibility: int = SIZE_DIVISIBILITY) -> dict:
    """Pad a list of samples to one batch (bottom/right, to the batch max rounded up to ``size_divisibility``).

    Returns ``images`` float [B, 3, Hp, Wp] (padding = 0 after normalisation), ``pixel_mask`` bool
    [B, Hp, Wp] (True = valid pixel; :func:`networks.ops.padding.pad_images`), ``sem_seg`` int64 [B, Hp, Wp]
    (0 = ignore, also on padding),
    ``targets`` ``[{"labels" [N], "masks" bool [N, Hp, Wp], "valid_extent" float [2] = (w/Wp, h/Hp)}]``,
    ``image_sizes`` [(h, w)] before padding, and per-image ``orig_sizes``, ``image_ids``, ``file_names``,
    ``gts`` (and ``paths`` for prediction).  If a sample failed with a user error (bad record), the batch is
    ``{"_error": ...}`` instead and :func:`raise_if_error` raises it where it can reach the user.
    """
    for s in samples:
        if "_error" in s:
            return {"_error": s["_error"]}
    hs = [s["image"].shape[1] for s in samples]
    ws = [s["image"].shape[2] for s in samples]
    images, pixel_mask = pad_images([s["image"] for s in samples], size_divisibility)
    B, _, Hp, Wp = images.shape
    sem = torch.zeros((B, Hp, Wp), dtype=torch.int64)
    targets = []
    for i, s in enumerate(samples):
        h, w = hs[i], ws[i]
        sem[i, :h, :w] = s["sem_seg"]
        masks = torch.zeros((s["masks"].shape[0], Hp, Wp), dtype=torch.bool)
        masks[:, :h, :w] = s["masks"]
        targets.append({"labels": s["labels"], "masks": masks,
                        "valid_extent": torch.tensor([w / Wp, h / Hp], dtype=torch.float32)})
    batch = {
        "images": images,
        "pixel_mask": pixel_mask,
        "sem_seg": sem,
        "targets": targets,
        "image_sizes": list(zip(hs, ws, strict=False)),
        "orig_sizes": [s["orig_size"] for s in samples],
        "image_ids": [s["image_id"] for s in samples],
        "file_names": [s["file_name"] for s in samples],
        "gts": [s["gt"] for s in samples],
    }
    if "path" in samples[0]:
        batch["paths"] = [s["path"] for s in samples]
    return batch


# ---------------------------------------------------------------------------------------- datamodule
try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - lightning is a hard dependency; keep import errors readable
    import lightning.pytorch as pl  # type: ignore


class Mask2FormerDataModule(pl.LightningDataModule):
    """Loaders for one action: train (+ val), evaluate (val, via ``test_dataloader``), inference (test images).

    Train drops the last partial batch (as TAO); evaluation and inference keep every image (TAO drops them).
    Batch size: ``dataset.<split>.batch_size``, or ``evaluate/inference.batch_size`` when it is > 0.
    """

    def __init__(self, cfg: Any, ctx: Any):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        self.action: str = ctx.action
        ds = cfg.dataset
        self.label_map = load_label_map(ds.label_map, cfg.model.sem_seg_head.num_classes, ds.contiguous_id) \
            if ds.label_map else None
        aug = ds.augmentation
        self.train_aug = Augmentation(True, expand_min_sizes(aug.train_min_size, aug.train_crop_size),
                                      aug.train_max_size, aug.train_crop_size, ds.train.target_size)
        self.val_aug = Augmentation(False, [aug.test_min_size], aug.test_max_size, None, ds.val.target_size)
        self.test_aug = Augmentation(False, [aug.test_min_size], aug.test_max_size, None, ds.test.target_size)
        self.train_dataset = self.val_dataset = self.predict_dataset = None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Raise a dataset user error (DataError naming the file/record) in the main process."""
        raise_if_error(batch)
        return batch

    def _require_label_map(self) -> LabelMap:
        if self.label_map is None:
            raise ConfigError("dataset.label_map", f"is required for {self.action}")
        return self.label_map

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (``fit``, ``validate``, ``test``, ``predict``)."""
        ds = self.cfg.dataset
        if stage in ("fit", None) and self.train_dataset is None:
            self.train_dataset = Mask2FormerDataset(ds.train, "train", self._require_label_map(), self.train_aug,
                                                    ds.pixel_mean, ds.pixel_std)
        if stage in ("fit", "validate", "test", None) and self.val_dataset is None:
            self.val_dataset = Mask2FormerDataset(ds.val, "val", self._require_label_map(), self.val_aug,
                                                  ds.pixel_mean, ds.pixel_std, keep_gt=True)
        if stage == "predict" and self.predict_dataset is None:
            self.predict_dataset = PredictDataset(ds.test.img_dir, self.test_aug, ds.pixel_mean, ds.pixel_std)

    def _loader(self, dataset, batch_size: int, num_workers: int, shuffle: bool, drop_last: bool) -> DataLoader:
        pin = bool(self.cfg.dataset.pin_memory) and torch.accelerator.is_available()
        if shuffle:  # order and augmentations from (train.seed, epoch): exact resume (networks/common/sampling.py)
            return training_loader(dataset, batch_size=batch_size, seed=self.cfg.train.seed, num_workers=num_workers,
                                   collate_fn=collate, drop_last=drop_last, pin_memory=pin)
        return DataLoader(dataset, batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
                          collate_fn=collate, pin_memory=pin, persistent_workers=num_workers > 0,
                          generator=private_generator())

    def _eval_batch(self, split_bs: int, section: str) -> int:
        bs = int(getattr(self.cfg, section).batch_size) if section in self.cfg else -1
        return bs if bs > 0 else int(split_bs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last partial batch is dropped when the set is larger than a batch."""
        tr = self.cfg.dataset.train
        drop = len(self.train_dataset) > tr.batch_size
        return self._loader(self.train_dataset, tr.batch_size, tr.num_workers, True, drop)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (every image)."""
        v = self.cfg.dataset.val
        bs = self._eval_batch(v.batch_size, "evaluate") if self.action == "evaluate" else v.batch_size
        return self._loader(self.val_dataset, bs, v.num_workers, False, False)

    def test_dataloader(self) -> DataLoader:
        """``evaluate`` runs on ``dataset.val`` (as TAO)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Inference images of ``dataset.test.img_dir``."""
        t = self.cfg.dataset.test
        return self._loader(self.predict_dataset, self._eval_batch(t.batch_size, "inference"), t.num_workers,
                            False, False)
