"""Dataset validators that report every problem instead of raising on the first (``tao dataset validate``).

One function per format — :func:`check_coco`, :func:`check_panoptic`, :func:`check_odvg`, :func:`check_semantic`
— each returning a list of :class:`Problem` (severity ``error`` or ``warning``, ``where`` = ``file:line`` for
JSON lines or ``file: <record id>`` for JSON, a one-line message, and the ``rule`` it broke).  :func:`check_file`
detects the format from the content and dispatches.

Agreement with the loaders: the record rules are not here.  They live once in
``networks/common/dataset_rules.py`` (:func:`coco_problems`, :func:`panoptic_problems`,
:func:`odvg_record_problems`), which the networks' loaders apply too; this module only adds what a loader cannot
see without reading every file: image files that do not exist or decode with another size, panoptic PNG ids
that do not match ``segments_info``, and semantic mask directories.  ``validate`` and a loader therefore differ
only in policy (``dataset_rules``' module docstring): a loader stops at the first error and a training loader
repairs short polygons and boxes outside the image, which ``validate`` reports as errors.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from networks.common.coco_io import load_coco, load_odvg_label_map
from networks.common.dataset_rules import Problem, coco_problems, odvg_line_problems, panoptic_problems
from networks.common.errors import DataError
from networks.common.io import read_json

__all__ = ["Problem", "FORMATS", "detect_format", "sniff_format", "check_file", "check_coco", "check_panoptic", "check_odvg",
           "check_semantic", "DEFAULT_SAMPLE"]

FORMATS = ("coco", "coco_panoptic", "odvg", "semantic")
DEFAULT_SAMPLE = 20
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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
    fmt, _ = sniff_format(p)
    return fmt


def sniff_format(p: Path) -> tuple[str, Any]:
    """``(format, parsed document or None)`` of the file ``p`` (see :func:`detect_format`); the COCO document is
    returned so that the caller parses it only once."""
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
            detected, doc = sniff_format(p)
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


# ----------------------------------------------------------------------------------------------- COCO
def _image_files(where: str, by_id: dict, images: str | os.PathLike, sample: int | None, rep: _Report) -> int:
    """Image-file rule on ``sample`` evenly spaced images of ``by_id``; returns how many were checked."""
    root = Path(os.path.expanduser(str(images)))
    chosen = [img for img in _sample(list(by_id.values()), sample) if isinstance(img.get("file_name"), str)]
    for img in chosen:
        _check_image_file(f"{where}: image id {img['id']}", root / img["file_name"],
                          (img.get("width"), img.get("height")), rep)
    return len(chosen)


def _by_id(doc: dict) -> dict:
    return {img["id"]: img for img in doc["images"] if isinstance(img, dict) and "id" in img}


def _count_categories(doc: dict) -> int:
    return len({c["id"] for c in doc["categories"] if isinstance(c, dict) and "id" in c})


def check_coco(path: str | os.PathLike, doc: dict | None = None, *, images: str | os.PathLike | None = None,
               sample: int | None = DEFAULT_SAMPLE) -> _Report:
    """The shared COCO rules (:func:`coco_problems`) on every record of a COCO instances file (``doc`` = its
    parsed content, read from ``path`` when None), plus the image-file rule with ``images``."""
    p = Path(path)
    rep = _Report()
    doc = _load(p, doc, rep)
    if doc is None:
        return rep
    rep.problems.extend(coco_problems(doc, p))
    by_id = _by_id(doc)
    rep.stats.update(images=len(by_id), categories=_count_categories(doc),
                     annotations=sum(isinstance(a, dict) for a in doc["annotations"]))
    if images is not None:
        rep.stats["image_files_checked"] = _image_files(str(p), by_id, images, sample, rep)
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
    """The shared panoptic rules (:func:`panoptic_problems`) on every record; then the PNGs (``masks`` dir, see
    :func:`check_file`) of ``sample`` annotations are decoded and their segment ids compared with
    ``segments_info``, and with ``images`` the image-file rule."""
    from networks.common.coco_io import load_panoptic_png

    p = Path(path)
    where = str(p)
    rep = _Report()
    doc = _load(p, doc, rep)
    if doc is None:
        return rep
    rep.problems.extend(panoptic_problems(doc, p))
    by_id = _by_id(doc)
    anns = doc["annotations"]
    # PNGs are compared only for annotations whose record is sound (known image, a PNG name, a segments list)
    usable = [(f"{where}: annotations[{k}] (image id {a.get('image_id')})", a) for k, a in enumerate(anns)
              if isinstance(a, dict) and a.get("image_id") in by_id and isinstance(a.get("file_name"), str)
              and isinstance(a.get("segments_info"), list)]
    rep.stats.update(images=len(by_id), categories=_count_categories(doc),
                     annotations=len({a.get("image_id") for a in anns if isinstance(a, dict)}),
                     segments=sum(len(a.get("segments_info") or []) for a in anns if isinstance(a, dict)))
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
        rep.stats["image_files_checked"] = _image_files(where, by_id, images, sample, rep)
    return rep


def _unique(arr: Any) -> Iterable[int]:
    import numpy as np

    return np.unique(arr).tolist()


# ----------------------------------------------------------------------------------------------- ODVG
def check_odvg(path: str | os.PathLike, *, images: str | os.PathLike | None = None,
               label_map: str | os.PathLike | None = None, sample: int | None = DEFAULT_SAMPLE) -> _Report:
    """The shared ODVG rules (:func:`odvg_record_problems`; problems named ``file:line``) on every line, with
    labels checked against ``label_map`` when given; plus the image-file rule with ``images``."""
    p = Path(os.path.expanduser(str(path)))
    rep = _Report()
    if not p.is_file():
        raise DataError(str(p), "does not exist", "give an ODVG .jsonl file")
    lm = load_odvg_label_map(label_map, "--label-map") if label_map is not None else None
    lines = boxes = 0
    files: list[tuple[str, dict]] = []
    for where, obj, problems in odvg_line_problems(p, label_map=lm):
        lines += 1
        rep.problems.extend(problems)
        if not isinstance(obj, dict) or not isinstance(obj.get("file_name"), str):
            continue
        files.append((where, obj))
        body = obj.get("detection", obj.get("grounding"))
        items = body.get("instances", body.get("regions")) if isinstance(body, dict) else None
        boxes += len(items) if isinstance(items, list) else 0
    rep.stats["lines"] = lines
    rep.stats["boxes"] = boxes
    if not boxes:
        rep.warn(str(p), "has no instances or regions: there is nothing to score or learn from", "no_annotations")
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
