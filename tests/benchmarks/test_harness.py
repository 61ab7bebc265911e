"""The `make bench` harness: paired A/B timing (fake clock, no wall-clock asserts), thread pinning, the
PASS/FAIL table and the history.jsonl line."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import run as bench_run
from benchmarks.common import bench_pairs, figure, paired, pin_threads


class FakeClock:
    """A clock that only moves when a fake workload advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def workloads(clock: FakeClock, a_costs: list[float], b_costs: list[float]):
    """Callables ``a`` and ``b`` whose k-th call takes ``*_costs[k]`` fake seconds; ``order`` logs the calls."""
    order: list[str] = []

    def make(name: str, costs: list[float]):
        def fn():
            clock.now += costs[sum(1 for o in order if o == name)]
            order.append(name)
        return fn

    return make("a", a_costs), make("b", b_costs), order


def test_paired_alternates_drops_warmup_and_reports_median_of_pair_ratios():
    clock = FakeClock()
    # warm-up pair is slow (10 s each) and must not count; then pairs with ratios 2, 3, 1.5 (a/b).
    a, b, order = workloads(clock, [10.0, 2.0, 6.0, 3.0], [10.0, 1.0, 2.0, 2.0])
    out = paired(a, b, pairs=3, warmup=1, clock=clock)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]  # A B, B A, A B, B A
    assert out["ratios"] == [2.0, 3.0, 1.5]
    assert out["ratio_pair_median"] == 2.0  # median of the pair ratios ...
    assert out["a_median_s"] / out["b_median_s"] == 1.5  # ... which differs from the ratio of the medians (3/2)
    # the reported figure: the couple (A B, B A) of pairs 1-2 as one geometric mean; the odd last pair left out
    assert out["ratio_median"] == pytest.approx(6 ** 0.5) and out["couple_ratios"] == [round(6 ** 0.5, 4)]
    assert (out["ratio_min"], out["ratio_max"]) == (1.5, 3.0)
    assert out["a_runs_s"] == [2.0, 6.0, 3.0] and out["b_runs_s"] == [1.0, 2.0, 2.0]
    assert (out["pairs"], out["warmup"]) == (3, 1)


def test_paired_ratio_tracks_a_known_cost_ratio_under_drifting_load():
    clock = FakeClock()
    load = [1.0 + 0.5 * k for k in range(10)]  # the machine slows down pair after pair: hits both alike
    a, b, _ = workloads(clock, [1.3 * x for x in load], [x for x in load])
    out = paired(a, b, pairs=9, warmup=1, clock=clock)
    assert out["ratio_median"] == pytest.approx(1.3)
    assert out["ratio_max"] - out["ratio_min"] == pytest.approx(0.0, abs=1e-9)


def _second_runs_faster(clock: FakeClock, a_cost: float, b_cost: float):
    """Callables ``a``/``b`` costing ``*_cost`` fake seconds, 20 % less when the call is the second of its pair."""
    calls = [0]

    def make(base: float):
        def fn():
            calls[0] += 1
            clock.now += base * (0.8 if calls[0] % 2 == 0 else 1.0)
        return fn

    return make(a_cost), make(b_cost)


def test_paired_figure_is_not_biased_by_which_call_runs_second():
    """The second call of a pair runs 20 % faster (warm caches): per-pair ratios alternate 1.3/0.8 and 1.3·0.8,
    and their median is the order that has the odd pair; the couple figure recovers the true 1.3 either way."""
    for pairs in (8, 9):
        clock = FakeClock()
        out = paired(*_second_runs_faster(clock, 1.3, 1.0), pairs=pairs, warmup=1, clock=clock)
        assert max(out["ratios"]) / min(out["ratios"]) == pytest.approx(1 / 0.64)
        assert out["ratio_median"] == pytest.approx(1.3)
    assert out["ratio_pair_median"] != pytest.approx(1.3)  # 9 pairs: the old figure picks one order


