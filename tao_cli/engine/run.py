"""``run_action``: run one network action end to end and return the process exit code.

Order: :func:`~tao_cli.engine.plan.make_plan` decides everything and refuses bad input before any file is
written (``--dry-run`` stops there and prints the plan); then the run dir, ``experiment.yaml`` (secret
redacted), logs tee'd to ``<action>.log`` and ``status.json`` records; then the network's module/datamodule and
the Trainer (:mod:`~tao_cli.engine.actions`), or the network's own action.

Exit codes: 0 success, 1 internal failure, 2 bad input (``TaoUserError``), 130 interrupted (SIGINT/SIGTERM).
Every run that got as far as creating its directory ends with a SUCCESS, FAILURE or INTERRUPTED record.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

from omegaconf import DictConfig

from networks.common.context import RunContext
from networks.common.errors import TaoUserError
from networks.common.io import atomic_write_text
from networks.common.network import LIGHTNING_ACTIONS, Network, random_init_warning
from tao_cli.redact import mask, secrets_of

from . import actions
from .devices import PLAN_ENV, is_launch_rank_zero
from .experiment import experiment_yaml
from .plan import RunPlan, make_plan, print_dry_run, resume_reason
from .runlock import RunDirLock
from .signals import Interrupted, SignalState, handle_signals
from .status import StatusLogger

__all__ = ["run_action", "Run", "LIGHTNING_ACTIONS"]

EXIT_OK, EXIT_FAIL, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class Run:
    """One action being executed: its plan, spec, status writer, signal state, logger and the network context."""

    plan: RunPlan
    cfg: DictConfig
    status: StatusLogger
    signals: SignalState
    log: logging.Logger
    ctx: RunContext

    def execute(self) -> int:
        """Seed, build the module and datamodule, and run the action; returns the exit code."""
        plan, cfg, status, log = self.plan, self.cfg, self.status, self.log
        action = plan.action
        if action not in LIGHTNING_ACTIONS:
            return actions.extra(self)

        from .trainer import seed_run

        seed_run(cfg, action)
        if action == "train":
            if plan.resume is not None:
                status.write("RUNNING", f"Resuming training from checkpoint: {plan.resume}")
                log.info("Resuming training from %s", resume_reason(cfg, plan.run_dir, plan.resume))
            else:
                status.write("RUNNING", f"Starting from scratch (no checkpoint in {plan.run_dir})")
                warning = random_init_warning(plan.net, cfg)
                if warning:
                    log.warning("%s", warning)
        elif plan.checkpoint is not None:
            status.write("RUNNING", f"Loading checkpoint: {plan.checkpoint}")
            log.info("Loading checkpoint: %s", plan.checkpoint)
        else:  # <action>.onnx_file: the network's module opens it (and logs the runtime)
            status.write("RUNNING", f"Loading ONNX file: {cfg[action].get('onnx_file')}")

        module = plan.net.build_module(cfg, self.ctx)
        datamodule = plan.net.build_datamodule(cfg, self.ctx)
        devices = plan.devices
        if devices.world_size > 1:
            # Workers that Lightning starts re-run this command; they must use rank 0's plan (their WORLD_SIZE
            # counts processes, not nodes).
            os.environ[PLAN_ENV] = devices.to_json()
        if devices.num_nodes > 1 and not devices.slurm and not os.environ.get("NODE_RANK") and os.environ.get("RANK"):
            # TAO accepts RANK as the node rank; Lightning only reads NODE_RANK/GROUP_RANK.
            os.environ["NODE_RANK"] = os.environ["RANK"]
            log.info("Using RANK=%s as NODE_RANK", os.environ["RANK"])
        step = {"train": actions.train, "evaluate": actions.evaluate, "inference": actions.infer}[action]
        return step(self, module, datamodule)


def _context(plan: RunPlan, log: logging.Logger) -> RunContext:
    from .checkpoints import load_checkpoint, save_checkpoint_file

    def safe_load(path):
        return load_checkpoint(path, key=plan.key, expected_network=plan.net.name)

    def save(obj, path):
        return save_checkpoint_file(obj, path, key=plan.key, network=plan.net.name)

    return RunContext(action=plan.action, run_dir=plan.run_dir, num_devices=plan.devices.world_size,
                      num_nodes=plan.devices.num_nodes, resuming=plan.resume is not None,
                      accelerator=plan.devices.accelerator, log=log, load_checkpoint=safe_load,
                      save_checkpoint=save)


#: Longest error line printed: a message that echoes user input (a path, a value) never floods the console.
MAX_ERROR_LINE = 1000


def _print_err(text: str) -> None:
    lines = [line if len(line) <= MAX_ERROR_LINE else f"{line[:MAX_ERROR_LINE - 40]}... ({len(line)} characters)"
             for line in text.rstrip("\n").split("\n")]
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


def _set_threads(plan, cfg: DictConfig, log) -> int | None:
    """Give this process the intra-op thread count chosen from the plan (tao_cli/engine/threads.py); returns the
    previous count (None when nothing changed)."""
    import torch

    from .threads import choose_threads, loader_workers

    threads, why = choose_threads(plan.devices.processes_per_node, loader_workers(cfg))
    log.info("Intra-op threads: %d per process (%s)", threads, why)
    before = torch.get_num_threads()
    if threads == before:
        return None
    torch.set_num_threads(threads)
    return before


def _restore_threads(before: int | None) -> None:
    if before is not None:
        import torch

        torch.set_num_threads(before)


def run_action(net: Network, action: str, cfg: DictConfig, *, argv: list[str], dry_run: bool = False,
               debug: bool = False, overrides: Sequence[str] = ()) -> int:
    """Run ``action`` of ``net`` with the validated spec ``cfg``; return the exit code.

    ``argv`` is recorded (secret masked) in ``experiment.yaml``.  ``overrides`` are the command-line
    ``key=value`` words (they decide which results dir wins).  ``dry_run`` prints the resolved spec and the plan
    and writes nothing; it refuses everything a real run would refuse before starting.  ``debug`` prints full
    tracebacks.
    """
    from .logs import run_logging

    key = None
    status: StatusLogger | None = None
    run_lock: RunDirLock | None = None
    signals = SignalState()
    try:
        with handle_signals(signals):
            key = (cfg.get("encryption_key") if "encryption_key" in cfg else None) or None
            plan = make_plan(net, action, cfg, overrides)
            if dry_run:
                print_dry_run(plan, cfg)
                return EXIT_OK

            rank0 = is_launch_rank_zero()
            run_dir = plan.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            stale_pid = None
            if rank0:  # DDP workers started by Lightning share rank 0's run (and its lock)
                run_lock = RunDirLock(run_dir)
                stale_pid = run_lock.acquire()
            status = StatusLogger(run_dir / "status.json", enabled=rank0, redact=secrets_of(key))
            if rank0:
                atomic_write_text(run_dir / "experiment.yaml",
                                  experiment_yaml(cfg, argv, key, plan.devices, plan.resume))
            with run_logging(run_dir / f"{action}.log" if rank0 else None, debug=debug,
                             redact=secrets_of(key)) as log:
                status.write("STARTED", f"Starting {net.title} {action}.")
                log.info("%s results will be saved at: %s (%s)", action.capitalize(), run_dir, plan.run_dir_why)
                log.info("Devices: %s", plan.devices.describe())
                if stale_pid:
                    log.warning("Took over the lock of %s from pid %d, which is no longer running", run_dir, stale_pid)
                for warning in plan.devices.warnings:
                    log.warning("%s", warning)
                if rank0 and action == "train":
                    for stale in run_dir.glob(".*.pth.*.tmp"):
                        # Left by a process killed mid-save; the file it was replacing is intact.
                        log.warning("Removing partial checkpoint %s left by an earlier run", stale.name)
                        stale.unlink(missing_ok=True)
                run = Run(plan, cfg, status, signals, log, _context(plan, log))
                threads_before = _set_threads(plan, cfg, log)
                try:
                    # weights a network reads itself (pretrained, backbone) are decrypted with the run's key
                    from networks.common.weights import file_reader

                    from .checkpoints import checkpoint_reader

                    with file_reader(checkpoint_reader(plan.key)):
                        return run.execute()
                except TaoUserError as exc:
                    # The console gets the one ERROR line on stderr below; the log file keeps it too.
                    log.error("%s", exc.one_line(), exc_info=debug, extra={"file_only": True})
                    raise
                except (KeyboardInterrupt, Interrupted) as exc:
                    log.warning("Interrupted: %s", exc, extra={"file_only": True})
                    raise
                except Exception:
                    log.error("%s", traceback.format_exc().rstrip(), extra={"file_only": True})
                    raise
                finally:  # an in-process caller (a test, a notebook) gets its own setting back
                    _restore_threads(threads_before)
    except TaoUserError as exc:
        if status is not None and not status.ended:
            status.write("FAILURE", exc.one_line())
        if debug:
            traceback.print_exc()
        _print_err(f"ERROR: {mask(exc.one_line(), secrets_of(key))}")
        return EXIT_USER
    except (KeyboardInterrupt, Interrupted) as exc:
        signame = signals.received or "SIGINT"
        message = str(exc) if isinstance(exc, Interrupted) else f"{action.capitalize()} interrupted by {signame}."
        if status is not None and not status.ended:
            status.write("INTERRUPTED", message)
        _print_err(f"Interrupted ({signame}). {message if isinstance(exc, Interrupted) else ''}".rstrip())
        return EXIT_INTERRUPTED
    except Exception as exc:  # internal failure: one line, FAILURE record, exit 1
        text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
        text = mask(text, secrets_of(key))
        if status is not None and not status.ended:
            status.write("FAILURE", text)
        if debug:
            traceback.print_exc()
            _print_err(f"ERROR: {text}")
        else:
            _print_err(f"ERROR: {text}\n(run with --debug for the full traceback)")
        return EXIT_FAIL
    finally:
        if run_lock is not None:
            run_lock.release()
