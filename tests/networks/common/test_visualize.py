"""Visualisation helpers: overlay colours (RGB order), boxes, labels, semantic colouring, atomic PNG."""
from __future__ import annotations

import numpy as np
from PIL import Image

from networks.common.visualize import colorize_semantic, overlay_masks, palette, save_png


def test_palette_is_deterministic_and_distinct():
    p = palette(12)
    assert p == palette(12) and len(set(p)) == 12
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in p)


def test_overlay_blends_masks_and_draws_boxes_and_labels():
    img = np.full((64, 80, 3), 100, np.uint8)
    mask = np.zeros((64, 80), bool)
    mask[20:40, 20:40] = True
    out = overlay_masks(img, [mask], [(255, 0, 0)], boxes=[[10, 10, 50, 50]], labels=["circle 0.9"], alpha=0.5)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert tuple(out[30, 30]) == (178, 50, 50)  # interior: 50 % red, red channel first
    assert tuple(out[20, 30]) == (255, 0, 0)  # mask outline
    assert tuple(out[45, 10]) == (255, 0, 0)  # box edge x1
    assert tuple(out[60, 70]) == (100, 100, 100)  # untouched
    assert (img == 100).all()  # input not modified
    # The label sits on a filled tag just above the box.
    tag = out[0:10, 10:40]
    assert (tag == (255, 0, 0)).all(axis=-1).sum() > 20
    assert (tag[..., 1] > 150).sum() > 5  # light (anti-aliased) text on the red tag


def test_overlay_with_nothing_is_identity():
    img = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(overlay_masks(img, []), img)


def test_colorize_semantic_list_and_dict():
    lab = np.array([[0, 1], [2, 7]])
    out = colorize_semantic(lab, [(0, 0, 0), (255, 0, 0), (0, 255, 0)])
    assert out.tolist() == [[[0, 0, 0], [255, 0, 0]], [[0, 255, 0], [0, 0, 0]]]
    out = colorize_semantic(lab, {7: (1, 2, 3)})
    assert out[1, 1].tolist() == [1, 2, 3] and out[0, 1].tolist() == [0, 0, 0]


def test_save_png_round_trip(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    p = save_png(tmp_path / "sub" / "x.png", rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(p)), rgb)
    save_png(tmp_path / "m.png", np.eye(3, dtype=bool))
    assert np.asarray(Image.open(tmp_path / "m.png")).tolist()[0] == [255, 0, 0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.png", "sub"]  # no temp files left
