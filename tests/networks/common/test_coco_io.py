"""COCO JSON loading errors and mask encodings (polygon, compressed and uncompressed RLE, panoptic ids)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from networks.common.coco_io import (
    ann_to_mask,
    id2rgb,
    load_coco,
    mask_to_rle,
    mask_to_uncompressed_rle,
    rgb2id,
    rle_area,
    rle_to_bbox,
)
from networks.common.errors import DataError


def test_load_coco_ok(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    assert load_coco(p, field="dataset.val_ann_path")["images"] == []


def test_load_coco_missing_file_names_the_field(tmp_path):
    with pytest.raises(DataError) as ei:
        load_coco(tmp_path / "x.json", field="dataset.val_ann_path")
    assert ei.value.subject == "dataset.val_ann_path" and "does not exist" in ei.value.problem


def test_load_coco_bad_json_has_line_and_column(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(DataError) as ei:
        load_coco(p, field="f")
    assert ei.value.subject == f"{p}:3:19"
    assert "invalid JSON" in ei.value.problem


@pytest.mark.parametrize("missing", ["images", "annotations", "categories"])
def test_load_coco_missing_key(tmp_path, missing):
    data = {"images": [], "annotations": [], "categories": []}
    del data[missing]
    p = tmp_path / "m.json"
    p.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"missing key '{missing}'"):
        load_coco(p, field="f")


def _random_mask(rng, h, w):
    m = np.zeros((h, w), np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, h), rng.integers(0, w)
        m[y : y + rng.integers(1, 15), x : x + rng.integers(1, 15)] = 1
    return m


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 64)])
def test_rle_round_trips(shape):
    rng = np.random.default_rng(0)
    for _ in range(10):
        m = _random_mask(rng, *shape)
        rle = mask_to_rle(m)
        assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
        json.dumps(rle)  # JSON-ready
        np.testing.assert_array_equal(ann_to_mask(rle, *shape), m)
        un = mask_to_uncompressed_rle(m)
        assert sum(un["counts"]) == m.size
        np.testing.assert_array_equal(ann_to_mask(un, *shape), m)
        assert rle_area(rle) == rle_area(un) == int(m.sum())


def test_uncompressed_rle_starts_with_zero_run_and_is_column_major():
    m = np.array([[1, 0], [1, 1]], np.uint8)
    # column-major: 1,1,0,1 -> zeros 0, ones 2, zeros 1, ones 1
    assert mask_to_uncompressed_rle(m)["counts"] == [0, 2, 1, 1]


def test_polygon_decodes_to_expected_square():
    m = ann_to_mask([[10, 10, 20, 10, 20, 20, 10, 20]], 40, 50)
    assert m.dtype == np.uint8 and m.shape == (40, 50) and m.sum() == 100
    assert m[10:20, 10:20].all()
    assert rle_to_bbox(mask_to_rle(m)) == [10.0, 10.0, 10.0, 10.0]
    # A flat polygon and degenerate polygons are tolerated.
    np.testing.assert_array_equal(ann_to_mask([10, 10, 20, 10, 20, 20, 10, 20], 40, 50), m)
    assert ann_to_mask([[1, 1, 2, 2]], 5, 5).sum() == 0


def test_bytes_counts_and_array_inputs():
    m = _random_mask(np.random.default_rng(1), 20, 30)
    rle = mask_to_rle(m)
    np.testing.assert_array_equal(ann_to_mask({"size": rle["size"], "counts": rle["counts"].encode()}, 20, 30), m)
    np.testing.assert_array_equal(ann_to_mask(m.astype(bool), 20, 30), m)


def test_bad_segmentations_raise_data_error():
    rle = mask_to_rle(np.ones((4, 4), np.uint8))
    with pytest.raises(DataError, match="does not match the image size"):
        ann_to_mask(rle, 5, 4, where="ann.json: annotation 3")
    with pytest.raises(DataError) as ei:
        ann_to_mask({"size": [2, 2], "counts": [1, 1]}, 2, 2, where="ann 9")
    assert ei.value.subject == "ann 9"
    with pytest.raises(DataError, match="odd number"):
        ann_to_mask([[1, 2, 3, 4, 5, 6, 7]], 10, 10)
    with pytest.raises(DataError, match="unsupported"):
        ann_to_mask("nope", 10, 10)


def test_panoptic_id_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536, 16_000_005]], np.int64)
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and tuple(rgb[0, 2]) == (255, 0, 0) and tuple(rgb[1, 0]) == (0, 1, 0)
    np.testing.assert_array_equal(rgb2id(rgb), ids)
