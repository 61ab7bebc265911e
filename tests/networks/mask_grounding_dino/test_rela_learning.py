"""Learning test of Mask Grounding DINO's ReLA branch (issue 10, "Learning"): configs/mask_grounding_dino/
rela_learn.yaml ("rela" in model.loss_types) trained through ``tao model mask_grounding_dino train`` on the
synthetic referring split, then scored by ``evaluate`` with the referring evaluator, against the same spec's
untrained weights evaluated the same way.

The expressions are scored on the training images (a learning test: can the model fit what it was shown), as
``make learn`` does for detection; the trained weights are ``mask_gdino_model_best.pth``, which the engine picks
by gIoU (``val_mIoU``, the main KPI of a referring val source) among the validations every 6 epochs.
``make learn-rela`` runs the same flow with a validation curve.

This is a thin test, and known to be: 72 steps are few for this task, and what the model learns depends on the draw.
Over seeds 1234, 1, 2 and 3 (2026-12-06), one in four passes these bars. The others score every expression as
"no target" (gIoU stays 0.471, the share of no-target expressions; T_acc 0), and that happens with either
deformable-attention summation order. Longer training (144 steps), batch 4, lr 1e-3, clip 1.0, and
``evaluate.conf_threshold`` 0.1 did not make it pass for every seed. The no-target head's loss stays at ln 2
throughout, so the empty masks come from detections scoring under ``conf_threshold``, not from that head.
Which seeds pass depends on the CPU as well: on an AMD EPYC (2026-12-07) seeds 1234 and 1 pass and 2 and 3 fail,
the reverse of the earlier Intel machine, where seed 2 was chosen. ``rela_learn.yaml`` uses seed 1234 (TAO's
default). A change that makes this test fail should be checked against the other seeds before it is blamed.
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
    data = generate(tmp_path / "data", seed=0, num_train=16, num_val=4, image_size=96, referring=True)
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
    assert after["N_acc"] >= 0.7, after
    assert after["mIoU"] >= 0.3 and after["mIoU"] > before["mIoU"] + 0.05, (before, after)
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
