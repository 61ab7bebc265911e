"""One trial = one ordinary ``tao model <net> train`` subprocess, watched through its ``status.json``.

The child runs in its own process group (a Ctrl-C on the terminal reaches only the driver, which stops it) and
gets ``PR_SET_PDEATHSIG`` = SIGTERM on Linux, so it never outlives a driver that is killed: SIGTERM makes the
train run save a checkpoint and exit, which the retry of the trial resumes from.  Its stdout and stderr go to
``<trial_dir>/trial.log``.

While it runs, every new epoch's KPI (records with ``epoch`` and the KPI key in ``kpi``; the value must be a
finite number) is passed to ``ctx.report``; when that says prune, the child gets SIGTERM, then SIGKILL after
``ctx.grace_s``.  A runner is any ``fn(ctx: TrialContext) -> TrialOutcome``: the driver takes it as an argument,
so tests replace training by a scripted KPI stream.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TrialContext", "TrialOutcome", "epoch_kpis", "subprocess_runner", "stop_process_group",
           "last_line"]


@dataclass
class TrialContext:
    """What a runner needs for trial ``number``.

    ``report(epoch, value) -> prune?`` takes each epoch's KPI once, in epoch order; ``stop`` is set when the
    driver got SIGINT/SIGTERM (the runner must then stop its training and return ``interrupted``).
    """

    number: int
    trial_dir: Path
    train_dir: Path
    spec_path: Path
    command: list[str]
    kpi: str
    direction: str
    max_epochs: int
    report: Callable[[int, float], bool]
    stop: threading.Event = field(default_factory=threading.Event)
    env: dict[str, str] | None = None
    poll_s: float = 0.5
    grace_s: float = 30.0


@dataclass
class TrialOutcome:
    """``state``: complete | pruned | failed | interrupted; ``kpis``: epoch → KPI value seen; ``reason``: why
    a trial failed or was stopped (empty for a complete one)."""

    state: str
    kpis: dict[int, float] = field(default_factory=dict)
    reason: str = ""
    returncode: int | None = None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)  # TAO's Grounding DINO writes mAP as strings
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def epoch_kpis(status_path: Path, key: str) -> tuple[dict[int, float], set[str]]:
    """``({epoch: value of kpi[key]}, every KPI key seen)`` from a ``status.json`` (JSON lines).

    A later record of the same epoch (a resumed run) replaces an earlier one; a partly written last line, a
    record without ``epoch`` or a non-finite value is skipped.
    """
    values: dict[int, float] = {}
    seen: set[str] = set()
    try:
        text = Path(status_path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return values, seen
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        kpi = record.get("kpi") if isinstance(record, dict) else None
        if not isinstance(kpi, dict):
            continue
        seen.update(str(k) for k in kpi)
        epoch = record.get("epoch")
        value = _number(kpi.get(key))
        if isinstance(epoch, int) and not isinstance(epoch, bool) and value is not None:
            values[epoch] = value
    return values, seen


def last_line(path: Path, limit: int = 300) -> str:
    """The last non-empty line of a log file (cut to ``limit`` characters), or ''."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def _pdeathsig() -> Callable[[int], object] | None:
    """``prctl(PR_SET_PDEATHSIG, sig)`` resolved in the driver: the forked child must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda sig: prctl(pr_set_pdeathsig, sig, 0, 0, 0)


def _child_setup(parent: int) -> Callable[[], None]:
    set_pdeathsig = _pdeathsig()

    def setup() -> None:
        os.setpgrp()
        if set_pdeathsig is not None:
            set_pdeathsig(signal.SIGTERM)
            if os.getppid() != parent:  # the driver died before prctl took effect
                os._exit(1)

    return setup


def stop_process_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the child's process group, SIGKILL after ``grace_s`` if it is still there; reaps the child."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        proc.wait()
    try:  # DataLoader workers left in the group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _report_new(ctx: TrialContext, reported: set[int]) -> tuple[dict[int, float], set[str], int | None]:
    """Report the epochs not reported yet; returns (kpis, keys seen, the epoch that asked to prune or None)."""
    kpis, seen = epoch_kpis(ctx.train_dir / "status.json", ctx.kpi)
    for epoch in sorted(kpis):
        if epoch in reported or epoch >= ctx.max_epochs:
            continue
        reported.add(epoch)
        if ctx.report(epoch, kpis[epoch]):
            return kpis, seen, epoch
    return kpis, seen, None


def no_kpi_reason(ctx: TrialContext, seen: set[str]) -> str:
    """Why a trial that ended without a KPI is failed (the keys it did report, as a hint)."""
    other = sorted(seen - {"train_loss"})
    hint = f"; its validation reported {', '.join(other)}" if other else "; it reported no validation metrics"
    return f"no '{ctx.kpi}' in any epoch record of {ctx.train_dir / 'status.json'}{hint}"


def subprocess_runner(ctx: TrialContext) -> TrialOutcome:
    """Run ``ctx.command`` as the trial's train process and follow it to the end (see the module docstring)."""
    ctx.trial_dir.mkdir(parents=True, exist_ok=True)
    log_path = ctx.trial_dir / "trial.log"
    reported: set[int] = set()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(ctx.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=ctx.env, preexec_fn=_child_setup(os.getpid()))  # noqa: PLW1509 - see setup
        try:
            while True:
                done = proc.poll() is not None
                kpis, seen, pruned_at = _report_new(ctx, reported)
                if pruned_at is not None and not done:
                    stop_process_group(proc, ctx.grace_s)
                    return TrialOutcome("pruned", kpis, f"pruned at epoch {pruned_at}", proc.returncode)
                if done:
                    break
                if ctx.stop.is_set():
                    stop_process_group(proc, ctx.grace_s)
                    return TrialOutcome("interrupted", kpis, "the AutoML driver was interrupted",
                                        proc.returncode)
                ctx.stop.wait(ctx.poll_s)
        except BaseException:
            stop_process_group(proc, ctx.grace_s)
            raise
    code = proc.returncode
    if code != 0:
        line = last_line(log_path) or "(empty log)"
        return TrialOutcome("failed", kpis, f"train exited with code {code}: {line}", code)
    if not kpis:
        return TrialOutcome("failed", kpis, no_kpi_reason(ctx, seen), code)
    return TrialOutcome("complete", kpis, "", code)
