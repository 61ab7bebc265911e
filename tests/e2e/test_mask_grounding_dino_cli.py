"""Mask Grounding DINO end to end (issue 5, acceptance 3): the seed overrides, pointing at the synthetic set's
archives, run train, evaluate, inference and export to completion with the tiny config."""
from __future__ import annotations

import json

import pytest

from networks.common.synthetic import generate
from tao_cli.paths import configs_dir

pytestmark = pytest.mark.slow
SPEC = str(configs_dir() / "mask_grounding_dino" / "tiny.yaml")


def test_seed_overrides_train_evaluate_inference_export(tmp_path, tao):
    data = generate(tmp_path / "synthetic", seed=6, num_train=8, num_val=4, image_size=96)
    tr, va = data["train"]["dir"], data["val"]["dir"]
    results = tmp_path / "results"
    common = [f"results_dir={results}",
              f"dataset.infer_data_sources.image_dir={va / 'images'}",
              f"dataset.test_data_sources.image_dir={va / 'images.tar.gz'}",
              f"dataset.test_data_sources.json_file={va / 'annotations.json'}",
              "model.num_region_queries=100",
              f"dataset.train_data_sources=[{{image_dir: {tr / 'images.tar.gz'}, json_file: "
              f"{tr / 'annotations_odvg.jsonl'}, label_map: {tr / 'annotations_odvg_labelmap.json'}}}]",
              f"dataset.val_data_sources={{image_dir: {va / 'images.tar.gz'}, json_file: {va / 'annotations.json'}}}"]
    seed = ["train.num_gpus=1", "train.num_epochs=10", "train.checkpoint_interval=10",
            "train.validation_interval=10"]
    code, _, err = tao("model", "mask_grounding_dino", "train", "-e", SPEC, *common, *seed)
    assert code == 0, err
    ckpt = results / "train" / "mask_gdino_model_latest.pth"
    assert ckpt.exists()
    code, _, err = tao("model", "mask_grounding_dino", "evaluate", "-e", SPEC, *common,
                       f"evaluate.checkpoint={ckpt}", "evaluate.conf_threshold=0.2")
    assert code == 0, err
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    assert {"bbox_val_mAP", "bbox_val_mAP50", "segm_val_mAP", "segm_val_mAP50"} <= set(metrics)
    code, _, err = tao("model", "mask_grounding_dino", "inference", "-e", SPEC, *common,
                       f"inference.checkpoint={ckpt}", "inference.conf_threshold=0.0")
    assert code == 0, err
    assert any((results / "inference" / "overlays").glob("*.png"))
    dets = json.loads((results / "inference" / "results.json").read_text())
    assert dets and all({"bbox", "score", "segmentation", "category_id"} <= set(d) for d in dets)
    onnx = results / "export" / "mgd.onnx"
    code, _, err = tao("model", "mask_grounding_dino", "export", "-e", SPEC, *common,
                       f"export.checkpoint={ckpt}", f"export.onnx_file={onnx}")
    assert code == 0, err
    assert onnx.stat().st_size > 0
