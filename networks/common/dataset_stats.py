"""Statistics of a COCO instance or COCO panoptic file (``tao dataset stats``): pure functions over the loaded dict.

Counting rules (``docs/formats.md``):

* an *annotation* is one entry of ``annotations`` (instances) or one ``segments_info`` entry (panoptic);
* ``instances`` per class counts every annotation of that ``category_id``, crowd included; ``crowd`` counts those
  with ``iscrowd: 1``;
* size bins are pycocotools' COCOeval ranges over the annotation's ``area`` for **non-crowd** annotations (COCOeval
  ignores crowd ground truth): small ``0 ≤ area ≤ 32²``, medium ``32² ≤ area ≤ 96²``, large ``96² ≤ area ≤ 10¹⁰``
  — closed intervals, exactly as COCOeval tests them, so an area of exactly 32² (or 96²) counts in both bins;
* boxes per image counts every annotation (crowd included) of each listed image, images without any as 0;
  an *empty* image has none;
* annotations whose ``image_id`` is not an image id, or whose ``category_id`` is not a category id, are counted
  as ``orphan_image`` / ``unknown_category`` (``tao dataset validate`` names them) and left out of the per-image
  and per-class figures respectively.

One pass over the annotations builds numpy arrays; everything else is vectorised, so an 860k-annotation file costs
about a second beyond ``json.load``.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from networks.common.errors import DataError

__all__ = ["SMALL_MAX", "MEDIUM_MAX", "coco_stats", "annotation_arrays", "plot_stats"]

SMALL_MAX = 32.0 ** 2
MEDIUM_MAX = 96.0 ** 2
_AREA_MAX = 1e10  # COCOeval's upper bound of "all" and "large"


def _is_panoptic(doc: dict) -> bool:
    anns = doc["annotations"]
    return bool(anns) and isinstance(anns[0], dict) and "segments_info" in anns[0]


def _flat(doc: dict, where: str) -> list[dict]:
    """One record per annotation; panoptic segments carry their image's ``image_id``."""
    if not _is_panoptic(doc):
        return doc["annotations"]
    flat: list[dict] = []
    for k, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("segments_info"), list):
            raise DataError(f"{where}annotations[{k}]", "panoptic annotation without a 'segments_info' list")
        iid = ann.get("image_id")
        flat.extend({**seg, "image_id": iid} for seg in ann["segments_info"] if isinstance(seg, dict))
    return flat


def _column(records: list[dict], key: str, convert: Callable, default: Any, dtype, where: str) -> np.ndarray:
    """``records[i][key]`` for all i as an array; the first record where that fails is a DataError naming it."""
    try:
        if default is None:
            return np.fromiter((convert(r[key]) for r in records), dtype=dtype, count=len(records))
        return np.fromiter((convert(r.get(key, default)) for r in records), dtype=dtype, count=len(records))
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    for k, r in enumerate(records):  # slow path, only to name the bad record
        try:
            convert(r[key] if default is None else r.get(key, default))
        except (KeyError, TypeError, ValueError, AttributeError):
            if not isinstance(r, dict):
                raise DataError(f"{where}annotations[{k}]", f"is a JSON {type(r).__name__}, expected an object") \
                    from None
            aid = r.get("id")
            label = f"{where}annotation id {aid}" if aid is not None else f"{where}annotations[{k}]"
            raise DataError(label, f"'{key}' is {r.get(key, '<missing>')!r}, expected a number") from None
    raise AssertionError("unreachable")  # pragma: no cover


