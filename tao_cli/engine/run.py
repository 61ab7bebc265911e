"""``run_action``: run one network action end to end and return the process exit code.

Order: resolve the results dir, check input paths, plan devices, find the resume checkpoint — all before any
file is written (``--dry-run`` stops there and prints the plan) — then create the run dir, write
``experiment.yaml`` (secret redacted), tee logs to ``<action>.log``, write ``status.json`` records, build the
network's module/datamodule and the Trainer, and fit/test/predict (or call the network's own ``run_action``).

Exit codes: 0 success, 1 internal failure, 2 bad input (``TaoUserError``), 130 interrupted (SIGINT/SIGTERM).
Every run that got as far as creating its directory ends with a SUCCESS, FAILURE or INTERRUPTED record.
"""
from __future__ import annotations

import os
import platform
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from networks.common.context import RunContext
from networks.common.errors import CheckpointError, ConfigError, DataError, TaoUserError
from networks.common.io import atomic_write_json, atomic_write_text

from .devices import PLAN_ENV, DevicePlan, is_launch_rank_zero, plan_for_action

__all__ = ["run_action", "resolve_results_dir", "choose_results_dir", "check_input_paths", "LIGHTNING_ACTIONS", "redacted_yaml"]

#: Actions the engine runs through a Lightning Trainer; any other action calls ``net.run_action``.
LIGHTNING_ACTIONS = ("train", "evaluate", "inference")
_EXIT_OK, _EXIT_FAIL, _EXIT_USER, _EXIT_INTERRUPTED = 0, 1, 2, 130


class _Interrupted(Exception):
    """Internal: the run was interrupted by a signal."""


def _value(node: Any, key: str) -> Any:
    """``node[key]``, with a missing key, a ``???`` value or a missing node all reading as None."""
    if node is None or key not in node or OmegaConf.is_missing(node, key):
        return None
    return node.get(key)


def _override_keys(overrides: Sequence[str]) -> set[str]:
    """Dotted keys set by command-line overrides (``a.b=v``, ``+a.b=v``, ``++a.b=v``)."""
    keys = set()
    for token in overrides:
        name, eq, _ = str(token).partition("=")
        if eq and not name.startswith("~"):
            keys.add(name.lstrip("+"))
    return keys


def choose_results_dir(cfg: DictConfig, action: str, overrides: Sequence[str] = ()) -> tuple[Path, str]:
    """The run directory of ``action`` and why it was chosen; written back into ``<action>.results_dir``.

    Precedence: ``<action>.results_dir`` on the command line, then ``results_dir`` on the command line (as
    ``<results_dir>/<action>``, even when the spec file sets ``<action>.results_dir`` — a re-used
    ``experiment.yaml`` stores the old run's resolved directory there), then ``<action>.results_dir`` from the
    spec, then ``<results_dir>/<action>``.  Neither set → ``ConfigError`` naming both keys.  The path is made
    absolute (``~`` expanded).
    """
    section = cfg.get(action) if action in cfg else None
    own = _value(section, "results_dir")
    root = _value(cfg, "results_dir")
    given = _override_keys(overrides)
    if own not in (None, "") and f"{action}.results_dir" in given:
        path, why = Path(str(own)), f"{action}.results_dir on the command line"
    elif root not in (None, "") and "results_dir" in given:
        path, why = Path(str(root)) / action, "results_dir on the command line"
        if own not in (None, ""):
            why += f", which replaces {action}.results_dir={own} from the spec file"
    elif own not in (None, ""):
        path, why = Path(str(own)), f"{action}.results_dir in the spec file"
    elif root not in (None, ""):
        path, why = Path(str(root)) / action, f"results_dir in the spec file, plus /{action}"
    else:
        raise ConfigError("results_dir", f"neither results_dir nor {action}.results_dir is set",
                          f"pass results_dir=/path (outputs go to /path/{action}) or {action}.results_dir=/path")
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    if section is not None and "results_dir" in section:
        try:
            section.results_dir = str(path)
        except Exception:  # a read-only config: the value is still returned
            pass
    return path, why


def resolve_results_dir(cfg: DictConfig, action: str, overrides: Sequence[str] = ()) -> Path:
    """The run directory of ``action`` (see :func:`choose_results_dir` for the precedence)."""
    return choose_results_dir(cfg, action, overrides)[0]


