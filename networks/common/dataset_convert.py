"""Exact dataset conversions between COCO, ODVG and semantic PNGs (``tao dataset convert``).

Four conversions, each a function that tests call directly (``docs/datasets.md`` has the user's view):

* :func:`coco_to_odvg` — COCO instances → ODVG **detection** JSON lines + label map ``{"0": name, ...}``.
  TAO's contiguous-id convention: the label of an annotation is the **position** of its ``category_id`` in the
  file's ``categories`` list (0..C-1), which is what Mask Grounding DINO's COCO evaluation uses as the class index
  (``networks/mask_grounding_dino/data.py``); for a COCO file whose categories are listed by increasing id (all
  official files) that is the rank of the id.  One record per image, in ``images`` order (images without
  annotations give a record with no instances); instances in annotation-file order; crowd annotations are left
  out (ODVG has no crowd flag and the loader would train on them as objects).  ``bbox`` becomes absolute xyxy
  pixels, ``segmentation`` is copied verbatim into ``mask``, ``category`` carries the name.
* :func:`coco_to_odvg` with ``captions`` — COCO instances → ODVG **grounding** JSON lines.  The caption of an
  image is the first caption for its ``image_id`` in a COCO captions file (``captions_train2017.json``: a JSON
  object whose ``annotations`` are ``{"image_id", "caption"}``), else the image's own ``caption`` key.  Each
  non-crowd annotation becomes a region whose ``phrase`` is its category name.  Images without a caption, or
  with no non-crowd annotation (an empty grounding record would train as a *no-target* expression), are left out.
* :func:`odvg_to_coco` — ODVG detection → COCO instances (evaluation files).  Category ids are the label-map
  keys (0..C-1, what Mask Grounding DINO's and TAO's COCO evaluation need), or those of ``categories_from`` (a
  COCO file whose ``categories`` list, position k ↔ label k, restores the original ids).  Image ids are 1..N in
  line order, annotation ids 1..M, ``iscrowd`` 0, ``area`` the mask's pixel count.
* :func:`panoptic_to_semantic` — COCO panoptic → semantic PNGs (pixel value = ``category_id``; 0 = unlabelled:
  VOID and crowd segments, as Mask2Former reads them) + ``semantic.jsonl`` + ``label_map.json`` (the id mapping:
  the panoptic categories as a Mask2Former label map).  8-bit PNGs when every id is < 255, else 16-bit.

Exactness: masks and names are copied; a box's xyxy ↔ xywh arithmetic is done so that ODVG → COCO → ODVG gives
back the same floats, and COCO → ODVG → COCO gives back the same widths whenever the width is the shortest
decimal that adds up to the same ``x2`` (always so for COCO's 2-decimal boxes); see :func:`xyxy_to_xywh`.

Bad input is a one-line :class:`DataError` naming the file and the record (``file:line`` for JSON lines, the
record id for JSON).  Every output file is written atomically.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from networks.common.coco_io import (
    ann_to_rle,
    load_coco,
    load_odvg_label_map,
    load_panoptic_png,
    rle_area,
)
from networks.common.dataset_rules import (
    odvg_line_problems,
    raise_first,
    record_kind,
    validate_coco,
    validate_panoptic,
)
from networks.common.errors import DataError
from networks.common.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
)

__all__ = [
    "ConvertResult",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
    "label_map_from_categories",
    "coco_doc_to_odvg",
    "coco_to_odvg",
    "odvg_to_coco",
    "panoptic_to_semantic",
    "semantic_from_panoptic",
]


@dataclass
class ConvertResult:
    """What a conversion wrote (paths), how many records of each kind (``counts``) and what it left out (``notes``,
    one line each)."""

    written: list[Path] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _dump(obj: Any) -> str:
    # compact, as the synthetic set and TAO's tools write JSON lines: round trips compare bytes
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# ------------------------------------------------------------------------------------------------ boxes
def xywh_to_xyxy(box: list) -> list:
    """COCO ``[x, y, w, h]`` pixels → ODVG ``[x1, y1, x2, y2]`` pixels (ints stay ints)."""
    x, y, w, h = box
    return [x, y, x + w, y + h]


def _extent(lo: Any, hi: Any) -> Any:
    """The shortest-written ``e`` with ``lo + e == hi`` exactly (``hi - lo`` when that already holds and no shorter
    decimal does): the width that gives ``hi`` back when added to ``lo``."""
    if isinstance(lo, int) and isinstance(hi, int):
        return hi - lo
    diff = hi - lo
    # Shortest decimal first: a width written with 2 decimals comes back as written, not as 38.650000000000034.
    for digits in range(1, 18):
        cand = float(f"{diff:.{digits}g}")
        if lo + cand == hi:
            return cand
    cand = diff
    for _ in range(64):  # diff is within a few ulps of a width that adds up exactly
        if lo + cand == hi:
            return cand
        cand = math.nextafter(cand, math.inf if lo + cand < hi else -math.inf)
    return diff


def xyxy_to_xywh(box: list) -> list:
    """ODVG ``[x1, y1, x2, y2]`` → COCO ``[x, y, w, h]`` such that :func:`xywh_to_xyxy` gives the box back
    exactly (floating-point ``x2 - x1`` alone does not: ``0.1 + (0.30000000000000004 - 0.1) != ...`` in general)."""
    x1, y1, x2, y2 = box
    return [x1, y1, _extent(x1, x2), _extent(y1, y2)]


# ------------------------------------------------------------------------------------------------ labels
def label_map_from_categories(categories: list, where: str) -> tuple[dict[str, str], dict[Any, int]]:
    """COCO ``categories`` → (ODVG label map ``{"0": name, ...}``, ``{category_id: label}``); label = position in
    the list.  DataError (``where``) for a category without ``id``/``name`` or an id listed twice."""
    label_map: dict[str, str] = {}
    label_of: dict[Any, int] = {}
    for k, cat in enumerate(categories):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise DataError(where, f"categories[{k}] has no 'id' or 'name'", "each category needs an id and a name")
        if cat["id"] in label_of:
            raise DataError(where, f"category id {cat['id']!r} is listed twice", "category ids must be unique")
        label_of[cat["id"]] = k
        label_map[str(k)] = str(cat["name"])
    if not label_map:
        raise DataError(where, "has no categories", "an instances file lists its categories")
    return label_map, label_of


def _captions_by_image(captions: str | os.PathLike | None, doc: dict) -> dict[Any, str]:
    """``{image_id: caption}``: the first caption per image in the captions file, else the images' ``caption``."""
    found: dict[Any, str] = {}
    if captions is not None:
        cap_doc = read_json(captions, field="--captions", hint="give a COCO captions file (captions_train2017.json)",
                            invalid_hint="fix the captions file")
        anns = cap_doc.get("annotations") if isinstance(cap_doc, dict) else None
        if not isinstance(anns, list):
            raise DataError(str(captions), "has no 'annotations' list",
                            "a COCO captions file is {\"annotations\": [{\"image_id\", \"caption\"}, ...]}")
        for k, ann in enumerate(anns):
            if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
                label = f"annotation id {ann.get('id')}" if isinstance(ann, dict) and "id" in ann else f"annotations[{k}]"
                raise DataError(str(captions), f"{label} has no 'caption' string")
            if ann["caption"].strip():
                found.setdefault(ann.get("image_id"), ann["caption"].strip())
        return found
    for img in doc["images"]:
        if isinstance(img.get("caption"), str) and img["caption"].strip():
            found[img["id"]] = img["caption"].strip()
    return found


