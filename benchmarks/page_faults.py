"""Page faults of ``make bench``'s steps under glibc's default malloc and under the steady settings.

``python -m benchmarks.page_faults`` runs, for each case, ours and the reference alternating in two fresh
processes, one per allocator setting (:func:`benchmarks.common.steady_malloc_env`), ``BENCH_PAIRS`` (default 6)
pairs after one warm-up pair.  Cases: ``m2f_step``, the Mask2Former Swin-T train step (384 px, batch 2;
:mod:`benchmarks.bench_mask2former`), and ``mgd_forward``, the Mask Grounding DINO eval forward (Swin-T, 320 px;
:mod:`benchmarks.bench_mask_grounding_dino`).  Per model and setting it reports the median time, and per call the
minor page faults and the kernel (system) CPU time, from ``getrusage``; and the ratio ours / reference as
``make bench`` computes it (:func:`benchmarks.common.paired`).  The faults are the cost the steady setting removes: a block glibc hands out with a fresh
``mmap`` faults in page by page.  Results: ``benchmarks/results/page_faults.json``.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


CASES = ("m2f_step", "mgd_forward")


def _steps(case: str, dev) -> dict:
    """{"ours": callable, "hf": callable} for ``case`` on ``dev``."""
    if case == "m2f_step":
        from benchmarks import bench_mask2former as b

        module, ours = b.build_ours(dev, b.SWIN_T)
        return {"ours": b.ours_step_fn(module, ours, b.make_batch(dev, b.SWIN_T_SIZE)),
                "hf": b.hf_step_fn(b.build_hf(dev, b.SWIN_T), b.make_batch(dev, b.SWIN_T_SIZE))}
    if case != "mgd_forward":
        raise ValueError(f"unknown case {case!r}: one of {CASES}")
    from benchmarks.bench_mask_grounding_dino import forward_pair

    pair = forward_pair(dev)
    return {"ours": pair.run_ours, "hf": pair.run_hf}


def _counted(fn, record: dict[str, list]):
    """``fn`` that also appends its minor page faults and system CPU seconds per call to ``record``."""
    def call():
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        record["minor_faults"].append(r1.ru_minflt - r0.ru_minflt)
        record["sys_s"].append(round(r1.ru_stime - r0.ru_stime, 3))

    return call


def _measure(case: str, pairs: int) -> dict:
    """(In the child.)  ``case``'s ours / HF calls through :func:`benchmarks.common.paired` (the bench's timing and
    ratio); per model the median seconds and, per timed call, minor faults and system seconds."""
    import torch

    from benchmarks.common import bench_pairs, paired, pin_threads

    pin_threads()
    steps = _steps(case, torch.device("cpu"))
    records = {k: {"minor_faults": [], "sys_s": []} for k in steps}
    timing = paired(_counted(steps["ours"], records["ours"]), _counted(steps["hf"], records["hf"]),
                    pairs=bench_pairs(pairs))
    out = {}
    for name, key in (("ours", "a_median_s"), ("hf", "b_median_s")):
        rec = {k: v[timing["warmup"]:] for k, v in records[name].items()}  # the warm-up pair's calls dropped
        out[name] = {"median_s": timing[key], "median_minor_faults": statistics.median(rec["minor_faults"]),
                     "median_sys_s": statistics.median(rec["sys_s"]), **rec}
    return {**out, "ratio_median": timing["ratio_median"], "ratios": timing["ratios"]}


def main() -> int:
    from benchmarks.common import child_call, steady_malloc_env

    results: dict[str, dict] = {}
    for case, mode in ((c, m) for c in CASES for m in ("default", "steady")):
        env, label = steady_malloc_env({**os.environ, "BENCH_MALLOC": mode})
        try:
            measured = child_call("benchmarks.page_faults", "_measure", case, 6, env=env)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        r = results.setdefault(case, {})[mode] = {"malloc": label, **measured}
        print(f"{case}, {label}: ours {r['ours']['median_s']:.3f} s ({r['ours']['median_minor_faults']} faults, "
              f"{r['ours']['median_sys_s']:.2f} s sys), HF {r['hf']['median_s']:.3f} s "
              f"({r['hf']['median_minor_faults']} faults, {r['hf']['median_sys_s']:.2f} s sys), "
              f"ours / HF {r['ratio_median']:.3f}", flush=True)
    from networks.common.io import atomic_write_json

    atomic_write_json(RESULTS / "page_faults.json", results, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
