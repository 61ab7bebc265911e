"""Scale benchmark of COCO AP (bbox and segm) by backend, and of panoptic PQ, on 5k-image sets (not a test).

Issue 14 §3: "bbox and segm COCO AP through faster-coco-eval by default ..., and panoptic PQ over 5k images, each
≤ 1/2 of today's time".  Today's COCO AP is pycocotools (``evaluate.coco_backend: pycocotools``).

* Ground truth like COCO val2017: 5,000 images of COCO's common sizes (~640×480), 36,781 instances of 80
  categories (Poisson per image, so some images are empty), sizes log-uniform so that about 45 % are small,
  30 % medium and 25 % large, ~1 % crowd regions stored as uncompressed RLE, the others one star-shaped polygon.
* Results: ``--dets`` (default 100) detections per image: 1-3 perturbed copies of each object (right class
  with p 0.7) and false positives up to the count, segm as compressed RLE with ``str`` counts (what the networks
  and a JSON results file give), bbox xywh.  Generated in memory (nothing is written to the repository).
* Timing: :func:`networks.common.metrics.coco_eval_stats` end to end (shared preparation + COCO index + loadRes
  + evaluate/accumulate/summarize) per backend, alternately in one process — pycocotools then faster-coco-eval,
  round after round (ABAB); the first round is a warm-up and dropped.  Reported: per-round seconds, the median of
  the paired ratios pycocotools / faster-coco-eval and their min/max, and the largest |difference| of the 12 stats.
* PQ (``--pq-images``, default 5000; 0 skips): today's :class:`networks.common.metrics.PanopticQuality` over
  synthetic 640×480 GT/prediction id-map pairs (~12 segments each; predictions shifted, some relabelled, merged
  or dropped); only ``update`` + ``compute`` are timed, the map generation is not.

    .venv/bin/python benchmarks/coco_eval_scale.py [--images 5000] [--instances 36781] [--dets 100]
                                                   [--rounds 3] [--pq-images 5000]

Writes ``benchmarks/results/coco_eval_scale.json``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "coco_eval_scale.json"
SHAPES = np.array([[640, 480], [480, 640], [640, 427], [500, 375], [640, 512]])  # (w, h), COCO's common sizes
BACKENDS = ("pycocotools", "faster_coco_eval")  # A = today's, B = the new default


def _star(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[float]:
    """One star-shaped ring of 6-20 points around (cx, cy) with radius ≤ r, as COCO's flat ``[x, y, ...]``."""
    n = int(rng.integers(6, 21))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.5, 1.0, n)
    ring = np.empty(2 * n)
    ring[0::2] = np.round(cx + rad * np.cos(ang), 2)
    ring[1::2] = np.round(cy + rad * np.sin(ang), 2)
    return ring.tolist()


def _ring_area(ring: list[float]) -> float:
    x, y = np.asarray(ring[0::2]), np.asarray(ring[1::2])
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _box(ring: list[float]) -> list[float]:
    x, y = ring[0::2], ring[1::2]
    return [min(x), min(y), max(x) - min(x), max(y) - min(y)]