def _resume_reason(cfg: DictConfig, run_dir: Path, resume: Path | None) -> str:
    """Why training starts from ``resume`` (or from scratch), for the dry-run plan and the log."""
    if resume is None:
        return f"none: no checkpoint in {run_dir}, starting from scratch"
    if _value(cfg.get("train"), "resume_training_checkpoint_path") not in (None, ""):
        return f"{resume} (train.resume_training_checkpoint_path)"
    return (f"{resume} (latest checkpoint in the results dir: re-running train there resumes; "
            "pass a new results_dir= to start afresh)")


_SYNTHETIC_HINT = "tao dataset synthetic --out {root}"


def _missing_path_hint(key: str, item: str) -> str:
    """What to do about a missing input path: the command that writes the synthetic set, or the key to set."""
    path = Path(os.path.expanduser(str(item)))
    parts = path.parts
    if "synthetic" in parts:
        root = Path(*parts[: parts.index("synthetic") + 1])
        return f"run `{_SYNTHETIC_HINT.format(root=root)}` to write the demo dataset there, or set {key}"
    where = "" if path.is_absolute() else f" (relative paths start at the current directory, {os.getcwd()})"
    return f"set {key}=/path/to/your/data{where}"


def check_input_paths(net: Any, cfg: DictConfig, action: str) -> dict[str, str]:
    """Check every ``{key: path}`` from ``net.input_paths(cfg, action)`` exists (``DataError`` otherwise)."""
    paths = dict(net.input_paths(cfg, action) or {}) if hasattr(net, "input_paths") else {}
    for key, value in paths.items():
        if value in (None, ""):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if not Path(os.path.expanduser(str(item))).exists():
                raise DataError(key, f"{item} does not exist", _missing_path_hint(key, str(item)))
    return paths


def _checkpoint_for(cfg: DictConfig, action: str) -> Path:
    value = _value(cfg.get(action), "checkpoint")
    if value in (None, ""):
        raise ConfigError(f"{action}.checkpoint", "is not set", f"pass {action}.checkpoint=/path/to/model.pth")
    path = Path(os.path.expanduser(str(value)))
    if not path.is_file():
        raise ConfigError(f"{action}.checkpoint", f"{value} does not exist")
    return path.resolve()


def redacted_yaml(cfg: DictConfig) -> str:
    """The resolved spec as YAML with ``encryption_key`` replaced (``tao_cli.spec.to_yaml`` when available)."""
    try:
        from tao_cli.spec import to_yaml  # type: ignore[attr-defined]
    except ImportError:
        to_yaml = None
    if to_yaml is not None:
        return to_yaml(cfg, redact=("encryption_key",))
    import yaml

    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception as exc:
        raise ConfigError("spec", f"cannot be resolved: {exc}") from None
    if isinstance(data, dict) and data.get("encryption_key"):
        data["encryption_key"] = "*****"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def _redact_argv(argv: list[str], key: str | None) -> list[str]:
    out = []
    for token in argv:
        name, eq, _ = token.partition("=")
        if eq and name.lstrip("+~").endswith("encryption_key"):
            token = f"{name}=*****"
        else:
            token = _mask(token, key)
        out.append(token)
    return out


def _versions() -> dict[str, str]:
    from importlib import metadata

    import torch

    import tao_cli

    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "tao_cli": tao_cli.__version__,
        "torch": str(torch.__version__),
        "lightning": dist("pytorch-lightning"),
        "hydra": dist("hydra-core"),
        "omegaconf": dist("omegaconf"),
        "python": platform.python_version(),
    }


def _experiment_yaml(cfg: DictConfig, argv: list[str], key: str | None, plan: DevicePlan, resume: Path | None) -> str:
    import yaml

    run = {
        "_run": {
            "argv": _redact_argv(list(argv), key),
            "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(),
            "versions": _versions(),
            "devices": plan.describe(),
            "resume_checkpoint": str(resume) if resume else None,
        }
    }
    text = _mask(redacted_yaml(cfg), key)
    # Second YAML document: the first one stays a valid spec for ``-e experiment.yaml``.
    return text + "---\n" + yaml.safe_dump(run, sort_keys=False)


def _outputs_planned(action: str, run_dir: Path, checkpoint_name: str) -> list[str]:
    out = [run_dir / "experiment.yaml", run_dir / "status.json", run_dir / f"{action}.log"]
    if action == "train":
        out += [run_dir / "model_epoch_<EEE>_step_<SSSSS>.pth", run_dir / f"{checkpoint_name}_latest.pth",
                run_dir / f"{checkpoint_name}_best.pth", run_dir / "lightning_logs/", run_dir / "metrics.csv",
                run_dir / "plots/"]
    elif action == "evaluate":
        out.append(run_dir / "metrics.json")
    return [str(p) for p in out]