# ------------------------------------------------------------------------------------------------ COCO → ODVG
def coco_doc_to_odvg(doc: dict, where: str, *, captions: dict[Any, str] | None = None
                     ) -> tuple[list[dict], dict[str, str], dict[str, int]]:
    """A COCO instances dict that passed :func:`validate_coco` (with ``need_bbox``) → (ODVG records, label map,
    counts).  ``captions`` given → grounding records for the images it names; else detection records for every
    image.  See the module docstring."""
    label_map, label_of = label_map_from_categories(doc["categories"], where)
    by_image: dict[Any, list[dict]] = {img["id"]: [] for img in doc["images"]}
    counts = {"images": len(doc["images"]), "annotations": 0, "crowd_skipped": 0}
    for ann in doc["annotations"]:
        if ann.get("iscrowd"):
            counts["crowd_skipped"] += 1
            continue
        box = xywh_to_xyxy(ann["bbox"])
        cat = label_of[ann["category_id"]]
        if captions is None:
            item = {"bbox": box, "label": cat, "category": label_map[str(cat)], "mask": ann["segmentation"]}
        else:
            item = {"bbox": box, "phrase": label_map[str(cat)], "mask": ann["segmentation"]}
        by_image[ann["image_id"]].append(item)
        counts["annotations"] += 1
    records = []
    skipped_no_caption = skipped_empty = 0
    for img in doc["images"]:
        for key in ("file_name", "height", "width"):
            if key not in img:
                raise DataError(where, f"image id {img['id']} has no '{key}'", "every image needs file_name, height, width")
        head = {"file_name": img["file_name"], "height": img["height"], "width": img["width"]}
        items = by_image[img["id"]]
        if captions is None:
            records.append({**head, "detection": {"instances": items}})
            continue
        if img["id"] not in captions:
            skipped_no_caption += 1
        elif not items:
            skipped_empty += 1
        else:
            records.append({**head, "grounding": {"caption": captions[img["id"]], "regions": items}})
    if captions is not None:
        counts.update(images_without_caption=skipped_no_caption, images_without_regions=skipped_empty)
    counts["records"] = len(records)
    return records, label_map, counts


