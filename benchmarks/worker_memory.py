"""Benchmark: memory DataLoader workers add while reading a COCO-size record list (issue 14 §3).

860,001 MAL-like records (``networks.mal.data.BoxRecord`` with a 6–20-point polygon each, COCO train2017's
annotation count) are held by a dataset as a plain ``list`` (A) or as a
:class:`networks.common.serialized.SerializedList` (B).  For each, 4 DataLoader workers run 2,000 iterations of
batch 16 at random indices (reading each record's box and polygon), and every worker's private memory (USS:
``Private_Clean + Private_Dirty`` of ``/proc/<pid>/smaps_rollup``, Linux) is sampled after its first batch and
after its last; the figure is the sum over workers of the growth.  A and B alternate (A B A B …, one warm-up pair
dropped).  Writes ``benchmarks/results/worker_memory.json``.  Target: B adds ≤ 300 MB in total.

    .venv/bin/python benchmarks/worker_memory.py [--records 860001] [--iterations 2000] [--pairs 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "worker_memory.json"
WORKERS, BATCH, LIMIT_MB = 4, 16, 300.0


def uss_mb(pid: int) -> float:
    """Private (unshared) memory of ``pid`` in MB."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


class Reader(Dataset):
    def __init__(self, records):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        rec = self.records[i]
        return torch.tensor([*rec.bbox, float(len(rec.segmentation[0]))])


class RandomBatches(Sampler):
    """``iterations × workers`` batches of random indices (fixed seed): every worker runs ``iterations``."""

    def __init__(self, n: int, iterations: int):
        self.n, self.iterations = n, iterations

    def __len__(self) -> int:
        return self.iterations * WORKERS

    def __iter__(self):
        rng = np.random.default_rng(0)
        for _ in range(len(self)):
            yield rng.integers(0, self.n, BATCH).tolist()


def worker_growth(records, iterations: int) -> dict:
    """Run the loader; returns the per-worker USS after the first and the last batch and the total growth."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}

    def collate(items):
        info = torch.utils.data.get_worker_info()
        pid = os.getpid()
        if pid not in first:
            first[pid] = uss_mb(pid)
        last[pid] = uss_mb(pid)
        return torch.stack(items), (info.id if info else -1, first[pid], last[pid])

    loader = DataLoader(Reader(records), batch_sampler=RandomBatches(len(records), iterations),
                        num_workers=WORKERS, collate_fn=collate)
    start = time.perf_counter()
    seen: dict[int, tuple[float, float]] = {}
    for _, (wid, f, lst) in loader:
        seen[wid] = (f, lst)
    growth = [lst - f for f, lst in seen.values()]
    return {"seconds": time.perf_counter() - start, "per_worker_mb": [round(g, 1) for g in growth],
            "total_mb": round(sum(growth), 1)}


def make_records(n: int) -> list:
    from networks.mal.data import BoxRecord

    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        k = int(rng.integers(6, 21))
        poly = [float(v) for v in rng.uniform(0, 400, 2 * k).round(2)]
        recs.append(BoxRecord(ann_id=i + 1, image_id=i // 7 + 1, file_name=f"{i // 7:012d}.jpg", height=480,
                              width=640, bbox=(10.0, 20.0, 30.0, 40.0), category_id=1 + i % 80,
                              compact_category_id=1 + i % 80, iscrowd=0, segmentation=[poly]))
    return recs


def main() -> None:
    from networks.common.serialized import SerializedList

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=860001)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    plain = make_records(args.records)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = SerializedList(plain)
    packed_s = time.perf_counter() - t0
    print(f"{args.records} records built in {made:.1f} s; serialized in {packed_s:.1f} s ({packed.nbytes / 2**20:.0f} MiB)")
    worker_growth(plain[:1000], 5), worker_growth(SerializedList(plain[:1000]), 5)  # warm-up pair, dropped
    pairs = []
    for _ in range(args.pairs):
        a = worker_growth(plain, args.iterations)
        b = worker_growth(packed, args.iterations)
        pairs.append({"list": a, "serialized": b})
        print(f"list: workers added {a['total_mb']:.0f} MB {a['per_worker_mb']} in {a['seconds']:.0f} s | "
              f"serialized: {b['total_mb']:.0f} MB {b['per_worker_mb']} in {b['seconds']:.0f} s")
    summary = {"list_total_mb": statistics.median(p["list"]["total_mb"] for p in pairs),
               "serialized_total_mb": statistics.median(p["serialized"]["total_mb"] for p in pairs),
               "target_mb": LIMIT_MB}
    summary["within_target"] = summary["serialized_total_mb"] <= LIMIT_MB
    print(json.dumps(summary))
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpu_threads": os.cpu_count(), "platform": platform.platform()},
        "setup": {"records": args.records, "workers": WORKERS, "iterations_per_worker": args.iterations,
                  "batch": BATCH, "serialized_mib": round(packed.nbytes / 2**20, 1),
                  "serialize_seconds": round(packed_s, 1), "order": "list then serialized per pair, warm-up dropped"},
        "pairs": pairs, "summary": summary}, indent=1) + "\n")
    print(f"written {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
