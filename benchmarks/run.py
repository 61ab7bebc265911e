"""`make bench`: run every network benchmark in its own process, print the ratios against their targets, record.

Each benchmark module exposes ``run() -> dict``; its ``"figures"`` list holds the ratios it measured with
:func:`benchmarks.common.paired` (ours and the reference alternating in one process; median of the per-pair
ratios, min/max as the spread) and each ratio's target (``None``: reported without one).  Running the benches
in separate processes keeps the CPU peak-memory figure (max RSS) per benchmark.

Every bench runs with the same torch thread count: ``BENCH_THREADS``, default the cores this process may use;
it is printed and recorded.  ``BENCH_PAIRS`` overrides every bench's pair count (smoke runs: ``BENCH_PAIRS=1``).
The bench processes time under glibc malloc settings that keep freed memory for reuse (``BENCH_MALLOC``:
``steady``, the default, or ``default``; :func:`benchmarks.common.steady_malloc_env`), recorded as ``malloc``.

Outputs: a table (figure, median ratio (min–max), target, PASS/FAIL) on stdout; the full results in
``benchmarks/results/bench_<UTC stamp>.json`` and ``benchmarks/results/latest.json``; one JSON line appended to
``benchmarks/results/history.jsonl`` (date, commit, machine, wall time, every figure with target and verdict).
Targets are reported, not enforced: the exit code is 0 unless a bench crashed (then 1).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
BENCHES = ["benchmarks.bench_mal", "benchmarks.bench_mask2former", "benchmarks.bench_mask_grounding_dino"]


def verdict(fig: dict) -> str:
    """``PASS`` when the median ratio is at most the target, ``FAIL`` above it, ``report`` without a target."""
    if fig.get("target") is None:
        return "report"
    return "PASS" if fig["ratio"] <= fig["target"] else "FAIL"


def figures_of(results: dict) -> list[dict]:
    """Every figure of every bench's result, in bench order, with ``bench`` and ``verdict`` added; a bench that
    failed contributes one row with its ``error``."""
    rows = []
    for bench, result in results.items():
        if "error" in result:
            rows.append({"bench": bench, "name": f"{bench} (failed)", "error": result["error"], "verdict": "ERROR"})
            continue
        for fig in result.get("figures", []):
            rows.append({"bench": bench, **fig, "verdict": verdict(fig)})
    return rows


def format_table(results: dict) -> str:
    """The printed table: one line per figure — name, median ratio with its (min–max) spread, target, verdict."""
    rows = figures_of(results)
    width = max([len(r["name"]) for r in rows] + [6])
    lines = [f"{'figure':<{width}}  {'ratio (min-max)':<22}  {'target':>7}  verdict"]
    for r in rows:
        if r["verdict"] == "ERROR":
            lines.append(f"{r['name']:<{width}}  {'-':<22}  {'-':>7}  ERROR: {r['error']}")
            continue
        lo, hi = r["spread"]
        measured = f"{r['ratio']:.3f} ({lo:.3f}-{hi:.3f})"
        target = "-" if r["target"] is None else f"<= {r['target']:.2f}"
        lines.append(f"{r['name']:<{width}}  {measured:<22}  {target:>7}  {r['verdict']}")
    return "\n".join(lines)


def deploy_rows(results: dict) -> list[dict]:
    """The ``deploy`` entries of the benches that report batch-1 inference, in bench order."""
    return [r["deploy"] for r in results.values() if isinstance(r, dict) and "deploy" in r]


def format_deploy(results: dict) -> str:
    """The batch-1 inference rows of the benches that report them (``deploy``): latency (median, s) and peak RSS
    growth (MiB, fresh process per runtime) of eager PyTorch, ONNX fp32 and ONNX int8 (ONNX Runtime, CPU)."""
    rows = deploy_rows(results)
    if not rows:
        return ""
    kinds = ("pytorch", "onnx_fp32", "onnx_int8")
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'batch-1 inference (CPU)':<{width}}  " + "  ".join(f"{k + ' s / MiB':>20}" for k in kinds)]
    for r in rows:
        cells = [f"{r['latency_s'].get(k, float('nan')):.3f} / {r['peak_rss_mib'].get(k, float('nan')):.0f}"
                 for k in kinds]
        lines.append(f"{r['name']:<{width}}  " + "  ".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def history_record(table: dict) -> dict:
    """The line appended to ``history.jsonl`` for one ``make bench`` table (see :func:`main`): date, commit,
    machine, wall time and every figure's ratio, spread, pairs, target and verdict (no per-run seconds), and the
    benches' batch-1 inference rows (``deploy``)."""
    keep = ("bench", "name", "ratio", "spread", "pairs", "target", "verdict", "error")
    record = {"date_utc": table["date_utc"], "commit": table["commit"], "machine": table["machine"],
              "wall_s": table.get("wall_s"),
              "figures": [{k: r[k] for k in keep if k in r} for r in figures_of(table["results"])]}
    deploy = deploy_rows(table["results"])
    if deploy:
        record["deploy"] = deploy
    return record


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the repository, or ``"unknown"`` (no git, not a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``, else ``"cpu"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine(threads: int) -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_model(),
            "cpu_cores": len(os.sched_getaffinity(0)), "gpu": gpu, "threads": threads}


def _run_one(module: str, env: dict[str, str]) -> dict:
    """Run ``module.run()`` in a fresh interpreter with ``env``, echoing its output; its result dict, or
    ``{"error"}``."""
    code = f"import json, {module} as m; print('BENCH_JSON ' + json.dumps(m.run()), flush=True)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO, env=env)
    result, tail = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("BENCH_JSON "):
            result = json.loads(line[len("BENCH_JSON "):])
            continue
        print(f"  | {line}", end="", flush=True)
        tail = (tail + [line.rstrip()])[-1:]
    proc.wait()
    if result is None:
        return {"error": (tail or [f"exit code {proc.returncode}, no output"])[-1][:300]}
    return result


def main() -> int:
    from benchmarks.common import pin_threads, steady_malloc_env
    from networks.common.io import atomic_write_json

    started = time.perf_counter()
    threads = pin_threads()
    os.environ["BENCH_THREADS"] = str(threads)  # every bench process uses the same count
    env, malloc = steady_malloc_env(dict(os.environ))
    selected = [m if m.startswith("benchmarks.") else f"benchmarks.{m}" for m in sys.argv[1:]] or BENCHES
    table = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
             "machine": {**machine(threads), "malloc": malloc}, "results": {}}
    print(f"machine: {json.dumps(table['machine'])}", flush=True)
    for module in selected:
        print(f"running {module} ...", flush=True)
        t0 = time.perf_counter()
        table["results"][module.split(".")[-1]] = result = _run_one(module, env)
        print(f"{module}: {time.perf_counter() - t0:.0f} s" + (f", error: {result['error']}" if "error" in result
                                                                   else ""), flush=True)
    table["wall_s"] = round(time.perf_counter() - started, 1)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for name in (f"bench_{stamp}.json", "latest.json"):
        atomic_write_json(RESULTS / name, table, indent=2)
    with open(RESULTS / "history.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(history_record(table)) + "\n")
    print(f"\n{format_table(table['results'])}\n")
    deploy = format_deploy(table["results"])
    if deploy:
        print(f"{deploy}\n")
    print(f"total {table['wall_s']:.0f} s; results in {RESULTS / 'latest.json'}, appended to "
          f"{RESULTS / 'history.jsonl'}")
    return 1 if any("error" in r for r in table["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
