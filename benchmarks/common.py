"""Timing helpers shared by the benchmarks: thread pinning, paired A/B timing, repeated timing, peak memory
(in process, and per inference runtime in fresh processes: :func:`inference_memory`).

A ratio between two implementations is measured with :func:`paired`: both run alternately in one process on
the same inputs, so load from other processes, thermal state and allocator state hit both alike, and the figure
is the median of the per-pair ratios (with their min and max as the spread), not a ratio of two separately
timed medians.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.memory import peak_rss_mib, rss_mib


def device() -> torch.device:
    """CUDA when available, else CPU (benchmarks run wherever the user runs them)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def pin_threads() -> int:
    """Set torch's intra-op threads to ``BENCH_THREADS`` (default: the cores this process may run on), print
    and return the number (every bench records it next to its figures)."""
    wanted = int(os.environ.get("BENCH_THREADS", "0") or 0)
    n = wanted if wanted > 0 else len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    return torch.get_num_threads()


#: glibc malloc settings for the timing processes of ``make bench`` (:func:`steady_malloc_env`): never hand out
#: memory with ``mmap`` and never give the heap back.  Under glibc's defaults a block larger than its mmap
#: threshold (128 KiB, rising to at most 32 MiB as blocks are freed) is a fresh ``mmap`` whose pages fault in on
#: first touch, and the top of the heap is returned whenever enough of it is free; a train step whose
#: temporaries cross that line pays for page faults every step, and which tensors do depends on the heap's
#: history, not on the model.  Measured on the Mask2Former Swin-T step (``benchmarks/page_faults.py``,
#: docs/performance.md): HF's 74 MB deformable-attention temporaries faulted 218k-345k pages (0.9-1.4 GB) per step.
STEADY_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
#: where :func:`steady_malloc_env` keeps the user's own ``GLIBC_TUNABLES`` for the memory probes
USER_TUNABLES = "BENCH_USER_GLIBC_TUNABLES"


def steady_malloc_env(environ: dict[str, str]) -> tuple[dict[str, str], str]:
    """(environment, label) for a bench process: ``BENCH_MALLOC`` ``steady`` (the default) appends
    :data:`STEADY_MALLOC` to ``GLIBC_TUNABLES``; ``default`` leaves glibc's own settings.  The user's
    ``GLIBC_TUNABLES`` is also kept in :data:`USER_TUNABLES`, which :func:`child_peak_mib` restores: the memory
    probes in their own processes run as a user's process would (a peak read in the timing process itself, such
    as MAL's, is under the bench's setting).  Not glibc: unchanged, ``"libc"``."""
    import platform

    env = dict(environ)
    mode = env.get("BENCH_MALLOC", "steady")
    if mode not in ("steady", "default"):
        raise SystemExit(f"BENCH_MALLOC={mode!r}: use 'steady' (the default) or 'default' (glibc's own settings)")
    if platform.libc_ver()[0] != "glibc":
        return env, "libc"
    user = env.get("GLIBC_TUNABLES", "")
    env.setdefault(USER_TUNABLES, user)
    if mode == "default":
        return env, "glibc default"
    env["GLIBC_TUNABLES"] = ":".join(t for t in (user, STEADY_MALLOC) if t)
    return env, "glibc steady (" + STEADY_MALLOC + ")"


def bench_pairs(default: int) -> int:
    """Pairs to time for one ratio: ``BENCH_PAIRS`` when set (>= 1), else the bench's ``default``."""
    n = int(os.environ.get("BENCH_PAIRS", "0") or 0)
    return n if n > 0 else default


