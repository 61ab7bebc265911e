"""A small, deterministic synthetic segmentation dataset in every format the networks read.

Scenes: a textured "sky" over a textured "ground" (stuff, split by a random wavy line) with 0–4 textured
"thing" shapes (circle, square, triangle) that may overlap and touch the border, and sometimes a crowd region
of small blobs of one class.  Each class has a colour family but a third of the objects take any hue, so colour
alone is a weak cue.  Masks are the *visible* parts (later objects are on top).  ``generate`` writes, per split
(``train``, ``val``), COCO instances, COCO panoptic, an ADE-style semantic JSONL, ODVG detection and grounding
JSONL, a Mask2Former label map and ``.tar.gz`` archives of the image and panoptic folders; with ``referring=True`` also
a referring-expression split (``referring.jsonl``: expressions naming one, several or no objects).  The exact layout
and every field are described in ``docs/formats.md``.  Same arguments → byte-identical annotation files.
"""
from __future__ import annotations

import colorsys
import gzip
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from networks.common.coco_io import id2rgb, mask_to_rle, mask_to_uncompressed_rle, rle_to_bbox

__all__ = ["CATEGORIES", "THING_IDS", "STUFF_IDS", "generate", "split_paths", "colour_word", "referring_expressions"]

FORMAT_VERSION = "1.0"

CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "supercategory": "shape", "isthing": 1, "color": [220, 50, 50]},
    {"id": 2, "name": "square", "supercategory": "shape", "isthing": 1, "color": [60, 180, 75]},
    {"id": 3, "name": "triangle", "supercategory": "shape", "isthing": 1, "color": [70, 90, 230]},
    {"id": 4, "name": "sky", "supercategory": "stuff", "isthing": 0, "color": [135, 206, 235]},
    {"id": 5, "name": "ground", "supercategory": "stuff", "isthing": 0, "color": [140, 105, 20]},
]
THING_IDS = (1, 2, 3)
STUFF_IDS = (4, 5)
_NAMES = {c["id"]: c["name"] for c in CATEGORIES}
# Hue centre (degrees) of each thing class's colour family.
_HUE = {1: 10.0, 2: 120.0, 3: 235.0}
# Panoptic segment ids of the stuff segments; thing/crowd segments use their instance annotation id.
_STUFF_SEGMENT_ID = {4: 16_000_004, 5: 16_000_005}
_SPLIT_CODE = {"train": 1, "val": 2}
_MIN_THING_AREA = 30
_MIN_CROWD_AREA = 12


def colour_word(rgb: tuple[float, float, float]) -> str:
    """Basic English colour name of an RGB colour (0..255): red, orange, yellow, green, cyan, blue, purple,
    pink, or gray/white/black for unsaturated colours."""
    h, s, v = colorsys.rgb_to_hsv(*(float(c) / 255.0 for c in rgb))
    if s < 0.25:
        return "white" if v > 0.85 else "black" if v < 0.2 else "gray"
    deg = h * 360.0
    for upper, name in ((15, "red"), (45, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"),
                        (260, "blue"), (290, "purple"), (335, "pink"), (361, "red")):
        if deg < upper:
            return name
    return "red"


# ------------------------------------------------------------------------------------------ textures
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Zero-mean, roughly unit-range low-frequency noise ``float32 h×w`` (bilinear-upsampled random grid)."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32) * 2.0 - 1.0
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR), dtype=np.float32)


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), dtype=np.float32) * 255.0