class _SignalState:
    """Signal handling for one run: SIGINT/SIGTERM set ``received`` and raise KeyboardInterrupt, except that
    SIGTERM during ``fit`` only sets the flag (Lightning then stops at the next batch boundary)."""

    def __init__(self):
        self.received: str | None = None
        self.in_fit = False

    def handler(self, signum, frame):  # noqa: ARG002 - signal handler signature
        name = signal.Signals(signum).name
        self.received = self.received or name
        if signum == signal.SIGTERM and self.in_fit:
            return
        raise KeyboardInterrupt(name)


@contextmanager
def _signals(state: _SignalState) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, state.handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _fit_mode_callback(state: _SignalState):
    from pytorch_lightning import Callback

    class _FitMode(Callback):
        """Marks the span of ``fit`` in which Lightning's own SIGTERM handling is active."""

        def on_fit_start(self, trainer, pl_module):
            state.in_fit = True

        def on_fit_end(self, trainer, pl_module):
            state.in_fit = False

        def on_exception(self, trainer, pl_module, exception):
            state.in_fit = False

    return _FitMode()


def _print_err(text: str) -> None:
    sys.stderr.write(text.rstrip("\n") + "\n")
    sys.stderr.flush()


def run_action(net: Any, action: str, cfg: DictConfig, *, argv: list[str], dry_run: bool = False,
               debug: bool = False, overrides: Sequence[str] = ()) -> int:
    """Run ``action`` of network module ``net`` with the validated spec ``cfg``; return the exit code.

    ``argv`` is recorded (secret masked) in ``experiment.yaml``.  ``overrides`` are the command-line
    ``key=value`` words (they decide which results dir wins).  ``dry_run`` prints the resolved spec and the plan
    and writes nothing; it refuses everything a real run would refuse before starting.  ``debug`` prints full
    tracebacks.
    """
    from .status import StatusLogger

    key = None
    status: StatusLogger | None = None
    state = _SignalState()
    title = getattr(net, "TITLE", getattr(net, "NAME", "network"))
    try:
        with _signals(state):
            key = (cfg.get("encryption_key") if "encryption_key" in cfg else None) or None
            run_dir, run_dir_why = choose_results_dir(cfg, action, overrides)
            if hasattr(net, "check"):
                net.check(cfg, action)
            check_input_paths(net, cfg, action)
            plan = plan_for_action(cfg, action)
            if action in LIGHTNING_ACTIONS:
                from .trainer import check_strategy

                check_strategy(cfg, action, plan)
            resume: Path | None = None
            checkpoint: Path | None = None
            if action == "train":
                from .checkpoints import resolve_resume

                resume = resolve_resume(cfg, run_dir, getattr(net, "CHECKPOINT_NAME", None))
            elif action in LIGHTNING_ACTIONS:
                checkpoint = _checkpoint_for(cfg, action)
            if dry_run:
                _print_dry_run(net, action, cfg, (run_dir, run_dir_why), plan, resume, checkpoint)
                return _EXIT_OK

            rank0 = is_launch_rank_zero()
            run_dir.mkdir(parents=True, exist_ok=True)
            status = StatusLogger(run_dir / "status.json", enabled=rank0, redact=_secrets(key))
            if rank0:
                atomic_write_text(run_dir / "experiment.yaml", _experiment_yaml(cfg, argv, key, plan, resume))
            from .logs import run_logging

            with run_logging(run_dir / f"{action}.log" if rank0 else None, debug=debug,
                             redact=_secrets(key)) as log:
                status.write("STARTED", f"Starting {title} {action}.")
                log.info("%s results will be saved at: %s (%s)", action.capitalize(), run_dir, run_dir_why)
                log.info("Devices: %s", plan.describe())
                for warning in plan.warnings:
                    log.warning("%s", warning)
                if rank0 and action == "train":
                    for stale in run_dir.glob(".*.pth.*.tmp"):
                        # Left by a process killed mid-save; the file it was replacing is intact.
                        log.warning("Removing partial checkpoint %s left by an earlier run", stale.name)
                        stale.unlink(missing_ok=True)
                try:
                    code = _dispatch(net, action, cfg, run_dir, plan, resume, checkpoint, key, status, state, log)
                except TaoUserError as exc:
                    # The console gets the one ERROR line on stderr below; the log file keeps it too.
                    log.error("%s", exc.one_line(), exc_info=debug, extra={"file_only": True})
                    raise
                except (KeyboardInterrupt, _Interrupted) as exc:
                    log.warning("Interrupted: %s", exc, extra={"file_only": True})
                    raise
                except Exception:
                    log.error("%s", traceback.format_exc().rstrip(), extra={"file_only": True})
                    raise
                return code
    except TaoUserError as exc:
        if status is not None and not status.ended:
            status.write("FAILURE", exc.one_line())
        if debug:
            traceback.print_exc()
        _print_err(f"ERROR: {_mask(exc.one_line(), key)}")
        return _EXIT_USER
    except (KeyboardInterrupt, _Interrupted) as exc:
        signame = state.received or "SIGINT"
        message = str(exc) if isinstance(exc, _Interrupted) else f"{action.capitalize()} interrupted by {signame}."
        if status is not None and not status.ended:
            status.write("INTERRUPTED", message)
        _print_err(f"Interrupted ({signame}). {message if isinstance(exc, _Interrupted) else ''}".rstrip())
        return _EXIT_INTERRUPTED
    except Exception as exc:  # internal failure: one line, FAILURE record, exit 1
        text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
        text = _mask(text, key)
        if status is not None and not status.ended:
            status.write("FAILURE", text)
        if debug:
            traceback.print_exc()
            _print_err(f"ERROR: {text}")
        else:
            _print_err(f"ERROR: {text}\n(run with --debug for the full traceback)")
        return _EXIT_FAIL


