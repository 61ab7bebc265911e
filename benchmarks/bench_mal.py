"""MAL at TAO's default size: one train step vs the bare timm backbone, and inference throughput.

Train step = student forward + teacher forward (no grad) + mean-field CRF target + MIL/CRF losses + backward
+ AdamW step + EMA update, at ``vit-mae-base/16``, crop 512, batch 2.  The bare backbone is the same timm ViT's
forward + backward (sum of the output) on the same input.  The two alternate in one process
(:func:`benchmarks.common.paired`, one warm-up pair dropped); the figure is the median of the per-pair ratios
step / backbone.  Target: <= 1.4.  Also reported: peak memory (max RSS on CPU, so an upper bound that includes
the backbone runs) and inference throughput (student forward on ``4 * batch`` crops, ``BENCH_REPEAT`` runs).

The teacher's precision follows MAL's default ``train.teacher_precision`` (``auto``: bf16 autocast for the
teacher of an fp32 run where the device has bf16 hardware), as a default training run does.

Environment: ``BENCH_MAL_ARCH``, ``BENCH_MAL_CROP``, ``BENCH_MAL_BATCH``, ``BENCH_MAL_TEACHER`` (a
``teacher_precision``: auto, run, bf16), ``BENCH_PAIRS`` (default 7), ``BENCH_REPEAT`` (default 3),
``BENCH_THREADS``.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from benchmarks.common import (
    bench_pairs,
    device,
    figure,
    paired,
    peak_memory_mib,
    pin_threads,
    reset_peak,
    time_it,
)
from networks.mal.config import ExperimentConfig
from networks.mal.criterion import MeanField, mal_losses
from networks.mal.model import build_mal_networks, ema_update
from networks.mal.module import teacher_bf16
from networks.ops.optim import fused_option
from networks.ops.precision import bf16_autocast

ARCH = os.environ.get("BENCH_MAL_ARCH", "vit-mae-base/16")
CROP = int(os.environ.get("BENCH_MAL_CROP", "512"))
BATCH = int(os.environ.get("BENCH_MAL_BATCH", "2"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
PAIRS = 7
TARGET = 1.4


def build_parts() -> SimpleNamespace:
    """The bench's student, teacher (eval), mean field, AdamW and inputs on :func:`device` (seeded), shared with
    ``benchmarks/profile_mal.py``."""
    torch.manual_seed(0)
    dev = device()
    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.model.arch = ARCH
    cfg.dataset.crop_size = CROP
    student, teacher = build_mal_networks(cfg, resuming=True)
    student, teacher = student.to(dev).train(), teacher.to(dev).eval()
    tr = cfg.train
    mean_field = MeanField(int(tr.crf_kernel_size), float(tr.crf_zeta), int(tr.crf_num_iter),
                           float(tr.crf_value_low_thres), float(tr.crf_value_high_thres))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.9), **fused_option(params))  # as the module builds it
    image = torch.randn(BATCH, 3, CROP, CROP, device=dev)
    mask = torch.zeros(BATCH, 1, CROP, CROP, device=dev)
    mask[:, :, CROP // 4: 3 * CROP // 4, CROP // 4: 3 * CROP // 4] = 1
    bbox = torch.tensor([[10.0, 10.0, 200.0, 150.0]] * BATCH, device=dev)
    loss_kw = dict(loss_mil_weight=4.0, loss_crf_weight=0.5, loss_mil_step=1000, loss_crf_step=4000,
                   crf_size_ratio=1)
    policy = os.environ.get("BENCH_MAL_TEACHER", str(tr.teacher_precision))
    return SimpleNamespace(dev=dev, student=student, teacher=teacher, mean_field=mean_field, opt=opt, image=image,
                           mask=mask, bbox=bbox, loss_kw=loss_kw, teacher_bf16=teacher_bf16(policy, dev),
                           config={"arch": ARCH, "crop": CROP, "batch": BATCH, "device": str(dev),
                                   "teacher_precision": policy})


def train_step_fn(p: SimpleNamespace, *, amp: bool, teacher_bf16: bool):
    """One whole train step on :func:`build_parts`' ``p`` (also ``benchmarks/mal_levers.py``'s): student and
    teacher forward (the step under fp16 autocast when ``amp``; the teacher under bf16 autocast when
    ``teacher_bf16`` and no ``amp``), losses, backward, AdamW, EMA."""
    def step():
        with torch.autocast(p.dev.type, dtype=torch.float16, enabled=amp):
            s = p.student(p.image, p.bbox)
            with torch.no_grad(), bf16_autocast(p.dev, teacher_bf16):
                t = p.teacher(p.image, p.bbox)
            losses = mal_losses(s, t, p.image, p.mask, p.mean_field, epoch=1, step_in_epoch=0, **p.loss_kw)
        p.opt.zero_grad(set_to_none=True)
        (losses["loss_mil"] + losses["loss_crf"]).backward()
        p.opt.step()
        ema_update(p.teacher, p.student, 0.996)

    return step


def run() -> dict:
    threads = pin_threads()
    p = build_parts()
    dev, student, bbox, image = p.dev, p.student, p.bbox, p.image
    amp = dev.type == "cuda"
    train_step = train_step_fn(p, amp=amp, teacher_bf16=p.teacher_bf16)
    backbone = student.backbone

    def backbone_step():
        backbone.zero_grad(set_to_none=True)  # fresh grads, like the train step's zero_grad
        with torch.autocast(dev.type, dtype=torch.float16 if amp else torch.bfloat16, enabled=amp):
            out = backbone(image)
        out.float().sum().backward()

    reset_peak(dev)
    timing = paired(train_step, backbone_step, pairs=bench_pairs(PAIRS), dev=dev)
    peak_step = peak_memory_mib(dev)
    student.eval()
    n_crops = BATCH * 4
    crops = torch.randn(n_crops, 3, CROP, CROP, device=dev)
    crop_boxes = bbox[:1].expand(n_crops, 4)

    def infer():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16 if amp else torch.bfloat16, enabled=amp):
            student(crops, crop_boxes)

    inf = time_it(infer, dev, repeat=REPEAT)
    name = f"MAL train step / bare backbone fwd+bwd ({ARCH}, crop {CROP}, batch {BATCH})"
    return {
        "config": {**p.config, "amp": amp, "teacher_bf16": p.teacher_bf16, "threads": threads},
        "figures": [figure(name, timing, TARGET, "step", "backbone")],
        "train_step_s": timing["a_median_s"],
        "bare_backbone_fwd_bwd_s": timing["b_median_s"],
        "peak_memory_mib": peak_step,
        "inference_crops_per_s": n_crops / inf["median_s"],
    }
