"""The study: storage, resume, retries, the worker loop, and ``run_automl`` (what ``tao automl`` calls).

Storage is an Optuna ``RDBStorage``: by default ``sqlite:///<results_dir>/automl/study.db``, or any URL in
``automl.storage``; every worker that runs the same command joins the same study (``load_if_exists``).

Budget.  ``automl_max_recommendations`` = N counts COMPLETE, PRUNED, RUNNING and WAITING trials and FAILED ones
that were not retried.  Before each ``ask`` a worker fails stale trials (no heartbeat for ``grace_period``:
their worker died; each is retried once as a new WAITING trial with the same parameters), then asks only when
a WAITING trial exists or fewer than N count.  With the SQLite default the count-and-ask runs under a file lock
(``study.db.lock``), so workers together run exactly N; with a server storage a worker that still overshoots
sees it after ``ask`` (N trials with smaller numbers already count) and gives its trial up, marked ``surplus``.
When nothing is left to ask but other workers' trials still run, a worker waits for them (it may have to take
over a retry), then writes the results.

Kill safety: rerunning the command resumes; COMPLETE/PRUNED/FAILED trials are never run again.  On SIGINT or
SIGTERM the running trial's train process is stopped, the trial is FAILED with the reason and retried once by
the next run, results are written and the exit code is 130.  A retry trains in the directory of the trial it
retries (``trial_dir`` in ``trials.csv``), so its train run resumes from the checkpoint left there: the one
written when the run was stopped, or the last periodic one after a SIGKILL.  A trial's heartbeat is recorded by
a thread every ``heartbeat_interval`` seconds while it runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from networks.common.errors import ConfigError

from .plan import Prepared, trial_dir_of
from .trial_run import TrialContext, TrialOutcome, subprocess_runner
from .trial_spec import KEY_ENV, trial_config, write_spec

__all__ = ["open_study", "budget_used", "run_study", "Runner"]

Runner = Callable[[TrialContext], TrialOutcome]
EXIT_OK, EXIT_FAIL, EXIT_INTERRUPTED = 0, 1, 130
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)


def _say(text: str) -> None:
    sys.stdout.write(f"[automl] {text}\n")
    sys.stdout.flush()


def _sqlite_path(url: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(url[len(prefix):]) if url.startswith(prefix) and url != prefix + ":memory:" else None


@contextlib.contextmanager
def study_lock(url: str) -> Iterator[None]:
    """An exclusive lock shared by the workers of a SQLite study (``<db>.lock``); nothing for other storages."""
    db = _sqlite_path(url)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_study(prep: Prepared, sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create or load the study (same name, same direction); a direction clash is a ConfigError."""
    s = prep.settings
    engine_kwargs = {"connect_args": {"timeout": 600}} if _sqlite_path(s.storage) else {"pool_pre_ping": True}
    try:
        storage = optuna.storages.RDBStorage(
            s.storage, engine_kwargs=engine_kwargs, heartbeat_interval=s.heartbeat_interval,
            grace_period=s.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    except (ImportError, ModuleNotFoundError) as exc:
        raise ConfigError("automl.storage", f"cannot open {s.storage}: {exc}",
                          "install the database driver (e.g. psycopg2 for postgresql://)") from None
    direction = "maximize" if prep.direction == "max" else "minimize"
    study = optuna.create_study(storage=storage, study_name=s.study_name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError("automl.study_name", f"study '{s.study_name}' in {s.storage} was created to "
                          f"{study.direction.name.lower()}, this spec's metric {prep.kpi} needs {direction}",
                          "set automl.study_name to a new name")
    return study


def _superseded(trials: list[FrozenTrial]) -> set[int]:
    out: set[int] = set()
    for t in trials:
        out.update(int(n) for n in t.system_attrs.get("retry_history", []))
    return out


def budget_used(trials: list[FrozenTrial], below: int | None = None) -> int:
    """How many of ``trials`` (those numbered below ``below`` when given) count against N (module docstring)."""
    gone = _superseded(trials)
    return sum(1 for t in trials if t.state in _COUNTED and t.number not in gone and not t.user_attrs.get("surplus")
               and (below is None or t.number < below))


class _Heartbeat:
    """Records the trial's heartbeat now and then every ``interval`` seconds until stopped."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval: int):
        self._storage = study._storage
        self._trial_id = trial._trial_id
        self._interval = interval
        self._stop = threading.Event()
        self._storage.record_heartbeat(self._trial_id)
        self._thread = threading.Thread(target=self._run, name="automl-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):  # a missed beat only risks a retry
                self._storage.record_heartbeat(self._trial_id)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def _signals(stop: threading.Event, received: list[str]) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop`` (the trial's process is stopped by its runner); restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def _values_text(values: dict) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    text = ", ".join(f"{k}={fmt(v)}" for k, v in values.items())
    return text if len(text) <= 200 else text[:197] + "..."


def _best_epoch(kpis: dict[int, float], direction: str) -> tuple[int, float]:
    pick = max if direction == "max" else min
    value = pick(kpis.values())
    return min(e for e, v in kpis.items() if v == value), value


class _Worker:
    """One driver process's share of the study (the loop of :func:`run_study`)."""

    def __init__(self, prep: Prepared, study: optuna.Study, runner: Runner, stop: threading.Event,
                 poll_s: float, grace_s: float):
        self.prep, self.study, self.runner, self.stop = prep, study, runner, stop
        self.poll_s, self.grace_s = poll_s, grace_s
        self.interrupted = False
        self.completed = 0
        self._start = time.monotonic()

    def _next(self) -> optuna.Trial | None:
        """Under the study lock: the next trial to run, or None when the study needs nothing more from us."""
        s = self.prep.settings
        while not self.stop.is_set():
            if s.timeout is not None and time.monotonic() - self._start > s.timeout:
                _say(f"timeout of {s.timeout:g} s reached: no new trial")
                return None
            with study_lock(s.storage):
                optuna.storages.fail_stale_trials(self.study)
                trials = self.study.get_trials(deepcopy=False)
                waiting = any(t.state == TrialState.WAITING for t in trials)
                if waiting or budget_used(trials) < s.max_trials:
                    with warnings.catch_warnings():  # ask/tell with heartbeats is what this loop does on purpose
                        warnings.filterwarnings("ignore", message="Heartbeat of storage")
                        trial = self.study.ask()
                    self.study._storage.record_heartbeat(trial._trial_id)
                    return trial
                running = [t.number for t in trials if t.state == TrialState.RUNNING]
            if not running:
                return None
            # Other workers' trials: wait; a dead worker's trial turns stale and comes back as a retry.
            self.stop.wait(min(s.heartbeat_interval, 5))
        return None

    def _surplus(self, trial: optuna.Trial) -> bool:
        frozen = self.study._storage.get_trial(trial._trial_id)
        if frozen.system_attrs.get("retry_history"):
            return False  # a retry takes the place of a trial that already counts
        trials = self.study.get_trials(deepcopy=False)
        return budget_used(trials, below=trial.number) >= self.prep.settings.max_trials

    def run(self) -> None:
        while not self.stop.is_set():
            trial = self._next()
            if trial is None:
                return
            if self._surplus(trial):
                trial.set_user_attr("surplus", True)
                trial.set_user_attr("reason", "surplus: other workers reached automl_max_recommendations")
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            self._run_trial(trial)

    def _fail(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("reason", reason)
        self.study.tell(trial, state=TrialState.FAIL)
        _say(f"trial {trial.number:03d} FAILED: {reason}")

    def _run_trial(self, trial: optuna.Trial) -> None:
        from . import space as space_mod

        prep, s = self.prep, self.prep.settings
        heartbeat = _Heartbeat(self.study, trial, s.heartbeat_interval)
        started = time.monotonic()
        try:
            retry = self.study._storage.get_trial(trial._trial_id).system_attrs.get("retry_history")
            # a retry trains in the directory of the trial it retries, so the train run resumes from the
            # checkpoint that one left (its run lock refuses the directory while a run still holds it)
            trial_dir = trial_dir_of(prep.automl_dir, int(retry[0]) if retry else trial.number)
            trial.set_user_attr("trial_dir", str(trial_dir))
            try:
                values = space_mod.sample(trial, prep.space)
                trial.set_user_attr("values", values)
                cfg = trial_config(prep.cfg, values, trial_dir, s)
                spec_path = write_spec(cfg, trial_dir / "spec.yaml")
            except Exception as exc:  # noqa: BLE001 - a bad sample fails this trial, not the study
                self._fail(trial, f"could not build the trial spec: {type(exc).__name__}: {exc}")
                return
            note = f" (retry of trial {retry[-1]:03d}, in {trial_dir.name})" if retry else ""
            _say(f"trial {trial.number:03d} started{note}: {_values_text(values)}  [log: {trial_dir / 'trial.log'}]")
            if self.stop.is_set():
                outcome = TrialOutcome("interrupted", reason="the AutoML driver was interrupted")
            else:
                outcome = self.runner(self._context(trial, trial_dir, spec_path))
        except BaseException:
            heartbeat.stop()
            raise
        heartbeat.stop()
        self._finish(trial, outcome, time.monotonic() - started)

    def _context(self, trial: optuna.Trial, trial_dir: Path, spec_path: Path) -> TrialContext:
        prep, s = self.prep, self.prep.settings

        def report(epoch: int, value: float) -> bool:
            # step = epochs trained, so a full trial reaches max_resource = R
            trial.report(value, step=epoch + 1)
            # A trial that trained all R epochs has spent its budget: pruning it then would only discard it.
            return s.pruned and epoch + 1 < s.max_epochs and trial.should_prune()

        env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
        key = prep.cfg.get("encryption_key")
        if key:
            env[KEY_ENV] = str(key)
        command = [sys.executable, "-m", "tao_cli", "model", prep.net.name, "train", "-e", str(spec_path)]
        return TrialContext(number=trial.number, trial_dir=trial_dir, train_dir=trial_dir / "train",
                            spec_path=spec_path, command=command, kpi=prep.kpi, direction=prep.direction,
                            max_epochs=s.max_epochs, report=report, stop=self.stop, env=env, poll_s=self.poll_s,
                            grace_s=self.grace_s)

    def _finish(self, trial: optuna.Trial, outcome: TrialOutcome, seconds: float) -> None:
        kpis = {e: v for e, v in outcome.kpis.items() if e < self.prep.settings.max_epochs}
        name = self.prep.kpi
        if kpis:
            epoch, value = _best_epoch(kpis, self.prep.direction)
            trial.set_user_attr("best_epoch", epoch)
            trial.set_user_attr("best_value", value)
        if outcome.state == "complete" and kpis:
            self.study.tell(trial, value)
            self.completed += 1
            _say(f"trial {trial.number:03d} COMPLETE: {name}={value:.4g} (best at epoch {epoch}) in {seconds:.1f} s")
        elif outcome.state == "pruned":
            trial.set_user_attr("reason", outcome.reason)
            self.study.tell(trial, state=TrialState.PRUNED)
            last = max(kpis) if kpis else -1
            shown = f"{name}={kpis[last]:.4g} at epoch {last}" if kpis else "no KPI"
            _say(f"trial {trial.number:03d} PRUNED after {last + 1} epoch(s): {shown} in {seconds:.1f} s")
        elif outcome.state == "interrupted":
            self.interrupted = True
            reason = outcome.reason or "interrupted"
            trial.set_user_attr("reason", reason)
            frozen = self.study.tell(trial, state=TrialState.FAIL)
            # The next run retries it once, like a trial whose worker died.
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(self.study, frozen)
            _say(f"trial {trial.number:03d} FAILED: {reason}; it is retried when the command is run again")
        else:
            reason = outcome.reason or f"no '{name}' reported"
            self._fail(trial, reason)


def run_study(prep: Prepared, runner: Runner | None = None, *, poll_s: float = 0.5, grace_s: float = 30.0) -> int:
    """Run this worker's part of the study of ``prep`` and write the results; returns the exit code
    (0: done with at least one complete trial, 1: none completed, 130: interrupted)."""
    from .algorithms import make_pruner, make_sampler
    from .results import write_results

    s = prep.settings
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    prep.automl_dir.mkdir(parents=True, exist_ok=True)
    sampler, note = make_sampler(s.algorithm, s.seed)
    if note:
        _say(note)
    pruner = make_pruner(s.algorithm, s.max_epochs, s.reduction_factor)
    with study_lock(s.storage):  # table creation is not safe against a second SQLite writer
        study = open_study(prep, sampler, pruner)
    done = budget_used(study.get_trials(deepcopy=False))
    _say(f"study '{s.study_name}' in {s.storage}: {s.algorithm}, {s.max_trials} trials ({done} already counted), "
         f"metric {prep.kpi} ({prep.direction})")
    stop, received = threading.Event(), []
    worker = _Worker(prep, study, runner or subprocess_runner, stop, poll_s, grace_s)
    with _signals(stop, received):
        worker.run()
    if received:
        worker.interrupted = True
    complete = write_results(prep, study)
    if worker.interrupted:
        _say(f"interrupted ({received[0] if received else 'SIGINT'}): run the same command to resume")
        return EXIT_INTERRUPTED
    if not complete:
        sys.stderr.write("ERROR: no trial completed (trials.csv gives each trial's reason)\n")
        return EXIT_FAIL
    return EXIT_OK
