"""Benchmark: ``precision: bf16`` (CPU autocast) against fp32, one train step per network (issue 14).

Each network's train step (forward + loss + backward, no optimizer) at a small size runs in fp32 (A) and under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (B), alternating A B A B … in one process after one dropped
warm-up pair, on the same inputs; the figure is the median of the paired ratios B/A with its spread.  The loss
values of the first pair are reported too (bf16 changes the numbers; the learning tests run fp32).

* MAL: ``vit-deit-tiny/16`` student + teacher, crop 256, batch 2, MIL + CRF losses;
* Mask2Former: the ``benchmarks/bench_mask2former.py`` config and batch;
* Mask Grounding DINO: the ``benchmarks/learn_mask_grounding_dino.py`` model on a synthetic batch of 2.

Writes ``benchmarks/results/bf16_cpu.json``.  ``docs/performance.md`` records the decision taken from it.

    .venv/bin/python benchmarks/bf16_cpu.py [--pairs 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "bf16_cpu.json"


def mal_step():
    from omegaconf import OmegaConf

    from networks.mal.config import ExperimentConfig
    from networks.mal.criterion import MeanField, mal_losses
    from networks.mal.model import build_mal_networks

    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.model.arch, cfg.dataset.crop_size = "vit-deit-tiny/16", 256
    cfg.model.mask_head_hidden_channel = cfg.model.mask_head_out_channel = 64
    torch.manual_seed(0)
    student, teacher = build_mal_networks(cfg, resuming=True)
    student, teacher = student.train(), teacher.eval()
    tr = cfg.train
    mean_field = MeanField(int(tr.crf_kernel_size), float(tr.crf_zeta), int(tr.crf_num_iter),
                           float(tr.crf_value_low_thres), float(tr.crf_value_high_thres))
    image = torch.randn(2, 3, 256, 256)
    mask = torch.zeros(2, 1, 256, 256)
    mask[:, :, 64:192, 64:192] = 1
    bbox = torch.tensor([[64.0, 64.0, 192.0, 192.0]] * 2)

    def step() -> float:
        student.zero_grad(set_to_none=True)
        s = student(image, bbox)
        with torch.no_grad():
            t = teacher(image, bbox)
        losses = mal_losses(s, t, image, mask, mean_field, epoch=1, step_in_epoch=0, loss_mil_weight=4.0,
                            loss_crf_weight=0.5, loss_mil_step=1000, loss_crf_step=4000, crf_size_ratio=1)
        loss = losses["loss_mil"] + losses["loss_crf"]
        loss.backward()
        return float(loss)

    return step


def mask2former_step():
    from benchmarks.bench_mask2former import build_ours, make_batch
    from benchmarks.learn_mask2former import our_loss

    module, ours = build_ours(torch.device("cpu"))
    batch = make_batch(torch.device("cpu"))
    return _backward_step(ours, lambda: our_loss(module, batch))


def mask_grounding_dino_step(tmp: Path):
    from benchmarks.learn_mask_grounding_dino import our_loss, our_spec
    from networks.common.context import RunContext
    from networks.common.synthetic import generate
    from networks.mask_grounding_dino.data import MaskGDinoDataModule
    from networks.mask_grounding_dino.module import MaskGDinoModule

    data = generate(tmp / "mgd", seed=0, num_train=2, num_val=0, image_size=128)
    cfg = our_spec(data)
    torch.manual_seed(0)
    module = MaskGDinoModule(cfg, None).train()
    dm = MaskGDinoDataModule(cfg, RunContext("train", tmp))
    dm.setup("fit")
    batch = dm.collate([dm.train_dataset[i] for i in range(2)])
    return _backward_step(module, lambda: our_loss(module, batch))


def _backward_step(model, loss_fn):
    """A train step without the optimizer: zero the gradients, loss, backward; returns the loss value."""
    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return float(loss.detach())

    return step


def measure(step, pairs: int) -> dict:
    def timed(bf16: bool) -> tuple[float, float]:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = step()
        return time.perf_counter() - t0, loss

    timed(False), timed(True)  # warm-up pair, dropped
    rows = []
    for _ in range(pairs):
        a, la = timed(False)
        b, lb = timed(True)
        rows.append({"fp32_s": a, "bf16_s": b, "ratio": b / a, "fp32_loss": la, "bf16_loss": lb})
    ratios = [r["ratio"] for r in rows]
    return {"median_ratio_bf16_over_fp32": statistics.median(ratios), "spread": [min(ratios), max(ratios)],
            "fp32_s_median": statistics.median(r["fp32_s"] for r in rows),
            "bf16_s_median": statistics.median(r["bf16_s"] for r in rows),
            "loss_first_pair": {"fp32": rows[0]["fp32_loss"], "bf16": rows[0]["bf16_loss"]}, "pairs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        builders = {"mal": mal_step, "mask2former": mask2former_step,
                    "mask_grounding_dino": lambda: mask_grounding_dino_step(Path(tmp))}
        for name, build in builders.items():
            results[name] = measure(build(), args.pairs)
            r = results[name]
            print(f"{name}: bf16/fp32 = {r['median_ratio_bf16_over_fp32']:.2f} (spread {r['spread'][0]:.2f}–"
                  f"{r['spread'][1]:.2f}; fp32 {r['fp32_s_median']:.2f} s, bf16 {r['bf16_s_median']:.2f} s; "
                  f"loss {r['loss_first_pair']['fp32']:.4f} vs {r['loss_first_pair']['bf16']:.4f})", flush=True)
    cpu_flags = ""
    try:
        cpu_flags = " ".join(f for f in open("/proc/cpuinfo").read().split() if f in ("avx512_bf16", "amx_bf16"))
    except OSError:
        pass
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "threads": args.threads, "platform": platform.platform(),
                    "torch": torch.__version__, "cpu_bf16_flags": sorted(set(cpu_flags.split()))},
        "results": results}, indent=1) + "\n")
    print(f"written {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