def coco_to_odvg(src: str | os.PathLike, out: str | os.PathLike, *, label_map_out: str | os.PathLike | None = None,
                 captions: str | os.PathLike | None = None, grounding: bool = False) -> ConvertResult:
    """Convert a COCO instances file to ODVG JSON lines at ``out``.

    Detection (default): also writes the label map to ``label_map_out`` (default ``<out stem>_labelmap.json``,
    TAO's ``annotations_odvg_labelmap.json`` naming).  ``grounding`` (or ``captions`` given): grounding records
    with captions from the ``captions`` file, else from the images' ``caption`` key; no label map.  The source is
    checked by the shared rules (:func:`validate_coco` with boxes and segmentations required; a polygon ring of
    fewer than 3 points is refused, since the ODVG loader would drop that instance; a box outside its image is
    copied as it is, the ODVG loader clips it).
    """
    where = str(src)
    doc = validate_coco(load_coco(src, field="SRC"), src, need_segmentation=True, need_bbox=True,
                        tolerate=("bbox_outside_image",),
                        segmentation_hint="ODVG needs a mask per instance: give every annotation a segmentation")
    cap = None
    if grounding or captions is not None:
        cap = _captions_by_image(captions, doc)
        if not cap:
            raise DataError(where if captions is None else str(captions), "no image has a caption",
                            "pass a COCO captions file with --captions, or give images a 'caption'")
    records, label_map, counts = coco_doc_to_odvg(doc, where, captions=cap)
    result = ConvertResult(counts=counts)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.written.append(atomic_write_text(out, "".join(_dump(r) + "\n" for r in records)))
    if cap is None:
        lm_path = Path(label_map_out) if label_map_out else out.with_name(out.stem + "_labelmap.json")
        result.written.append(atomic_write_text(lm_path, _dump(label_map)))
    if counts["crowd_skipped"]:
        result.notes.append(f"left out {counts['crowd_skipped']} crowd annotation(s): ODVG has no crowd flag")
    if counts.get("images_without_caption"):
        result.notes.append(f"left out {counts['images_without_caption']} image(s) without a caption")
    if counts.get("images_without_regions"):
        result.notes.append(f"left out {counts['images_without_regions']} captioned image(s) without a non-crowd "
                            "annotation (an empty grounding record would train as 'no target')")
    return result


# ------------------------------------------------------------------------------------------------ ODVG → COCO
def _image_size(image_dir: str | os.PathLike | None, file_name: str, where: str) -> tuple[int, int]:
    if image_dir is None:
        raise DataError(where, "has no 'height'/'width'", "pass --images DIR so the sizes are read from the images")
    from PIL import Image

    p = Path(image_dir) / file_name
    if not p.is_file():
        raise DataError(where, f"image '{p}' does not exist", "check --images and the record's file_name")
    with Image.open(p) as im:
        w, h = im.size
    return h, w


