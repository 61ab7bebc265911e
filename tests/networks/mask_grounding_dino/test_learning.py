"""Acceptance: the tiny Mask Grounding DINO learns the synthetic shapes from text prompts on this CPU.

``configs/mask_grounding_dino/tiny.yaml`` is trained for a fixed ``TRAIN_STEPS`` optimizer steps (deterministic,
not wall-clock bound) on ``NUM_TRAIN`` synthetic images (circle/square/triangle, prompts
"circle . square . triangle ." with their ODVG labels) and evaluated with the COCO file on ``NUM_VAL`` held-out
images (``generate``'s separate val split).  The untrained model — same seed, so the same initial weights, and
the same eval images — is scored first, in the test; the trained model must beat it by ``MARGINS`` on bbox and
segm mAP50.  A model that does not learn (lr 0, a broken loss or matcher, masks not trained) stays at the
untrained score and fails.  The test leaves torch's intra-op threads alone: with no DataLoader workers torch's
default (the cores, or ``OMP_NUM_THREADS``) is what the engine chooses (tao_cli/engine/threads.py).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from networks.common.context import RunContext
from networks.mask_grounding_dino.data import MaskGDinoDataModule
from networks.mask_grounding_dino.module import MaskGDinoModule

from .conftest import make_tiny_cfg

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover
    import lightning.pytorch as pl  # type: ignore

pytestmark = pytest.mark.slow

NUM_TRAIN, NUM_VAL, IMAGE_SIZE = 32, 16, 128
TRAIN_STEPS = 480
#: Required lead of the trained model over the untrained one (mAP50 ≤ 0.005) on the held-out images, set from the
#: spread over seeds rather than from one lucky run.  Measured on this 2-core CPU with the data fixed and
#: ``train.seed`` ∈ {1234, 1, 2, 3, 4, 5} (initial weights, sample order and augmentation all change with it), bbox /
#: segm mAP50 after 320, 480, 640 and 800 steps:
#:
#:   seed 1234: 0.017/0.19  0.083/0.28  0.060/0.22  0.143/0.26
#:   seed 1:    0.063/0.22  0.086/0.29  0.086/0.25  0.099/0.26
#:   seed 3:    0.100/0.25  0.224/0.40  0.296/0.42  0.251/0.41
#:   seed 4:    0.075/0.23  0.085/0.27  0.129/0.30  0.225/0.36
#:   seed 2:    0.110/0.25  0.182/0.34  0.130/0.29  0.141/0.36
#:   seed 5:    0.084/0.24  0.101/0.20  0.149/0.21  0.115/0.23
#:
#: At 320 steps the default seed gives bbox 0.017, under the old margin of 0.02 (it passed before the sampler's
#: seed stream changed: the margin had been set from a lucky stream).  At 480 steps the worst bbox mAP50 is 0.083
#: and the worst segm 0.20, so the margins below sit at a third (bbox) and a half (segm) of the worst seed.  Boxes
#: converge more slowly than masks, and neither curve is monotonic at this scale (16 evaluation images).
#: The table was measured with 1 intra-op thread.  The test now leaves the count to torch (2 here, as the engine
#: chooses): seed 1234 at 480 steps then gives 0.085/0.20 instead of 0.083/0.28, a change of reduction order only,
#: inside the spread above.
MARGINS = {"bbox_val_mAP50": 0.03, "segm_val_mAP50": 0.1}


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def test_tiny_model_learns_shapes(tmp_path, monkeypatch):
    from networks.common.synthetic import generate

    data = generate(tmp_path / "data", seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=IMAGE_SIZE)
    cfg = make_tiny_cfg(data)  # train on data["train"], evaluate (test_data_sources) on data["val"]
    pl.seed_everything(int(cfg.train.seed), workers=True)
    ctx = RunContext("train", tmp_path / "run", log=logging.getLogger("test"))
    module = MaskGDinoModule(cfg, ctx)
    dm = MaskGDinoDataModule(cfg, ctx)

    _trainer().test(module, datamodule=dm, verbose=False)
    before = dict(module.kpi)

    module.train()  # Lightning keeps the eval mode that test() left behind
    fit = _trainer(max_steps=TRAIN_STEPS, max_epochs=-1, gradient_clip_val=cfg.train.clip_grad_norm,
                   limit_val_batches=0, num_sanity_val_steps=0)
    fit.fit(module, datamodule=dm)
    assert fit.global_step == TRAIN_STEPS
    _trainer().test(module, datamodule=dm, verbose=False)
    after = dict(module.kpi)
    report = f"untrained {before}, trained {after} after {fit.global_step} steps ({fit.current_epoch} epochs)"
    print(report)
    for key, margin in MARGINS.items():
        assert after[key] >= before[key] + margin, report

    # Issue 17: the same trained model prompted with a 300-class label map (chunked; the three true classes land
    # in three different chunks) still detects every true class and still beats the untrained model by the margins.
    chunked, detected = _evaluate_with_300_classes(module, cfg, data["val"], tmp_path, monkeypatch)
    report += f"; 300-class chunked prompt {chunked}"
    print(report)
    assert detected >= {c["id"] for c in json.loads(Path(data["val"]["annotations"]).read_text())["categories"]}
    for key, margin in MARGINS.items():
        assert chunked[key] >= before[key] + margin, report


def _evaluate_with_300_classes(module, cfg, val: dict, tmp_path: Path, monkeypatch) -> tuple[dict, set]:
    """KPIs of ``module`` on ``val`` with its categories at positions 20, 150 and 280 of 300, and the category
    ids of the detections it scored.  Scores differ from the 3-class prompt's (the fusion sees other names):
    with the seed of this test and 1 intra-op thread, bbox / segm mAP50 were 0.083 / 0.276 with 3 classes, 0.101 /
    0.277 with 300 (8 chunks) and 0.101 / 0.262 with 30 names in one window, so chunking adds no error beyond what
    any distractor names cause; with 2 threads 0.085 / 0.201 with 3 classes and 0.086 / 0.194 with 300."""
    import networks.common.metrics as metrics

    doc = json.loads(Path(val["annotations"]).read_text())
    true = iter(doc["categories"])
    cats = [next(true) if i in (20, 150, 280) else {"id": 1000 + i, "name": f"distractor thing number {i}"}
            for i in range(300)]
    big = tmp_path / "val_300_classes.json"
    big.write_text(json.dumps({**doc, "categories": cats}))
    big_cfg = copy.deepcopy(cfg)
    big_cfg.dataset.test_data_sources = {"image_dir": str(val["images"]), "json_file": str(big)}
    detected: set = set()
    real = metrics.coco_eval_stats

    def spy(gt, dets, *args, **kwargs):
        detected.update(d["category_id"] for d in dets)
        return real(gt, dets, *args, **kwargs)

    monkeypatch.setattr(metrics, "coco_eval_stats", spy)
    saved = module.cfg
    module.cfg = big_cfg
    try:
        _trainer().test(module, datamodule=MaskGDinoDataModule(big_cfg, RunContext("evaluate", tmp_path / "ev")),
                        verbose=False)
    finally:
        module.cfg = saved
    return dict(module.kpi), detected
