"""Bad data is refused or skipped, never scored (issue 15, item 5).

Every case runs the real CLI (``tao_cli.cli.run_model``) with the tiny specs on a copy of the synthetic set in
which one record is broken, and asserts: exit code 2, exactly one stderr line naming the file and the record,
and no output (``metrics.json``, the labels JSON) written.  Checkpoints for evaluate/inference are the untrained
tiny models saved by :func:`_checkpoint` (the data is refused before any weight matters).

Training files take the skip side of the rule where a record is safe to drop: a polygon with fewer than 3
points in a training file is skipped with one warning line giving the count (tested on the readers directly).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch

from networks.common.context import RunContext
from networks.common.synthetic import generate
from tao_cli import registry
from tao_cli.cli import run_model
from tao_cli.paths import configs_dir
from tao_cli.spec import load_spec

pytestmark = pytest.mark.reliability

SPECS = {"mal": configs_dir() / "mal" / "demo.yaml", "mask2former": configs_dir() / "mask2former" / "tiny.yaml",
         "mask_grounding_dino": configs_dir() / "mask_grounding_dino" / "tiny.yaml"}


# ------------------------------------------------------------------------------------------- fixture helper
def write_bad_coco(src: Path, dst: Path, breaks) -> Path:
    """Copy the COCO JSON ``src`` to ``dst`` after ``breaks(doc)`` edited it in place; returns ``dst``."""
    doc = json.loads(Path(src).read_text())
    breaks(doc)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(doc))
    return dst


def write_bad_odvg(src: Path, dst: Path, breaks) -> Path:
    """Copy the ODVG JSON-lines file ``src`` to ``dst`` after ``breaks(records)`` edited the parsed lines."""
    records = [json.loads(line) for line in Path(src).read_text().splitlines() if line.strip()]
    breaks(records)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(json.dumps(r) + "\n" for r in records))
    return dst


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_data")
    return root, generate(root / "synthetic", seed=11, num_train=4, num_val=2, image_size=64)


def _overrides(net: str, data: dict, results: Path) -> list[str]:
    tr, va = data["train"], data["val"]
    if net == "mal":
        return [f"results_dir={results}", f"dataset.train_ann_path={tr['annotations']}",
                f"dataset.train_img_dir={tr['images']}", f"dataset.val_ann_path={va['annotations']}",
                f"dataset.val_img_dir={va['images']}", f"inference.ann_path={va['annotations']}",
                f"inference.img_dir={va['images']}", "dataset.num_workers_per_gpu=0", "train.num_epochs=1",
                "train.checkpoint_interval=1", "train.validation_interval=1", "train.batch_size=2"]
    if net == "mask2former":
        return [f"results_dir={results}", f"dataset.label_map={tr['label_map']}",
                f"dataset.train.img_dir={tr['images']}", f"dataset.train.panoptic_json={tr['panoptic_json']}",
                f"dataset.train.panoptic_dir={tr['panoptic_dir']}", f"dataset.val.img_dir={va['images']}",
                f"dataset.val.panoptic_json={va['panoptic_json']}", f"dataset.val.panoptic_dir={va['panoptic_dir']}",
                f"dataset.test.img_dir={va['images']}"]
    return [f"results_dir={results}",
            f"dataset.train_data_sources=[{{image_dir: {tr['images']}, json_file: {tr['odvg']}, "
            f"label_map: {tr['odvg_labelmap']}}}]",
            f"dataset.val_data_sources={{image_dir: {va['images']}, json_file: {va['annotations']}}}",
            f"dataset.test_data_sources={{image_dir: {va['images']}, json_file: {va['annotations']}}}",
            f"dataset.infer_data_sources.image_dir={va['images']}"]


_CKPTS: dict[tuple[str, str], Path] = {}


def _checkpoint(net_name: str, root: Path, data: dict) -> Path:
    """The untrained tiny model of ``net_name`` saved as a checkpoint the engine accepts (built once)."""
    if (str(root), net_name) not in _CKPTS:
        net = registry.load(net_name)
        cfg = load_spec(net.config_class, "train", SPECS[net_name], _overrides(net_name, data, root / "ck"),
                        mandatory=False)
        torch.manual_seed(0)
        module = net.build_module(cfg, RunContext("evaluate", root, log=logging.getLogger("test")))
        path = root / f"{net_name}_untrained.pth"
        torch.save({"state_dict": module.state_dict(), "tao_model": net_name, "epoch": 0, "global_step": 0}, path)
        _CKPTS[(str(root), net_name)] = path
    return _CKPTS[(str(root), net_name)]


# ------------------------------------------------------------------------------------------- the variants
# (network, action, which file is broken): each knows the override that points at the broken copy and the
# outputs that must not appear.
class Variant:
    def __init__(self, net: str, action: str, kind: str, key: str | None, source: str, extra=()):
        self.net, self.action, self.kind, self.key, self.source, self.extra = net, action, kind, key, source, extra

    @property
    def id(self) -> str:
        return f"{self.net}-{self.action}-{self.kind}"


MAL_TRAIN = Variant("mal", "train", "coco", "dataset.train_ann_path", "train")
MAL_EVAL = Variant("mal", "evaluate", "coco", "dataset.val_ann_path", "val")
MAL_INFER = Variant("mal", "inference", "coco", "inference.ann_path", "val")
M2F_EVAL_INST = Variant("mask2former", "evaluate", "coco", "dataset.val.instance_json", "val",
                        ("dataset.val.type=coco", "model.mode=instance"))
M2F_TRAIN_INST = Variant("mask2former", "train", "coco", "dataset.train.instance_json", "train",
                         ("dataset.train.type=coco",))
M2F_EVAL_PAN = Variant("mask2former", "evaluate", "panoptic", "dataset.val.panoptic_json", "val")
MGD_EVAL = Variant("mask_grounding_dino", "evaluate", "coco", "dataset.test_data_sources.json_file", "val")
MGD_TRAIN = Variant("mask_grounding_dino", "train", "odvg", None, "train")


def run_broken(variant: Variant, synthetic, tmp_path, capsys, breaks) -> tuple[int, list[str], Path, Path]:
    """Run ``variant`` on a copy of its file edited by ``breaks``; returns (code, stderr lines, file, run dir)."""
    root, data = synthetic
    results = tmp_path / "results"
    overrides = _overrides(variant.net, data, results) + list(variant.extra)
    split = data[variant.source]
    if variant.kind == "odvg":
        bad = write_bad_odvg(split["odvg"], tmp_path / "bad.jsonl", breaks)
        overrides.append(f"dataset.train_data_sources=[{{image_dir: {split['images']}, json_file: {bad}, "
                         f"label_map: {split['odvg_labelmap']}}}]")
    else:
        src = split["panoptic_json"] if variant.kind == "panoptic" else split["annotations"]
        bad = write_bad_coco(src, tmp_path / "bad.json", breaks)
        overrides.append(f"{variant.key}={bad}")
    if variant.net == "mask2former" and variant.kind == "coco":
        overrides.append(f"{variant.key.rsplit('.', 1)[0]}.img_dir={split['images']}")
    if variant.action in ("evaluate", "inference"):
        overrides.append(f"{variant.action}.checkpoint={_checkpoint(variant.net, root, data)}")
    capsys.readouterr()
    code = run_model(variant.net, variant.action, str(SPECS[variant.net]), overrides)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err, bad, results / variant.action


def assert_refused(code: int, err: list[str], bad: Path, record: str, run_dir: Path) -> None:
    assert code == 2 and len(err) == 1, (code, err)
    assert str(bad) in err[0] and record in err[0], err[0]
    written = sorted(p.name for p in run_dir.rglob("*.json") if p.name != "status.json") if run_dir.exists() else []
    assert written == [], written


# ------------------------------------------------------------------------------------------- the cases
def _dup_image_id(doc):
    # The second image takes the first one's id, and so do its annotations: their boxes would be scored on
    # whichever of the two images a reader keeps.
    first, second = doc["images"][0]["id"], doc["images"][1]["id"]
    doc["images"][1]["id"] = first
    for a in doc["annotations"]:
        if a["image_id"] == second:
            a["image_id"] = first


@pytest.mark.parametrize("variant", [MAL_TRAIN, MAL_EVAL, MAL_INFER, M2F_EVAL_INST, M2F_EVAL_PAN, MGD_EVAL],
                         ids=lambda v: v.id)
def test_duplicate_image_id(variant, synthetic, tmp_path, capsys):
    code, err, bad, run_dir = run_broken(variant, synthetic, tmp_path, capsys, _dup_image_id)
    assert_refused(code, err, bad, "image id 1", run_dir)


def _no_annotations(doc):
    doc["annotations"] = [{**a, "segments_info": []} for a in doc["annotations"]] \
        if doc["annotations"] and "segments_info" in doc["annotations"][0] else []


@pytest.mark.parametrize("variant", [MAL_EVAL, MAL_INFER, M2F_EVAL_INST, M2F_EVAL_PAN, MGD_EVAL],
                         ids=lambda v: v.id)
def test_no_annotations(variant, synthetic, tmp_path, capsys):
    code, err, bad, run_dir = run_broken(variant, synthetic, tmp_path, capsys, _no_annotations)
    assert_refused(code, err, bad, "no annotations", run_dir)


def test_no_annotations_odvg_train(synthetic, tmp_path, capsys):
    def breaks(records):
        for r in records:
            r["detection"]["instances"] = []
    code, err, bad, run_dir = run_broken(MGD_TRAIN, synthetic, tmp_path, capsys, breaks)
    assert_refused(code, err, bad, "no annotations", run_dir)


def _two_point_polygon(doc):
    # The first annotation's mask becomes one polygon of 2 points: no area, so its mask would be empty.
    ann = doc["annotations"][0]
    ann["segmentation"] = [[1.0, 1.0, 9.0, 9.0]]
    doc["_bad_id"] = ann["id"]


@pytest.mark.parametrize("variant", [MAL_EVAL, MAL_INFER, M2F_EVAL_INST, MGD_EVAL], ids=lambda v: v.id)
def test_two_point_polygon(variant, synthetic, tmp_path, capsys):
    bad_id = json.loads(Path(synthetic[1][variant.source]["annotations"]).read_text())["annotations"][0]["id"]
    code, err, bad, run_dir = run_broken(variant, synthetic, tmp_path, capsys, _two_point_polygon)
    assert_refused(code, err, bad, f"annotation id {bad_id}", run_dir)


def test_two_point_polygon_in_training_files_is_skipped_with_one_warning(synthetic, tmp_path, caplog):
    from networks.common.coco_io import load_coco
    from networks.common.dataset_rules import validate_coco
    from networks.mask_grounding_dino.data import read_odvg

    _, data = synthetic
    tr = data["train"]
    bad = write_bad_coco(tr["annotations"], tmp_path / "train.json", _two_point_polygon)
    doc = load_coco(bad, field="f")
    n = len(doc["annotations"])
    with caplog.at_level(logging.WARNING):
        kept = validate_coco(doc, bad, need_segmentation=True, train=True)
    assert len(kept["annotations"]) == n - 1 and all(a["id"] != doc["_bad_id"] for a in kept["annotations"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 annotation" in warnings[0] and str(bad) in warnings[0], warnings
    with pytest.raises(Exception, match=f"annotation id {doc['_bad_id']}"):
        validate_coco(copy.deepcopy(doc), bad, need_segmentation=True)

    def breaks(records):
        records[0]["detection"]["instances"][0]["mask"] = [[1.0, 1.0, 9.0, 9.0]]
    odvg = write_bad_odvg(tr["odvg"], tmp_path / "train.jsonl", breaks)
    label_map = {k: v for k, v in json.loads(Path(tr["odvg_labelmap"]).read_text()).items()}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        records = read_odvg(odvg, label_map, "json_file")
    before = read_odvg(tr["odvg"], label_map, "json_file")
    assert sum(len(r.boxes) for r in records) == sum(len(r.boxes) for r in before) - 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 instance" in warnings[0], warnings


def _negative_width(doc):
    ann = doc["annotations"][0]
    ann["bbox"][2] = -ann["bbox"][2]
    doc["_bad_id"] = ann["id"]


@pytest.mark.parametrize("variant", [MAL_TRAIN, MAL_EVAL, MAL_INFER, M2F_EVAL_INST, MGD_EVAL], ids=lambda v: v.id)
def test_negative_bbox(variant, synthetic, tmp_path, capsys):
    first = json.loads(Path(synthetic[1][variant.source]["annotations"]).read_text())["annotations"][0]["id"]
    code, err, bad, run_dir = run_broken(variant, synthetic, tmp_path, capsys, _negative_width)
    assert_refused(code, err, bad, f"annotation id {first}", run_dir)


def test_inverted_bbox_odvg_train(synthetic, tmp_path, capsys):
    def breaks(records):
        box = records[0]["detection"]["instances"][0]["bbox"]
        box[0], box[2] = box[2], box[0]
    code, err, bad, run_dir = run_broken(MGD_TRAIN, synthetic, tmp_path, capsys, breaks)
    assert_refused(code, err, bad, f"{bad}:1", run_dir)


def _no_segmentation(doc):
    del doc["annotations"][0]["segmentation"]


@pytest.mark.parametrize("variant", [MAL_EVAL, MAL_INFER, M2F_EVAL_INST, M2F_TRAIN_INST, MGD_EVAL],
                         ids=lambda v: v.id)
def test_missing_segmentation(variant, synthetic, tmp_path, capsys):
    first = json.loads(Path(synthetic[1][variant.source]["annotations"]).read_text())["annotations"][0]["id"]
    code, err, bad, run_dir = run_broken(variant, synthetic, tmp_path, capsys, _no_segmentation)
    assert_refused(code, err, bad, f"annotation id {first}", run_dir)


def _unknown_image_id(doc):
    doc["annotations"][-1]["image_id"] = 999


@pytest.mark.parametrize("variant", [MAL_TRAIN, MAL_EVAL, MAL_INFER, M2F_EVAL_INST, M2F_EVAL_PAN, MGD_EVAL],
                         ids=lambda v: v.id)
def test_unknown_image_id(variant, synthetic, tmp_path, capsys):
    src = synthetic[1][variant.source]["panoptic_json" if variant.kind == "panoptic" else "annotations"]
    last = json.loads(Path(src).read_text())["annotations"][-1]
    record = f"annotation id {last['id']}" if "id" in last else "image_id 999"
    code, err, bad, run_dir = run_broken(variant, synthetic, tmp_path, capsys, _unknown_image_id)
    assert_refused(code, err, bad, record, run_dir)