def _secrets(key: str | None) -> tuple[str, ...]:
    """Strings masked in free text (logs, status, errors).  Keys under 4 characters are only masked where the
    key is a named field (spec, argv): masking every ``"a"`` in a log would destroy it."""
    return (key,) if key and len(key) >= 4 else ()


def _mask(text: str, key: str | None) -> str:
    for secret in _secrets(key):
        text = text.replace(secret, "*****")
    return text


def _print_dry_run(net, action, cfg, run_dir_choice: tuple[Path, str], plan: DevicePlan, resume,
                   checkpoint) -> None:
    from .trainer import decide_precision

    run_dir, run_dir_why = run_dir_choice
    lines = ["# Resolved spec (encryption_key redacted)", redacted_yaml(cfg).rstrip(), "", "# Plan"]
    lines.append(f"network:      {getattr(net, 'NAME', '?')} ({getattr(net, 'TITLE', '')})")
    lines.append(f"action:       {action}")
    lines.append(f"results dir:  {run_dir} ({run_dir_why})")
    lines.append(f"devices:      {plan.describe()}")
    for warning in plan.warnings:
        lines.append(f"  warning:    {warning}")
    if action in LIGHTNING_ACTIONS:
        if plan.world_size > 1:
            section = cfg.get("train") if action == "train" else None
            strategy = str(section.get("distributed_strategy", "ddp")) if section is not None and \
                "distributed_strategy" in section else "ddp"
            strategy += " (gloo)" if plan.accelerator == "cpu" else ""
        else:
            strategy = "auto (single process)"
        lines.append(f"strategy:     {strategy}")
        lines.append(f"precision:    {decide_precision(cfg, action, plan.accelerator)}")
    if action == "train":
        lines.append(f"resume from:  {_resume_reason(cfg, run_dir, resume)}")
    elif checkpoint is not None:
        lines.append(f"checkpoint:   {checkpoint}")
    lines.append("would write:")
    lines += [f"  {p}" for p in _outputs_planned(action, run_dir, getattr(net, "CHECKPOINT_NAME", "model"))]
    print("\n".join(lines))
    sys.stdout.flush()