def _categories_for(label_map: dict[str, str], categories_from: str | os.PathLike | None,
                    lm_where: str) -> tuple[list[dict], dict[str, Any]]:
    """(COCO categories, ``{label key: category_id}``)."""
    if categories_from is None:
        keys = []
        for k in label_map:
            try:
                keys.append(int(k))
            except ValueError:
                raise DataError(lm_where, f"label key {k!r} is not an integer",
                                "pass --categories COCO_FILE to give the category ids") from None
        cats = [{"id": k, "name": label_map[str(k)]} for k in sorted(keys)]
        return cats, {str(k): k for k in keys}
    ref = load_coco(categories_from, field="--categories", required=("categories",))
    ref_map, _ = label_map_from_categories(ref["categories"], str(categories_from))
    if ref_map != label_map:
        diff = next((k for k in sorted(set(ref_map) | set(label_map))
                     if ref_map.get(k) != label_map.get(k)), "?")
        raise DataError(str(categories_from), f"categories do not match the label map at label {diff}: "
                        f"{ref_map.get(diff)!r} vs {label_map.get(diff)!r}",
                        "categories[k] must be the category of label k")
    cats = [{k: c[k] for k in ("id", "name", "supercategory") if k in c} for c in ref["categories"]]
    return cats, {str(k): c["id"] for k, c in enumerate(ref["categories"])}


def odvg_to_coco(src: str | os.PathLike, label_map: str | os.PathLike, out: str | os.PathLike, *,
                 categories_from: str | os.PathLike | None = None,
                 image_dir: str | os.PathLike | None = None) -> ConvertResult:
    """Convert ODVG detection JSON lines (with their label map) to a COCO instances file at ``out``.

    Image sizes come from each record's ``height``/``width``, else from the image in ``image_dir``.  DataError
    (``file:line``) for a line that is not a detection record, a label not in the label map, an instance without
    ``mask``, a bbox that is not 4 finite numbers or is inverted, a polygon ring of fewer than 3 points.
    """
    lm_where = str(label_map)
    lmap = load_odvg_label_map(label_map, "--label-map")
    categories, cat_id = _categories_for(lmap, categories_from, lm_where)
    p = Path(os.path.expanduser(str(src)))
    if not p.is_file():
        raise DataError("SRC", f"'{src}' does not exist", "give the ODVG .jsonl file")
    images, annotations = [], []
    for where, obj, problems in odvg_line_problems(p, label_map=lmap, kind="detection"):
        if obj is not None and record_kind(obj) == "grounding":
            raise DataError(where, "is a grounding record",
                            "grounding records have no categories; only detection ODVG converts to COCO")
        # conversion is exact: nothing is dropped or clipped, so every rule is enforced
        raise_first(problems)
        if obj.get("height") and obj.get("width"):
            h, w = obj["height"], obj["width"]
        else:
            h, w = _image_size(image_dir, obj["file_name"], where)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": obj["file_name"], "height": h, "width": w})
        for j, inst in enumerate(obj["detection"].get("instances", [])):
            key = str(inst["label"])
            area = rle_area(ann_to_rle(inst["mask"], int(h), int(w), where=f"{where} instance {j}"))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[key],
                                "bbox": xyxy_to_xywh(inst["bbox"]), "area": float(area), "iscrowd": 0,
                                "segmentation": inst["mask"]})
    doc = {"images": images, "annotations": annotations, "categories": categories}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = ConvertResult(counts={"images": len(images), "annotations": len(annotations),
                                   "categories": len(categories)})
    result.written.append(atomic_write_text(out, _dump(doc)))
    return result


# ------------------------------------------------------------------------------------------------ panoptic → semantic
def semantic_from_panoptic(seg_ids: np.ndarray, segments_info: list, where: str) -> np.ndarray:
    """Per-pixel ``category_id`` (int64 H×W; 0 = unlabelled: VOID and crowd segments) from a panoptic segment-id
    map and its ``segments_info``.  DataError (``where``) for a pixel id that no segment lists."""
    lut: dict[int, int] = {0: 0}
    for seg in segments_info:
        lut[int(seg["id"])] = 0 if seg.get("iscrowd") else int(seg["category_id"])
    ids, inverse = np.unique(seg_ids, return_inverse=True)
    missing = [int(i) for i in ids if int(i) not in lut]
    if missing:
        raise DataError(where, f"PNG has segment id(s) {missing[:5]} that segments_info does not list",
                        "the panoptic PNG and segments_info disagree; regenerate one of them")
    return np.array([lut[int(i)] for i in ids], dtype=np.int64)[inverse].reshape(seg_ids.shape)


