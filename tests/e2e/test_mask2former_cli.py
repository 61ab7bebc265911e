"""Mask2Former end to end: the TAO seed overrides (issue 4) train the tiny model through the CLI; evaluate and
inference then run in every mode and write their outputs; export writes an ONNX file checked against PyTorch."""
from __future__ import annotations

import json

import pytest

from networks.common.synthetic import generate
from tao_cli.paths import configs_dir

pytestmark = pytest.mark.slow
SPEC = str(configs_dir() / "mask2former" / "tiny.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("m2f_e2e")
    data = generate(root / "synthetic", seed=5, num_train=6, num_val=4, image_size=96)
    results = root / "results"
    tr, va = data["train"], data["val"]
    common = [f"results_dir={results}", "dataset.contiguous_id=True", f"dataset.label_map={tr['label_map']}",
              f"dataset.val.img_dir={va['images_archive']}", f"dataset.val.panoptic_json={va['panoptic_json']}",
              f"dataset.val.panoptic_dir={va['panoptic_archive']}", f"dataset.val.instance_json={va['annotations']}",
              f"dataset.test.img_dir={va['images']}"]
    seed = ["model.sem_seg_head.num_classes=90", f"dataset.train.img_dir={tr['images_archive']}",
            f"dataset.train.instance_json={tr['annotations']}", f"dataset.train.panoptic_json={tr['panoptic_json']}",
            f"dataset.train.panoptic_dir={tr['panoptic_archive']}", "train.num_gpus=1", "train.num_epochs=10",
            "train.checkpoint_interval=10", "train.validation_interval=10"]
    return results, common, seed


def test_seed_overrides_train_then_every_mode(trained, tao):
    results, common, seed = trained
    code, _, err = tao("model", "mask2former", "train", "-e", SPEC, *common, *seed)
    assert code == 0, err
    ckpt = results / "train" / "mask2former_model_latest.pth"
    assert ckpt.exists() and (results / "train" / "model_epoch_009_step_00030.pth").exists()
    expected_kpi = {"semantic": {"mIoU", "ACC_all"}, "panoptic": {"mIoU", "PQ", "SQ", "RQ", "PQ_th", "PQ_st"},
                    "instance": {"mIoU", "AP", "AP50"}}
    for mode, keys in expected_kpi.items():
        out = results / mode
        args = (*common, "model.sem_seg_head.num_classes=90", f"model.mode={mode}")
        code, _, err = tao("model", "mask2former", "evaluate", "-e", SPEC, *args, f"evaluate.checkpoint={ckpt}",
                           f"evaluate.results_dir={out / 'evaluate'}")
        assert code == 0, err
        metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
        assert keys <= set(metrics), (mode, metrics)
        code, _, err = tao("model", "mask2former", "inference", "-e", SPEC, *args,
                           f"inference.checkpoint={ckpt}", f"inference.results_dir={out / 'inference'}")
        assert code == 0, err
        inf = out / "inference"
        assert len(list((inf / "overlays").glob("*.png"))) == 4
        if mode == "semantic":
            assert len(list((inf / "semantic").glob("*.png"))) == 4
        elif mode == "panoptic":
            pan = json.loads((inf / "panoptic.json").read_text())
            assert len(pan["annotations"]) == 4 and len(list((inf / "panoptic").glob("*.png"))) == 4
        else:
            dets = json.loads((inf / "instances.json").read_text())
            images = json.loads((inf / "images.json").read_text())
            stuff_ids = {c["id"] for c in images["categories"] if not c.get("isthing", 1)}
            # test_topk_per_image (20) exceeds queries (8) × stuff classes (2), so the thing-only filter must
            # leave at least 20 - 16 = 4 detections in every image, whatever the tiny model predicts
            per_image = {im["id"]: [d for d in dets if d["image_id"] == im["id"]] for im in images["images"]}
            assert len(per_image) == 4 and all(4 <= len(v) <= 20 for v in per_image.values()), \
                {k: len(v) for k, v in per_image.items()}
            assert len(dets) == sum(len(v) for v in per_image.values())
            sizes = {im["id"]: [im["height"], im["width"]] for im in images["images"]}
            for d in dets:
                assert {"image_id", "category_id", "segmentation", "score"} <= set(d)
                assert d["category_id"] not in stuff_ids and 0.0 <= d["score"] <= 1.0
                assert d["segmentation"]["size"] == sizes[d["image_id"]]
    onnx = results / "export" / "m2f.onnx"
    code, _, err = tao("model", "mask2former", "export", "-e", SPEC, *common, "model.sem_seg_head.num_classes=90",
                       f"export.checkpoint={ckpt}", f"export.onnx_file={onnx}")
    assert code == 0, err
    assert onnx.stat().st_size > 0
    status = [json.loads(line) for line in (results / "export" / "status.json").read_text().splitlines()]
    assert status[-1]["status"] == "SUCCESS"
