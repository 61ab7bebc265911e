"""Drawing helpers for inference outputs: mask overlays, boxes, labels, semantic colour maps, PNG saving.

Images are ``uint8 H×W×3`` **RGB** arrays; masks are ``H×W`` bool (or 0/1) arrays at the image's size; boxes are
``[x1, y1, x2, y2]`` in pixels; colours are ``(r, g, b)`` tuples of ints in 0..255.
"""
from __future__ import annotations

import colorsys
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from networks.common.io import atomic_write_bytes

__all__ = ["palette", "overlay_masks", "colorize_semantic", "save_png"]

Color = tuple[int, int, int]


def palette(n: int, seed: int = 0) -> list[Color]:
    """``n`` distinct, saturated RGB colours; deterministic for a given ``seed`` (golden-ratio hue walk)."""
    rng = np.random.default_rng(seed)
    start = float(rng.random())
    out = []
    for i in range(int(n)):
        h = (start + i * 0.618033988749895) % 1.0
        s = 0.65 + 0.3 * ((i * 7) % 3) / 2.0
        v = 0.95 - 0.25 * ((i * 5) % 2)
        r, g, b = colorsys.hsv_to_rgb(h, min(s, 1.0), v)
        out.append((int(round(r * 255)), int(round(g * 255)), int(round(b * 255))))
    return out


def _text_color(color: Color) -> Color:
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def overlay_masks(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    colors: Sequence[Color] | None = None,
    boxes: Sequence[Sequence[float]] | np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend filled masks into ``image`` and draw mask outlines, ``boxes`` (xyxy px) and text ``labels``.

    ``colors[i]`` colours instance i (defaults to :func:`palette`); ``alpha`` is the mask opacity.  Any of
    ``masks``/``boxes``/``labels`` may be empty; ``boxes``/``labels`` may be None.  Returns a new
    ``uint8 H×W×3`` RGB array; the input is not modified.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"overlay_masks expects an H×W×3 image, got shape {img.shape}")
    h, w = img.shape[:2]
    n = max(len(masks), len(boxes) if boxes is not None else 0, len(labels) if labels is not None else 0)
    cols = list(colors) if colors is not None else palette(n)
    if len(cols) < n:
        cols += palette(n - len(cols), seed=len(cols) + 1)
    out = img.astype(np.float32)
    for i, m in enumerate(masks):
        mb = np.asarray(m).astype(bool)
        if mb.shape != (h, w):
            raise ValueError(f"mask {i} has shape {mb.shape}, expected {(h, w)}")
        out[mb] = (1.0 - alpha) * out[mb] + alpha * np.asarray(cols[i], dtype=np.float32)
        # Outline: mask pixels with a background 4-neighbour, so touching instances stay distinguishable.
        pad = np.pad(mb, 1)
        inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        out[mb & ~inner] = np.asarray(cols[i], dtype=np.float32)
    pil = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    box_list = [] if boxes is None else [list(map(float, b)) for b in np.asarray(boxes).reshape(-1, 4)]
    for i, b in enumerate(box_list):
        draw.rectangle([b[0], b[1], b[2], b[3]], outline=tuple(cols[i]), width=max(1, min(h, w) // 200))
    for i, text in enumerate(labels or []):
        if not text:
            continue
        if i < len(box_list):
            x, y = box_list[i][0], box_list[i][1]
        elif i < len(masks) and np.asarray(masks[i]).any():
            ys, xs = np.nonzero(masks[i])
            x, y = float(xs.min()), float(ys.min())
        else:
            x, y = 0.0, 0.0
        left, top, right, bottom = draw.textbbox((0, 0), str(text), font=font)
        tw, th = right - left, bottom - top
        x = min(max(x, 0.0), max(w - tw - 2, 0))
        y = y - th - 2 if y - th - 2 >= 0 else min(y + 1, max(h - th - 2, 0))
        draw.rectangle([x, y, x + tw + 2, y + th + 2], fill=tuple(cols[i]))
        draw.text((x + 1 - left, y + 1 - top), str(text), fill=_text_color(tuple(cols[i])), font=font)
    return np.asarray(pil, dtype=np.uint8).copy()


def colorize_semantic(label_map: np.ndarray, colors: Sequence[Color] | np.ndarray | dict[int, Color]) -> np.ndarray:
    """``uint8 H×W×3`` RGB image of an integer class map; ``colors`` is indexed by class id (list/array) or a
    dict ``{class_id: (r, g, b)}``.  Ids without a colour are drawn black."""
    lab = np.asarray(label_map).astype(np.int64)
    if isinstance(colors, dict):
        size = max([int(k) for k in colors] + [int(lab.max()) if lab.size else 0]) + 1
        table = np.zeros((size, 3), dtype=np.uint8)
        for k, c in colors.items():
            table[int(k)] = c
    else:
        cols = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
        size = max(len(cols), int(lab.max()) + 1 if lab.size else 0)
        table = np.zeros((size, 3), dtype=np.uint8)
        table[: len(cols)] = cols
    safe = np.where(lab >= 0, lab, size)
    table = np.concatenate([table, np.zeros((1, 3), dtype=np.uint8)])
    return table[np.minimum(safe, size)]


def save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` (``H×W`` uint8/uint16/bool or ``H×W×3``/``H×W×4`` uint8) as PNG atomically; returns the path."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 3 and a.shape[2] not in (3, 4):
        raise ValueError(f"save_png expects H×W, H×W×3 or H×W×4, got shape {a.shape}")
    if a.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"save_png expects uint8/uint16/bool, got {a.dtype}")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
