"""Drawing helpers: mask overlays, boxes, non-overlapping labels, semantic colour maps, side-by-side pictures,
PNG saving, and the evaluate-time ground-truth | prediction pictures.

Images are ``uint8 H×W×3`` **RGB** arrays; masks are ``H×W`` bool (or 0/1) arrays at the image's size; boxes are
``[x1, y1, x2, y2]`` in pixels; colours are ``(r, g, b)`` tuples of ints in 0..255.  Label rectangles are
``(x0, y0, x1, y1)`` integer pixels with an exclusive end.

Label text scales with the image (:func:`label_font_size`: at least 3 % of the image height, never below 11 px
unless the image is tiny) and is drawn with Pillow's built-in TrueType font, so nothing is downloaded.
"""
from __future__ import annotations

import colorsys
import functools
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from networks.common.io import atomic_write_bytes

__all__ = [
    "palette",
    "overlay_masks",
    "colorize_semantic",
    "save_png",
    "encode_png",
    "label_font_size",
    "label_font",
    "place_labels",
    "draw_labels",
    "denormalize",
    "add_caption",
    "side_by_side",
    "SideBySideWriter",
]

Color = tuple[int, int, int]
Rect = tuple[int, int, int, int]

#: title of the two panels of an evaluate picture
GT_PRED_TITLES = ("ground truth", "prediction")


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