def _dispatch(net, action: str, cfg: DictConfig, run_dir: Path, plan: DevicePlan, resume: Path | None,
              checkpoint: Path | None, key: str | None, status, state: _SignalState, log) -> int:
    from .trainer import seed_run

    title = getattr(net, "TITLE", getattr(net, "NAME", "network"))
    from .checkpoints import load_checkpoint

    def safe_load(path):
        return load_checkpoint(path, key=key, expected_network=getattr(net, "NAME", None))

    ctx = RunContext(action=action, run_dir=run_dir, num_devices=plan.world_size, num_nodes=plan.num_nodes,
                     resuming=resume is not None, accelerator=plan.accelerator, log=log,
                     load_checkpoint=safe_load)
    if action not in LIGHTNING_ACTIONS:
        if not hasattr(net, "run_action"):
            raise ConfigError("action", f"{getattr(net, 'NAME', '?')} has no action {action!r}")
        outputs = net.run_action(action, cfg, ctx) or {}
        status.write("SUCCESS", f"{action.capitalize()} finished successfully.", outputs=outputs)
        return _EXIT_OK

    seed_run(cfg, action)
    if action == "train":
        if resume is not None:
            status.write("RUNNING", f"Resuming training from checkpoint: {resume}")
            log.info("Resuming training from %s", _resume_reason(cfg, run_dir, resume))
        else:
            status.write("RUNNING", f"Starting from scratch (no checkpoint in {run_dir})")
    else:
        status.write("RUNNING", f"Loading checkpoint: {checkpoint}")
        log.info("Loading checkpoint: %s", checkpoint)

    module = net.build_module(cfg, ctx)
    datamodule = net.build_datamodule(cfg, ctx)
    if plan.world_size > 1:
        # Workers that Lightning starts re-run this command; they must use rank 0's plan (their WORLD_SIZE
        # counts processes, not nodes).
        os.environ[PLAN_ENV] = plan.to_json()
    if plan.num_nodes > 1 and not plan.slurm and not os.environ.get("NODE_RANK") and os.environ.get("RANK"):
        # TAO accepts RANK as the node rank; Lightning only reads NODE_RANK/GROUP_RANK.
        os.environ["NODE_RANK"] = os.environ["RANK"]
        log.info("Using RANK=%s as NODE_RANK", os.environ["RANK"])
    if action == "train":
        return _train(net, cfg, run_dir, plan, resume, key, status, state, log, module, datamodule, title)
    return _evaluate_or_infer(net, action, cfg, run_dir, plan, checkpoint, key, status, state, log, module,
                              datamodule)


def _interruptible(trainer, state: _SignalState, what: str, call, ckpt_cb=None) -> Any:
    """Run ``call`` (a Trainer fit/test/predict); turn Lightning's ways of ending on a signal into ``_Interrupted``.

    Lightning ends on KeyboardInterrupt with ``sys.exit(1)`` and on SIGTERM with ``SIGTERMException`` (a
    ``SystemExit``), after calling the callbacks' ``on_exception`` (where the checkpoint is saved).
    """
    from pytorch_lightning.trainer.states import TrainerStatus
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    interrupted = False
    result = None
    try:
        result = call()
    except (KeyboardInterrupt, SystemExit) as exc:
        if not (state.received or isinstance(exc, (KeyboardInterrupt, SIGTERMException))
                or trainer.state.status == TrainerStatus.INTERRUPTED):
            raise
        interrupted = True
    if interrupted or trainer.state.status == TrainerStatus.INTERRUPTED:
        where = ""
        if ckpt_cb is not None and trainer.is_global_zero:
            saved = ckpt_cb.interrupt_path
            where = f"; checkpoint saved: {saved}" if saved else "; no checkpoint saved"
        raise _Interrupted(f"{what} interrupted by {state.received or 'SIGINT'}{where}")
    return result


def _train(net, cfg, run_dir, plan, resume, key, status, state, log, module, datamodule, title) -> int:
    from .checkpoints import TaoCheckpoint, TaoCheckpointIO
    from .status import StatusCallback
    from .trainer import build_trainer

    train = cfg.train
    main_kpi = net.main_kpi(cfg) if hasattr(net, "main_kpi") else None

    def on_best(info: dict) -> None:
        status.write("RUNNING", "New best checkpoint", epoch=info["epoch"], step=info["step"],
                     best_checkpoint=info)

    ckpt_cb = TaoCheckpoint(run_dir, getattr(net, "CHECKPOINT_NAME", f"{net.NAME}_model"),
                            interval=int(train.get("checkpoint_interval", 1)),
                            unit=str(train.get("checkpoint_interval_unit", "epoch")),
                            main_kpi=main_kpi, keep=int(train.get("keep_checkpoints", 0) or 0), on_best=on_best)
    callbacks = [_fit_mode_callback(state), StatusCallback(status), ckpt_cb]
    trainer = build_trainer(cfg, "train", plan, run_dir, callbacks, module,
                            plugins=[TaoCheckpointIO(net.NAME, key)])
    _interruptible(trainer, state, "Train", lambda: trainer.fit(
        module, datamodule=datamodule, ckpt_path=str(resume) if resume else None), ckpt_cb)
    best = ckpt_cb.best_info()
    status.write("SUCCESS", "Train finished successfully.", **({"best_checkpoint": best} if best else {}))
    if best:
        log.info("Best checkpoint: %s (%s=%s, epoch %d, step %d)", best["path"], best["kpi"], best["value"],
                 best["epoch"], best["step"])
    log.info("Train finished successfully. Results in %s", run_dir)
    return _EXIT_OK


