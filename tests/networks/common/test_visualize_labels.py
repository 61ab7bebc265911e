"""Overlay labels scale with the image, never overlap, sit on a tag of the instance colour; side-by-side and the
evaluate picture writer."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from networks.common.visualize import (
    SideBySideWriter,
    draw_labels,
    label_font,
    label_font_size,
    overlay_masks,
    place_labels,
    side_by_side,
)


def _ink_rows(region: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Rows of ``region`` holding pixels that differ from ``background`` (the drawn text)."""
    return np.nonzero((region != np.asarray(background)).any(axis=-1).any(axis=1))[0]


@pytest.mark.parametrize("h,w", [(128, 128), (1080, 1920)])
def test_label_text_is_at_least_two_percent_of_the_image_height(h, w):
    pil = Image.new("RGB", (w, h), (0, 0, 0))
    color = (255, 0, 0)
    box = [w * 0.3, h * 0.3, w * 0.6, h * 0.6]
    rect = draw_labels(pil, [box], ["Hello"], [color])[0]
    assert rect is not None
    x0, y0, x1, y1 = rect
    assert y1 - y0 >= 0.02 * h
    tag = np.asarray(pil)[y0:y1, x0:x1]
    rows = _ink_rows(tag, color)
    assert len(rows) and rows.max() - rows.min() + 1 >= 0.02 * h  # the glyphs themselves, not only the tag
    # The tag is filled with the instance colour and the text contrasts with it (white on red).
    assert (tag == color).all(axis=-1).mean() > 0.3
    assert (tag.min(axis=-1) > 200).sum() > 5
    # Just above the box's top-left corner.
    assert y1 <= box[1] + 1 and abs(x0 - box[0]) <= 1


def test_font_grows_with_the_image_and_stays_readable_when_small():
    assert label_font_size(128) >= 11
    assert label_font_size(1080) >= 0.02 * 1080 / 0.75  # font size ~ 1.3 x glyph cap height
    assert label_font_size(2160) > label_font_size(1080) > label_font_size(480)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_of_overlapping_boxes_do_not_intersect():
    pil = Image.new("RGB", (200, 160), (40, 40, 40))
    boxes = [[50, 50, 150, 120], [52, 51, 148, 118], [55, 53, 140, 110]]
    rects = draw_labels(pil, boxes, ["circle 0.91", "square 0.80", "triangle 0.5"],
                        [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    assert all(r is not None for r in rects)
    for i in range(len(rects)):
        for j in range(i + 1, len(rects)):
            assert not _overlap(rects[i], rects[j]), (rects[i], rects[j])
        x0, y0, x1, y1 = rects[i]
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 160
    # The first label keeps the preferred place above its box.
    assert rects[0][3] <= 50


def test_a_label_with_no_free_place_is_skipped_not_drawn_over_another():
    font = label_font(label_font_size(40))
    # An image one label tall: the second label cannot go anywhere without covering the first.
    rects = place_labels((60, 14), [[0, 0, 60, 14], [0, 0, 60, 14]], ["a long label", "another long one"], font)
    assert rects[0] is not None and rects[1] is None


def test_overlay_labels_at_mask_boxes_do_not_overlap():
    img = np.zeros((128, 128, 3), np.uint8)
    m1 = np.zeros((128, 128), bool)
    m1[40:90, 40:90] = True
    m2 = np.zeros((128, 128), bool)
    m2[42:88, 45:95] = True
    colors = [(255, 0, 0), (0, 0, 255)]
    out = overlay_masks(img, [m1, m2], colors, labels=["first", "second"])
    # Both tags are visible: enough pixels of each pure instance colour outside the masks' interiors.
    for c in colors:
        assert (out == c).all(axis=-1).sum() > 60


def test_side_by_side_keeps_aspect_and_titles():
    left = np.zeros((100, 150, 3), np.uint8)
    right = np.full((50, 75, 3), 255, np.uint8)  # resized to the left's height
    out = side_by_side(left, right, ("ground truth", "prediction"))
    assert out.dtype == np.uint8 and out.shape[2] == 3
    assert 300 <= out.shape[1] <= 310
    assert out.shape[0] > 100  # a title strip above the panels
    assert (out[-1, 160:300] == 255).all() and (out[-1, :150] == 0).all()


def test_writer_keeps_the_first_images_and_writes_atomically(tmp_path):
    writer = SideBySideWriter(tmp_path / "overlays", 2)
    img = np.zeros((20, 30, 3), np.uint8)
    for key in (5, 3, 9):
        writer.add(key, f"dir/img_{key}.jpg", img, img)
    assert not writer.wanted
    paths = writer.finish()
    assert sorted(p.name for p in paths) == ["img_3.png", "img_5.png"]
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["img_3.png", "img_5.png"]
    assert SideBySideWriter(None, 4).finish() == [] and not SideBySideWriter(tmp_path, 0).wanted