def test_paired_rejects_no_pairs():
    with pytest.raises(ValueError, match="pairs >= 1"):
        paired(lambda: None, lambda: None, pairs=0)


def test_threads_and_pairs_come_from_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("BENCH_THREADS", "1")
        assert pin_threads() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    monkeypatch.delenv("BENCH_PAIRS", raising=False)
    assert bench_pairs(5) == 5
    monkeypatch.setenv("BENCH_PAIRS", "2")
    assert bench_pairs(5) == 2


_MALLINFO = """
import ctypes
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
block = libc.malloc(64 * 2**20)  # above glibc's largest mmap threshold
held = libc.mallinfo2()
libc.free(block)
print(held.hblkhd >> 20, libc.mallinfo2().arena >> 20)
"""


def _mallinfo_64mib(env: dict[str, str]) -> tuple[int, int]:
    """(MiB in mmapped blocks while a 64 MiB block is held, MiB of heap kept after freeing it) in a fresh
    interpreter with ``env`` (glibc's ``mallinfo2``: independent of transparent huge pages, unlike fault counts)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MALLINFO], env=env, capture_output=True, text=True, check=True)
    mapped, heap = out.stdout.split()
    return int(mapped), int(heap)


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc malloc tunables")
def test_steady_malloc_reuses_freed_memory_and_memory_probes_get_the_users(monkeypatch):
    import os

    from benchmarks.common import STEADY_MALLOC, USER_TUNABLES, child_peak_mib, steady_malloc_env

    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BENCH_MALLOC", USER_TUNABLES)}
    steady, label = steady_malloc_env(base)
    default, default_label = steady_malloc_env({**base, "BENCH_MALLOC": "default"})
    assert steady["GLIBC_TUNABLES"] == STEADY_MALLOC and STEADY_MALLOC in label
    assert "GLIBC_TUNABLES" not in default and default_label == "glibc default"
    # the tunables take effect (a misspelt or out-of-range one is ignored by glibc without a word): glibc's
    # defaults map a 64 MiB block and unmap it on free (its pages fault in again next time); the steady setting
    # serves it from the heap and keeps the heap after the free
    mapped, _ = _mallinfo_64mib(default)
    assert mapped >= 64
    mapped, kept = _mallinfo_64mib(steady)
    assert mapped == 0 and kept >= 64

    users, _ = steady_malloc_env({**base, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert users["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + STEADY_MALLOC
    assert users[USER_TUNABLES] == "glibc.malloc.arena_max=2"
    monkeypatch.setattr(os, "environ", users)  # a bench process started by make bench: its memory probes ...
    probe = child_peak_mib("tests.benchmarks.test_harness", "_tunables_probe")
    assert probe == float(len("glibc.malloc.arena_max=2"))  # ... run with the user's tunables, not the steady ones

    with pytest.raises(SystemExit, match="BENCH_MALLOC='fast'"):
        steady_malloc_env({**base, "BENCH_MALLOC": "fast"})


def _tunables_probe() -> dict:
    """(Run by :func:`benchmarks.common.child_peak_mib`.)  The length of this process's ``GLIBC_TUNABLES`` as its
    ``peak_mib``."""
    import os

    return {"peak_mib": float(len(os.environ.get("GLIBC_TUNABLES", "")))}


def _timing(ratios: list[float]) -> dict:
    return {"ratio_median": sorted(ratios)[len(ratios) // 2], "ratio_min": min(ratios), "ratio_max": max(ratios),
            "a_median_s": 2.0, "b_median_s": 1.0, "pairs": len(ratios), "ratios": ratios}


def fake_table() -> dict:
    return {
        "date_utc": "2026-12-06T08:00:00+00:00", "commit": "abc1234",
        "machine": {"python": "3.11", "torch": "2.x", "cpu": "Fake CPU", "cpu_cores": 2, "gpu": None, "threads": 2},
        "wall_s": 600.0,
        "results": {
            "bench_a": {"figures": [figure("A step / backbone", _timing([1.2, 1.35, 1.5]), 1.4, "step", "backbone"),
                                    figure("A over", _timing([1.5, 1.6, 1.7]), 1.4, "ours", "hf")],
                        "train_step_s": 2.0},
            "bench_b": {"figures": [figure("B train step", _timing([0.9, 1.0, 1.1]), None, "ours", "hf")],
                        "deploy": {"name": "B model", "latency_s": {"pytorch": 0.5, "onnx_fp32": 0.25,
                                                                     "onnx_int8": 0.2},
                                   "peak_rss_mib": {"pytorch": 300.0, "onnx_fp32": 200.4, "onnx_int8": 120.6}}},
            "bench_c": {"error": "RuntimeError: boom"},
        },
    }


def test_table_has_every_figure_with_target_and_verdict():
    lines = bench_run.format_table(fake_table()["results"]).splitlines()
    assert lines[0].split() == ["figure", "ratio", "(min-max)", "target", "verdict"]
    assert len(lines) == 5
    assert lines[1].startswith("A step / backbone") and "1.350 (1.200-1.500)" in lines[1]
    assert lines[1].rstrip().endswith("<= 1.40  PASS")
    assert "1.600 (1.500-1.700)" in lines[2] and lines[2].endswith("FAIL")
    assert lines[3].endswith("report") and " - " in lines[3]
    assert "bench_c (failed)" in lines[4] and "ERROR: RuntimeError: boom" in lines[4]


def test_verdict_boundary_is_inclusive():
    assert bench_run.verdict({"ratio": 0.85, "target": 0.85}) == "PASS"
    assert bench_run.verdict({"ratio": 0.8501, "target": 0.85}) == "FAIL"
    assert bench_run.verdict({"ratio": 5.0, "target": None}) == "report"


def test_history_line_is_one_json_object_with_figures_targets_verdicts():
    record = bench_run.history_record(fake_table())
    line = json.dumps(record)
    assert "\n" not in line
    back = json.loads(line)
    assert (back["date_utc"], back["commit"], back["wall_s"]) == ("2026-12-06T08:00:00+00:00", "abc1234", 600.0)
    assert back["machine"]["threads"] == 2 and back["machine"]["cpu"] == "Fake CPU"
    assert [(f["bench"], f["name"], f["verdict"]) for f in back["figures"]] == [
        ("bench_a", "A step / backbone", "PASS"), ("bench_a", "A over", "FAIL"), ("bench_b", "B train step", "report"),
        ("bench_c", "bench_c (failed)", "ERROR")]
    first = back["figures"][0]
    assert (first["ratio"], first["spread"], first["target"], first["pairs"]) == (1.35, [1.2, 1.5], 1.4, 3)
    assert "ratios" not in first and "train_step_s" not in json.dumps(back)  # per-run detail stays in latest.json


def test_deploy_rows_are_printed_and_recorded():
    lines = bench_run.format_deploy(fake_table()["results"]).splitlines()
    assert len(lines) == 2 and "pytorch s / MiB" in lines[0] and "onnx_int8 s / MiB" in lines[0]
    assert lines[1].split() == ["B", "model", "0.500", "/", "300", "0.250", "/", "200", "0.200", "/", "121"]
    assert bench_run.history_record(fake_table())["deploy"][0]["peak_rss_mib"]["onnx_int8"] == 120.6
    assert bench_run.format_deploy({"x": {"figures": []}}) == ""


def test_inference_memory_counts_the_weights(tmp_path):
    """A model four times larger grows the peak RSS of its fresh process by more (the weights are counted)."""
    from benchmarks.common import inference_memory

    x = torch.randn(1, 256)
    small = inference_memory(torch.nn.Linear(256, 256), (x,), ["x"], {}, str(tmp_path))["pytorch"]
    big = inference_memory(torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(64)]), (x,), ["x"], {},
                           str(tmp_path))["pytorch"]
    assert big > small + 8, (small, big)  # 64 x 256 KiB of weights = 16 MiB
