"""Referring (GRES-style) data for Mask Grounding DINO: the synthetic referring split, no-target ODVG grounding
records, the evaluator chosen by ``data_type``, and ``tao ... evaluate`` writing the referring KPIs."""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from networks.common.coco_io import ann_to_mask
from networks.common.errors import DataError
from networks.common.synthetic import generate

_EXPR = re.compile(r"^the (?:(?P<colour>[a-z]+) )?(?P<shape>circle|square|triangle)(?P<plural>s)?"
                   r"(?: on the (?P<side>left|right))?$")


@pytest.fixture(scope="module")
def ref_data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("ref"), seed=2, num_train=10, num_val=5, image_size=96, referring=True)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _expected(expr: str, objects: list[dict]) -> list[int]:
    """Indices of the objects ``expr`` names, from its words alone (independent of the generator's code)."""
    m = _EXPR.match(expr)
    assert m, expr
    ks = [k for k, o in enumerate(objects) if o["shape"] == m["shape"] and m["colour"] in (None, o["colour"])]
    if m["side"]:
        assert len(ks) == 2, expr  # "on the left" is said of one of exactly two
        cx = [(objects[k]["bbox"][0] + objects[k]["bbox"][2]) / 2 for k in ks]
        return [ks[int(np.argmin(cx))] if m["side"] == "left" else ks[int(np.argmax(cx))]]
    if not m["plural"]:
        assert len(ks) <= 1, expr  # a singular expression never names one of several
    return ks


def test_referring_split_counts_and_masks_match_the_words(ref_data):
    kinds = Counter()
    for split in ("train", "val"):
        vg = {r["file_name"]: r for r in _lines(ref_data[split]["vg"])}
        per_image = Counter()
        for rec in _lines(ref_data[split]["referring"]):
            h, w = rec["height"], rec["width"]
            expr = rec["grounding"]["caption"]
            regions = rec["grounding"]["regions"]
            assert all(r["phrase"] == expr for r in regions)
            # the image's objects with their colour words, from the ordinary grounding file
            objects = [{"colour": r["phrase"].split(" ")[0], "shape": r["phrase"].split(" ")[1], "bbox": r["bbox"],
                        "mask": ann_to_mask(r["mask"], h, w)}
                       for r in vg.get(rec["file_name"], {"grounding": {"regions": []}})["grounding"]["regions"]]
            want = _expected(expr, objects)
            assert len(regions) == len(want), (expr, len(regions), want)
            got = sorted(ann_to_mask(r["mask"], h, w).tobytes() for r in regions)
            assert got == sorted(objects[k]["mask"].tobytes() for k in want), expr
            kinds["none" if not want else "one" if len(want) == 1 else "several"] += 1
            per_image[rec["file_name"]] += 1
        # every image gets a no-target expression, and at most one of each kind
        assert set(per_image) == {f"{i:06d}.jpg" for i in range(1, len(per_image) + 1)}
        assert max(per_image.values()) <= 3
    assert kinds["none"] == 15  # one per image of both splits
    assert kinds["one"] >= 8 and kinds["several"] >= 3, kinds


def test_referring_split_is_deterministic_and_leaves_other_files_alone(ref_data, tmp_path):
    again = generate(tmp_path / "a", seed=2, num_train=10, num_val=5, image_size=96, referring=True)
    plain = generate(tmp_path / "b", seed=2, num_train=10, num_val=5, image_size=96)
    assert again["val"]["referring"].read_bytes() == ref_data["val"]["referring"].read_bytes()
    assert not plain["val"]["referring"].exists()
    for key in ("annotations", "odvg", "vg"):
        assert plain["train"][key].read_bytes() == ref_data["train"][key].read_bytes()


def test_no_target_every_keeps_one_image_in_n_no_target_expression_and_every_other_line(ref_data, tmp_path):
    thinned = generate(tmp_path / "t", seed=2, num_train=10, num_val=5, image_size=96, referring=True,
                       no_target_every=4)
    full = [(x["file_name"], x["grounding"]["caption"], len(x["grounding"]["regions"]))
            for x in _lines(ref_data["train"]["referring"])]
    kept = [(x["file_name"], x["grounding"]["caption"], len(x["grounding"]["regions"]))
            for x in _lines(thinned["train"]["referring"])]
    no_target_images = [f for f, _, n in full if n == 0]
    assert len(no_target_images) == 10
    assert [f for f, _, n in kept if n == 0] == no_target_images[::4]  # the 1st, 5th and 9th
    assert [line for line in kept if line[2]] == [line for line in full if line[2]]
    assert [x["ref_id"] for x in _lines(thinned["train"]["referring"])] == list(range(len(kept)))
    with pytest.raises(ValueError, match="no_target_every"):
        generate(tmp_path / "z", seed=2, num_train=1, num_val=0, referring=True, no_target_every=0)