def panoptic_to_semantic(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                         panoptic_dir: str | os.PathLike | None = None,
                         image_dir: str | os.PathLike | None = None) -> ConvertResult:
    """Convert a COCO panoptic file to ADE-style semantic data under ``out_dir``: ``semantic/<stem>.png`` per
    annotation, ``semantic.jsonl`` (``{"img", "segm"}`` relative to ``out_dir``; ``img`` is
    ``<image_dir>/<file_name>`` made relative, or ``images/<file_name>`` without ``image_dir``) and
    ``label_map.json`` (``[{id, name, color, isthing}]``).

    ``panoptic_dir`` defaults to COCO's layout: the JSON's path without ``.json`` (``panoptic_val2017/``).
    DataError for a category id 0 (0 means unlabelled), a missing PNG, a PNG whose size differs from its image's,
    or a pixel id that ``segments_info`` does not list (naming the PNG).
    """
    doc = validate_panoptic(load_coco(src, field="SRC"), src)
    where = str(src)
    pan_dir = Path(panoptic_dir) if panoptic_dir else Path(src).with_suffix("")
    cats = []
    for k, c in enumerate(doc["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
            raise DataError(where, f"categories[{k}] has no integer 'id' or no 'name'")
        if c["id"] <= 0 or c["id"] > 65535:
            raise DataError(where, f"category id {c['id']} cannot be a semantic PNG value (1..65535; 0 = unlabelled)")
        entry = {"id": c["id"], "name": c["name"]}
        if "color" in c:
            entry["color"] = c["color"]
        entry["isthing"] = int(c.get("isthing", 1))
        cats.append(entry)
    known = {c["id"] for c in cats}
    wide = max(known, default=0) >= 255  # 255 is read as unlabelled unless it is an id: keep it unambiguous
    images = {img["id"]: img for img in doc["images"]}
    out_dir = Path(out_dir)
    (out_dir / "semantic").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    lines = []
    result = ConvertResult(counts={"images": 0, "segments": 0, "crowd_segments": 0})
    for ann in doc["annotations"]:
        img = images[ann["image_id"]]
        png_name = ann.get("file_name") or Path(img["file_name"]).with_suffix(".png").name
        png_where = str(pan_dir / png_name)
        for seg in ann.get("segments_info") or []:
            if seg.get("category_id") not in known:
                raise DataError(where, f"segment id {seg.get('id')} of image id {ann['image_id']} has category_id "
                                f"{seg.get('category_id')!r}, not in 'categories'")
            result.counts["segments"] += 1
            result.counts["crowd_segments"] += int(bool(seg.get("iscrowd")))
        ids = load_panoptic_png(pan_dir / png_name)
        if "height" in img and "width" in img and ids.shape != (img["height"], img["width"]):
            raise DataError(png_where, f"is {ids.shape[1]}x{ids.shape[0]} but image id {img['id']} is "
                            f"{img['width']}x{img['height']}")
        sem = semantic_from_panoptic(ids, ann.get("segments_info") or [], png_where)
        stem = Path(png_name).stem
        buf = io.BytesIO()
        if wide:
            Image.fromarray(sem.astype(np.uint16)).save(buf, format="PNG")
        else:
            Image.fromarray(sem.astype(np.uint8), mode="L").save(buf, format="PNG")
        atomic_write_bytes(out_dir / "semantic" / f"{stem}.png", buf.getvalue())
        img_path = (os.path.relpath(Path(image_dir) / img["file_name"], out_dir) if image_dir
                    else f"images/{img['file_name']}")
        lines.append({"img": img_path, "segm": f"semantic/{stem}.png"})
        result.counts["images"] += 1
    result.written.append(out_dir / "semantic")
    result.written.append(atomic_write_text(out_dir / "semantic.jsonl", "".join(_dump(x) + "\n" for x in lines)))
    result.written.append(atomic_write_json(out_dir / "label_map.json", cats))
    if result.counts["crowd_segments"]:
        result.notes.append(f"{result.counts['crowd_segments']} crowd segment(s) written as 0 (unlabelled), as "
                            "Mask2Former reads crowd in semantic ground truth")
    return result
