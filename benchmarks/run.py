"""`make bench`: run every network benchmark in its own process and write one JSON table.

Each benchmark module exposes ``run() -> dict``.  Running them in separate processes keeps the CPU peak-memory
figure (max RSS) per benchmark.  The table goes to ``benchmarks/results/bench_<UTC date>.json`` and
``benchmarks/results/latest.json``.  No assertions: targets are reported, not enforced.
"""
from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from networks.common.io import atomic_write_json

BENCHES = ["benchmarks.bench_mal", "benchmarks.bench_mask2former", "benchmarks.bench_mask_grounding_dino"]
RESULTS = Path(__file__).resolve().parent / "results"


def _run_one(module: str) -> dict:
    code = f"import json, {module} as m; print('BENCH_JSON ' + json.dumps(m.run()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}


def main() -> None:
    selected = sys.argv[1:] or BENCHES
    table = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
                    or "cpu", "cpu_threads": torch.get_num_threads()},
        "results": {},
    }
    for module in selected:
        if not module.startswith("benchmarks."):
            module = f"benchmarks.{module}"
        print(f"running {module} ...", flush=True)
        table["results"][module.split(".")[-1]] = result = _run_one(module)
        print(json.dumps(result, indent=2), flush=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for name in (f"bench_{stamp}.json", "latest.json"):
        atomic_write_json(RESULTS / name, table, indent=2)
    print(f"results written to {RESULTS / 'latest.json'}")


if __name__ == "__main__":
    main()
