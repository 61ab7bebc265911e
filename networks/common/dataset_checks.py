"""Dataset validators that report every problem instead of raising on the first (``tao dataset validate``).

One function per format — :func:`check_coco`, :func:`check_panoptic`, :func:`check_odvg`, :func:`check_semantic`
— each returning a list of :class:`Problem` (severity ``error`` or ``warning``, ``where`` = ``file:line`` for
JSON lines or ``file: <record id>`` for JSON, a one-line message, and the ``rule`` it broke).  :func:`check_file`
detects the format from the content and dispatches.

Agreement with the loaders: the rules reuse the loaders' own helpers (``load_coco``/``read_json`` for the top
level, ``short_polygon`` for polygon rings, ``ann_to_rle`` for RLE size/counts), and after the per-record pass the
loaders' validators (``validate_coco``/``validate_panoptic``) are run on the same document: if they would refuse
it while this pass found no error, their refusal is reported as an error.  ``validate`` therefore never passes a
file a loader refuses.  It is stricter in places (boxes outside the image, unknown category ids, images that do
not exist or decode with another size), because those make a metric wrong without any loader noticing.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from networks.common.coco_io import (
    ann_to_rle,
    load_coco,
    load_odvg_label_map,
    short_polygon,
    validate_coco,
    validate_panoptic,
)
from networks.common.errors import DataError
from networks.common.io import read_json

__all__ = ["Problem", "FORMATS", "detect_format", "check_file", "check_coco", "check_panoptic", "check_odvg",
           "check_semantic", "DEFAULT_SAMPLE"]

FORMATS = ("coco", "coco_panoptic", "odvg", "semantic")
DEFAULT_SAMPLE = 20
# A box may exceed the image by this much (pixels) before it counts as outside: COCO's own boxes are rounded
# polygon extents and overshoot by a fraction of a pixel.
BOX_TOLERANCE = 1.0
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Problem:
    """One finding: ``severity`` is ``"error"`` (a loader would refuse it or a metric would be wrong) or
    ``"warning"`` (suspicious but usable); ``where`` names the file and record; ``rule`` is the kind."""

    severity: str
    where: str
    message: str
    rule: str

    def as_dict(self) -> dict:
        return asdict(self)


class _Report:
    """Collects problems and counts records; ``stats`` ends up in the JSON report."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.stats: dict[str, int] = {}

    def error(self, where: str, message: str, rule: str) -> None:
        self.problems.append(Problem("error", where, message, rule))

    def warn(self, where: str, message: str, rule: str) -> None:
        self.problems.append(Problem("warning", where, message, rule))

    @property
    def has_error(self) -> bool:
        return any(p.severity == "error" for p in self.problems)


# ----------------------------------------------------------------------------------------- detection
def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path`` from its content: a directory → ``semantic``; JSON lines whose first record has
    ``detection``/``grounding`` → ``odvg``; a JSON object whose first annotation has ``segments_info`` →
    ``coco_panoptic``; otherwise a JSON object → ``coco``.  DataError when none fits."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        return "semantic"
    fmt, _ = _sniff(p)
    return fmt


def _sniff(p: Path) -> tuple[str, Any]:
    """(format, parsed document or None) — the COCO document is returned so it is parsed only once."""
    if not p.is_file():
        raise DataError(str(p), "does not exist", "give a COCO/panoptic JSON, an ODVG .jsonl or a mask directory")
    if p.suffix.lower() in (".jsonl", ".odvg"):
        return "odvg", None
    # the first line of a one-line COCO file is the whole document; of ODVG, one record (a few are tried, so
    # that one broken line does not hide the format)
    obj = None
    first_obj = None
    with open(p, encoding="utf-8", errors="replace") as fh:
        tried = 0
        for line in fh:
            if not line.strip():
                continue
            tried += 1
            if tried == 1 and line.strip() == "{":
                break  # pretty-printed JSON: its inner lines may look like records
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            if tried == 1:
                first_obj = obj
            if isinstance(obj, dict) and ("detection" in obj or "grounding" in obj):
                return "odvg", None
            if isinstance(obj, dict) and "file_name" in obj and "images" not in obj:
                return "odvg", None
            if tried >= 5 or obj is not None:
                break
    obj = first_obj
    doc = obj if isinstance(obj, dict) and "images" in obj else None
    if doc is None:  # a pretty-printed file: its first line is not the whole object
        doc = read_json(p, field=str(p), invalid_hint="fix the JSON (or give --format odvg for JSON lines)")
    if not isinstance(doc, dict):
        raise DataError(str(p), f"top level is a JSON {type(doc).__name__}, not a COCO object nor ODVG lines")
    anns = doc.get("annotations")
    if isinstance(anns, list) and anns and isinstance(anns[0], dict) and "segments_info" in anns[0]:
        return "coco_panoptic", doc
    return "coco", doc


