"""`tao dataset validate`: each rule finds one planted error, names the exact record and exits 2; the clean
synthetic set passes with exit 0 in every format."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from networks.common import synthetic
from tao_cli.cli import app
from tests.dataset_plants import IMAGE_FILE_RULES, plant_coco

runner = CliRunner()


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("validate_synth")
    return synthetic.generate(root, seed=3, num_train=5, num_val=1, image_size=64)["train"]


def _run(tmp_path: Path, *args: str) -> tuple[int, dict, str]:
    out = tmp_path / "report.json"
    res = runner.invoke(app, ["dataset", "validate", *args, "--json", str(out)])
    report = json.loads(out.read_text()) if out.exists() else {}
    return res.exit_code, report, res.output


def _errors(report: dict) -> set[tuple[str, str]]:
    return {(p["where"], p["rule"]) for p in report["problems"] if p["severity"] == "error"}


@pytest.mark.parametrize("key,extra", [("annotations", []), ("panoptic_json", []), ("odvg", ["--label-map"]),
                                       ("semantic_dir", [])])
def test_clean_synthetic_set_passes(synth, tmp_path, key, extra):
    args = [str(synth[key]), "--images", str(synth["images"]), "--all"]
    if extra:
        args += [extra[0], str(synth["odvg_labelmap"])]
    code, report, output = _run(tmp_path, *args)
    assert code == 0, output
    assert report["errors"] == 0 and report["problems"] == []
    assert report["format"] == {"annotations": "coco", "panoptic_json": "coco_panoptic", "odvg": "odvg",
                                "semantic_dir": "semantic"}[key]


def test_pretty_printed_coco_is_detected(synth, tmp_path):
    doc = json.loads(Path(synth["annotations"]).read_text())
    p = tmp_path / "pretty.json"
    p.write_text(json.dumps(doc, indent=2))
    code, report, _ = _run(tmp_path, str(p))
    assert (code, report["format"], report["stats"]["annotations"]) == (0, "coco", len(doc["annotations"]))


@pytest.mark.parametrize("rule", ["image_id_duplicate", "annotation_id_duplicate", "image_ref", "category_ref",
                                  "bbox_not_finite", "bbox_negative", "bbox_outside_image", "polygon_short", "rle",
                                  "image_missing", "image_size_mismatch", "image_decode"])
def test_coco_rule_names_the_record(synth, tmp_path, rule):
    doc = json.loads(Path(synth["annotations"]).read_text())
    assert isinstance(doc["annotations"][1]["segmentation"], dict)  # the RLE plant edits an RLE
    record = plant_coco(doc, rule)
    needs_images = rule in IMAGE_FILE_RULES
    images = tmp_path / "images"
    shutil.copytree(synth["images"], images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    code, report, output = _run(tmp_path, str(p), *(["--images", str(images), "--all"] if needs_images else []))
    assert code == 2, output
    assert (f"{p}: {record}", rule) in _errors(report), report["problems"]
    assert f"{p}: {record}" in output.replace("\n", "")


def test_panoptic_png_ids_must_match_segments_info(synth, tmp_path):
    doc = json.loads(Path(synth["panoptic_json"]).read_text())
    k = next(i for i, a in enumerate(doc["annotations"]) if a["segments_info"])
    dropped = doc["annotations"][k]["segments_info"].pop()
    p = tmp_path / "pan.json"
    p.write_text(json.dumps(doc))
    code, report, _ = _run(tmp_path, str(p), "--masks", str(synth["panoptic_dir"]), "--all")
    assert code == 2
    where = f"{p}: annotations[{k}] (image id {doc['annotations'][k]['image_id']})"
    assert _errors(report) == {(where, "png_ids")}
    assert f"in PNG only: [{dropped['id']}]" in report["problems"][0]["message"]


def test_panoptic_second_annotation_of_an_image(synth, tmp_path):
    doc = json.loads(Path(synth["panoptic_json"]).read_text())
    doc["annotations"].append(copy.deepcopy(doc["annotations"][0]))
    p = tmp_path / "pan.json"
    p.write_text(json.dumps(doc))
    code, report, _ = _run(tmp_path, str(p), "--masks", str(synth["panoptic_dir"]))
    k = len(doc["annotations"]) - 1
    assert code == 2
    assert (f"{p}: annotations[{k}] (image id {doc['annotations'][0]['image_id']})",
            "image_annotated_twice") in _errors(report)


@pytest.mark.parametrize("rule", ["json_line", "label_unknown", "bbox_negative", "mask_missing"])
def test_odvg_rule_names_the_line(synth, tmp_path, rule):
    lines = Path(synth["odvg"]).read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if json.loads(line)["detection"]["instances"])
    rec = json.loads(lines[n])
    inst = rec["detection"]["instances"][0]
    if rule == "json_line":
        lines[n] = lines[n][:-5]
        where = f"{{p}}:{n + 1}"
    else:
        where = f"{{p}}:{n + 1} instance 0"
        if rule == "label_unknown":
            inst["label"] = 999
        elif rule == "bbox_negative":
            inst["bbox"] = [10.0, 10.0, 5.0, 20.0]
        else:
            del inst["mask"]
        lines[n] = json.dumps(rec)
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    code, report, _ = _run(tmp_path, str(p), "--label-map", str(synth["odvg_labelmap"]))
    assert code == 2
    assert _errors(report) == {(where.format(p=p), rule)}


def test_semantic_rgb_mask_is_refused(synth, tmp_path):
    from PIL import Image

    masks = tmp_path / "semantic"
    shutil.copytree(synth["semantic_dir"], masks)
    bad = sorted(masks.glob("*.png"))[1]
    Image.open(bad).convert("RGB").save(bad)
    code, report, _ = _run(tmp_path, str(masks), "--all")
    assert code == 2
    assert _errors(report) == {(str(bad), "mask_mode")}


def test_max_lines_then_counts(synth, tmp_path):
    doc = json.loads(Path(synth["annotations"]).read_text())
    for a in doc["annotations"]:
        a["category_id"] = 4321
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    code, report, output = _run(tmp_path, str(p), "--max-lines", "1")
    n = len(doc["annotations"])
    assert code == 2 and report["counts"] == {"error:category_ref": n}
    assert output.count("refers to unknown category_id") == 1
    assert f"... {n - 1} more problem(s)" in output and f"error:category_ref: {n}" in output


def test_invalid_json_is_reported_with_its_line(synth, tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{\n "images": [\n  {"id": 1,,}\n ]\n}\n')
    code, report, _ = _run(tmp_path, str(p))
    assert code == 2
    assert _errors(report) == {(f"{p}:3:12", "top_level")}