def paired(a: Callable[[], object], b: Callable[[], object], *, pairs: int, warmup: int = 1,
           dev: torch.device | None = None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time ``a`` against ``b`` in ``warmup + pairs`` alternating pairs; the first ``warmup`` pairs are dropped.

    Pair ``i`` runs ``a`` then ``b`` when ``i`` is even and ``b`` then ``a`` when odd (A B, B A, A B, ...), so
    neither side always runs right after the other's allocations.  Each call is timed alone with ``clock``
    (after ``sync(dev)``, so CUDA work is counted).  Returns seconds per call and ratios a/b:
    ``{"a_median_s", "b_median_s", "ratio_median", "ratio_pair_median", "ratio_min", "ratio_max", "ratios",
    "couple_ratios", "pairs", "warmup"}``.

    ``ratio_median`` (the figure benches report) is the median over *couples* of consecutive pairs, one A B and one
    B A, of the geometric mean of their two ratios ``a_i / b_i`` (a single pair: its ratio; an odd last pair is
    left out of it).  On a CPU the call that runs second in a pair is often faster (warm caches): the per-pair
    ratios of ``make bench`` alternated (Mask Grounding DINO int8/fp32: 0.81, 0.65, 0.78, 0.60, ...), so their
    median (``ratio_pair_median``) was whichever order had the odd pair.  ``ratio_min``/``ratio_max``: the per-pair
    extremes.
    """
    if pairs < 1 or warmup < 0:
        raise ValueError(f"paired needs pairs >= 1 and warmup >= 0, got pairs={pairs}, warmup={warmup}")
    dev = dev or torch.device("cpu")

    def timed(fn: Callable[[], object]) -> float:
        sync(dev)
        start = clock()
        fn()
        sync(dev)
        return clock() - start

    a_s: list[float] = []
    b_s: list[float] = []
    for i in range(warmup + pairs):
        if i % 2 == 0:
            ta = timed(a)
            tb = timed(b)
        else:
            tb = timed(b)
            ta = timed(a)
        if i >= warmup:
            a_s.append(ta)
            b_s.append(tb)
    ratios = [x / y for x, y in zip(a_s, b_s, strict=True)]
    couples = [(ratios[k] * ratios[k + 1]) ** 0.5 for k in range(0, len(ratios) - 1, 2)] or ratios
    return {"a_median_s": statistics.median(a_s), "b_median_s": statistics.median(b_s),
            "ratio_median": statistics.median(couples), "ratio_pair_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "couple_ratios": [round(r, 4) for r in couples],
            "ratios": [round(r, 4) for r in ratios], "a_runs_s": [round(t, 4) for t in a_s],
            "b_runs_s": [round(t, 4) for t in b_s], "pairs": pairs, "warmup": warmup}


def figure(name: str, timing: dict, target: float | None, a: str, b: str, **extra) -> dict:
    """One reported ratio: ``name``, the :func:`paired` result ``timing`` (a = ``a``, b = ``b``), its
    ``target`` (the median must be <= it; ``None``: reported without a target) and any ``extra`` fields."""
    return {"name": name, "ratio": round(timing["ratio_median"], 4),
            "spread": [round(timing["ratio_min"], 4), round(timing["ratio_max"], 4)], "target": target,
            "numerator": a, "denominator": b, f"{a}_s": round(timing["a_median_s"], 4),
            f"{b}_s": round(timing["b_median_s"], 4), "pairs": timing["pairs"], "ratios": timing["ratios"],
            **extra}


def time_it(fn: Callable[[], object], dev: torch.device, *, warmup: int = 1, repeat: int = 3) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times; seconds per call (median, min, all)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times}


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_mib(dev: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set size on CPU (MiB)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return peak_rss_mib()


def inference_peak_child(kind: str, model: str, inputs: str, preload: str = "", repeat: int = 3) -> dict:
    """(Run in a fresh process.)  Growth of the peak RSS over the RSS after imports, in MiB, while one model is
    loaded and run ``repeat`` times: ``kind`` "pytorch" (``model`` a pickled module, ``inputs`` its pickled
    argument tuple; ``preload`` the module defining it, imported first) or "onnx" (``model`` an ONNX file run by
    the CPU provider, ``inputs`` an ``.npz`` of feeds).  The weights in memory are part of the figure."""
    import importlib

    import numpy as np

    if kind == "onnx":
        import onnxruntime  # noqa: F401 - loaded before the baseline, like the module of a PyTorch model

        from networks.common.onnx_runtime import inference_session, is_qdq_onnx

        qdq = is_qdq_onnx(model)  # reads the graph: before the baseline, not part of the figure
    elif preload:
        importlib.import_module(preload)
    base = rss_mib()
    if kind == "onnx":
        session = inference_session(model, ["CPUExecutionProvider"], qdq=qdq)  # as evaluate/inference run it
        feeds = dict(np.load(inputs))
        for _ in range(repeat):
            session.run(None, feeds)
    else:
        net = torch.load(model, weights_only=False).eval()  # written by this benchmark a moment ago
        args = torch.load(inputs, weights_only=False)
        with torch.no_grad():
            for _ in range(repeat):
                net(*args)
    return {"peak_mib": peak_rss_mib() - base}


def inference_memory(wrapper: torch.nn.Module, args: tuple, names: list[str], onnx_files: dict[str, str],
                     tmp: str) -> dict[str, float]:
    """Peak RSS growth (MiB) of batch-1 inference per runtime, each in its own fresh process
    (:func:`inference_peak_child`): ``{"pytorch": ..., <name>: ...}`` for the eager ``wrapper`` on ``args`` and
    each ONNX file of ``onnx_files`` on the same inputs (``names`` are the graph's input names, in ``args`` order)."""
    from pathlib import Path

    import numpy as np

    tmp_path = Path(tmp)
    torch.save(wrapper, tmp_path / "eager.pt")
    torch.save(tuple(args), tmp_path / "args.pt")
    np.savez(tmp_path / "feeds.npz", **{n: a.detach().cpu().numpy() for n, a in zip(names, args, strict=True)})
    jobs = {"pytorch": ("pytorch", tmp_path / "eager.pt", tmp_path / "args.pt", type(wrapper).__module__)}
    jobs.update({k: ("onnx", Path(v), tmp_path / "feeds.npz", "") for k, v in onnx_files.items()})
    return {key: child_peak_mib("benchmarks.common", "inference_peak_child", kind, str(model), str(inputs), preload)
            for key, (kind, model, inputs, preload) in jobs.items()}


def child_call(module: str, function: str, *args: object, env: dict[str, str]) -> dict:
    """Run ``module.function(*args)`` (arguments passed by ``repr``) in a fresh interpreter at the repository root
    with ``env`` and return the dict it returns; RuntimeError with the child's output tail if it gave none."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    call = f"{function}({', '.join(repr(a) for a in args)})"
    code = f"import json; from {module} import {function}; print('CHILD_JSON ' + json.dumps({call}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    line = next((x for x in proc.stdout.splitlines() if x.startswith("CHILD_JSON ")), None)
    if line is None:
        raise RuntimeError(f"{module}.{call} failed: {(proc.stderr or proc.stdout)[-1500:]}")
    return json.loads(line[len("CHILD_JSON "):])


def child_peak_mib(module: str, function: str, *args: str) -> float:
    """Run ``module.function(*args)`` in a fresh interpreter (:func:`child_call`: repository root, this process's
    thread count, the user's ``GLIBC_TUNABLES``: see :func:`steady_malloc_env`) and return the ``peak_mib`` of the
    dict it returns, rounded to 0.1."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    if USER_TUNABLES in env:  # started by make bench: the user's allocator, not the timing one
        env["GLIBC_TUNABLES"] = env.pop(USER_TUNABLES)
        if not env["GLIBC_TUNABLES"]:
            del env["GLIBC_TUNABLES"]
    return round(child_call(module, function, *args, env=env)["peak_mib"], 1)