def check_file(path: str | os.PathLike, fmt: str | None = None, *, images: str | os.PathLike | None = None,
               masks: str | os.PathLike | None = None, label_map: str | os.PathLike | None = None,
               all_images: bool = False, sample: int = DEFAULT_SAMPLE) -> tuple[str, list[Problem], dict]:
    """Validate ``path`` as ``fmt`` (detected when None); returns ``(format, problems, stats)``.

    ``images`` is the image directory (file existence and decoding are checked only when given; ``sample``
    evenly spaced images, or all with ``all_images``); ``masks`` the panoptic PNG directory (default: the JSON's
    stem beside it, else ``panoptic/``) or, for ``semantic``, the image directory is ``images``; ``label_map`` an
    ODVG label map. DataError only for a bad argument (unknown format, missing file); problems in the data are
    returned, not raised."""
    p = Path(os.path.expanduser(str(path)))
    if fmt is not None and fmt not in FORMATS:
        raise DataError("--format", f"unknown format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    n = None if all_images else sample
    if fmt == "semantic" or (fmt is None and p.is_dir()):
        rep = check_semantic(p, images=images, sample=n)
        return "semantic", rep.problems, rep.stats
    if fmt == "odvg":
        detected, doc = "odvg", None
    else:
        try:
            detected, doc = _sniff(p)
        except DataError as exc:
            if not p.is_file():
                raise
            # unparseable JSON is a finding like any other: it goes in the report (and exits 2)
            return fmt or "unknown", [Problem("error", exc.subject, exc.problem, "top_level")], {}
        fmt = fmt or detected
    if fmt == "odvg":
        rep = check_odvg(p, images=images, label_map=label_map, sample=n)
    elif fmt == "coco_panoptic":
        rep = check_panoptic(p, doc, images=images, masks=masks, sample=n)
    else:
        rep = check_coco(p, doc, images=images, sample=n)
    return fmt, rep.problems, rep.stats


# ------------------------------------------------------------------------------------------ helpers
def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _load(p: Path, doc: Any, rep: _Report) -> dict | None:
    """The COCO document (``load_coco``'s top-level checks); a top-level problem is one error."""
    if doc is not None:
        required = ("images", "annotations", "categories")
        missing = [k for k in required if not isinstance(doc.get(k), list)]
        if not missing:
            return doc
    try:
        return load_coco(p, field=str(p))
    except DataError as exc:
        rep.error(exc.subject or str(p), exc.problem, "top_level")
        return None


def _check_images(where: str, doc: dict, rep: _Report) -> dict:
    """``{image id: image entry}``; errors for entries without an id, duplicate ids and bad sizes."""
    by_id: dict = {}
    for k, img in enumerate(doc["images"]):
        if not isinstance(img, dict) or "id" not in img:
            rep.error(f"{where}: images[{k}]", "has no 'id'", "image_id_missing")
            continue
        iid = img["id"]
        label = f"{where}: image id {iid}"
        if iid in by_id:
            rep.error(label, "appears twice in 'images'", "image_id_duplicate")
            continue
        by_id[iid] = img
        w, h = img.get("width"), img.get("height")
        if not (_num(w) and _num(h) and w > 0 and h > 0):
            rep.error(label, f"has width {w!r}, height {h!r} (need positive numbers)", "image_size")
        if not isinstance(img.get("file_name"), str) or not img.get("file_name"):
            rep.error(label, "has no 'file_name'", "image_file_name")
    rep.stats["images"] = len(by_id)
    return by_id


def _check_categories(where: str, doc: dict, rep: _Report) -> set:
    ids: set = set()
    for k, cat in enumerate(doc["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            rep.error(f"{where}: categories[{k}]", "has no 'id'", "category_id_missing")
            continue
        if cat["id"] in ids:
            rep.error(f"{where}: category id {cat['id']}", "appears twice in 'categories'", "category_id_duplicate")
        ids.add(cat["id"])
    rep.stats["categories"] = len(ids)
    return ids


def _check_box(label: str, box: Any, img: dict | None, rep: _Report, *, xyxy: bool = False) -> None:
    """Box rule: 4 finite numbers, non-negative extent, inside the image (± BOX_TOLERANCE)."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_num(v) for v in box):
        rep.error(label, f"has bbox {box!r} (need 4 finite numbers)", "bbox_not_finite")
        return
    x0, y0 = box[0], box[1]
    x1, y1 = (box[2], box[3]) if xyxy else (box[0] + box[2], box[1] + box[3])
    if x1 < x0 or y1 < y0:
        rep.error(label, f"has bbox {list(box)!r} with a negative width or height", "bbox_negative")
        return
    if img is None:
        return
    w, h = img.get("width"), img.get("height")
    if not (_num(w) and _num(h)):
        return
    t = BOX_TOLERANCE
    if x0 < -t or y0 < -t or x1 > w + t or y1 > h + t:
        rep.error(label, f"has bbox {list(box)!r} outside its {w}x{h} image", "bbox_outside_image")


def _check_segmentation(label: str, seg: Any, img: dict | None, rep: _Report) -> None:
    """Polygon rule (numbers, even count, ≥ 3 points: ``short_polygon``) and RLE rule (``ann_to_rle``)."""
    if isinstance(seg, list):
        rings = seg if seg and isinstance(seg[0], (list, tuple)) else [seg]
        for ring in rings:
            if not isinstance(ring, (list, tuple)) or not all(_num(v) for v in ring):
                rep.error(label, "has a polygon whose coordinates are not finite numbers", "polygon_values")
                return
            if len(ring) % 2:
                rep.error(label, f"has a polygon with an odd number of coordinates ({len(ring)})", "polygon_values")
                return
        if short_polygon(seg):
            rep.error(label, "has a polygon with fewer than 3 points (its mask would be empty)", "polygon_short")
        return
    if isinstance(seg, dict):
        if img is None or not (_num(img.get("height")) and _num(img.get("width"))):
            return
        try:
            ann_to_rle(seg, int(img["height"]), int(img["width"]), where=label)
        except DataError as exc:
            rep.error(label, exc.problem, "rle")
        except (TypeError, ValueError) as exc:
            rep.error(label, f"has an unreadable RLE ({exc})", "rle")
        return
    rep.error(label, f"has a segmentation of type {type(seg).__name__} (need a polygon list or an RLE dict)",
              "segmentation_type")


def _sample(items: list, n: int | None) -> list:
    """``n`` evenly spaced items (all when ``n`` is None): deterministic, and spread over the whole file."""
    if n is None or len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _check_image_file(label: str, path: Path, size: tuple[Any, Any] | None, rep: _Report) -> tuple[int, int] | None:
    """Image rule: the file exists, decodes, and has the (width, height) the annotation claims."""
    from PIL import Image

    if not path.is_file():
        rep.error(label, f"image file {path} does not exist", "image_missing")
        return None
    try:
        with Image.open(path) as im:
            im.load()
            wh = im.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a broken file
        rep.error(label, f"image file {path} does not decode ({type(exc).__name__}: {exc})", "image_decode")
        return None
    if size is not None and all(_num(v) for v in size) and (int(size[0]), int(size[1])) != wh:
        rep.error(label, f"image file {path} is {wh[0]}x{wh[1]}, the annotation says {size[0]}x{size[1]}",
                  "image_size_mismatch")
    return wh


def _loader_backstop(rep: _Report, run: Callable[[], Any]) -> None:
    """Run a loader's validator; if it refuses a file this pass found clean, report its refusal."""
    if rep.has_error:
        return
    try:
        run()
    except DataError as exc:
        rep.error(exc.subject, exc.problem, "loader_refusal")


# ----------------------------------------------------------------------------------------------- COCO
def check_coco(path: str | os.PathLike, doc: dict | None = None, *, images: str | os.PathLike | None = None,
               sample: int | None = DEFAULT_SAMPLE) -> _Report:
    """Every rule on a COCO instances file (``doc`` = its parsed content, read from ``path`` when None)."""
    p = Path(path)
    where = str(p)
    rep = _Report()
    doc = _load(p, doc, rep)
    if doc is None:
        return rep
    by_id = _check_images(where, doc, rep)
    cats = _check_categories(where, doc, rep)
    seen: set = set()
    n = 0
    for k, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict):
            rep.error(f"{where}: annotations[{k}]", "is not an object", "annotation_type")
            continue
        n += 1
        aid = ann.get("id")
        label = f"{where}: annotation id {aid}" if aid is not None else f"{where}: annotations[{k}]"
        if aid is None:
            rep.error(label, "has no 'id'", "annotation_id_missing")
        elif aid in seen:
            rep.error(label, "is used twice", "annotation_id_duplicate")
        else:
            seen.add(aid)
        img = by_id.get(ann.get("image_id"))
        if img is None:
            rep.error(label, f"refers to unknown image_id {ann.get('image_id')!r}", "image_ref")
        if ann.get("category_id") not in cats:
            rep.error(label, f"refers to unknown category_id {ann.get('category_id')!r}", "category_ref")
        if "bbox" in ann:
            _check_box(label, ann["bbox"], img, rep)
        else:
            rep.warn(label, "has no 'bbox'", "bbox_missing")
        if "segmentation" in ann:
            _check_segmentation(label, ann["segmentation"], img, rep)
        if ann.get("iscrowd", 0) not in (0, 1):
            rep.error(label, f"has iscrowd {ann.get('iscrowd')!r} (need 0 or 1)", "iscrowd")
    rep.stats["annotations"] = n
    if not n:
        rep.warn(where, "has no annotations: there is nothing to score or learn from", "no_annotations")
    if images is not None:
        root = Path(os.path.expanduser(str(images)))
        chosen = _sample(list(by_id.values()), sample)
        for img in chosen:
            if isinstance(img.get("file_name"), str):
                _check_image_file(f"{where}: image id {img['id']}", root / img["file_name"],
                                  (img.get("width"), img.get("height")), rep)
        rep.stats["image_files_checked"] = len(chosen)
    _loader_backstop(rep, lambda: validate_coco(doc, p))
    return rep


# ------------------------------------------------------------------------------------------- panoptic
def _panoptic_dir(p: Path, masks: str | os.PathLike | None) -> Path | None:
    if masks is not None:
        return Path(os.path.expanduser(str(masks)))
    for cand in (p.with_suffix(""), p.parent / "panoptic"):
        if cand.is_dir():
            return cand
    return None


def check_panoptic(path: str | os.PathLike, doc: dict | None = None, *, images: str | os.PathLike | None = None,
                   masks: str | os.PathLike | None = None, sample: int | None = DEFAULT_SAMPLE) -> _Report:
    """Every rule on a COCO panoptic file; PNGs (``masks`` dir, see :func:`check_file`) of ``sample`` images are
    decoded and their segment ids compared with ``segments_info``."""
    from networks.common.coco_io import load_panoptic_png

    p = Path(path)
    where = str(p)
    rep = _Report()
    doc = _load(p, doc, rep)
    if doc is None:
        return rep
    by_id = _check_images(where, doc, rep)
    cats = _check_categories(where, doc, rep)
    annotated: set = set()
    usable: list[tuple[str, dict]] = []
    segments = 0
    for k, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict):
            rep.error(f"{where}: annotations[{k}]", "is not an object", "annotation_type")
            continue
        iid = ann.get("image_id")
        label = f"{where}: annotations[{k}] (image id {iid})"
        img = by_id.get(iid)
        if img is None:
            rep.error(label, f"refers to unknown image_id {iid!r}", "image_ref")
        elif iid in annotated:
            rep.error(label, "is a second annotation of this image", "image_annotated_twice")
        annotated.add(iid)
        if not isinstance(ann.get("file_name"), str):
            rep.error(label, "has no PNG 'file_name'", "png_file_name")
        infos = ann.get("segments_info")
        if not isinstance(infos, list):
            rep.error(label, "has no 'segments_info' list", "segments_info")
            continue
        ids: set = set()
        for j, seg in enumerate(infos):
            slabel = f"{label} segment {seg.get('id') if isinstance(seg, dict) else j}"
            if not isinstance(seg, dict) or not isinstance(seg.get("id"), int) or seg["id"] <= 0:
                rep.error(slabel, "has no positive integer 'id'", "segment_id")
                continue
            if seg["id"] in ids:
                rep.error(slabel, "is listed twice in segments_info", "segment_id_duplicate")
            ids.add(seg["id"])
            if seg.get("category_id") not in cats:
                rep.error(slabel, f"refers to unknown category_id {seg.get('category_id')!r}", "category_ref")
            if "bbox" in seg:
                _check_box(slabel, seg["bbox"], img, rep)
        segments += len(infos)
        if img is not None and isinstance(ann.get("file_name"), str):
            usable.append((label, ann))
    rep.stats["annotations"] = len(annotated)
    rep.stats["segments"] = segments
    if not segments:
        rep.warn(where, "has no segments: there is nothing to score or learn from", "no_annotations")
    png_dir = _panoptic_dir(p, masks)
    chosen = _sample(usable, sample)
    if png_dir is not None:
        for label, ann in chosen:
            png = png_dir / ann["file_name"]
            img = by_id[ann["image_id"]]
            if _check_image_file(label, png, (img.get("width"), img.get("height")), rep) is None:
                continue
            present = {int(v) for v in _unique(load_panoptic_png(png))} - {0}
            listed = {s["id"] for s in ann["segments_info"] if isinstance(s, dict) and isinstance(s.get("id"), int)}
            if present != listed:
                extra, missing = sorted(present - listed), sorted(listed - present)
                rep.error(label, f"PNG {png.name} ids do not match segments_info (in PNG only: {extra[:5]}, "
                          f"in segments_info only: {missing[:5]})", "png_ids")
        rep.stats["pngs_checked"] = len(chosen)
    else:
        rep.warn(where, "no panoptic PNG directory found (give --masks DIR): PNG ids not checked", "png_dir")
    if images is not None:
        root = Path(os.path.expanduser(str(images)))
        for img in _sample(list(by_id.values()), sample):
            if isinstance(img.get("file_name"), str):
                _check_image_file(f"{where}: image id {img['id']}", root / img["file_name"],
                                  (img.get("width"), img.get("height")), rep)
    _loader_backstop(rep, lambda: validate_panoptic(doc, p))
    return rep


def _unique(arr: Any) -> Iterable[int]:
    import numpy as np

    return np.unique(arr).tolist()


# ----------------------------------------------------------------------------------------------- ODVG
def check_odvg(path: str | os.PathLike, *, images: str | os.PathLike | None = None,
               label_map: str | os.PathLike | None = None, sample: int | None = DEFAULT_SAMPLE) -> _Report:
    """Every rule on an ODVG JSON-lines file (problems named ``file:line``): each line parses to an object with
    ``file_name`` and ``detection.instances`` or ``grounding.regions``; labels exist in ``label_map`` (when
    given); each instance/region has a ``mask`` and a finite, non-inverted xyxy box inside its image (when the
    line has ``height``/``width``); polygon and RLE rules as for COCO."""
    p = Path(os.path.expanduser(str(path)))
    rep = _Report()
    if not p.is_file():
        raise DataError(str(p), "does not exist", "give an ODVG .jsonl file")
    lm = load_odvg_label_map(label_map, "--label-map") if label_map is not None else None
    lines = boxes = 0
    files: list[tuple[str, dict]] = []
    with open(p, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            lines += 1
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                rep.error(where, f"not valid JSON ({exc.msg})", "json_line")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("file_name"), str):
                rep.error(where, "is not a JSON object with 'file_name'", "odvg_record")
                continue
            img = obj if _num(obj.get("height")) and _num(obj.get("width")) else None
            files.append((where, obj))
            if "detection" in obj:
                det = obj["detection"]
                items = det.get("instances") if isinstance(det, dict) else None
                kind, key = "instance", "label"
            elif "grounding" in obj:
                gr = obj["grounding"]
                items = gr.get("regions", []) if isinstance(gr, dict) else None
                kind, key = "region", "phrase"
            else:
                rep.error(where, "has neither 'detection' nor 'grounding'", "odvg_record")
                continue
            if not isinstance(items, list):
                rep.error(where, f"has no {kind} list", "odvg_record")
                continue
            for j, item in enumerate(items):
                label = f"{where} {kind} {j}"
                if not isinstance(item, dict):
                    rep.error(label, "is not an object", "odvg_record")
                    continue
                boxes += 1
                if kind == "instance":
                    if lm is not None and str(item.get("label")) not in lm:
                        rep.error(label, f"label {item.get('label')!r} is not in the label map", "label_unknown")
                elif not str(item.get(key, "")).strip():
                    rep.error(label, "has no phrase", "phrase_missing")
                _check_box(label, item.get("bbox"), img, rep, xyxy=True)
                if "mask" not in item:
                    rep.error(label, "has no 'mask'", "mask_missing")
                else:
                    _check_segmentation(label, item["mask"], img, rep)
    rep.stats["lines"] = lines
    rep.stats["boxes"] = boxes
    if images is not None:
        root = Path(os.path.expanduser(str(images)))
        chosen = _sample(files, sample)
        for where, obj in chosen:
            size = (obj.get("width"), obj.get("height")) if "width" in obj else None
            _check_image_file(where, root / obj["file_name"], size, rep)
        rep.stats["image_files_checked"] = len(chosen)
    return rep


# ------------------------------------------------------------------------------------------- semantic
def check_semantic(mask_dir: str | os.PathLike, *, images: str | os.PathLike | None = None,
                   sample: int | None = DEFAULT_SAMPLE) -> _Report:
    """Rules for a directory of semantic label PNGs: each sampled mask decodes as a single-channel image (mode
    ``L``/``P``/``I``), and with ``images`` an image of the same stem exists and has the same size."""
    from PIL import Image

    d = Path(os.path.expanduser(str(mask_dir)))
    rep = _Report()
    if not d.is_dir():
        raise DataError(str(d), "is not a directory", "semantic validation takes the mask directory")
    pngs = sorted(x for x in d.iterdir() if x.suffix.lower() == ".png")
    rep.stats["masks"] = len(pngs)
    if not pngs:
        rep.error(str(d), "has no .png masks", "no_masks")
        return rep
    root = Path(os.path.expanduser(str(images))) if images is not None else None
    by_stem = {}
    if root is not None:
        by_stem = {x.stem: x for x in root.iterdir() if x.suffix.lower() in _IMAGE_EXTS} if root.is_dir() else {}
    chosen = _sample(pngs, sample)
    for png in chosen:
        label = str(png)
        try:
            with Image.open(png) as im:
                im.load()
                mode, wh = im.mode, im.size
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for a broken file
            rep.error(label, f"does not decode ({type(exc).__name__}: {exc})", "image_decode")
            continue
        if mode not in ("L", "P", "I", "I;16"):
            rep.error(label, f"has mode {mode} (a label mask is single-channel: L, P or I)", "mask_mode")
        if root is not None:
            img = by_stem.get(png.stem)
            if img is None:
                rep.error(label, f"has no image {png.stem}.* in {root}", "image_missing")
            else:
                _check_image_file(label, img, wh, rep)
    rep.stats["masks_checked"] = len(chosen)
    return rep