# ----------------------------------------------------------------------------------------------- labels
def label_font_size(image_height: int) -> int:
    """Font size (px) of labels on an image ``image_height`` pixels tall: 3 % of the height, at least 11 px
    (readable on a 128 px thumbnail) but at most a fifth of a tiny image."""
    h = max(int(image_height), 1)
    return max(min(11, max(h // 5, 6)), int(round(0.03 * h)))


@functools.lru_cache(maxsize=32)
def label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in TrueType font at ``size`` px (Pillow >= 10.1 with FreeType); the fixed-size bitmap
    font where FreeType is missing."""
    try:
        return ImageFont.load_default(size=int(size))
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: the bitmap font ignores size
        return ImageFont.load_default()


def _text_extent(text: str, font) -> tuple[int, int, int, int]:
    """(left, top, width, height) of ``text`` drawn at the origin with its default (left-ascender) anchor.

    The top is at most the top of a capital, so labels of one font have one height unless a glyph is taller."""
    left, top, right, bottom = font.getbbox(text)
    cap_top = font.getbbox("H")[1]
    top = min(top, cap_top)
    return left, top, max(right - left, 1), max(bottom - top, 1)


def _label_box(text: str, font) -> tuple[int, int, int]:
    """(rect width, rect height, padding) of a label tag."""
    _, _, tw, th = _text_extent(text, font)
    pad = max(1, th // 8)
    return tw + 2 * pad, th + 2 * pad, pad


def _intersects(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _candidates(anchor: Sequence[float] | None, lw: int, lh: int, w: int, h: int) -> list[tuple[int, int]]:
    """Top-left corners to try for a ``lw × lh`` label of ``anchor`` (xyxy px), best first, clamped to the
    image: above the box's top-left corner, inside it, below, inside the bottom, the same at the right edge,
    then further positions up and down along the box's left and right edges."""
    if anchor is None:
        x1 = y1 = 0.0
        x2, y2 = float(lw), float(lh)
        first = [(0, 0)]
    else:
        x1, y1, x2, y2 = (float(v) for v in anchor)
        first = []
    xl, xr = int(round(x1)), int(round(x2)) - lw
    yt, yb = int(round(y1)), int(round(y2))
    first += [(xl, yt - lh), (xl, yt), (xl, yb), (xl, yb - lh), (xr, yt - lh), (xr, yt), (xr, yb), (xr, yb - lh)]
    step = max(1, lh // 2)
    home = yt - lh
    ys = sorted(range(0, max(h - lh, 0) + 1, step), key=lambda y: (abs(y - home), y))
    scan = [(x, y) for y in ys for x in (xl, xr)]
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for x, y in first + scan:
        x = min(max(x, 0), max(w - lw, 0))
        y = min(max(y, 0), max(h - lh, 0))
        if (x, y) not in seen:
            seen.add((x, y))
            out.append((x, y))
    return out


def place_labels(image_size: tuple[int, int], anchors: Sequence[Sequence[float] | None], texts: Sequence[str],
                 font, taken: Sequence[Rect] = ()) -> list[Rect | None]:
    """Rectangles for labels ``texts`` of objects ``anchors`` (xyxy px boxes, or None for "anywhere") on an image
    of ``image_size`` = (width, height), placed in order so that no two rectangles (nor any of ``taken``)
    intersect.  Each label goes to the first free position of :func:`_candidates`; a label with no free
    position (or an empty text) gets None and is not drawn, so a label never hides another."""
    w, h = int(image_size[0]), int(image_size[1])
    placed: list[Rect] = list(taken)
    out: list[Rect | None] = []
    for i, text in enumerate(texts):
        if not text:
            out.append(None)
            continue
        lw, lh, _ = _label_box(str(text), font)
        anchor = anchors[i] if i < len(anchors) else None
        rect = None
        for x, y in _candidates(anchor, lw, lh, w, h):
            cand = (x, y, x + lw, y + lh)
            if not any(_intersects(cand, r) for r in placed):
                rect = cand
                break
        if rect is not None:
            placed.append(rect)
        out.append(rect)
    return out


def draw_labels(pil: Image.Image, anchors: Sequence[Sequence[float] | None], texts: Sequence[str],
                colors: Sequence[Color], font=None, taken: Sequence[Rect] = ()) -> list[Rect | None]:
    """Draw ``texts`` as tags filled with ``colors[i]`` (black or white text, whichever contrasts) next to
    ``anchors`` on ``pil`` (in place), without overlaps (see :func:`place_labels`).  ``font`` defaults to
    :func:`label_font` sized for the image.  Returns each label's rectangle, None where it was skipped."""
    font = font or label_font(label_font_size(pil.size[1]))
    rects = place_labels(pil.size, anchors, texts, font, taken)
    draw = ImageDraw.Draw(pil)
    for i, rect in enumerate(rects):
        if rect is None:
            continue
        text = str(texts[i])
        left, top, _, _ = _text_extent(text, font)
        _, _, pad = _label_box(text, font)
        color = tuple(int(c) for c in colors[i % len(colors)]) if colors else (255, 255, 255)
        draw.rectangle([rect[0], rect[1], rect[2] - 1, rect[3] - 1], fill=color)
        draw.text((rect[0] + pad - left, rect[1] + pad - top), text, fill=_text_color(color), font=font)
    return rects


# ----------------------------------------------------------------------------------------------- overlays
def _mask_bbox(mask: np.ndarray) -> list[float] | None:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def overlay_masks(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    colors: Sequence[Color] | None = None,
    boxes: Sequence[Sequence[float]] | np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    alpha: float = 0.5,
    box_width: int | None = None,
) -> np.ndarray:
    """Blend filled masks into ``image`` and draw mask outlines, ``boxes`` (xyxy px) and text ``labels``.

    ``box_width`` is the box outline width in pixels (e.g. Grounding DINO's ``inference.outline_width``); None
    scales it with the image (1 px per 200 px of the shorter side).

    ``colors[i]`` colours instance i (defaults to :func:`palette`); ``alpha`` is the mask opacity.  Any of
    ``masks``/``boxes``/``labels`` may be empty; ``boxes``/``labels`` may be None.  Label i sits at box i (else
    at the bounding box of mask i, else anywhere free) on a tag of the instance colour; labels never overlap
    and a label that finds no free place is left out (:func:`draw_labels`).  Returns a new ``uint8 H×W×3`` RGB
    array; the input is not modified.
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
    box_list = [] if boxes is None else [list(map(float, b)) for b in np.asarray(boxes).reshape(-1, 4)]
    for i, b in enumerate(box_list):
        width = int(box_width) if box_width is not None else max(1, min(h, w) // 200)
        draw.rectangle([b[0], b[1], b[2], b[3]], outline=tuple(cols[i]), width=width)
    if labels:
        anchors: list[Sequence[float] | None] = []
        for i in range(len(labels)):
            if i < len(box_list):
                anchors.append(box_list[i])
            elif i < len(masks):
                anchors.append(_mask_bbox(np.asarray(masks[i]).astype(bool)))
            else:
                anchors.append(None)
        draw_labels(pil, anchors, [str(t) if t else "" for t in labels], [tuple(c) for c in cols[:len(labels)]])
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


def denormalize(image: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``uint8 H×W×3`` RGB picture of a normalised ``[3, H, W]`` tensor/array ``(x/255 - mean) / std``
    (``mean``/``std`` per channel, in 0..1 units, as the data pipelines use)."""
    x = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"denormalize expects a [3, H, W] image, got shape {tuple(x.shape)}")
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    rgb = (x * s + m) * 255.0
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0).copy()


# ----------------------------------------------------------------------------------------- composition
def _wrap(text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for para in str(text).splitlines() or [""]:
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}" if line else word
            if line and font.getlength(trial) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def add_caption(image: np.ndarray, text: str, *, top: bool = True, font_size: int | None = None,
                background: Color = (32, 32, 32), color: Color = (255, 255, 255)) -> np.ndarray:
    """``image`` with a strip holding ``text`` (word-wrapped to the image width) above it (``top``) or below.

    The font is sized for the image's height (:func:`label_font_size`) unless ``font_size`` is given."""
    img = np.asarray(image)
    h, w = img.shape[:2]
    font = label_font(font_size or label_font_size(h))
    _, _, _, th = _text_extent("Hg", font)
    pad = max(2, th // 4)
    lines = _wrap(text, font, max(w - 2 * pad, 1))
    line_h = th + pad
    strip = Image.new("RGB", (w, pad + line_h * len(lines)), background)
    draw = ImageDraw.Draw(strip)
    _, top_off, _, _ = _text_extent("Hg", font)
    for k, line in enumerate(lines):
        draw.text((pad, pad + k * line_h - top_off), line, fill=color, font=font)
    parts = [np.asarray(strip), img] if top else [img, np.asarray(strip)]
    return np.concatenate(parts, axis=0)


def _resize_to_height(image: np.ndarray, height: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h == height:
        return image
    new_w = max(1, int(round(w * height / h)))
    return np.asarray(Image.fromarray(image).resize((new_w, height), Image.BILINEAR))


def side_by_side(left: np.ndarray, right: np.ndarray, titles: Sequence[str] = GT_PRED_TITLES,
                 gap: int | None = None) -> np.ndarray:
    """Two RGB pictures next to each other, each under a small title strip (``titles``).

    ``right`` is resized to ``left``'s height (aspect kept); the panels are ``gap`` pixels apart (default
    ~1 % of the height, at least 2).  Returns ``uint8 (t + H) × (W_left + gap + W_right) × 3``."""
    a = np.asarray(left, dtype=np.uint8)
    b = _resize_to_height(np.asarray(right, dtype=np.uint8), a.shape[0])
    h = a.shape[0]
    size = label_font_size(h)
    a = add_caption(a, titles[0] if titles else "", font_size=size)
    b = add_caption(b, titles[1] if titles and len(titles) > 1 else "", font_size=size)
    # Strips may wrap differently for very different widths: pad the shorter panel at the bottom.
    H = max(a.shape[0], b.shape[0])
    g = max(2, h // 100) if gap is None else int(gap)
    canvas = np.full((H, a.shape[1] + g + b.shape[1], 3), 255, dtype=np.uint8)
    canvas[:a.shape[0], :a.shape[1]] = a
    canvas[:b.shape[0], a.shape[1] + g:] = b
    return canvas


# ------------------------------------------------------------------------------------------------- files
def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of ``array`` (``H×W`` uint8/uint16/bool or ``H×W×3``/``H×W×4`` uint8)."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 3 and a.shape[2] not in (3, 4):
        raise ValueError(f"save_png expects H×W, H×W×3 or H×W×4, got shape {a.shape}")
    if a.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"save_png expects uint8/uint16/bool, got {a.dtype}")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` (``H×W`` uint8/uint16/bool or ``H×W×3``/``H×W×4`` uint8) as PNG atomically; returns the path."""
    return atomic_write_bytes(path, encode_png(array))


class SideBySideWriter:
    """Ground truth | prediction pictures of the first ``num`` images of an evaluation, written by rank 0.

    Each rank calls :meth:`add` while :attr:`wanted` (it keeps its first ``num`` images, PNG-encoded); every rank
    then calls :meth:`finish` (a collective when a process group exists), which gathers them, keeps the ``num``
    smallest ``key`` values (the dataset order, e.g. image id) and writes ``out_dir/<name>.png`` atomically on
    rank 0.  With ``out_dir`` None or ``num`` 0 it does nothing (and gathers nothing).
    """

    def __init__(self, out_dir: str | os.PathLike | None, num: int):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.num = max(int(num or 0), 0)
        self._items: dict[Any, tuple[str, bytes]] = {}

    @property
    def enabled(self) -> bool:
        """True when pictures are written at all (same on every rank)."""
        return self.out_dir is not None and self.num > 0

    @property
    def wanted(self) -> bool:
        """True while this rank still keeps new pictures."""
        return self.enabled and len(self._items) < self.num

    def add(self, key: Any, name: str, left: np.ndarray, right: np.ndarray,
            titles: Sequence[str] = GT_PRED_TITLES) -> None:
        """Keep the picture of one image (``key`` orders images; ``name`` is the file stem)."""
        if self.wanted and key not in self._items:
            self._items[key] = (str(name), encode_png(side_by_side(left, right, titles)))

    def finish(self, gather: bool = True) -> list[Path]:
        """Gather (a collective: every rank calls it) and write on rank 0; returns the paths written (empty on
        other ranks).  ``gather=False`` writes this process's pictures as they are (for callers that already
        gathered their data and call this on rank 0 only)."""
        if not self.enabled:
            return []
        from networks.common.distributed import gather_objects, is_rank_zero

        merged: dict[Any, tuple[str, bytes]] = {}
        for part in gather_objects(self._items) if gather else [self._items]:
            merged.update(part or {})
        self._items = {}
        if gather and not is_rank_zero():
            return []
        written: list[Path] = []
        used: set[str] = set()
        for key in sorted(merged, key=_sort_key)[: self.num]:
            name, data = merged[key]
            stem = Path(name).stem or str(key)
            if stem in used:  # same file name in two folders: keep both
                stem = f"{stem}_{key}"
            used.add(stem)
            written.append(atomic_write_bytes(self.out_dir / f"{stem}.png", data))
        return written


def _sort_key(key: Any) -> tuple[int, Any]:
    return (0, key) if isinstance(key, (int, float)) else (1, str(key))