def _thing_texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = int(rng.integers(4))
    if kind == 0:  # stripes along a random direction
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(4, 10)
        pattern = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period)
    elif kind == 1:  # checkerboard
        period = int(rng.integers(3, 8))
        pattern = (((xx // period) + (yy // period)) % 2) * 2.0 - 1.0
    elif kind == 2:  # blotches
        pattern = _smooth_noise(rng, h, w, int(rng.integers(6, 16)))
    else:  # linear gradient
        theta = rng.uniform(0, 2 * np.pi)
        g = xx * np.cos(theta) + yy * np.sin(theta)
        pattern = (g - g.mean()) / (np.abs(g - g.mean()).max() + 1e-6)
    amp = rng.uniform(15, 40)
    fine = rng.normal(0, 6, (h, w)).astype(np.float32)
    return base[None, None, :] + (amp * pattern + fine)[..., None]


def _stuff_textures(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy = np.mgrid[0:h, 0:w][0].astype(np.float32) / h
    sky_base = _hsv(rng.uniform(185, 230), rng.uniform(0.15, 0.6), rng.uniform(0.7, 1.0))
    sky = sky_base[None, None, :] * (1.05 - 0.25 * yy)[..., None]
    sky = sky + 18.0 * _smooth_noise(rng, h, w, 4)[..., None] + rng.normal(0, 3, (h, w, 1)).astype(np.float32)
    ground_base = _hsv(rng.uniform(20, 100), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.65))
    ground = ground_base[None, None, :] + 25.0 * _smooth_noise(rng, h, w, 12)[..., None]
    ground = ground + rng.normal(0, 10, (h, w, 3)).astype(np.float32)
    return sky, ground


# -------------------------------------------------------------------------------------------- shapes
def _polygon(cat: int, cx: float, cy: float, size: float, theta: float, rng: np.random.Generator) -> list[float]:
    if cat == 1:
        n = 32
        ang = theta + np.arange(n) * 2 * np.pi / n
        r = size / 2.0
        pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)
    elif cat == 2:
        ang = theta + np.pi / 4 + np.arange(4) * np.pi / 2
        r = size / np.sqrt(2.0)
        pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)
    else:
        ang = theta + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.15, 0.15, 3)
        r = size / np.sqrt(3.0)
        pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)
    return [round(float(v), 2) for v in pts.reshape(-1)]


def _raster(polys: list[list[float]], h: int, w: int) -> np.ndarray:
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    return mask_utils.decode(rle).astype(bool)


def _inside(poly: list[float], h: int, w: int) -> bool:
    xs, ys = poly[0::2], poly[1::2]
    return min(xs) >= 0.5 and min(ys) >= 0.5 and max(xs) <= w - 0.5 and max(ys) <= h - 0.5


def _thing_colour(rng: np.random.Generator, cat: int) -> np.ndarray:
    hue = rng.uniform(0, 360) if rng.random() < 1 / 3 else _HUE[cat] + rng.uniform(-45, 45)
    return _hsv(hue, rng.uniform(0.55, 0.95), rng.uniform(0.55, 0.95))


def _make_scene(rng: np.random.Generator, h: int, w: int, no_objects: bool, force_crowd: bool) -> dict:
    layers: list[dict] = []
    crowd = force_crowd or (not no_objects and rng.random() < 0.15)
    if crowd:
        cat = int(rng.choice(THING_IDS))
        ccx, ccy = rng.uniform(20, w - 20), rng.uniform(20, h - 20)
        polys = []
        for _ in range(int(rng.integers(6, 14))):
            bx, by = ccx + rng.normal(0, 7), ccy + rng.normal(0, 7)
            polys.append(_polygon(cat, bx, by, rng.uniform(4, 8), rng.uniform(0, np.pi), rng))
        layers.append({"cat": cat, "crowd": True, "polys": polys, "colour": _thing_colour(rng, cat)})
    n = 0 if no_objects else int(rng.integers(1, 5))
    for _ in range(n):
        cat = int(rng.choice(THING_IDS))
        size = rng.uniform(12, 60) if cat != 2 else rng.uniform(12, 50)
        cx = rng.uniform(0.2 * size, w - 0.2 * size)
        cy = rng.uniform(0.2 * size, h - 0.2 * size)
        poly = _polygon(cat, cx, cy, size, rng.uniform(0, 2 * np.pi), rng)
        layers.append({"cat": cat, "crowd": False, "polys": [poly], "colour": _thing_colour(rng, cat)})
    for layer in layers:
        layer["full"] = _raster(layer["polys"], h, w)
    # Drop layers whose visible part is too small to be a usable instance, until every one is large enough.
    while True:
        owner = np.full((h, w), -1, dtype=np.int32)
        for idx, layer in enumerate(layers):
            owner[layer["full"]] = idx
        bad = []
        for idx, layer in enumerate(layers):
            vis = owner == idx
            area = int(vis.sum())
            ys, xs = np.nonzero(vis)
            small = area < (_MIN_CROWD_AREA if layer["crowd"] else _MIN_THING_AREA)
            if small or xs.max() - xs.min() + 1 <= 2 or ys.max() - ys.min() + 1 <= 2:
                bad.append(idx)
        if not bad:
            break
        layers = [la for i, la in enumerate(layers) if i not in bad]
    for idx, layer in enumerate(layers):
        layer["visible"] = owner == idx
    return {"layers": layers, "owner": owner}


