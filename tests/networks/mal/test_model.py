"""MAL network: ViT backbones (all five arches), weight loading, heads, size bins, EMA, and the Lightning
module's optimisation plumbing (accumulation, EMA per optimizer step, LR schedule, evaluation KPIs)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from networks.backbones.vit import ARCHS, build_vit, load_vit_weights, read_weights_file
from networks.common.context import RunContext
from networks.common.errors import CheckpointError, ConfigError
from networks.mal.config import ExperimentConfig
from networks.mal.model import (
    MALNetwork,
    MaskHead,
    RoIHead,
    area_bin,
    build_mal_network,
    build_mal_networks,
    ema_update,
)
from networks.mal.module import MALModule, warmup_cosine_lr

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**overrides):
    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.model.arch = "vit-deit-tiny/16"
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg




# ------------------------------------------------------------------------------------------------ backbone
def _build_and_step(arch, device):
    dim, depth, heads, patch = ARCHS[arch]
    torch.manual_seed(0)
    with torch.device(device):
        backbone = build_vit(arch, weight_init="skip")
        # the meta device cannot run the data-dependent bin selection (nonzero): use the single-scale path there
        net = MALNetwork(backbone, hidden_channels=32, out_channels=32, adjust_scale=device != "meta")
        side = 2 * patch  # 32 px (28 px for the /14 huge model): a 2x2 token grid
        x = torch.randn(3, 3, side, side)
        boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 50, 50], [0, 0, 200, 200]], dtype=torch.float32)
    assert backbone.embed_dim == dim and backbone.patch_size == patch and len(backbone.blocks) == depth
    assert backbone.blocks[0].attn.num_heads == heads
    logits = net(x, boxes)
    assert logits.shape == ((3, 1, 8, 8) if device != "meta" else (3, 1, 16, 16))
    logits.square().mean().backward()
    assert backbone.patch_embed.proj.weight.grad is not None
    assert net.mask_head.convs[0].conv.weight.grad is not None
    return net, logits


@pytest.mark.parametrize("arch", ["vit-deit-tiny/16", "vit-deit-small/16", "vit-mae-base/16"])
def test_small_arches_build_and_train(arch):
    net, logits = _build_and_step(arch, "cpu")
    assert torch.isfinite(logits).all()
    assert net.mask_head.convs[0].conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["vit-mae-large/16", "vit-mae-huge/14"])
def test_large_arches_build_and_train_shapes(arch):
    # TAO crashes building huge (and tiny); here every arch builds.  On the meta device the whole
    # forward/backward runs shape-only, in well under a second even for the 630M-parameter huge model.
    _build_and_step(arch, "meta")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit-mae-large/16", "vit-mae-huge/14"])
def test_large_arches_train_numerically(arch):
    net, logits = _build_and_step(arch, "cpu")
    assert torch.isfinite(logits).all()
    assert net.mask_head.convs[0].conv.weight.grad.abs().sum() > 0


def test_spatial_output_matches_timm_tokens_and_crops_leftover_pixels():
    torch.manual_seed(0)
    vit = build_vit("vit-deit-tiny/16", weight_init="skip").eval()
    x = torch.randn(2, 3, 48, 64)
    out = vit(x)
    assert out.shape == (2, 192, 3, 4)
    tokens = vit.forward_features(x)[:, 1:]
    assert torch.allclose(out.flatten(2).transpose(1, 2), tokens, atol=1e-6)
    # 50x70 is not a multiple of 16: the extra pixels are dropped, not an error
    assert torch.allclose(vit(torch.nn.functional.pad(x, (0, 6, 0, 2))), out, atol=1e-5)


def test_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="model.arch"):
        build_vit("vit-mae-giant/16")


def test_frozen_stages_list_semantics(caplog):
    with caplog.at_level(logging.WARNING):
        vit = build_vit("vit-deit-tiny/16", frozen_stages=[0, 2, 99], weight_init="skip")
    assert vit.frozen_stages == (0, 2)
    assert "99" in caplog.text
    assert not any(p.requires_grad for p in vit.patch_embed.parameters())
    assert not any(p.requires_grad for p in vit.blocks[1].parameters())
    assert all(p.requires_grad for p in vit.blocks[0].parameters())
    assert vit.cls_token.requires_grad and vit.pos_embed.requires_grad
    vit.train()
    assert not vit.blocks[1].training and vit.blocks[0].training
    default = build_vit("vit-deit-tiny/16", weight_init="skip")
    assert default.frozen_stages == () and all(p.requires_grad for p in default.parameters())


# ------------------------------------------------------------------------------------------------ weights
def _mae_dict(vit):
    sd = {k: v.clone() for k, v in vit.state_dict().items() if not k.startswith("head.")}
    sd.update({"mask_token": torch.zeros(1, 1, 128), "decoder_embed.weight": torch.zeros(128, vit.embed_dim),
               "decoder_pos_embed": torch.zeros(1, 197, 128), "decoder_blocks.0.norm1.weight": torch.ones(128),
               "decoder_pred.weight": torch.zeros(768, 128)})
    return {"model": sd, "epoch": 99}


def test_mae_and_timm_formats_load_with_an_empty_report(tmp_path: Path):
    torch.manual_seed(0)
    src = build_vit("vit-deit-tiny/16", weight_init="skip")
    # MAE pretrain checkpoint: {"model": ...}, no classifier, decoder keys, saved with an argparse Namespace
    import argparse

    mae = _mae_dict(src)
    mae["args"] = argparse.Namespace(model="mae_vit_base_patch16")
    torch.save(mae, tmp_path / "checkpoint-99.pth")
    dst = build_vit("vit-deit-tiny/16", weight_init="skip")
    report = load_vit_weights(dst, read_weights_file(tmp_path / "checkpoint-99.pth"), source="mae")
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert "mask_token" in report.benign and "decoder_embed.weight" in report.benign
    for key, value in src.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(dst.state_dict()[key], value), key
    # timm / DeiT dict with a 1000-class head, as .safetensors
    from safetensors.torch import save_file

    timm_sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(timm_sd, str(tmp_path / "deit.safetensors"))
    dst2 = build_vit("vit-deit-tiny/16", weight_init="skip")
    report = load_vit_weights(dst2, read_weights_file(tmp_path / "deit.safetensors"))
    assert report.clean and report.missing == [] and report.unexpected == []
    assert torch.equal(dst2.head.weight, src.head.weight)
    # a head for another label set and a distillation token are benign
    timm_sd["head.weight"] = torch.zeros(21843, 192)
    timm_sd["head.bias"] = torch.zeros(21843)
    timm_sd["dist_token"] = torch.zeros(1, 1, 192)
    timm_sd["pos_embed"] = torch.cat([timm_sd["pos_embed"][:, :1], torch.zeros(1, 1, 192),
                                      timm_sd["pos_embed"][:, 1:]], 1)
    report = load_vit_weights(build_vit("vit-deit-tiny/16", weight_init="skip"), timm_sd)
    assert report.clean, report.summary()


def test_pos_embed_with_another_grid_is_resampled():
    src = build_vit("vit-deit-tiny/16", img_size=384, weight_init="skip")
    assert src.pos_embed.shape == (1, 1 + 24 * 24, 192)
    dst = build_vit("vit-deit-tiny/16", weight_init="skip")
    report = load_vit_weights(dst, src.state_dict())
    assert report.clean
    assert dst.pos_embed.shape == (1, 197, 192)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # cls position is kept as is


def test_shape_mismatch_raises_naming_key_and_shapes():
    sd = build_vit("vit-deit-small/16", weight_init="skip").state_dict()
    with pytest.raises(CheckpointError) as err:
        load_vit_weights(build_vit("vit-deit-tiny/16", weight_init="skip"), sd, source="small.pth")
    text = str(err.value)
    assert "small.pth" in text and "cls_token" in text and "(1, 1, 384)" in text and "(1, 1, 192)" in text


def test_unrelated_or_convstem_or_unsafe_files_raise(tmp_path: Path):
    vit = build_vit("vit-deit-tiny/16", weight_init="skip")
    with pytest.raises(CheckpointError, match="no tensor"):
        load_vit_weights(vit, {"foo.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="ConvStem"):
        load_vit_weights(vit, {"patch_embed.proj.0.0.weight": torch.zeros(3)})

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {"x": torch.zeros(1)}, "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="safely"):
        read_weights_file(tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="not found"):
        read_weights_file(tmp_path / "missing.pth")


def test_mal_checkpoint_loads_backbone_and_heads_into_student_and_teacher(tmp_path: Path):
    torch.manual_seed(0)
    cfg = _cfg(**{"model.mask_head_hidden_channel": 32, "model.mask_head_out_channel": 32})
    trained = build_mal_network(cfg)
    sd = {f"student.{k}": v for k, v in trained.state_dict().items()}
    sd.update({f"teacher.{k}": torch.zeros_like(v) for k, v in trained.state_dict().items()})
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "mal.pth")
    cfg.train.pretrained_model_path = str(tmp_path / "mal.pth")
    student, teacher = build_mal_networks(cfg)
    for net in (student, teacher):
        for key, value in trained.state_dict().items():
            assert torch.equal(net.state_dict()[key], value), key
    assert not any(p.requires_grad for p in teacher.parameters())
    # when resuming the file is not read at all
    cfg.train.pretrained_model_path = str(tmp_path / "absent.pth")
    build_mal_networks(cfg, resuming=True)


def test_teacher_is_built_separately_not_copied():
    torch.manual_seed(0)
    student, teacher = build_mal_networks(_cfg(**{"model.mask_head_hidden_channel": 16,
                                                  "model.mask_head_out_channel": 16}))
    assert not torch.equal(student.roi_head.mlp1.weight, teacher.roi_head.mlp1.weight)


# ------------------------------------------------------------------------------------------------ heads
def test_heads_shapes_init_and_relu():
    head = MaskHead(48, num_convs=4, hidden_channels=16, out_channels=8, scale_ratio=2.0)
    out = head(torch.randn(2, 48, 5, 7))
    assert out.shape == (2, 8, 10, 14) and out.min() >= 0
    assert torch.all(head.convs[0].conv.bias == 0)
    # kaiming normal, fan_out, relu: std = sqrt(2 / (out_channels · 9))
    std = head.convs[1].conv.weight.std().item()
    assert std == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.15)
    assert MaskHead(48, num_convs=2, hidden_channels=16, out_channels=8)(torch.randn(1, 48, 5, 7)).shape == (1, 8, 5, 7)
    assert RoIHead(48, 8)(torch.randn(3, 48, 4, 4)).shape == (3, 8)


def test_area_bins_cover_every_area_including_boundaries():
    boxes = torch.tensor([[0, 0, 0, 0], [0, 0, 10, 10], [0, 0, 32, 32], [0, 0, 33, 32], [0, 0, 96, 96],
                          [0, 0, 97, 96], [0, 0, 500, 500]], dtype=torch.float32)
    assert area_bin(boxes).tolist() == [0, 0, 0, 1, 1, 2, 2]
    torch.manual_seed(0)
    net = MALNetwork(build_vit("vit-deit-tiny/16", weight_init="skip"), hidden_channels=16, out_channels=16)
    with torch.no_grad():
        logits = net(torch.randn(len(boxes), 3, 64, 64), boxes)
    assert logits.shape == (7, 1, 16, 16)
    assert torch.all(logits.flatten(1).abs().sum(1) > 0)  # TAO: rows with area 0, 1024, 9216 are all-zero


def test_multiscale_path_uses_bin_resolution():
    torch.manual_seed(0)
    net = MALNetwork(build_vit("vit-deit-tiny/16", weight_init="skip"), hidden_channels=8, out_channels=8).eval()
    x = torch.randn(1, 3, 64, 64)
    seen = []
    net.mask_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    for area_side in (20, 60, 200):
        net(x, torch.tensor([[0, 0, area_side, area_side]], dtype=torch.float32))
    assert seen == [(4, 4), (8, 8), (16, 16)]  # token grid 4x4 resized x0.5 / x1 / x2, then x2 in the head
    flat = MALNetwork(net.backbone, hidden_channels=8, out_channels=8, adjust_scale=False)
    assert flat(x, torch.zeros(1, 4)).shape == (1, 1, 32, 32)


def test_ema_update_is_parameter_lerp():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    a.register_buffer("stat", torch.zeros(1))
    b.register_buffer("stat", torch.ones(1))
    before = a.weight.detach().clone()
    ema_update(a, b, 0.996)
    assert torch.allclose(a.weight, 0.996 * before + 0.004 * b.weight)
    assert a.stat.item() == 0  # buffers untouched


# ------------------------------------------------------------------------------------------------ module
def test_warmup_cosine_schedule():
    kw = dict(base_lr=1.0, min_lr=0.2, warmup_epochs=2, num_epochs=10)
    assert warmup_cosine_lr(0, **kw) == 0
    assert warmup_cosine_lr(1, **kw) == pytest.approx(0.5)
    assert warmup_cosine_lr(2, **kw) == pytest.approx(1.0)
    assert warmup_cosine_lr(6, **kw) == pytest.approx(0.6)
    assert warmup_cosine_lr(10, **kw) == pytest.approx(0.2)
    assert warmup_cosine_lr(4, **kw) == pytest.approx(warmup_cosine_lr(8, **kw) + 2 * (0.6 - warmup_cosine_lr(8, **kw)))
    assert warmup_cosine_lr(5, base_lr=1.0, min_lr=0.2, warmup_epochs=3, num_epochs=3) == 1.0  # no div by 0


class _TrainSet(torch.utils.data.Dataset):
    def __init__(self, n, side):
        self.n, self.side = n, side

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        mask = torch.zeros(1, self.side, self.side)
        mask[:, 8:40, 10:30] = 1
        return {"image": torch.randn(3, self.side, self.side, generator=g),
                "timage": torch.randn(3, self.side, self.side, generator=g), "mask": mask,
                "bbox": torch.tensor([5.0, 5.0, 45.0, 60.0]), "compact_category_id": torch.tensor(1),
                "ann_id": torch.tensor(i)}


class _EvalSet(torch.utils.data.Dataset):
    def __init__(self, n, side):
        self.n, self.side = n, side

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        boxmask = torch.zeros(1, self.side, self.side)
        boxmask[:, 8:56, 8:56] = 1
        gt = np.zeros((60, 80), np.uint8)
        gt[20:40, 30:30 + (5, 10, 20)[i % 3]] = 1  # fills a quarter, half or all of the box: IoUs differ
        g = torch.Generator().manual_seed(1000 + i)  # the same image each time it is read
        return {"image": torch.randn(3, self.side, self.side, generator=g), "boxmask": boxmask,
                "bbox": torch.tensor([30.0, 20.0, 50.0, 40.0]), "ext_box": torch.tensor([27, 17, 53, 43]),
                "image_hw": torch.tensor([60, 80]), "category_id": torch.tensor(5 + i % 2),
                "compact_category_id": torch.tensor(1 + i % 2), "ann_id": torch.tensor(100 + i),
                "image_id": torch.tensor(i // 2), "iscrowd": torch.tensor(0), "gt_mask": gt}


def _small_module(**train):
    cfg = _cfg(**{"model.mask_head_hidden_channel": 16, "model.mask_head_out_channel": 16,
                  "train.crf_num_iter": 3, "train.batch_size": 2, "train.num_epochs": 2, "train.lr": 1e-4,
                  **{f"train.{k}": v for k, v in train.items()}})
    ctx = RunContext(action="train", run_dir=Path("."))
    return MALModule(cfg, ctx), cfg


def test_module_contract_and_lr_scaling():
    mod, cfg = _small_module()
    assert mod.trainer_traits.find_unused_parameters is True
    assert mod.lr == pytest.approx(1e-4 * 1 * 2)  # base × devices × per-device batch
    assert mod.min_lr == pytest.approx(mod.lr * 0.2)
    opt = mod.configure_optimizers()["optimizer"]
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in mod.student.parameters()}
    assert opt.param_groups[0]["betas"] == (0.9, 0.9) and opt.param_groups[0]["weight_decay"] == 5e-4
    ctx4 = RunContext(action="train", run_dir=Path("."), num_devices=4)
    assert MALModule(cfg, ctx4).lr == pytest.approx(1e-4 * 4 * 2)


def test_accumulation_steps_ema_and_schedule_per_optimizer_step(monkeypatch):
    import pytorch_lightning as pl

    import networks.mal.module as module_mod
    from networks.mal.data import collate_eval

    torch.manual_seed(0)
    mod, _ = _small_module(warmup_epochs=1, num_epochs=2)
    calls = []
    real = module_mod.ema_update
    monkeypatch.setattr(module_mod, "ema_update", lambda t, s, m: (calls.append(m), real(t, s, m)))
    lrs = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[Spy()])
    train = torch.utils.data.DataLoader(_TrainSet(8, 64), batch_size=2)  # 4 batches -> 2 optimizer steps/epoch
    # 3 instances, categories 1, 2, 1: the class-averaged mIoU differs from the plain mean over instances
    val = torch.utils.data.DataLoader(_EvalSet(3, 64), batch_size=2, collate_fn=collate_eval)
    trainer.fit(mod, train, val)
    assert trainer.global_step == 4
    assert calls == [0.996] * 4  # one EMA update per optimizer step, not per batch
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 4
    # per batch: LR of the optimizer step it accumulates into; step k uses lr(k / 2 steps-per-epoch)
    expect = [mod.lr_at_step(k, 2) for k in (0, 0, 1, 1, 2, 2, 3, 3)]
    assert lrs == pytest.approx(expect)
    assert lrs[0] == 0 and lrs[4] == pytest.approx(mod.lr)
    # KPIs after validation: TAO's mIoU family plus COCO mask AP
    assert set(mod.kpi) == {"mIoU", "mIoU_small", "mIoU_medium", "mIoU_large", "AP", "AP50", "AP75", "APs",
                            "APm", "APl", "num_instances", "num_small", "num_medium", "num_large"}
    # the reported mIoU, recomputed by hand from the final student's masks on the same validation set:
    # per-instance IoU with the ground truth, mean per category, then mean over categories (TAO)
    mod.eval()
    per_category: dict[int, list[float]] = {}
    with torch.no_grad():
        for batch in val:
            for rec in mod._instances(batch, mod.crop_probs(batch)):
                pred, true = np.asarray(rec["mask"], bool), np.asarray(rec["gt"], bool)
                iou = (pred & true).sum() / (pred | true).sum()
                per_category.setdefault(rec["compact_category_id"], []).append(float(iou))
    expected = float(np.mean([np.mean(v) for v in per_category.values()]))
    assert mod.kpi["mIoU"] == pytest.approx(expected, abs=1e-6)
    assert "train/loss_epoch" in trainer.callback_metrics


def test_eval_probabilities_flags_and_kpi_values():
    torch.manual_seed(0)
    mod, _ = _small_module()
    mod.eval()
    from networks.mal.data import collate_eval

    batch = collate_eval([_EvalSet(2, 64)[i] for i in range(2)])
    with torch.no_grad():
        p_s = mod.crop_probs(batch)
        assert p_s.shape == (2, 64, 64) and torch.all(p_s[:, :8] == 0)  # gated by the box mask
        mod.use_teacher_test = True
        p_t = mod.crop_probs(batch)
        mod.use_mixed_model_test = True
        p_m = mod.crop_probs(batch)
        s = mod.student(batch["image"], batch["bbox"])
        t = mod.teacher(batch["image"], batch["bbox"])
        expect = torch.sigmoid(torch.nn.functional.interpolate((s + t) / 2, size=(64, 64), mode="bilinear",
                                                               align_corners=False))[:, 0] * batch["boxmask"][:, 0]
        assert torch.allclose(p_m, expect, atol=1e-6)
        assert not torch.allclose(p_s, p_t)
        mod.use_flip_test = True
        assert mod.crop_probs(batch).shape == (2, 64, 64)
    # compute_kpi on hand-made records: perfect masks give mIoU 1 and AP 1
    from networks.common.coco_io import mask_to_rle

    gt = np.zeros((20, 20), np.uint8)
    gt[5:15, 5:15] = 1
    rec = {"image_id": 1, "category_id": 3, "compact_category_id": 1, "iscrowd": 0, "bbox": [5, 5, 10, 10],
           "box_area": 100.0, "iou": 1.0, "hw": [20, 20], "pred": mask_to_rle(gt), "gt": mask_to_rle(gt),
           "score": 0.9}
    kpi = mod.compute_kpi([dict(rec, ann_id=1), dict(rec, ann_id=1), dict(rec, ann_id=2, iou=0.5)])
    assert kpi["mIoU"] == pytest.approx(0.75) and kpi["mIoU_small"] == pytest.approx(0.75)
    assert kpi["AP"] == pytest.approx(1.0)


def test_predict_writes_pseudo_labels_for_every_annotation(tmp_path: Path):
    import json

    import pytorch_lightning as pl

    from networks.common.synthetic import generate
    from networks.mal.data import MALDataModule

    generate(tmp_path / "data", seed=1, num_train=1, num_val=3, image_size=64)
    val = tmp_path / "data" / "val"
    cfg = _cfg(**{"model.mask_head_hidden_channel": 16, "model.mask_head_out_channel": 16,
                  "dataset.crop_size": 32, "dataset.num_workers_per_gpu": 0,
                  "inference.ann_path": str(val / "annotations.json"), "inference.img_dir": str(val / "images"),
                  "inference.load_mask": True, "inference.batch_size": 2, "inference.label_dump_path": "out.json"})
    ctx = RunContext(action="inference", run_dir=tmp_path / "run")
    torch.manual_seed(0)
    mod = MALModule(cfg, ctx)
    assert mod.label_dump_path == tmp_path / "run" / "out.json"
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    preds = trainer.predict(mod, MALDataModule(cfg, ctx))
    flat = [r for batch in preds for r in batch]
    src = json.loads((val / "annotations.json").read_text())
    out = json.loads((tmp_path / "run" / "out.json").read_text())
    assert len(flat) == len(src["annotations"]) == len(out["annotations"]) == mod.outputs["annotations"]
    for ann_in, ann_out in zip(src["annotations"], out["annotations"], strict=True):
        assert ann_out["id"] == ann_in["id"] and ann_out["bbox"] == ann_in["bbox"]
        img = next(i for i in src["images"] if i["id"] == ann_in["image_id"])
        assert ann_out["segmentation"]["size"] == [img["height"], img["width"]]
        assert 0.0 <= ann_out["score"] <= 1.0 and "iou" in ann_out


@pytest.mark.parametrize(("policy", "native", "expected"), [
    ("run", True, torch.float32), ("bf16", False, torch.bfloat16),
    ("auto", True, torch.bfloat16), ("auto", False, torch.float32)])
def test_teacher_precision_sets_only_the_teacher_forward_dtype(monkeypatch, policy, native, expected):
    import networks.mal.module as module_mod

    monkeypatch.setattr(module_mod, "native_bf16", lambda device: native)
    mod, _ = _small_module(teacher_precision=policy)
    seen = {}
    for name in ("student", "teacher"):
        getattr(mod, name).roi_head.mlp1.register_forward_hook(
            lambda m, i, out, name=name: seen.__setitem__(name, out.dtype))
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1
    batch = {"image": torch.randn(2, 3, 32, 32), "bbox": torch.tensor([[8.0, 8.0, 24.0, 24.0]] * 2), "mask": mask}
    loss = mod.training_step(batch, 0)
    assert seen == {"student": torch.float32, "teacher": expected}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
