"""Learning test of Mask Grounding DINO's ReLA branch (issue 10, "Learning"): configs/mask_grounding_dino/
rela_learn.yaml ("rela" in model.loss_types) trained through ``tao model mask_grounding_dino train`` on the
synthetic referring split, then scored by ``evaluate`` with the referring evaluator, against the same spec's
untrained weights evaluated the same way.

The expressions are scored on the training images (a learning test: can the model fit what it was shown), as
``make learn`` does for detection; the trained weights are ``mask_gdino_model_best.pth``, which the engine picks
by gIoU (``val_mIoU``, the main KPI of a referring val source) among the validations every 6 epochs.
``make learn-rela`` runs the same flow with a validation curve.

The training expressions are the synthetic split's with the no-target expression of one image in four
(``generate(..., no_target_every=4)``: 22 expressions, 4 of them no-target), so that no-target expressions are a
minority, as in gRefCOCO.  With one per image (16 of 34) this test was a coin flip (2026-12-06/07: one seed in
four passed, and after a change of summation order in the deformable attention, none).  The failing runs
predicted every expression empty: their detections scored under ``conf_threshold`` or fell outside the union
mask (IoI filter; on one 72-step model, ``ioi_threshold`` 0 and ``conf_threshold`` 0.1 together took T_acc from 0
to 0.67), and a 288-step run learned (gIoU 0.67 at step 144) and went back to all-empty later.  Our reading,
not proven: the no-target head, whose loss stays at ln 2 in short runs (it has not learned to tell images
apart), leans towards "no target" when half the expressions have none (TAO's class weights [0.9, 1.1]).  With the
thinned split and 144 steps (lr ×0.1 after epoch 54), seeds 1234, 1, 2 and 3 reached (gIoU, cIoU, T_acc, N_acc) of
(0.60, 0.52, 0.89, 1.0), (0.68, 0.60, 0.94, 1.0), (0.41, 0.34, 0.56, 1.0) and (0.63, 0.57, 0.83, 1.0), from the
untrained (0.18, 0, 0, 1.0), or (0.20, 0.07, 0.28, 1.0) for seed 3 (2026-12-08).  With the deformable attention's
CPU gather path forced (this config's 16 channels per head take ``grid_sample``), the four seeds also passed,
the weakest at (0.39, 0.35, 0.50, 1.0).  The bars below hold for each.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

KEYS = ("mIoU", "overall_IoU", "T_acc", "N_acc")  # TAO's names: gIoU, cIoU, T_acc, N_acc


def _evaluate(spec, overrides, results, checkpoint) -> dict:
    from tao_cli.cli import run_model

    code = run_model("mask_grounding_dino", "evaluate", str(spec),
                     overrides + [f"results_dir={results}", f"evaluate.checkpoint={checkpoint}"])
    assert code == 0, f"evaluate failed (exit {code}); see {results}/evaluate"
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    return {k: metrics[f"test_{k}"] for k in KEYS}


@pytest.mark.slow
def test_rela_learns_the_synthetic_referring_split(tmp_path):
    from networks.common.context import RunContext
    from networks.common.synthetic import generate
    from tao_cli import registry
    from tao_cli.cli import run_model
    from tao_cli.paths import configs_dir
    from tao_cli.spec import load_spec

    spec = configs_dir() / "mask_grounding_dino" / "rela_learn.yaml"
    data = generate(tmp_path / "data", seed=0, num_train=16, num_val=4, image_size=96, referring=True,
                    no_target_every=4)
    tr = data["train"]
    source = f"{{image_dir: {tr['images']}, json_file: {tr['referring']}}}"
    overrides = [f"dataset.train_data_sources=[{source}]",
                 f"dataset.val_data_sources={{image_dir: {tr['images']}, json_file: {tr['referring']}, data_type: VG}}"]

    # untrained: the spec's model with its seed, saved as a checkpoint and evaluated like the trained one
    net = registry.load("mask_grounding_dino")
    cfg = load_spec(net.config_class, "train", spec, overrides, mandatory=False)
    torch.manual_seed(int(cfg.train.seed))
    module = net.build_module(cfg, RunContext("evaluate", tmp_path, log=logging.getLogger("test")))
    untrained_ckpt = tmp_path / "untrained.pth"
    torch.save({"state_dict": module.state_dict(), "tao_model": "mask_grounding_dino", "epoch": 0,
                "global_step": 0}, untrained_ckpt)
    del module
    before = _evaluate(spec, overrides, tmp_path / "untrained", untrained_ckpt)

    train_dir = tmp_path / "run"
    assert run_model("mask_grounding_dino", "train", str(spec), overrides + [f"results_dir={train_dir}"]) == 0
    # the referring val source makes gIoU (val_mIoU) the main KPI: a best checkpoint is written, and scored
    best = train_dir / "train" / "mask_gdino_model_best.pth"
    assert best.exists()
    after = _evaluate(spec, overrides, tmp_path / "trained", best)

    print("\nReLA on the synthetic referring split (gIoU=mIoU, cIoU=overall_IoU):")
    for name, m in (("untrained", before), ("trained", after)):
        print(f"  {name:9s} " + "  ".join(f"{k}={m[k]:.3f}" for k in KEYS))
    assert after["N_acc"] >= 0.5, after
    assert after["mIoU"] >= before["mIoU"] + 0.1, (before, after)
    assert after["overall_IoU"] >= before["overall_IoU"] + 0.15, (before, after)
    assert after["T_acc"] >= before["T_acc"] + 0.3, (before, after)


def test_main_kpi_is_giou_for_a_referring_val_source(tmp_path):
    """A referring val source (ODVG grounding lines, data_type not OD) picks the best checkpoint by gIoU
    (``val_mIoU``, the key the module's referring evaluator writes); a COCO source keeps ``segm_val_mAP``."""
    from omegaconf import OmegaConf

    import networks.mask_grounding_dino as gdino

    lines = tmp_path / "ref.jsonl"
    lines.write_text(json.dumps({"file_name": "a.jpg", "height": 8, "width": 8,
                                 "grounding": {"caption": "the red square", "regions": []}}) + "\n")
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    cfg = OmegaConf.structured(gdino.ExperimentConfig)
    cfg.dataset.val_data_sources = {"image_dir": str(tmp_path), "json_file": str(lines), "data_type": "VG"}
    assert gdino.main_kpi(cfg) == ("val_mIoU", "max")
    cfg.dataset.val_data_sources = {"image_dir": str(tmp_path), "json_file": str(coco), "data_type": "VG"}
    assert gdino.main_kpi(cfg) == ("segm_val_mAP", "max")
    cfg.dataset.val_data_sources = {"image_dir": str(tmp_path), "json_file": str(coco), "data_type": "OD"}
    assert gdino.main_kpi(cfg) == ("segm_val_mAP", "max")
