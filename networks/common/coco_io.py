"""COCO JSON loading and mask encodings (polygons, RLE) shared by every network.

Conventions: masks are ``uint8`` arrays ``H×W`` with values 0/1 at the image's pixel grid; COCO boxes are
``[x, y, w, h]`` in pixels (float); RLE dicts are ``{"size": [H, W], "counts": ...}`` where ``counts`` is a
compressed UTF-8 string (pycocotools' LEB128-like encoding) or, for *uncompressed* RLE, a list of run lengths
in column-major order starting with a run of zeros.  Panoptic PNGs store a segment id per pixel as
``id = R + 256·G + 256²·B`` (panopticapi's ``rgb2id``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from networks.common.errors import DataError
from networks.common.io import read_json

__all__ = [
    "load_coco",
    "ann_to_mask",
    "ann_to_rle",
    "mask_to_rle",
    "mask_to_uncompressed_rle",
    "rle_area",
    "rle_to_bbox",
    "rgb2id",
    "id2rgb",
    "load_panoptic_png",
    "load_odvg_label_map",
]

_REQUIRED_KEYS = ("images", "annotations", "categories")


def load_coco(path: str | os.PathLike, *, field: str, required: tuple[str, ...] = _REQUIRED_KEYS) -> dict:
    """Read a COCO (instances or panoptic) JSON file and check its top-level shape.

    Raises :class:`DataError`: subject ``field`` when the file is missing; ``<path>:<line>:<col>`` for invalid
    JSON; ``<path>`` when the top level is not an object or lacks one of ``required`` (each must be a list).
    """
    p = Path(os.path.expanduser(str(path)))
    data = read_json(path, field=field, hint="check the annotation file path",
                     invalid_hint="fix or regenerate the annotation file")
    if not isinstance(data, dict):
        raise DataError(str(p), f"top level is a JSON {type(data).__name__}, expected an object",
                        "a COCO file is an object with 'images', 'annotations' and 'categories'")
    for key in required:
        if key not in data:
            raise DataError(str(p), f"missing key '{key}'", "a COCO file needs 'images', 'annotations' and 'categories'")
        if not isinstance(data[key], list):
            raise DataError(str(p), f"'{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _bad(where: str | None, problem: str) -> DataError:
    return DataError(where or "segmentation", problem, "use polygons [[x1,y1,x2,y2,...],...] or an RLE dict")


def ann_to_rle(segmentation: Any, height: int, width: int, *, where: str | None = None) -> dict:
    """Compressed RLE (``counts`` as bytes, pycocotools' native form) of a COCO ``segmentation``.

    Accepts a polygon list (``[[x,y,...], ...]`` or one flat ``[x,y,...]``; polygons with fewer than 3 points
    are skipped), an uncompressed RLE (list ``counts``), a compressed RLE (str/bytes ``counts``), or a 2-D array.
    ``where`` names the record for a :class:`DataError` (e.g. ``"ann.json: annotation 17"``).
    """
    h, w = int(height), int(width)
    if isinstance(segmentation, np.ndarray):
        if segmentation.shape[:2] != (h, w) or segmentation.ndim != 2:
            raise _bad(where, f"mask array has shape {segmentation.shape}, expected ({h}, {w})")
        return mask_utils.encode(np.asfortranarray((segmentation > 0).astype(np.uint8)))
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise _bad(where, "RLE dict needs 'size' and 'counts'")
        size = [int(v) for v in segmentation["size"]]
        if size != [h, w]:
            raise _bad(where, f"RLE size {size} does not match the image size [{h}, {w}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != h * w:
                raise _bad(where, f"uncompressed RLE counts sum to {sum(int(c) for c in counts)}, expected H*W = {h * w}")
            return mask_utils.frPyObjects({"size": size, "counts": [int(c) for c in counts]}, h, w)
        if isinstance(counts, str):
            counts = counts.encode("utf-8")
        if not isinstance(counts, bytes):
            raise _bad(where, f"RLE counts must be a list or a string, got {type(counts).__name__}")
        return {"size": size, "counts": counts}
    if isinstance(segmentation, list):
        polys = segmentation
        if polys and not isinstance(polys[0], (list, tuple)):
            polys = [polys]
        clean = []
        for poly in polys:
            try:
                coords = [float(v) for v in poly]
            except (TypeError, ValueError):
                raise _bad(where, "polygon coordinates must be numbers") from None
            if len(coords) % 2:
                raise _bad(where, f"polygon has an odd number of coordinates ({len(coords)})")
            if len(coords) >= 6:
                clean.append(coords)
        if not clean:
            return mask_utils.encode(np.zeros((h, w), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(clean, h, w))
    raise _bad(where, f"unsupported segmentation type {type(segmentation).__name__}")


def ann_to_mask(segmentation: Any, height: int, width: int, *, where: str | None = None) -> np.ndarray:
    """Decode a COCO ``segmentation`` (polygons / uncompressed RLE / compressed RLE / array) to ``uint8 H×W`` 0/1."""
    return np.ascontiguousarray(mask_utils.decode(ann_to_rle(segmentation, height, width, where=where)))


def mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed RLE of a 2-D mask (nonzero = foreground): ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask_to_rle expects a 2-D mask, got shape {m.shape}")
    rle = mask_utils.encode(np.asfortranarray((m > 0).astype(np.uint8)))
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": rle["counts"].decode("utf-8")}


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict:
    """Uncompressed RLE of a 2-D mask: ``{"size": [H, W], "counts": [int, ...]}``, column-major runs that start
    with the number of leading zeros (COCO's encoding for crowd regions)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask_to_uncompressed_rle expects a 2-D mask, got shape {m.shape}")
    flat = (m > 0).astype(np.int8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0] + runs
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(r) for r in runs]}