def annotation_arrays(doc: dict, path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """``image_id``, ``category_id`` (int64), ``area`` (float64) and ``iscrowd`` (bool) of every annotation
    (panoptic: every segment), in file order.  A missing/non-numeric value is a DataError naming ``path`` and the
    record (``<path>: annotation id 7``)."""
    where = f"{path}: " if path is not None else ""
    records = _flat(doc, where)
    return {
        "image_id": _column(records, "image_id", int, None, np.int64, where),
        "category_id": _column(records, "category_id", int, None, np.int64, where),
        "area": _column(records, "area", float, None, np.float64, where),
        "iscrowd": _column(records, "iscrowd", int, 0, np.int64, where) != 0,
    }


def _ids(entries: list, what: str, where: str) -> np.ndarray:
    try:
        return np.fromiter((int(e["id"]) for e in entries), dtype=np.int64, count=len(entries))
    except (KeyError, TypeError, ValueError):
        for k, e in enumerate(entries):
            if not isinstance(e, dict) or "id" not in e:
                raise DataError(f"{where}{what}[{k}]", "has no 'id'") from None
            try:
                int(e["id"])
            except (TypeError, ValueError):
                raise DataError(f"{where}{what}[{k}]", f"id {e['id']!r} is not an integer") from None
        raise AssertionError("unreachable") from None  # pragma: no cover


def _index(ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Position of each ``query`` value in ``ids`` (first occurrence), -1 where absent."""
    if ids.size == 0:
        return np.full(query.shape, -1, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, query), 0, ids.size - 1)
    return np.where(sorted_ids[pos] == query, order[pos], -1)


def coco_stats(doc: dict, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Statistics of a loaded COCO instance or panoptic dict (see the module docstring for what counts);
    ``path`` (the file) prefixes the subject of a DataError for a record that cannot be counted.

    Returns a JSON-serialisable dict: ``format``, ``images``, ``annotations``, ``crowd``, ``empty_images``,
    ``orphan_image``, ``unknown_category``, ``sizes`` ``{small, medium, large}``, ``boxes_per_image``
    ``{min, median, max, mean}`` (``None`` without images), ``boxes_per_image_histogram`` (entry k: images with k
    annotations) and ``classes``: one row per category in file order,
    ``{id, name, instances, crowd, images}`` (``images``: images holding at least one annotation of the class).
    """
    arr = annotation_arrays(doc, path)
    where = f"{path}: " if path is not None else ""
    img_ids = _ids(doc["images"], "images", where)
    cat_ids = _ids(doc["categories"], "categories", where)
    img_pos = _index(img_ids, arr["image_id"])
    cat_pos = _index(cat_ids, arr["category_id"])
    n_img, n_cat = img_ids.size, cat_ids.size
    crowd, area = arr["iscrowd"], arr["area"]

    known_img = img_pos >= 0
    per_image = np.bincount(img_pos[known_img], minlength=n_img)
    known_cat = cat_pos >= 0
    instances = np.bincount(cat_pos[known_cat], minlength=n_cat)
    crowd_per_cat = np.bincount(cat_pos[known_cat & crowd], minlength=n_cat)
    both = known_img & known_cat
    # distinct (image, class) pairs: images per class
    pairs = np.unique(img_pos[both] * max(n_cat, 1) + cat_pos[both])
    images_per_cat = np.bincount(pairs % max(n_cat, 1), minlength=n_cat) if n_cat else np.zeros(0, np.int64)

    a = area[~crowd]
    sizes = {  # COCOeval: a GT is counted in a range when not (area < lo or area > hi)
        "small": int(np.count_nonzero((a >= 0) & (a <= SMALL_MAX))),
        "medium": int(np.count_nonzero((a >= SMALL_MAX) & (a <= MEDIUM_MAX))),
        "large": int(np.count_nonzero((a >= MEDIUM_MAX) & (a <= _AREA_MAX))),
    }
    bpi = None
    if n_img:
        bpi = {"min": int(per_image.min()), "median": float(np.median(per_image)),
               "max": int(per_image.max()), "mean": float(per_image.mean())}
    classes = [
        {"id": int(cat_ids[k]), "name": str(c.get("name", "")), "instances": int(instances[k]),
         "crowd": int(crowd_per_cat[k]), "images": int(images_per_cat[k])}
        for k, c in enumerate(doc["categories"])
    ]
    return {
        "format": "coco_panoptic" if _is_panoptic(doc) else "coco",
        "images": int(n_img),
        "annotations": int(crowd.size),
        "crowd": int(np.count_nonzero(crowd)),
        "empty_images": int(np.count_nonzero(per_image == 0)),
        "orphan_image": int(np.count_nonzero(~known_img)),
        "unknown_category": int(np.count_nonzero(~known_cat)),
        "sizes": sizes,
        "boxes_per_image": bpi,
        "boxes_per_image_histogram": np.bincount(per_image).tolist() if n_img else [],
        "classes": classes,
    }


def plot_stats(stats: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``classes.png`` (instances per class) and ``boxes_per_image.png`` (histogram) under ``out_dir``,
    atomically; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    from networks.common.io import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    names = [c["name"] or str(c["id"]) for c in stats["classes"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(names)), 4))
    ax.bar(range(len(names)), [c["instances"] for c in stats["classes"]], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 8 else 0, fontsize=8)
    ax.set_ylabel("instances")
    ax.set_title("instances per class")
    fig.tight_layout()
    dest = out / "classes.png"
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    written.append(dest)

    hist = stats["boxes_per_image_histogram"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(range(len(hist)), hist, width=1.0, color="tab:green")
    ax.set_xlabel("annotations per image")
    ax.set_ylabel("images")
    ax.set_title("boxes per image")
    fig.tight_layout()
    dest = out / "boxes_per_image.png"
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    written.append(dest)
    return written
