"""What each MAL speed lever of issue 14 buys, measured together in one process (not part of ``make bench``).

Four functions alternate in every round on the bench's inputs (``benchmarks/bench_mal.py``: vit-mae-base/16,
crop 512, batch 2, fp32): the train step as it was (mask head on NCHW input, fp32 teacher), with the mask head
on channels-last input, with the teacher under bf16 autocast as well (``train.teacher_precision: auto`` on a
CPU with bf16 hardware), and the bare backbone forward + backward.  Each step's figure is the median over rounds
of its time / the backbone's time in the same round (first round dropped), with the spread.  Writes
``benchmarks/results/mal_levers.json``.

    .venv/bin/python -m benchmarks.mal_levers [--rounds 6]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_mal import build_parts, train_step_fn
from benchmarks.common import pin_threads
from networks.mal.model import MaskHead

OUT = Path(__file__).resolve().parent / "results" / "mal_levers.json"
VARIANTS = {  # name: (mask-head input layout, teacher under bf16 autocast)
    "before: NCHW mask head, fp32 teacher": (torch.contiguous_format, False),
    "channels-last mask head": (torch.channels_last, False),
    "channels-last mask head + bf16 teacher": (torch.channels_last, True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    threads = pin_threads()
    p = build_parts()

    def step(layout, teacher_bf16: bool) -> None:
        MaskHead.memory_format = layout
        train_step_fn(p, amp=False, teacher_bf16=teacher_bf16)()

    def backbone() -> None:
        p.student.backbone.zero_grad(set_to_none=True)
        p.student.backbone(p.image).sum().backward()

    fns = {name: (lambda v=v: step(*v)) for name, v in VARIANTS.items()}
    fns["bare backbone fwd+bwd"] = backbone
    times: dict[str, list[float]] = {name: [] for name in fns}
    try:
        for r in range(args.rounds + 1):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                if r:  # round 0 is the warm-up
                    times[name].append(time.perf_counter() - start)
    finally:
        MaskHead.memory_format = torch.channels_last
    out = {"config": {**p.config, "threads": threads, "rounds": args.rounds,
                      "cpu": torch.backends.cpu.get_cpu_capability()}, "steps": {}}
    base = times["bare backbone fwd+bwd"]
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base, strict=True)]
        row = {"median_ms": round(1000 * statistics.median(ts)), "ratio": round(statistics.median(ratios), 4),
               "spread": [round(min(ratios), 4), round(max(ratios), 4)]}
        out["steps"][name] = row
        print(f"{name:42s} {row['median_ms']:7d} ms  {row['ratio']:.3f} {row['spread']}")
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print("written", OUT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
