"""Mask2Former LightningModule: optimiser groups, freeze, weight loading (safe .pkl, class-head re-init),
and a short fit → test → predict run through a real Trainer on the synthetic set."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from networks.common.context import RunContext
from networks.common.errors import CheckpointError, ConfigError
from networks.mask2former.data import Mask2FormerDataModule
from networks.mask2former.module import (
    Mask2FormerModule,
    freeze_modules,
    load_detectron2_pkl,
    load_pretrained_model,
    param_groups,
)

from .conftest import make_tiny_cfg


@pytest.fixture(scope="module")
def tiny_module(m2f_synthetic):
    torch.manual_seed(0)
    return Mask2FormerModule(make_tiny_cfg(m2f_synthetic), RunContext(action="evaluate", run_dir=Path(".")))


def test_param_groups_follow_tao_rules(tiny_module):
    groups = {g["name"]: g for g in param_groups(tiny_module.model, 1e-3, 0.05, 0.1)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["backbone"]["weight_decay"] == 0.05
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["head_no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups["backbone_no_decay"]["params"] + groups["head_no_decay"]["params"]}
    named = dict(tiny_module.model.named_parameters())
    assert id(named["sem_seg_head.predictor.query_feat.weight"]) in no_decay
    assert id(named["sem_seg_head.predictor.decoder_norm.weight"]) in no_decay
    assert any("relative_position_bias_table" in n and id(p) in no_decay for n, p in named.items())
    assert id(named["sem_seg_head.predictor.class_embed.weight"]) not in no_decay
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(1 for p in tiny_module.model.parameters() if p.requires_grad)


def test_freeze(m2f_synthetic):
    m = Mask2FormerModule(make_tiny_cfg(m2f_synthetic), RunContext(action="evaluate", run_dir=Path(".")))
    assert freeze_modules(m.model, ["model.backbone"]) == ["backbone"]
    assert not any(p.requires_grad for p in m.model.backbone.parameters())
    assert all(p.requires_grad for p in m.model.sem_seg_head.parameters())
    with pytest.raises(ConfigError) as err:
        freeze_modules(m.model, ["backbone.nope"])
    assert err.value.subject == "train.freeze" and "backbone.nope" in err.value.problem


def test_detectron2_pkl_is_loaded_safely_with_class_roll(tmp_path, tiny_module):
    sd = tiny_module.model.state_dict()
    w = sd["sem_seg_head.predictor.class_embed.weight"].numpy()
    orig_layout = np.concatenate([w[1:], w[:1]])  # original: no-object last
    arrays = {k.replace("query_feat", "static_query"): v.numpy() for k, v in sd.items()}
    arrays["sem_seg_head.predictor.class_embed.weight"] = orig_layout
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "test"}))
    loaded = load_detectron2_pkl(path)
    assert np.array_equal(loaded["sem_seg_head.predictor.class_embed.weight"].numpy(), w)
    assert "sem_seg_head.predictor.query_feat.weight" in loaded

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"model": {"x": Evil()}}))
    with pytest.raises(CheckpointError, match="safely"):
        load_detectron2_pkl(bad)


def test_pretrained_pth_reinitialises_only_the_class_head(tmp_path, m2f_synthetic, tiny_module):
    cfg = make_tiny_cfg(m2f_synthetic)
    cfg.model.sem_seg_head.num_classes = 7
    from networks.mask2former.model import build_model

    other = build_model(cfg.model)
    ckpt = tmp_path / "tao.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()},
                "tao_model": "mask2former"}, ckpt)
    report = load_pretrained_model(tiny_module.model, ckpt)
    assert {m[0] for m in report.mismatched} == {"sem_seg_head.predictor.class_embed.weight",
                                                 "sem_seg_head.predictor.class_embed.bias"}
    assert torch.equal(tiny_module.model.sem_seg_head.predictor.query_feat.weight,
                       other.sem_seg_head.predictor.query_feat.weight)
    cfg.model.sem_seg_head.num_classes = 5
    cfg.model.mask_former.hidden_dim = 32
    cfg.model.mask_former.nheads = 4
    torch.save({"state_dict": {f"model.{k}": v for k, v in build_model(cfg.model).state_dict().items()}}, ckpt)
    with pytest.raises(CheckpointError, match="shape"):
        load_pretrained_model(tiny_module.model, ckpt)


def _trainer(tmp_path, **kw):
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      gradient_clip_val=0.1, **kw)


def test_fit_test_predict(tmp_path, m2f_synthetic):
    cfg = make_tiny_cfg(m2f_synthetic)
    cfg.train.optim.lr_scheduler = "WarmupPoly"
    torch.manual_seed(0)
    module = Mask2FormerModule(cfg, RunContext(action="train", run_dir=tmp_path / "train"))
    dm = Mask2FormerDataModule(cfg, RunContext("train", Path(".")))
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                       num_sanity_val_steps=0)
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert {"mIoU", "ACC_all", "pixel_accuracy", "PQ", "SQ", "RQ", "PQ_th", "PQ_st"} <= set(module.kpi)
    # WarmupPoly over the real number of steps: 2 steps done of max_iter = 2 + 1
    head_lr = trainer.optimizers[0].param_groups[-1]["lr"]
    assert head_lr == pytest.approx(2e-4 * (1 - 2 / 3) ** 0.9, rel=1e-6)

    for mode in ("instance", "semantic", "panoptic"):
        cfg.model.mode = mode
        run_dir = tmp_path / mode
        module.ctx = RunContext(action="inference", run_dir=run_dir)
        if mode == "instance":
            trainer = _trainer(tmp_path)
            trainer.test(module, Mask2FormerDataModule(cfg, RunContext("evaluate", Path("."))))
            assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "mIoU"} <= set(module.kpi)
        trainer = _trainer(tmp_path)
        trainer.predict(module, Mask2FormerDataModule(cfg, RunContext("inference", Path("."))), return_predictions=False)
        overlays = sorted((run_dir / "overlays").glob("*.png"))
        assert len(overlays) == 4
        if mode == "instance":
            dets = json.loads((run_dir / "instances.json").read_text())
            assert dets and {"image_id", "category_id", "score", "segmentation"} <= set(dets[0])
            assert {d["category_id"] for d in dets} <= {1, 2, 3}  # things only: the label map has stuff
        elif mode == "semantic":
            from PIL import Image

            png = np.asarray(Image.open(run_dir / "semantic" / "000001.png"))
            assert png.shape == (np.asarray(Image.open(m2f_synthetic["val"]["images"] / "000001.jpg")).shape[:2])
            assert set(np.unique(png).tolist()) <= {1, 2, 3, 4, 5}
        else:
            pan = json.loads((run_dir / "panoptic.json").read_text())
            assert len(pan["annotations"]) == 4 and (run_dir / pan["annotations"][0]["file_name"]).is_file()
        assert module.outputs["num_images"] == 4


@pytest.mark.slow
def test_overfits_one_batch(m2f_synthetic):
    """Learning test: 15 AdamW steps on one synthetic batch cut the weighted loss by more than half."""
    cfg = make_tiny_cfg(m2f_synthetic)
    cfg.train.optim.lr = 1e-3
    torch.manual_seed(0)
    module = Mask2FormerModule(cfg, RunContext(action="evaluate", run_dir=Path(".")))
    dm = Mask2FormerDataModule(cfg, RunContext("evaluate", Path(".")))
    dm.setup("test")
    batch = next(iter(dm.val_dataloader()))
    opt = torch.optim.AdamW(param_groups(module.model, 1e-3, 0.0, 1.0))
    losses = []
    for _ in range(15):
        loss = module._weighted(module.criterion(module.model(batch["images"]), batch["targets"]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