def _as_compressed(rle: dict) -> dict:
    counts = rle["counts"]
    h, w = (int(v) for v in rle["size"])
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("utf-8")
    return {"size": [h, w], "counts": counts}


def rle_area(rle: dict) -> int:
    """Foreground pixel count of an RLE dict (compressed str/bytes or uncompressed list ``counts``)."""
    if isinstance(rle.get("counts"), list):
        return int(sum(rle["counts"][1::2]))
    return int(mask_utils.area(_as_compressed(rle)))


def rle_to_bbox(rle: dict) -> list[float]:
    """Tight ``[x, y, w, h]`` box (pixels, float) of an RLE, as pycocotools computes it; zeros for empty masks."""
    return [float(v) for v in mask_utils.toBbox(_as_compressed(rle))]


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Panoptic segment ids from an ``H×W×3`` RGB array: ``R + 256·G + 256²·B`` as ``int64 H×W``."""
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] < 3:
        raise ValueError(f"rgb2id expects H×W×3, got shape {a.shape}")
    a = a[..., :3].astype(np.int64)
    return a[..., 0] + 256 * a[..., 1] + 256 * 256 * a[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb2id`: ``H×W`` ids (< 256³) → ``uint8 H×W×3``."""
    a = np.asarray(ids).astype(np.int64)
    out = np.empty(a.shape + (3,), dtype=np.uint8)
    for c in range(3):
        out[..., c] = a % 256
        a = a // 256
    return out


def load_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """Read a COCO panoptic PNG and return its ``int64 H×W`` segment-id map (0 = void)."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise DataError(str(p), "panoptic PNG does not exist", "check panoptic_dir and the annotation file_name")
    with Image.open(p) as im:
        return rgb2id(np.asarray(im.convert("RGB")))


def load_odvg_label_map(path: str | os.PathLike, field: str = "label_map") -> dict[str, str]:
    """ODVG label map ``{"0": "person", ...}`` → ``{label key: name}``; DataError on a missing/bad file, naming
    ``field``.  (Mask2Former's label map is another format: a list of ``{id, name, color, isthing}``.)"""
    data = read_json(path, field=field, hint=f"point {field} at the ODVG label-map JSON",
                     invalid_hint="fix the label map")
    if not isinstance(data, dict) or not data:
        raise DataError(str(Path(os.path.expanduser(str(path)))),
                        "must be a non-empty JSON object {\"0\": \"name\", ...}")
    return {str(k): str(v) for k, v in data.items()}
