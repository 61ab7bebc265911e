"""A consistent, deterministic subset of a dataset file (``tao dataset subset``): the tiny set for CI smoke runs.

Inputs (``docs/formats.md``): a COCO instances JSON, a COCO panoptic JSON (``annotations[].segments_info``) or an
ODVG JSON-lines file (``.jsonl``; detection or grounding).  Output layout under ``out``, so that a spec's keys can
point at it the way they point at the synthetic set::

    out/<input file name>          the subset file (same name as the input)
    out/images/<file_name> …       the chosen images (or out/images.tar.gz with archive=True: members at its root)
    out/panoptic/<png> …           panoptic only: the chosen images' PNGs, unchanged
    out/<label map name>           ODVG detection only: the label map, copied unchanged

Contract:

* the chosen images depend only on the image list, ``n``, ``seed`` and ``by_class`` (numpy ``default_rng(seed)``),
  and are written in their input order; two runs with the same arguments write byte-identical files;
* COCO/panoptic: image ids become ``1 … N`` (input order), annotations keep their input order with ``image_id``
  remapped; instance annotation ids become ``1 … M``; ``categories`` and every other key are kept; panoptic
  ``segments_info`` (and so the PNG segment ids) are kept unchanged;
* ODVG: the chosen lines, unchanged, in input order (one "image" = one line);
* ``by_class``: before the random fill, the rarest classes first, one randomly ranked image holding each class not
  yet covered is taken, so every class is represented when ``n`` allows (class = ``category_id``; ODVG detection:
  ``label``; grounding: ``phrase``).

Bad input is a one-line :class:`DataError` naming the file and record (COCO: ``validate_coco`` /
``validate_panoptic``; ODVG: ``file:line``; a missing image names its record).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from networks.common.coco_io import load_coco
from networks.common.dataset_checks import sniff_format
from networks.common.dataset_rules import (
    REPAIRS,
    coco_problems,
    odvg_line_problems,
    panoptic_problems,
    raise_first,
)
from networks.common.errors import ConfigError, DataError
from networks.common.io import atomic_path, atomic_write_text
from networks.common.sources import resolve_dir, resolve_member

__all__ = ["choose_images", "subset"]


def choose_images(classes: list[list[Any]], n: int, seed: int, by_class: bool = False) -> list[int]:
    """Indices (ascending) of ``min(n, len(classes))`` images; ``classes[i]`` lists image i's class keys.

    A random ranking of all images (``default_rng(seed).permutation``) decides; with ``by_class`` the
    best-ranked image of each class still missing is taken first, rarest class first (ties: sorted key), until
    ``n`` images are chosen; the rest is filled in ranking order.
    """
    total = len(classes)
    rank_order = np.random.default_rng(seed).permutation(total)
    if n >= total:
        return list(range(total))
    chosen: list[int] = []
    taken = np.zeros(total, dtype=bool)
    if by_class:
        rank = np.empty(total, dtype=np.int64)
        rank[rank_order] = np.arange(total)
        best: dict[Any, int] = {}  # class -> best-ranked image holding it
        freq: dict[Any, int] = {}
        for i, keys in enumerate(classes):
            for key in set(keys):
                freq[key] = freq.get(key, 0) + 1
                if key not in best or rank[i] < rank[best[key]]:
                    best[key] = i
        covered: set = set()
        for key in sorted(freq, key=lambda k: (freq[k], repr(k))):
            if len(chosen) >= n:
                break
            if key in covered:
                continue
            i = best[key]
            chosen.append(i)
            taken[i] = True
            covered.update(classes[i])
    for i in rank_order:
        if len(chosen) >= n:
            break
        if not taken[i]:
            chosen.append(int(i))
            taken[i] = True
    return sorted(chosen)


def _safe_rel(name: Any, where: str) -> PurePosixPath:
    rel = PurePosixPath(str(name))
    if not str(name) or rel.is_absolute() or ".." in rel.parts:
        raise DataError(where, f"file_name {name!r} is not a relative path inside the image directory")
    return rel


def _copy_files(pairs: list[tuple[Path, PurePosixPath]], dest_dir: Path, archive: Path | None) -> None:
    """Copy ``(source, relative name)`` pairs under ``dest_dir``, or into the ``.tar.gz`` ``archive``."""
    if archive is not None:
        from networks.common.synthetic import _write_targz  # the one deterministic tar.gz writer

        files = sorted({str(rel): src.read_bytes() for src, rel in pairs}.items())
        with atomic_path(archive) as tmp:
            _write_targz(tmp, files)
        return
    for src, rel in pairs:
        dest = dest_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)


def _sources(root: Path | None, names: list[tuple[Any, str]]) -> list[tuple[Path, PurePosixPath]]:
    """``(source path, relative name)`` for each ``(file_name, record label)``; a missing file names its record."""
    pairs = []
    for name, where in names:
        rel = _safe_rel(name, where)
        src = resolve_member(root, str(rel))
        if not src.is_file():
            raise DataError(where, f"image '{name}' not found in {root}",
                            "pass the image directory (or archive) with --images")
        pairs.append((src, rel))
    return pairs


def _dump(obj: Any) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False)


def _default_dir(path: Path, given: str | os.PathLike | None, name: str) -> Path:
    return Path(os.path.expanduser(str(given))) if given is not None else path.parent / name


def subset(path: str | os.PathLike, out: str | os.PathLike, n: int, *, seed: int = 0, by_class: bool = False,
           images: str | os.PathLike | None = None, archive: bool = False,
           panoptic_dir: str | os.PathLike | None = None, label_map: str | os.PathLike | None = None,
           copy_images: bool = True) -> dict[str, Any]:
    """Write the subset of ``path`` described in the module docstring under ``out``; returns a summary
    ``{format, images, annotations, files}`` (``files``: the written annotation/label-map/archive paths).

    ``images`` (directory or archive) defaults to ``<path's folder>/images``; ``panoptic_dir`` to
    ``<path's folder>/panoptic``; ``label_map`` (ODVG detection) to ``<stem>_labelmap.json`` beside ``path``
    when that exists.  ``out/<file name>`` must not exist yet (ConfigError naming ``--out``).
    """
    if n < 1:
        raise ConfigError("-n", f"is {n}, expected at least 1")
    src = Path(os.path.expanduser(str(path)))
    out_dir = Path(os.path.expanduser(str(out)))
    target = out_dir / src.name
    if target.exists():
        raise ConfigError("--out", f"'{target}' already exists", "choose an empty output directory")
    if not src.is_file():
        raise DataError("FILE", f"'{path}' does not exist" if not src.exists() else f"'{path}' is not a file")
    fmt, doc = sniff_format(src)
    if fmt == "odvg":
        return _subset_odvg(src, out_dir, n, seed, by_class, images, archive, label_map, copy_images)
    if doc is None or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
        doc = load_coco(src, field="FILE")
    panoptic = fmt == "coco_panoptic"
    # the shared rules; records a loader repairs (short polygons, boxes outside the image) are copied unchanged
    raise_first((panoptic_problems if panoptic else coco_problems)(doc, src), tolerate=REPAIRS)

    id_pos = {img["id"]: k for k, img in enumerate(doc["images"])}
    classes: list[list[Any]] = [[] for _ in doc["images"]]
    for ann in doc["annotations"]:
        segs = (ann.get("segments_info") or []) if panoptic else [ann]
        classes[id_pos[ann["image_id"]]].extend(s.get("category_id") for s in segs if isinstance(s, dict))
    keep = choose_images(classes, n, seed, by_class)
    new_id = {doc["images"][k]["id"]: j + 1 for j, k in enumerate(keep)}

    new_images = [{**doc["images"][k], "id": new_id[doc["images"][k]["id"]]} for k in keep]
    new_anns = []
    for ann in doc["annotations"]:
        if ann["image_id"] in new_id:
            rec = {**ann, "image_id": new_id[ann["image_id"]]}
            if not panoptic:
                rec["id"] = len(new_anns) + 1
            new_anns.append(rec)
    new_doc = {**doc, "images": new_images, "annotations": new_anns}

    written = []
    if copy_images:
        root = resolve_dir(_default_dir(src, images, "images"), field="--images")
        pairs = _sources(root, [(img.get("file_name"), f"{src}: image id {img['id']}")
                                for img in (doc["images"][k] for k in keep)])
        arch = out_dir / "images.tar.gz" if archive else None
        _copy_files(pairs, out_dir / "images", arch)
        if arch is not None:
            written.append(arch)
    if panoptic:
        pan_root = resolve_dir(_default_dir(src, panoptic_dir, "panoptic"), field="--panoptic-dir")
        pngs = [(a.get("file_name"), f"{src}: annotation of image id {a['image_id']}")
                for a in doc["annotations"] if a["image_id"] in new_id]
        _copy_files(_sources(pan_root, pngs), out_dir / "panoptic", None)
    atomic_write_text(target, _dump(new_doc))
    written.insert(0, target)
    segments = sum(len(a.get("segments_info") or []) for a in new_anns) if panoptic else len(new_anns)
    return {"format": "coco_panoptic" if panoptic else "coco", "images": len(new_images),
            "annotations": segments, "files": [str(p) for p in written]}


def _odvg_classes(obj: dict) -> list[Any]:
    """The class keys of a checked ODVG record: detection labels or grounding phrases."""
    if "detection" in obj:
        return [inst.get("label") for inst in obj["detection"].get("instances") or []]
    return [r.get("phrase") for r in obj["grounding"].get("regions") or []]


def _subset_odvg(src: Path, out_dir: Path, n: int, seed: int, by_class: bool, images, archive: bool,
                 label_map, copy_images: bool) -> dict[str, Any]:
    lines: list[tuple[str, str, Any]] = []  # (where, raw line, parsed)
    with open(src, encoding="utf-8", errors="replace") as fh:  # the line split and blank-skipping of the rules
        raw_lines = [ln.rstrip("\r\n") for ln in fh if ln.strip()]
    for (where, obj, problems), raw in zip(odvg_line_problems(src), raw_lines, strict=True):
        raise_first(problems, tolerate=REPAIRS)
        lines.append((where, raw, obj))
    classes = [_odvg_classes(obj) for _, _, obj in lines]
    keep = choose_images(classes, n, seed, by_class)
    written = []
    lm = Path(os.path.expanduser(str(label_map))) if label_map is not None else \
        src.with_name(src.stem + "_labelmap.json")
    if label_map is not None and not lm.is_file():
        raise DataError("--label-map", f"'{label_map}' does not exist")
    if lm.is_file():
        dest = out_dir / lm.name
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            shutil.copyfile(lm, tmp)
        written.append(dest)
    if copy_images:
        root = resolve_dir(_default_dir(src, images, "images"), field="--images")
        names = {}
        for k in keep:  # several lines (referring expressions) may share one image
            names.setdefault(lines[k][2]["file_name"], lines[k][0])
        arch = out_dir / "images.tar.gz" if archive else None
        _copy_files(_sources(root, list(names.items())), out_dir / "images", arch)
        if arch is not None:
            written.append(arch)
    target = out_dir / src.name
    atomic_write_text(target, "".join(lines[k][1] + "\n" for k in keep))
    return {"format": "odvg", "images": len(keep), "annotations": sum(len(classes[k]) for k in keep),
            "files": [str(target), *map(str, written)]}
