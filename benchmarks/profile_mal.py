"""Where a MAL train step spends its time: ``torch.profiler`` tables for the bench's step (not a test).

Builds the step of ``benchmarks/bench_mal.py`` (``vit-mae-base/16``, crop 512, batch 2 unless ``BENCH_MAL_*`` say
otherwise), runs one warm-up step, then profiles ``--steps`` steps with every phase under its own
``record_function`` label: student forward (backbone, mask/RoI heads), teacher forward, mean field + losses,
backward, AdamW, EMA.  The phase table is wall time per phase (``time.perf_counter`` at the phase boundaries,
median over ``--steps`` steps run without the profiler: the profiler's per-operator cost would inflate the phases
made of many small operators, such as the mean field's 100 iterations); the operator table is the profiler's
``--top`` operators by self CPU time over ``--steps`` profiled steps.  Both go to
``benchmarks/results/profile_mal[_<tag>].json``.

``--teacher-bf16`` runs the teacher under CPU bf16 autocast (the lever issue 14 names) and reports the teacher's
mask agreement with the fp32 teacher on the same input: IoU of ``logits > 0`` and the largest probability change.

    .venv/bin/python benchmarks/profile_mal.py [--steps 3] [--top 15] [--teacher-bf16] [--tag NAME]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from benchmarks.bench_mal import build_parts  # noqa: E402
from benchmarks.common import pin_threads  # noqa: E402
from networks.mal.criterion import mal_losses  # noqa: E402
from networks.mal.model import ema_update  # noqa: E402

PHASES = ("student.backbone", "student.heads", "teacher", "losses", "backward", "optimizer", "ema")


def _split_backbone(net, clock: dict[str, list[float]]):
    """Run ``net.backbone`` under the ``student.backbone`` label and add its wall time to
    ``clock["student.backbone"]``; the rest of the student forward (RoI and mask heads, per-bin resizing) is
    ``student`` minus that.  Returns the undo function."""
    backbone = net.backbone
    inner = backbone.forward

    def forward(x):
        start = time.perf_counter()
        with record_function("student.backbone"):
            out = inner(x)
        clock["student.backbone"].append(time.perf_counter() - start)
        return out

    backbone.forward = forward
    return lambda: setattr(backbone, "forward", inner)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--teacher-bf16", action="store_true")
    ap.add_argument("--amp", action="store_true",
                    help="the whole forward under CPU bf16 autocast, as MAL's default train.use_amp runs on CPU")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    threads = pin_threads()
    p = build_parts()

    def teacher_forward():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.teacher_bf16 or args.amp):
            return p.teacher(p.image, p.bbox).float()

    clock: dict[str, list[float]] = {name: [] for name in ("student", *PHASES) if name != "student.heads"}
    undo = _split_backbone(p.student, clock)

    def phase(name: str, fn):
        start = time.perf_counter()
        with record_function(name):
            out = fn()
        clock[name].append(time.perf_counter() - start)
        return out

    def backward(losses):
        p.opt.zero_grad(set_to_none=True)
        (losses["loss_mil"] + losses["loss_crf"]).backward()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
            s = phase("student", lambda: p.student(p.image, p.bbox))
            t = phase("teacher", teacher_forward)
            losses = phase("losses", lambda: mal_losses(s, t, p.image, p.mask, p.mean_field, epoch=1,
                                                        step_in_epoch=0, **p.loss_kw))
        phase("backward", lambda: backward(losses))
        phase("optimizer", p.opt.step)
        phase("ema", lambda: ema_update(p.teacher, p.student, 0.996))

    agreement = None
    if args.teacher_bf16:
        with torch.no_grad():
            ref = p.teacher(p.image, p.bbox).float()
        low = teacher_forward()
        a, b = ref > 0, low > 0
        union = (a | b).sum().item()
        agreement = {"mask_iou": (a & b).sum().item() / union if union else 1.0,
                     "max_prob_change": (ref.sigmoid() - low.sigmoid()).abs().max().item()}
    step()  # warm-up: allocator, oneDNN primitive caches
    for values in clock.values():
        values.clear()
    for _ in range(args.steps):  # wall clock per phase, no profiler
        step()
    walls = {k: statistics.median(v) * 1e3 for k, v in clock.items()}
    phases = {"student.backbone": walls["student.backbone"],
              "student.heads": walls["student"] - walls["student.backbone"],
              **{k: walls[k] for k in ("teacher", "losses", "backward", "optimizer", "ema")}}
    total = sum(phases.values())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    undo()
    print(f"\nMAL train step ({p.config}, threads {threads}, teacher "
          f"{'everything bf16 autocast' if args.amp else 'bf16' if args.teacher_bf16 else 'fp32'}): {total:.0f} ms per step (median per phase, no profiler)")
    print(f"{'phase':<18}{'ms/step':>10}{'share':>8}")
    for name in PHASES:
        print(f"{name:<18}{phases[name]:>10.0f}{phases[name] / total:>8.1%}")
    if agreement:
        print(f"teacher bf16 vs fp32: mask IoU {agreement['mask_iou']:.4f}, max |Δp| {agreement['max_prob_change']:.4f}")
    labels = {"student", "teacher", "losses", "backward", "optimizer", "ema", "student.backbone"}
    ops = sorted((e for e in prof.key_averages() if e.key not in labels and not e.key.startswith("ProfilerStep")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    print(f"\n{'operator (top by self CPU)':<44}{'ms/step':>10}{'calls':>8}")
    for e in ops:
        print(f"{e.key[:43]:<44}{e.self_cpu_time_total / 1e3 / args.steps:>10.0f}{e.count // args.steps:>8}")
    out = ROOT / "benchmarks" / "results" / f"profile_mal{'_' + args.tag if args.tag else ''}.json"
    from networks.common.io import atomic_write_json

    atomic_write_json(out, {"config": {**p.config, "threads": threads, "teacher_bf16": args.teacher_bf16, "amp": args.amp},
                            "ms_per_step": round(total, 1),
                            "phases_ms": {k: round(v, 1) for k, v in phases.items()},
                            "teacher_agreement": agreement,
                            "top_ops_ms": {e.key: round(e.self_cpu_time_total / 1e3 / args.steps, 1) for e in ops}},
                      indent=2)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