def _render_image(rng: np.random.Generator, h: int, w: int) -> tuple[dict, np.ndarray, np.ndarray]:
    amp = rng.uniform(3, 12)
    freq = rng.uniform(0.5, 2.5)
    phase = rng.uniform(0, 2 * np.pi)
    level = rng.uniform(0.35, 0.65) * h
    xs = np.arange(w, dtype=np.float32)
    boundary = level + amp * np.sin(2 * np.pi * freq * xs / w + phase) + 2.0 * _smooth_noise(rng, 1, w, 8)[0]
    sky_mask = np.arange(h, dtype=np.float32)[:, None] < boundary[None, :]
    sky_tex, ground_tex = _stuff_textures(rng, h, w)
    img = np.where(sky_mask[..., None], sky_tex, ground_tex)
    return {"sky": sky_mask}, img, boundary


# ---------------------------------------------------------------------------------------- referring
_REF_COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


def referring_expressions(objects: list[dict], rng: np.random.Generator) -> list[tuple[str, list[int]]]:
    """Referring expressions of one image: ``[(expression, indices of the objects it names)]``.

    ``objects``: ``{"cat", "colour" (colour word), "bbox" xyxy px}`` per (non-crowd) thing.  Candidates, each
    naming exactly the objects that fit it: one target — "the red square" (the only red square), "the square"
    (the only square), "the blue triangle on the left"/"the triangle on the right" (one of exactly two, centres
    ≥ 8 px apart); several targets — "the red squares", "the squares" (all of them, ≥ 2); no target — "the
    green circle" / "the circles" for a colour/shape absent from the image.  Picks, when available, one
    one-target, one several-target and one no-target expression (so every image gives a no-target one).
    """
    one: list[tuple[str, list[int]]] = []
    several: list[tuple[str, list[int]]] = []
    for cat in THING_IDS:
        shape = _NAMES[cat]
        same = [k for k, o in enumerate(objects) if o["cat"] == cat]
        groups = [("", same)] + [(f"{c} ", [k for k in same if objects[k]["colour"] == c])
                                 for c in sorted({objects[k]["colour"] for k in same})]
        for prefix, ks in groups:
            if len(ks) == 1:
                one.append((f"the {prefix}{shape}", ks))
            elif len(ks) >= 2:
                several.append((f"the {prefix}{_PLURAL[shape]}", ks))
            if len(ks) == 2:
                cx = [(objects[k]["bbox"][0] + objects[k]["bbox"][2]) / 2 for k in ks]
                if abs(cx[0] - cx[1]) >= 8:
                    left, right = (ks[0], ks[1]) if cx[0] < cx[1] else (ks[1], ks[0])
                    one.append((f"the {prefix}{shape} on the left", [left]))
                    one.append((f"the {prefix}{shape} on the right", [right]))
    present = {(o["colour"], o["cat"]) for o in objects}
    none = [(f"the {c} {_NAMES[cat]}", []) for cat in THING_IDS for c in _REF_COLOURS if (c, cat) not in present]
    none += [(f"the {_PLURAL[_NAMES[cat]]}", []) for cat in THING_IDS if not any(o["cat"] == cat for o in objects)]
    out = []
    for pool in (one, several, none):
        if pool:
            out.append(pool[int(rng.integers(len(pool)))])
    return out


