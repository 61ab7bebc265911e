"""The record rules of each annotation format, written once.

Every consumer applies the same rules: the networks' data loaders (through :func:`validate_coco`,
:func:`validate_panoptic` and :func:`odvg_record_problems`), ``tao dataset validate``
(``networks/common/dataset_checks.py``), ``subset`` and ``convert``.  A rule yields :class:`Problem` objects
instead of raising, so ``validate`` can list every problem while a loader stops at the first one; the two can
only differ in *policy*, never in the rule:

* a loader raises the first ``error`` as a :class:`DataError` (subject = the problem's ``where``), except that
  a *repairable* error is repaired when the caller allows it (training: a polygon ring of fewer than 3 points is
  dropped, a box outside its image is clipped; one warning with the count) — ``validate`` reports it as an
  error, because as ground truth for an evaluation it makes the metric wrong;
* what a network needs (``need_bbox``, ``need_segmentation``, ``need_annotations``) turns the matching
  ``warning`` into an ``error``; ``validate`` does not know the network and reports the warning.

``where`` names the file and record: ``<file>: annotation id 17`` / ``<file>: image id 3`` for JSON, and
``<file>:<line>`` (plus ``instance 2``/``region 0``) for JSON lines.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Collection, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from networks.common.coco_io import ann_to_rle
from networks.common.errors import DataError
from networks.common.io import json_lines

__all__ = ["Problem", "REPAIRS", "BOX_TOLERANCE", "short_polygon", "coco_problems", "panoptic_problems",
           "odvg_record_problems", "odvg_line_problems", "raise_first", "validate_coco", "validate_panoptic",
           "record_kind", "warn_repaired"]

# A box may exceed its image by this much (pixels) before it counts as outside: COCO's own boxes are rounded
# polygon extents and overshoot by a fraction of a pixel.
BOX_TOLERANCE = 1.0
# repairable rule → what a training loader does instead of refusing
REPAIRS = {"polygon_short": "dropped", "bbox_outside_image": "clipped to the image"}


@dataclass(frozen=True)
class Problem:
    """One finding.  ``severity``: ``"error"`` (a loader refuses it, or it makes a metric wrong) or
    ``"warning"`` (usable; an error for a network that needs the missing part); ``where``: file and record;
    ``rule``: the rule's name; ``hint``: what to do; ``item``: the index of the offending annotation (COCO,
    in ``annotations``) or instance/region (ODVG, in its line), for a loader that repairs it."""

    severity: str
    where: str
    message: str
    rule: str
    hint: str = ""
    item: int | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("item")
        return d

    def as_error(self) -> DataError:
        return DataError(self.where, self.message, self.hint or None)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _finite_numbers(values: Any) -> bool:
    """All entries are finite numbers; ``sum`` is the fast path (it refuses strings, None and lists)."""
    try:
        return math.isfinite(sum(values))
    except TypeError:
        return False


def short_polygon(segmentation: Any) -> bool:
    """True when ``segmentation`` is a polygon list (``[[x,y,...], ...]`` or one flat ``[x,y,...]``) with a ring
    of fewer than 3 points (< 6 numbers): such a ring has no area, so its mask is empty or smaller than drawn."""
    if not isinstance(segmentation, list) or not segmentation:
        return False
    rings = segmentation if isinstance(segmentation[0], (list, tuple)) else [segmentation]
    return any(isinstance(r, (list, tuple)) and len(r) < 6 for r in rings)


# ------------------------------------------------------------------------------------------ shared rules
def _box_problems(where: str, box: Any, hw: tuple[Any, Any] | None, *, xyxy: bool, item: int | None,
                  ) -> Iterator[Problem]:
    """4 finite numbers, non-negative extent, inside the ``(height, width)`` image (± BOX_TOLERANCE)."""
    form = "[x1, y1, x2, y2]" if xyxy else "[x, y, width, height]"
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_num(v) for v in box):
        yield Problem("error", where, f"has bbox {box!r} (need 4 finite numbers)", "bbox_not_finite",
                      f"write bbox as {form} in pixels", item)
        return
    x0, y0 = box[0], box[1]
    x1, y1 = (box[2], box[3]) if xyxy else (box[0] + box[2], box[1] + box[3])
    if x1 < x0 or y1 < y0:
        yield Problem("error", where, f"has bbox {list(box)!r} with a negative width or height", "bbox_negative",
                      f"boxes are {form} pixels", item)
        return
    if hw is None:
        return
    h, w = hw
    t = BOX_TOLERANCE
    if x0 < -t or y0 < -t or x1 > w + t or y1 > h + t:
        yield Problem("error", where, f"has bbox {list(box)!r} outside its {w}x{h} image", "bbox_outside_image",
                      "clip the box to the image (training clips it; evaluation would score an unreachable box)",
                      item)


def _segmentation_problems(where: str, seg: Any, hw: tuple[Any, Any] | None, *, item: int | None,
                           ) -> Iterator[Problem]:
    """Polygons: finite numbers, an even count, ≥ 3 points per ring.  RLE: the size matches the image and the
    counts read (``ann_to_rle``'s rules, the decoder every network uses)."""
    if isinstance(seg, list):
        rings = seg if seg and isinstance(seg[0], (list, tuple)) else [seg]
        for ring in rings:
            if not isinstance(ring, (list, tuple)) or not _finite_numbers(ring):
                yield Problem("error", where, "has a polygon whose coordinates are not finite numbers",
                              "polygon_values", "polygons are [[x1, y1, x2, y2, ...], ...] in pixels", item)
                return
            if len(ring) % 2:
                yield Problem("error", where, f"has a polygon with an odd number of coordinates ({len(ring)})",
                              "polygon_values", "polygons are [[x1, y1, x2, y2, ...], ...] in pixels", item)
                return
        if short_polygon(seg):
            yield Problem("error", where, "has a polygon with fewer than 3 points (its mask would be empty)",
                          "polygon_short", "fix or remove the polygon (training drops it)", item)
        return
    if isinstance(seg, dict):
        if hw is None:
            return
        try:
            ann_to_rle(seg, int(hw[0]), int(hw[1]), where=where)
        except DataError as exc:
            yield Problem("error", where, exc.problem, "rle", exc.hint or "", item)
        except (TypeError, ValueError) as exc:
            yield Problem("error", where, f"has an unreadable RLE ({exc})", "rle",
                          "RLE is {'size': [H, W], 'counts': ...}", item)
        return
    yield Problem("error", where, f"has a segmentation of type {type(seg).__name__} (need a polygon list or an "
                  "RLE dict)", "segmentation_type", "use polygons [[x1,y1,x2,y2,...],...] or an RLE dict", item)


def _image_index(doc: dict, where: str, problems: list[Problem]) -> dict:
    """``{image id: image entry}``; problems for entries without an id, ids listed twice, bad sizes and missing
    file names (appended to ``problems``)."""
    by_id: dict = {}
    for k, img in enumerate(doc["images"]):
        if not isinstance(img, dict) or "id" not in img:
            problems.append(Problem("error", f"{where}: images[{k}]", "has no 'id'", "image_id_missing",
                                    "every image entry needs a unique id"))
            continue
        iid = img["id"]
        label = f"{where}: image id {iid}"
        if iid in by_id:
            problems.append(Problem("error", label, "appears twice in 'images'", "image_id_duplicate",
                                    "give every image a unique id (annotations would be matched to the wrong image)"))
            continue
        by_id[iid] = img
        w, h = img.get("width"), img.get("height")
        if not (_num(w) and _num(h) and w > 0 and h > 0):
            problems.append(Problem("error", label, f"has width {w!r}, height {h!r} (need positive numbers)",
                                    "image_size", "every COCO image needs its 'height' and 'width' in pixels"))
        if not isinstance(img.get("file_name"), str) or not img.get("file_name"):
            problems.append(Problem("error", label, "has no 'file_name'", "image_file_name"))
    return by_id


def _hw(img: dict | None) -> tuple[Any, Any] | None:
    if img is None or not (_num(img.get("height")) and _num(img.get("width"))):
        return None
    return img["height"], img["width"]


def _category_ids(doc: dict, where: str, problems: list[Problem]) -> set:
    ids: set = set()
    for k, cat in enumerate(doc["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            problems.append(Problem("error", f"{where}: categories[{k}]", "has no 'id'", "category_id_missing"))
            continue
        if cat["id"] in ids:
            problems.append(Problem("error", f"{where}: category id {cat['id']}", "appears twice in 'categories'",
                                    "category_id_duplicate"))
        ids.add(cat["id"])
    return ids


def _images_and_categories(doc: dict, where: str) -> tuple[dict, set, list[Problem]]:
    """``({image id: entry}, {category id}, problems of both lists)`` — the part COCO and panoptic share."""
    problems: list[Problem] = []
    by_id = _image_index(doc, where, problems)
    return by_id, _category_ids(doc, where, problems), problems


# ----------------------------------------------------------------------------------------------- COCO
def coco_problems(doc: dict, path: str | os.PathLike, *, need_bbox: bool = False, need_segmentation: bool = False,
                  need_annotations: bool = False,
                  segmentation_hint: str = "give every annotation a polygon or RLE 'segmentation'",
                  ) -> Iterator[Problem]:
    """Every rule on the records of a COCO instances document (``load_coco``'s top level already checked):
    images (id present and unique, positive size, file name), categories (id present and unique), annotations
    (an object; id present and unique; ``image_id`` and ``category_id`` resolve; ``bbox`` 4 finite numbers, not
    negative, inside the image; polygon/RLE rules; ``iscrowd`` 0 or 1), and at least one annotation.  A missing
    ``bbox``/``segmentation``/annotation list is a warning unless ``need_*`` makes it an error."""
    where = str(path)
    by_id, cats, head = _images_and_categories(doc, where)
    yield from head
    seen: set = set()
    anns = doc["annotations"]
    for k, ann in enumerate(anns):
        if not isinstance(ann, dict):
            yield Problem("error", f"{where}: annotations[{k}]", "is not an object", "annotation_type", item=k)
            continue
        aid = ann.get("id")
        label = f"{where}: annotation id {aid}" if aid is not None else f"{where}: annotations[{k}]"
        if aid is None:
            yield Problem("error", label, "has no 'id'", "annotation_id_missing",
                          "every annotation needs a unique id (COCO evaluation indexes them)", k)
        elif aid in seen:
            yield Problem("error", label, "is used twice", "annotation_id_duplicate", "annotation ids must be unique", k)
        else:
            seen.add(aid)
        img = by_id.get(ann.get("image_id"))
        if img is None:
            yield Problem("error", label, f"refers to unknown image_id {ann.get('image_id')!r} (not in 'images')",
                          "image_ref", "add the image entry or remove the annotation", k)
        if ann.get("category_id") not in cats:
            yield Problem("error", label, f"refers to unknown category_id {ann.get('category_id')!r} (not in "
                          "'categories')", "category_ref", "add the category or fix the annotation", k)
        hw = _hw(img)
        if "bbox" in ann:
            yield from _box_problems(label, ann["bbox"], hw, xyxy=False, item=k)
        else:
            yield Problem("error" if need_bbox else "warning", label, "has no 'bbox'", "bbox_missing",
                          "give every annotation a bbox [x, y, width, height]", k)
        seg = ann.get("segmentation")
        if seg is None or (not seg and seg != []):
            if need_segmentation:
                yield Problem("error", label, "has no 'segmentation'", "segmentation_missing", segmentation_hint, k)
        else:
            yield from _segmentation_problems(label, seg, hw, item=k)
        if ann.get("iscrowd", 0) not in (0, 1):
            yield Problem("error", label, f"has iscrowd {ann.get('iscrowd')!r} (need 0 or 1)", "iscrowd", item=k)
    if not anns:
        yield Problem("error" if need_annotations else "warning", where,
                      "has no annotations: there is nothing to score or learn from", "no_annotations",
                      "check that this is the right file (it lists images but no objects)")


# ------------------------------------------------------------------------------------------- panoptic
def panoptic_problems(doc: dict, path: str | os.PathLike, *, need_annotations: bool = False) -> Iterator[Problem]:
    """Every rule on the records of a COCO panoptic document: images and categories as for COCO; one
    annotation per image, naming a known image and a PNG ``file_name``; ``segments_info`` a list of segments with
    a positive integer ``id`` (unique in the image), a known ``category_id`` and a valid box; at least one
    segment (an error with ``need_annotations``).  The PNG's pixels are checked by ``tao dataset validate``."""
    where = str(path)
    by_id, cats, head = _images_and_categories(doc, where)
    yield from head
    annotated: set = set()
    segments = 0
    for k, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict):
            yield Problem("error", f"{where}: annotations[{k}]", "is not an object", "annotation_type", item=k)
            continue
        iid = ann.get("image_id")
        label = f"{where}: annotations[{k}] (image id {iid})"
        img = by_id.get(iid)
        if img is None:
            yield Problem("error", label, f"refers to unknown image_id {iid!r} (not in 'images')", "image_ref",
                          "add the image entry or remove the annotation", k)
        elif iid in annotated:
            yield Problem("error", label, "is a second annotation of this image", "image_annotated_twice",
                          "a panoptic file has one annotation (one PNG) per image", k)
        annotated.add(iid)
        if not isinstance(ann.get("file_name"), str) or not ann.get("file_name"):
            yield Problem("error", label, "has no PNG 'file_name'", "png_file_name", item=k)
        infos = ann.get("segments_info")
        if not isinstance(infos, list):
            yield Problem("error", label, "has no 'segments_info' list", "segments_info", item=k)
            continue
        ids: set = set()
        for j, seg in enumerate(infos):
            slabel = f"{label} segment {seg.get('id') if isinstance(seg, dict) else j}"
            sid = seg.get("id") if isinstance(seg, dict) else None
            if not isinstance(sid, int) or isinstance(sid, bool) or sid <= 0:
                yield Problem("error", slabel, "has no positive integer 'id'", "segment_id", item=k)
                continue
            if sid in ids:
                yield Problem("error", slabel, "is listed twice in segments_info", "segment_id_duplicate", item=k)
            ids.add(sid)
            if seg.get("category_id") not in cats:
                yield Problem("error", slabel, f"refers to unknown category_id {seg.get('category_id')!r}",
                              "category_ref", "add the category or fix the segment", k)
            if "bbox" in seg:
                yield from _box_problems(slabel, seg["bbox"], _hw(img), xyxy=False, item=k)
        segments += len(infos)
    if not segments:
        yield Problem("error" if need_annotations else "warning", where,
                      "has no annotations: no image has a segment, there is nothing to score or learn from",
                      "no_annotations",
                      "check that this is the right file")


# ----------------------------------------------------------------------------------------------- ODVG
def record_kind(obj: Any) -> str | None:
    """``"detection"`` or ``"grounding"`` for an ODVG record, None when it is neither."""
    if isinstance(obj, dict):
        if "detection" in obj:
            return "detection"
        if "grounding" in obj:
            return "grounding"
    return None


def odvg_record_problems(obj: Any, where: str, *, label_map: dict[str, str] | None = None,
                         kind: str | None = None) -> Iterator[Problem]:
    """Every rule on one parsed ODVG line: an object with ``file_name``; of ``kind`` (``detection`` /
    ``grounding``; either when None) with an ``instances``/``regions`` list; each item an object with a label in
    ``label_map`` (detection, when given) or a phrase (grounding), a ``mask`` (polygon/RLE rules) and an xyxy box
    (finite, not inverted, inside the image when the line has ``height``/``width``).  A grounding line without
    regions nor caption is a warning (nothing to prompt with: loaders skip it).  ``item`` = instance/region index."""
    if not isinstance(obj, dict) or not isinstance(obj.get("file_name"), str):
        yield Problem("error", where, "is not a JSON object with 'file_name'", "odvg_record",
                      "see docs/formats.md (ODVG)")
        return
    found = record_kind(obj)
    if found is None or (kind is not None and found != kind):
        hint = ("a source with a label_map holds detection records" if kind == "detection" else
                "a source without a label_map holds grounding records" if kind == "grounding" else
                "see docs/formats.md (ODVG)")
        problem = f"is a {found} record in a file of {kind} records" if found else \
            f"has no '{kind or 'detection'}'" + ("" if kind else " nor 'grounding'")
        yield Problem("error", where, problem, "odvg_record", hint)
        return
    body = obj[found]
    list_key, item_kind = ("instances", "instance") if found == "detection" else ("regions", "region")
    items = body.get(list_key, []) if isinstance(body, dict) else None
    if not isinstance(items, list):
        yield Problem("error", where, f"has no '{found}': {{'{list_key}': [...]}}", "odvg_record",
                      "see docs/formats.md (ODVG)")
        return
    h, w = obj.get("height"), obj.get("width")
    hw = (h, w) if _num(h) and _num(w) and h > 0 and w > 0 else None
    for j, it in enumerate(items):
        label = f"{where} {item_kind} {j}"
        if not isinstance(it, dict):
            yield Problem("error", label, "is not an object", "odvg_record", item=j)
            continue
        if found == "detection":
            if label_map is not None and str(it.get("label")) not in label_map:
                yield Problem("error", label, f"label {it.get('label')!r} is not in the label map", "label_unknown",
                              f"label map keys are {sorted(label_map)[:10]}", j)
        elif not str(it.get("phrase", "")).strip():
            yield Problem("error", label, "has no phrase", "phrase_missing", "give every region a 'phrase'", j)
        yield from _box_problems(label, it.get("bbox"), hw, xyxy=True, item=j)
        if "mask" not in it:
            yield Problem("error", label, "has no 'mask'", "mask_missing", f"give a polygon list or RLE per {item_kind}",
                          j)
        else:
            yield from _segmentation_problems(label, it["mask"], hw, item=j)
    if found == "grounding" and not items and not str(body.get("caption") or "").strip():
        yield Problem("warning", where, "has no regions nor caption (nothing to prompt with: it is skipped)",
                      "grounding_empty", "give the expression a caption or remove the line")


def odvg_line_problems(path: str | os.PathLike, **rules: Any) -> Iterator[tuple[str, Any, list[Problem]]]:
    """``(where, parsed line or None, problems)`` for each non-blank line of an ODVG file; a line that is not
    JSON gives ``None`` and one ``json_line`` error.  ``rules`` go to :func:`odvg_record_problems`; without a
    ``kind`` (or a ``label_map``, which means detection) the first record's kind is the file's, as one source
    holds one kind."""
    if rules.get("kind") is None and rules.get("label_map") is not None:
        rules = {**rules, "kind": "detection"}
    for where, obj in json_lines(path):
        if isinstance(obj, json.JSONDecodeError):
            yield where, None, [Problem("error", where, f"not valid JSON ({obj.msg})", "json_line",
                                        "each line must be one JSON object")]
            continue
        if rules.get("kind") is None and record_kind(obj) is not None:
            rules = {**rules, "kind": record_kind(obj)}
        yield where, obj, list(odvg_record_problems(obj, where, **rules))


# ------------------------------------------------------------------------------------------ loader policy
def raise_first(problems: Iterable[Problem], *, repair: bool = False, tolerate: Collection[str] = ()
                ) -> list[Problem]:
    """A loader's policy: raise the first error as a :class:`DataError`; with ``repair`` the repairable ones
    (:data:`REPAIRS`), and the rules named in ``tolerate``, are returned instead, for the caller to drop, clip
    or filter.  Warnings are ignored."""
    kept: list[Problem] = []
    for prob in problems:
        if prob.severity != "error":
            continue
        if (repair and prob.rule in REPAIRS) or prob.rule in tolerate:
            kept.append(prob)
            continue
        raise prob.as_error()
    return kept


def warn_repaired(repaired: list[Problem], where: str, log: logging.Logger | None = None,
                  actions: dict[str, str] | None = None, noun: str = "annotation(s)") -> None:
    """One warning per repaired rule: ``<where>: <count> <noun> <action>: <first message> (first: <record>)``,
    ``actions`` defaulting to :data:`REPAIRS`."""
    for rule, action in (actions or REPAIRS).items():
        hits = [p for p in repaired if p.rule == rule]
        if hits:
            (log or logging.getLogger("tao")).warning("%s: %d %s %s: %s (first: %s)", where, len(hits), noun,
                                                      action, hits[0].message.removeprefix("has "), hits[0].where)


def validate_coco(doc: dict, path: str | os.PathLike, *, need_segmentation: bool = False, need_bbox: bool = False,
                  need_annotations: bool = False, train: bool = False, tolerate: Collection[str] = (),
                  segmentation_hint: str = "give every annotation a polygon or RLE 'segmentation'",
                  log: logging.Logger | None = None) -> dict:
    """A loader's check of a COCO instances document (as returned by ``load_coco``): :func:`coco_problems`,
    the first error raised as a :class:`DataError`.  With ``train``, annotations with a polygon ring of fewer
    than 3 points are dropped and boxes outside their image are clipped, with one warning per rule.  Rules in
    ``tolerate`` are let through unchanged (a network that filters those records itself, as TAO does).  Returns
    ``doc``, or a shallow copy with the repaired annotations."""
    found = raise_first(coco_problems(doc, path, need_bbox=need_bbox, need_segmentation=need_segmentation,
                                      need_annotations=need_annotations, segmentation_hint=segmentation_hint),
                        repair=train, tolerate=tolerate)
    repaired = [p for p in found if p.rule not in tolerate]
    if not repaired:
        return doc
    warn_repaired(repaired, str(path), log)
    drop = {p.item for p in repaired if p.rule == "polygon_short"}
    clip = {p.item for p in repaired if p.rule == "bbox_outside_image"}
    images = {img["id"]: img for img in doc["images"]}
    anns = []
    for k, ann in enumerate(doc["annotations"]):
        if k in drop:
            continue
        if k in clip:
            img = images[ann["image_id"]]
            ann = {**ann, "bbox": _clip_xywh(ann["bbox"], img["width"], img["height"])}
        anns.append(ann)
    return {**doc, "annotations": anns}


def _clip_xywh(box: list, width: float, height: float) -> list[float]:
    x0, y0 = min(max(box[0], 0.0), width), min(max(box[1], 0.0), height)
    x1, y1 = min(max(box[0] + box[2], 0.0), width), min(max(box[1] + box[3], 0.0), height)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def validate_panoptic(doc: dict, path: str | os.PathLike, *, need_annotations: bool = False, train: bool = False,
                      log: logging.Logger | None = None) -> dict:
    """A loader's check of a COCO panoptic document: :func:`panoptic_problems`, the first error raised as a
    :class:`DataError`.  With ``train`` a segment box outside its image is only warned about (training reads
    the PNG, not the box).  Returns ``doc``."""
    warn_repaired(raise_first(panoptic_problems(doc, path, need_annotations=need_annotations), repair=train),
                  str(path), log, {"bbox_outside_image": "kept (training reads the PNG, not the box)"})
    return doc