def test_no_target_grounding_records_are_samples_with_empty_targets(ref_data, tiny_cfg, tokenizer):
    from networks.mask_grounding_dino.data import OdvgDataset, Transform, read_odvg

    src = {"image_dir": str(ref_data["train"]["images"]), "json_file": str(ref_data["train"]["referring"])}
    lines = _lines(src["json_file"])
    records = read_odvg(src["json_file"], None, "f")
    assert len(records) == len(lines)  # none dropped
    ds = OdvgDataset(src, 0, Transform(tiny_cfg.dataset.augmentation, "eval"), tokenizer, 256, 3)
    for i, line in enumerate(lines):
        item = ds[i]
        assert item["names"] == [line["grounding"]["caption"]]  # the expression is the prompt
        assert item["target"]["empty"] is (not line["grounding"]["regions"])
        assert len(item["target"]["labels"]) == len(line["grounding"]["regions"])
    # a grounding record with neither regions nor caption has nothing to prompt with: still skipped
    bad = Path(src["json_file"]).with_name("nocap.jsonl")
    bad.write_text(json.dumps({"file_name": "000001.jpg", "grounding": {"regions": []}}) + "\n"
                   + json.dumps(lines[0]) + "\n")
    assert len(read_odvg(bad, None, "f")) == 1


def test_data_type_selects_the_evaluator(ref_data):
    from networks.mask_grounding_dino.data import eval_kind

    jsonl, coco = str(ref_data["val"]["referring"]), str(ref_data["val"]["annotations"])
    assert eval_kind({"json_file": jsonl, "data_type": "VG"}, "k") == "referring"
    assert eval_kind({"json_file": jsonl, "data_type": ""}, "k") == "referring"
    assert eval_kind({"json_file": coco, "data_type": "OD"}, "k") == "coco"
    assert eval_kind({"json_file": coco, "data_type": "VG"}, "k") == "coco"  # TAO's default beside COCO files
    with pytest.raises(DataError, match="data_type 'OD'"):
        eval_kind({"json_file": jsonl, "data_type": "OD"}, "k")
    with pytest.raises(DataError, match="data_type 'RES'"):
        eval_kind({"json_file": coco, "data_type": "RES"}, "k")


def test_module_scores_referring_expressions(ref_data, tmp_path):
    """Untrained tiny model through Lightning's test loop: KPIs from the instance predictions (no ReLA head)."""
    from networks.common.context import RunContext
    from networks.mask_grounding_dino.data import MaskGDinoDataModule
    from networks.mask_grounding_dino.module import MaskGDinoModule

    from ..overlay_checks import run_test
    from .conftest import make_tiny_cfg

    cfg = make_tiny_cfg(ref_data)
    val = {"image_dir": str(ref_data["val"]["images"]), "json_file": str(ref_data["val"]["referring"]),
           "data_type": "VG"}
    cfg.dataset.test_data_sources = val
    cfg.evaluate.conf_threshold = 0.0  # every one of num_select instances is kept: nothing predicted empty
    torch.manual_seed(0)
    module = MaskGDinoModule(cfg, RunContext("evaluate", tmp_path, log=logging.getLogger("test")))
    run_test(module, MaskGDinoDataModule(cfg, RunContext("evaluate", Path("."))), tmp_path)
    kpi = module.kpi
    n = len(_lines(val["json_file"]))
    assert kpi["test_num_expressions"] == n and kpi["test_num_no_target"] == 5
    assert kpi["test_N_acc"] == 0.0 and kpi["test_T_acc"] == 1.0
    assert 0.0 <= kpi["test_mIoU"] < 1.0 and 0.0 <= kpi["test_overall_IoU"] < 1.0
    assert "bbox_val_mAP" not in kpi
    results = json.loads((tmp_path / "referring_results.json").read_text())
    assert len(results["expressions"]) == n and results["metrics"]["N_acc"] == 0.0
    assert all(r["phrases"] for r in results["expressions"])  # text_threshold decoding reached


def test_tao_evaluate_writes_referring_kpis(ref_data, tmp_path, capsys):
    from networks.common.context import RunContext
    from tao_cli import registry
    from tao_cli.cli import run_model
    from tao_cli.paths import configs_dir
    from tao_cli.spec import load_spec

    spec = configs_dir() / "mask_grounding_dino" / "tiny.yaml"
    tr, va = ref_data["train"], ref_data["val"]
    results = tmp_path / "results"
    overrides = [f"results_dir={results}",
                 f"dataset.train_data_sources=[{{image_dir: {tr['images']}, json_file: {tr['referring']}}}]",
                 f"dataset.val_data_sources={{image_dir: {va['images']}, json_file: {va['referring']}, "
                 "data_type: VG}",
                 "dataset.test_data_sources={image_dir: '', json_file: ''}",
                 "evaluate.conf_threshold=0.5"]
    net = registry.load("mask_grounding_dino")
    cfg = load_spec(net.config_class, "train", spec, overrides, mandatory=False)
    torch.manual_seed(0)
    module = net.build_module(cfg, RunContext("evaluate", tmp_path, log=logging.getLogger("test")))
    ckpt = tmp_path / "untrained.pth"
    torch.save({"state_dict": module.state_dict(), "tao_model": "mask_grounding_dino", "epoch": 0,
                "global_step": 0}, ckpt)
    code = run_model("mask_grounding_dino", "evaluate", str(spec), overrides + [f"evaluate.checkpoint={ckpt}"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    names = {"test_mIoU", "test_overall_IoU", "test_T_acc", "test_N_acc", "test_Pr@0.7", "test_Pr@0.8",
             "test_Pr@0.9", "test_mAP50", "test_mAP"}
    assert names <= set(metrics), sorted(metrics)
    saved = json.loads((results / "evaluate" / "referring_results.json").read_text())
    assert saved["data_type"] == "VG" and saved["metrics"]["num_expressions"] == len(_lines(va["referring"]))
    assert {r["expression_id"] for r in saved["expressions"]} == set(range(len(saved["expressions"])))