# ----------------------------------------------------------------------------------------- writing
def _jpeg_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_targz(dest: Path, files: list[tuple[str, bytes]]) -> None:
    """Deterministic ``.tar.gz`` (zero mtimes, root-owned, sorted) holding ``files`` at the archive root."""
    with open(dest, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for name, data in sorted(files):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    tf.addfile(info, io.BytesIO(data))


def _dump(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _make_split(split: str, split_dir: Path, seed: int, count: int, image_size: int, referring: bool = False,
                no_target_every: int = 1) -> None:
    (split_dir / "images").mkdir(parents=True)
    (split_dir / "panoptic").mkdir()
    (split_dir / "semantic").mkdir()
    images, annotations, pan_annotations = [], [], []
    odvg_lines, vg_lines, semantic_lines, ref_lines = [], [], [], []
    image_files, panoptic_files = [], []
    next_ann = 1
    no_targets = 0
    for i in range(count):
        rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], i])
        w = image_size + 32 * int(rng.integers(2))
        h = image_size + 32 * int(rng.integers(2))
        image_id = i + 1
        stem = f"{image_id:06d}"
        stuff, img, _ = _render_image(rng, h, w)
        # Guarantee the edge cases in every split: the last image is empty, the second has a crowd region.
        scene = _make_scene(rng, h, w, no_objects=(i == count - 1) or rng.random() < 0.1,
                            force_crowd=(i == 1 and count > 2))
        semantic = np.where(stuff["sky"], 4, 5).astype(np.uint8)
        pan = np.where(stuff["sky"], _STUFF_SEGMENT_ID[4], _STUFF_SEGMENT_ID[5]).astype(np.int64)
        segments, instances, regions, objects = [], [], [], []
        for layer in scene["layers"]:
            vis, cat = layer["visible"], layer["cat"]
            tex = _thing_texture(rng, h, w, layer["colour"])
            img[vis] = tex[vis]
            semantic[vis] = cat
            ann_id = next_ann
            next_ann += 1
            pan[vis] = ann_id
            area = int(vis.sum())
            if layer["crowd"]:
                seg: Any = mask_to_uncompressed_rle(vis)
            elif (area == int(layer["full"].sum()) and _inside(layer["polys"][0], h, w) and rng.random() < 0.6):
                seg = [list(layer["polys"][0])]
            else:
                seg = mask_to_rle(vis)
            bbox = rle_to_bbox(mask_to_rle(vis))
            iscrowd = int(layer["crowd"])
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox,
                                "area": float(area), "iscrowd": iscrowd, "segmentation": seg})
            segments.append({"id": ann_id, "category_id": cat, "iscrowd": iscrowd, "bbox": bbox, "area": area})
            if not layer["crowd"]:
                xyxy = [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]
                instances.append({"bbox": xyxy, "label": cat - 1, "category": _NAMES[cat], "mask": seg})
                phrase = f"{colour_word(tuple(layer['colour']))} {_NAMES[cat]}"
                regions.append({"bbox": xyxy, "phrase": phrase, "mask": seg})
                objects.append({"cat": cat, "colour": colour_word(tuple(layer["colour"])), "bbox": xyxy, "mask": seg})
        for cat in STUFF_IDS:
            vis = pan == _STUFF_SEGMENT_ID[cat]
            area = int(vis.sum())
            if area:
                segments.insert(len([s for s in segments if s["category_id"] in STUFF_IDS]),
                                {"id": _STUFF_SEGMENT_ID[cat], "category_id": cat, "iscrowd": 0,
                                 "bbox": rle_to_bbox(mask_to_rle(vis)), "area": area})
        img_u8 = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        file_name = f"{stem}.jpg"
        jpg = _jpeg_bytes(img_u8)
        (split_dir / "images" / file_name).write_bytes(jpg)
        image_files.append((file_name, jpg))
        png = _png_bytes(id2rgb(pan))
        (split_dir / "panoptic" / f"{stem}.png").write_bytes(png)
        panoptic_files.append((f"{stem}.png", png))
        (split_dir / "semantic" / f"{stem}.png").write_bytes(_png_bytes(semantic))
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        pan_annotations.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments})
        semantic_lines.append({"img": f"images/{file_name}", "segm": f"semantic/{stem}.png"})
        odvg_lines.append({"file_name": file_name, "height": h, "width": w, "detection": {"instances": instances}})
        if regions:
            caption = ", ".join(r["phrase"] for r in regions) + "."
            vg_lines.append({"file_name": file_name, "height": h, "width": w,
                             "grounding": {"caption": caption, "regions": regions}})
        if referring:
            # A separate generator: the other files stay byte-identical whether or not this split is written.
            ref_rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], i, 7])
            for expr, picked in referring_expressions(objects, ref_rng):
                if not picked:
                    no_targets += 1
                    if (no_targets - 1) % no_target_every:
                        continue
                ref_lines.append({"file_name": file_name, "height": h, "width": w, "ref_id": len(ref_lines),
                                  "grounding": {"caption": expr, "regions": [
                                      {"bbox": objects[k]["bbox"], "phrase": expr, "mask": objects[k]["mask"]}
                                      for k in picked]}})

    info = {"description": "tao-cli synthetic shapes", "version": FORMAT_VERSION, "seed": int(seed), "split": split}
    things = [{k: c[k] for k in ("id", "name", "supercategory")} for c in CATEGORIES if c["isthing"]]
    (split_dir / "annotations.json").write_text(_dump(
        {"info": info, "images": images, "annotations": annotations, "categories": things}))
    # Mask Grounding DINO's COCO evaluation uses category_id as an index into the category list: ids 0..C-1.
    zero_based = [{**a, "category_id": a["category_id"] - 1} for a in annotations]
    (split_dir / "annotations_0based.json").write_text(_dump(
        {"info": info, "images": images, "annotations": zero_based,
         "categories": [{**c, "id": c["id"] - 1} for c in things]}))
    (split_dir / "annotations_panoptic.json").write_text(_dump(
        {"info": info, "images": images, "annotations": pan_annotations, "categories": CATEGORIES}))
    (split_dir / "label_map.json").write_text(_dump(
        [{k: c[k] for k in ("id", "name", "color", "isthing")} for c in CATEGORIES]))
    (split_dir / "semantic.jsonl").write_text("".join(_dump(x) + "\n" for x in semantic_lines))
    (split_dir / "annotations_odvg.jsonl").write_text("".join(_dump(x) + "\n" for x in odvg_lines))
    (split_dir / "annotations_odvg_labelmap.json").write_text(_dump({str(c - 1): _NAMES[c] for c in THING_IDS}))
    (split_dir / "annotations_vg.jsonl").write_text("".join(_dump(x) + "\n" for x in vg_lines))
    if referring:
        (split_dir / "referring.jsonl").write_text("".join(_dump(x) + "\n" for x in ref_lines))
    _write_targz(split_dir / "images.tar.gz", image_files)
    _write_targz(split_dir / "images_panoptic.tar.gz", panoptic_files)