def make_gt(n_images: int, n_instances: int, seed: int = 0) -> dict:
    """The COCO-val-like ground truth described in the module doc (a dict, never written to disk)."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    wh = SHAPES[rng.integers(0, len(SHAPES), n_images)]
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": int(w), "height": int(h)}
              for i, (w, h) in enumerate(wh.tolist())]
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in range(1, 81)]
    anns = []
    for k, img_i in enumerate(rng.integers(0, n_images, n_instances).tolist()):
        w, h = (int(v) for v in wh[img_i])
        r = min(float(np.exp(rng.uniform(np.log(3.0), np.log(250.0)))), min(w, h) / 2 - 1)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        ring = _star(rng, cx, cy, r)
        ann = {"id": k + 1, "image_id": img_i + 1, "category_id": int(rng.integers(1, 81)), "iscrowd": 0,
               "segmentation": [ring], "area": _ring_area(ring), "bbox": _box(ring)}
        if rng.random() < 0.01:  # a crowd region, stored as COCO stores them: uncompressed RLE
            rle = mask_utils.merge(mask_utils.frPyObjects([ring], h, w))
            m = np.asfortranarray(mask_utils.decode(rle))
            flat = m.ravel(order="F")
            change = np.flatnonzero(np.diff(flat)) + 1
            runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
            if flat[0]:
                runs = [0] + runs
            ann.update(iscrowd=1, segmentation={"size": [h, w], "counts": runs}, area=float(m.sum()))
        anns.append(ann)
    return {"info": {"description": "coco_eval_scale benchmark"}, "images": images, "annotations": anns,
            "categories": cats}


def make_results(gt: dict, dets_per_image: int, seed: int = 1) -> tuple[list[dict], list[dict]]:
    """``(segm results, bbox results)``: the same detections, segm as str-count RLE (+ bbox), bbox as xywh."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    by_image: dict[int, list[dict]] = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        by_image[a["image_id"]].append(a)
    segm, bbox = [], []
    for im in gt["images"]:
        w, h = im["width"], im["height"]
        rings, cats, scores = [], [], []
        for a in by_image[im["id"]]:
            x, y, bw, bh = a["bbox"]
            r0 = max(bw, bh) / 2
            for _ in range(int(rng.integers(1, 4))):
                r = float(np.clip(r0 * rng.uniform(0.8, 1.2), 2.0, min(w, h) / 2 - 1))
                cx = float(np.clip(x + bw / 2 + rng.normal(0, 0.1 * r0), r, w - r))
                cy = float(np.clip(y + bh / 2 + rng.normal(0, 0.1 * r0), r, h - r))
                rings.append(_star(rng, cx, cy, r))
                cats.append(a["category_id"] if rng.random() < 0.7 else int(rng.integers(1, 81)))
                scores.append(float(rng.beta(5, 2)))
        while len(rings) < dets_per_image:  # false positives, lower scores
            r = min(float(np.exp(rng.uniform(np.log(3.0), np.log(200.0)))), min(w, h) / 2 - 1)
            rings.append(_star(rng, rng.uniform(r, w - r), rng.uniform(r, h - r), r))
            cats.append(int(rng.integers(1, 81)))
            scores.append(float(rng.beta(2, 5)))
        rings, cats, scores = rings[:dets_per_image], cats[:dets_per_image], scores[:dets_per_image]
        rles = mask_utils.frPyObjects(rings, h, w)  # a list of single-ring polygons: one RLE per detection
        for ring, cat, score, rle in zip(rings, cats, scores, rles, strict=True):
            box = _box(ring)
            segm.append({"image_id": im["id"], "category_id": cat, "score": score, "bbox": box,
                         "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
            bbox.append({"image_id": im["id"], "category_id": cat, "score": score, "bbox": box})
    return segm, bbox


def time_coco(gt: dict, results: dict[str, list[dict]], rounds: int) -> dict:
    """ABAB timing of ``coco_eval_stats`` per IoU type; round 0 is the warm-up (dropped)."""
    from networks.common.metrics import coco_eval_stats

    out: dict = {}
    for iou_type, res in results.items():
        runs: dict[str, list[float]] = {b: [] for b in BACKENDS}
        stats: dict[str, list[float]] = {}
        for rnd in range(rounds + 1):
            for backend in BACKENDS:
                gc.collect()
                t0 = time.perf_counter()
                stats[backend] = coco_eval_stats(gt, res, iou_type, backend=backend)
                seconds = time.perf_counter() - t0
                print(f"  {iou_type} round {rnd}{' (warm-up)' if rnd == 0 else ''}: {backend} {seconds:.2f} s",
                      flush=True)
                if rnd > 0:
                    runs[backend].append(seconds)
        ratios = [a / b for a, b in zip(runs[BACKENDS[0]], runs[BACKENDS[1]], strict=True)]
        diff = float(np.max(np.abs(np.asarray(stats[BACKENDS[0]]) - np.asarray(stats[BACKENDS[1]]))))
        out[iou_type] = {
            "seconds": {b: [round(s, 3) for s in runs[b]] for b in BACKENDS},
            "median_seconds": {b: round(statistics.median(runs[b]), 3) for b in BACKENDS},
            "ratio_pycocotools_over_faster": {"median": round(statistics.median(ratios), 2),
                                              "min": round(min(ratios), 2), "max": round(max(ratios), 2)},
            "faster_share_of_today": round(1 / statistics.median(ratios), 3),
            "within_half_of_today": statistics.median(ratios) >= 2.0,
            "max_abs_stat_difference": diff,
            "AP_AP50_AP75": [round(v, 4) for v in stats[BACKENDS[1]][:3]],
        }
        print(f"{iou_type}: median {out[iou_type]['median_seconds']}, "
              f"ratio {out[iou_type]['ratio_pycocotools_over_faster']}, "
              f"max |Δstat| {diff:.1e}", flush=True)
    return out


def _pq_pair(rng: np.random.Generator, h: int, w: int) -> tuple:
    """A GT id map with ~12 segments (2 stuff, ~10 things, some VOID, maybe a crowd) and a perturbed prediction."""
    gt = np.zeros((h, w), np.int32)
    gt[: h // 3] = 1  # stuff: sky
    gt[h // 3:] = 2  # stuff: ground
    segs = [{"id": 1, "category_id": 81, "iscrowd": 0}, {"id": 2, "category_id": 82, "iscrowd": 0}]
    for sid in range(3, 3 + int(rng.integers(6, 15))):
        bw, bh = int(rng.integers(8, w // 3)), int(rng.integers(8, h // 3))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        gt[y:y + bh, x:x + bw] = sid
        segs.append({"id": sid, "category_id": int(rng.integers(1, 81)), "iscrowd": int(rng.random() < 0.02)})
    gt[: int(rng.integers(0, 12))] = 0  # a VOID band
    present = set(np.unique(gt).tolist())
    segs = [s for s in segs if s["id"] in present]
    pred = np.roll(gt, (int(rng.integers(-6, 7)), int(rng.integers(-6, 7))), axis=(0, 1))
    pred_segs = []
    for s in segs:
        if rng.random() < 0.1 and s["id"] > 2:
            pred[pred == s["id"]] = 1  # dropped: swallowed by sky
            continue
        cat = s["category_id"] if rng.random() < 0.85 else int(rng.integers(1, 81))
        pred_segs.append({"id": s["id"], "category_id": cat})
    present = set(np.unique(pred).tolist()) - {0}
    pred_segs = [s for s in pred_segs if s["id"] in present]
    pred[pred == 0] = 2  # predictions label every pixel
    if 2 in set(np.unique(pred).tolist()) and not any(s["id"] == 2 for s in pred_segs):
        pred_segs.append({"id": 2, "category_id": 82})
    return gt, segs, pred, pred_segs


#: the commit before issue 14 changed ``PanopticQuality.update``: its code is the PQ timing's baseline
BASELINE_COMMIT = "5ff6bdb"


def _before_class():
    """``PanopticQuality`` as it was at :data:`BASELINE_COMMIT` (three ``np.unique`` per image: GT, prediction,
    joint; both maps copied to int64), read from git history so the baseline is the old code itself."""
    import subprocess
    import types

    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE_COMMIT}:networks/common/metrics.py"],
                         capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("metrics_before")
    exec(compile(src, f"{BASELINE_COMMIT}:networks/common/metrics.py", "exec"), module.__dict__)  # noqa: S102
    return module.PanopticQuality


def time_pq(n_images: int, blocks: int = 5, warmup: int = 50, seed: int = 2) -> dict:
    """PanopticQuality before and after issue 14 on the same ``n_images`` synthetic 640×480 pairs.

    Per image both accumulators update on the same pair, the order alternating image by image (AB, BA, ...);
    the first ``warmup`` images are not timed.  The timed images form ``blocks`` equal blocks; the ratio
    before / after is taken per block (paired) and reported as median, min and max.  ``compute`` must agree.
    """
    from networks.common.metrics import PanopticQuality

    rng = np.random.default_rng(seed)
    cats = [{"id": c, "isthing": 1, "name": f"t{c}"} for c in range(1, 81)]
    cats += [{"id": 81, "isthing": 0, "name": "sky"}, {"id": 82, "isthing": 0, "name": "ground"}]
    accs = {"before": _before_class()(cats), "after": PanopticQuality(cats)}
    per_block = max((n_images - warmup) // blocks, 1)
    spent = {k: [0.0] * blocks for k in accs}
    for i in range(n_images):
        gt, segs, pred, pred_segs = _pq_pair(rng, 480, 640)
        for name in (("before", "after") if i % 2 == 0 else ("after", "before")):
            t0 = time.perf_counter()
            accs[name].update(gt, segs, pred, pred_segs, image=i)
            dt = time.perf_counter() - t0
            if i >= warmup:
                spent[name][min((i - warmup) // per_block, blocks - 1)] += dt
    results = {k: acc.compute() for k, acc in accs.items()}
    same = results["before"] == results["after"]
    ratios = [b / a for b, a in zip(spent["before"], spent["after"], strict=True)]
    timed = n_images - warmup
    out = {"images": n_images, "timed_images": timed, "size": [480, 640], "blocks": blocks,
           "seconds": {k: round(sum(v), 3) for k, v in spent.items()},
           "seconds_per_5000_images": {k: round(sum(v) * 5000 / timed, 2) for k, v in spent.items()},
           "ms_per_image": {k: round(1000 * sum(v) / timed, 3) for k, v in spent.items()},
           "ratio_before_over_after": {"median": round(statistics.median(ratios), 2),
                                       "min": round(min(ratios), 2), "max": round(max(ratios), 2)},
           "within_half_of_today": statistics.median(ratios) >= 2.0,
           "identical_results": same, "PQ": round(results["after"]["PQ"], 4)}
    print(f"PQ: {out}", flush=True)
    if not same:
        raise SystemExit("PQ before/after differ")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--instances", type=int, default=36781)  # COCO val2017's instance count
    ap.add_argument("--dets", type=int, default=100, help="detections per image")
    ap.add_argument("--rounds", type=int, default=3, help="timed ABAB rounds after the warm-up")
    ap.add_argument("--pq-images", type=int, default=5050, help="PQ pairs, the first 50 untimed (0 skips)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    from importlib.metadata import version

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = {"cpu_threads_available": cpus, "faster_coco_eval_rle_iou_workers": min(cpus or 1, 8),
               "pycocotools": 1, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    print(f"threads: {threads}", flush=True)
    t0 = time.perf_counter()
    gt = make_gt(args.images, args.instances)
    segm, bbox = make_results(gt, args.dets)
    gen_s = time.perf_counter() - t0
    anns = gt["annotations"]
    areas = np.asarray([a["area"] for a in anns])
    dataset = {"images": len(gt["images"]), "instances": len(anns),
               "crowd": sum(a["iscrowd"] for a in anns),
               "empty_images": len(gt["images"]) - len({a["image_id"] for a in anns}),
               "small_medium_large": [round(float(np.mean(areas < 32**2)), 3),
                                      round(float(np.mean((areas >= 32**2) & (areas < 96**2))), 3),
                                      round(float(np.mean(areas >= 96**2)), 3)],
               "detections": len(segm), "detections_per_image": args.dets,
               "generation_seconds": round(gen_s, 1)}
    print(f"dataset: {dataset}", flush=True)
    coco = time_coco(gt, {"bbox": bbox, "segm": segm}, args.rounds)
    del segm, bbox, gt
    gc.collect()
    pq = time_pq(args.pq_images) if args.pq_images > 0 else None
    report = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), **threads},
        "versions": {p: version(p) for p in ("pycocotools", "faster-coco-eval", "numpy")},
        "method": {
            "coco_ap": "networks.common.metrics.coco_eval_stats end to end, pycocotools then faster_coco_eval per "
                       f"round (ABAB), {args.rounds} timed rounds after 1 warm-up round (dropped); ratio = "
                       "pycocotools seconds / faster_coco_eval seconds of the same round",
            "panoptic_pq": "PanopticQuality.update before issue 14 (3 np.unique per image) and after (1), on the "
                           "same pairs, order alternating per image, 50 warm-up images untimed; ratio per block of "
                           "1000 images = before / after; compute() results must be identical"},
        "target": "each <= 1/2 of today's time, i.e. ratio >= 2",
        "dataset": dataset,
        "coco_ap": coco,
        "panoptic_pq": pq,
    }
    if not args.no_write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {RESULT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