def _load_into(module, checkpoint: Path, key: str | None, network: str) -> dict:
    """Load ``checkpoint`` safely into ``module``; every key must match by name and shape.

    A mismatch is one ``CheckpointError`` naming the first few keys of each kind, with the checkpoint's and the
    model's shape for shape mismatches.
    """
    import torch

    from networks.common.weights import apply_state_dict

    from .checkpoints import load_checkpoint, state_dict_of

    obj = load_checkpoint(checkpoint, key=key, expected_network=network)
    weights = {k: v for k, v in state_dict_of(obj).items() if torch.is_tensor(v)}
    report = apply_state_dict(module, weights, source=str(checkpoint), raise_on_mismatch=False, log_summary=False)
    if not report.clean:
        parts = []
        if report.mismatched:
            shapes = ", ".join(f"{k}: {tuple(f)} in the checkpoint vs {tuple(m)} in the model"
                               for k, f, m in report.mismatched[:3])
            parts.append(f"{len(report.mismatched)} shape mismatch(es) e.g. {shapes}")
        if report.missing:
            parts.append(f"{len(report.missing)} missing key(s) e.g. {report.missing[:3]}")
        if report.unexpected:
            parts.append(f"{len(report.unexpected)} unexpected key(s) e.g. {report.unexpected[:3]}")
        raise CheckpointError(str(checkpoint), "does not match the model: " + "; ".join(parts),
                              "check that the spec's model section matches the one used for training")
    return obj


def _evaluate_or_infer(net, action, cfg, run_dir, plan, checkpoint, key, status, state, log, module,
                       datamodule) -> int:
    from .checkpoints import TaoCheckpointIO
    from .trainer import build_trainer

    try:
        obj = _load_into(module, checkpoint, key, net.NAME)
    except RuntimeError as exc:  # shape mismatch from load_state_dict
        raise CheckpointError(str(checkpoint), f"does not match the model ({str(exc).splitlines()[0]})") from None
    epoch, step = obj.get("epoch"), obj.get("global_step")
    trainer = build_trainer(cfg, action, plan, run_dir, [], module, plugins=[TaoCheckpointIO(net.NAME, key)])
    rank0 = trainer.is_global_zero and is_launch_rank_zero()
    if action == "evaluate":
        _interruptible(trainer, state, "Evaluate", lambda: trainer.test(module, datamodule=datamodule, verbose=False))
        # NaN/inf would make metrics.json invalid JSON: an undefined metric is null, as an empty size bin is.
        kpi = {k: _finite_or_none(_plain(v)) for k, v in dict(getattr(module, "kpi", None) or {}).items()}
        fields = {k: v for k, v in (("epoch", epoch), ("step", step)) if v is not None}
        if rank0:
            atomic_write_json(run_dir / "metrics.json", kpi, indent=2)
        status.write("RUNNING", "Evaluation metrics generated.", kpi=kpi, **fields)
        for name, value in kpi.items():
            log.info("%s: %s", name, value)
        status.write("SUCCESS", "Evaluate finished successfully.")
    else:
        _interruptible(trainer, state, "Inference",
                       lambda: trainer.predict(module, datamodule=datamodule, return_predictions=False))
        outputs = {k: _plain(v) for k, v in dict(getattr(module, "outputs", None) or {}).items()}
        for name, value in outputs.items():
            log.info("%s: %s", name, value)
        status.write("SUCCESS", "Inference finished successfully.", outputs=outputs)
    return _EXIT_OK


def _finite_or_none(value: Any) -> Any:
    """``value``, except that a non-finite float becomes None (JSON has no NaN)."""
    import math

    return None if isinstance(value, float) and not math.isfinite(value) else value


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, Path):
        return str(value)
    return value