def split_paths(split_dir: Path) -> dict[str, Path]:
    """Paths of every file/folder ``generate`` writes for one split (see ``docs/formats.md``)."""
    return {
        "dir": split_dir,
        "images": split_dir / "images",
        "images_archive": split_dir / "images.tar.gz",
        "annotations": split_dir / "annotations.json",
        "annotations_0based": split_dir / "annotations_0based.json",
        "panoptic_json": split_dir / "annotations_panoptic.json",
        "panoptic_dir": split_dir / "panoptic",
        "panoptic_archive": split_dir / "images_panoptic.tar.gz",
        "label_map": split_dir / "label_map.json",
        "semantic_dir": split_dir / "semantic",
        "semantic_jsonl": split_dir / "semantic.jsonl",
        "odvg": split_dir / "annotations_odvg.jsonl",
        "odvg_labelmap": split_dir / "annotations_odvg_labelmap.json",
        "vg": split_dir / "annotations_vg.jsonl",
        "referring": split_dir / "referring.jsonl",  # written only by generate(..., referring=True)
    }


def generate(out_dir: str | Path, seed: int = 0, num_train: int = 48, num_val: int = 16, image_size: int = 128,
             referring: bool = False, no_target_every: int = 1) -> dict:
    """Write the synthetic dataset under ``out_dir/{train,val}/`` and return its paths.

    Images are ``W×H`` with each side drawn from {image_size, image_size + 32}.  Deterministic for a given
    argument set.  Each split is built in a temporary sibling directory and renamed into place (an existing
    ``train``/``val`` folder is replaced).  Returns ``{"root": Path, "train": {...}, "val": {...}}`` with the
    keys of :func:`split_paths`.  ``referring=True`` also writes ``referring.jsonl`` per split (see
    :func:`referring_expressions`); the other files are the same bytes either way.  ``no_target_every=N`` keeps
    the no-target expression of one image in N (the 1st, (N+1)th, ... image that has one), making no-target
    expressions a minority as in gRefCOCO; the other expressions are unchanged.
    """
    if no_target_every < 1:
        raise ValueError(f"no_target_every must be >= 1, got {no_target_every}")
    if image_size < 48:
        raise ValueError(f"image_size must be >= 48, got {image_size}")
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"root": root}
    for split, count in (("train", num_train), ("val", num_val)):
        tmp = Path(tempfile.mkdtemp(prefix=f".{split}.", suffix=".tmp", dir=root))
        try:
            _make_split(split, tmp / split, seed, count, image_size, referring, no_target_every)
            final = root / split
            if final.exists():
                shutil.rmtree(final)
            (tmp / split).rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        result[split] = split_paths(root / split)
    return result
