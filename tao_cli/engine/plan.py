"""Everything decided before a run writes anything, and the ``--dry-run`` printout of it.

:func:`make_plan` refuses intervals beyond ``num_epochs`` (TAO's assertion), resolves the results dir (and why),
runs the network's checks (e.g. exactly one of checkpoint / onnx_file / trt_engine), then refuses ``trt_engine``
(no TensorRT runner here), checks the input paths, plans the devices, checks the strategy, and finds the resume
checkpoint (and why) or the checkpoint to evaluate (none when an ONNX file runs).  Any
refusal is a ``TaoUserError`` raised here, so ``--dry-run`` exit 0 means the run will start.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from networks.common.errors import ConfigError, DataError
from networks.common.network import LIGHTNING_ACTIONS, Network, random_init_warning, refuse_deploy_action

from .devices import DevicePlan, is_launch_rank_zero, plan_for_action
from .runlock import check_free

__all__ = ["RunPlan", "make_plan", "choose_results_dir", "resolve_results_dir", "check_input_paths",
           "check_path_lengths", "check_writable", "check_intervals", "check_trt_engine",
           "print_dry_run", "outputs_planned", "resume_reason"]


@dataclass
class RunPlan:
    """The decisions for one run.  ``run_dir``: ``<results_dir>/<action>`` (absolute) and ``run_dir_why``;
    ``devices``: the device plan; ``resume``: train's resume checkpoint (None = from scratch);
    ``checkpoint``: evaluate/inference's checkpoint; ``key``: the spec's encryption key (None when unset)."""

    net: Network
    action: str
    run_dir: Path
    run_dir_why: str
    devices: DevicePlan
    resume: Path | None = None
    checkpoint: Path | None = None
    key: str | None = None


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


#: Longest file-name component and whole path (bytes) the file systems we run on accept (Linux NAME_MAX and
#: PATH_MAX); a longer one fails deep inside a run with "File name too long".
NAME_MAX, PATH_MAX = 255, 4096
#: Room left in PATH_MAX for the names a run writes under its directory (checkpoint temp files, plots/...).
_RUN_DIR_ROOM = 64
#: Leaf names (besides ``*_dir``/``*_path``/``*_file``/``*_json``/``*_engine``) whose values are paths.
_PATH_LEAVES = ("checkpoint", "label_map", "text_encoder_type", "timing_cache")


def _is_path_key(key: str) -> bool:
    leaf = key.rpartition(".")[2].split("[")[0]
    return leaf.endswith(("_dir", "_path", "_file", "_json", "_engine")) or leaf in _PATH_LEAVES


def _path_leaves(node: Any, prefix: str) -> list[tuple[str, str]]:
    """(dotted key, value) of every non-empty string under a path-like key (lists of data sources included)."""
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _path_leaves(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            out += _path_leaves(v, f"{prefix}[{i}]")
    elif isinstance(node, str) and node and _is_path_key(prefix):
        out.append((prefix, node))
    return out


def _too_long(path: str, room: int = 0) -> str | None:
    """Why ``path`` cannot be a file name here (a component over NAME_MAX bytes, or the whole absolute path,
    plus ``room`` for names written under it, over PATH_MAX bytes), else None."""
    full = os.path.abspath(os.path.expanduser(path))
    for part in Path(full).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            return f"has a path component of {len(os.fsencode(part))} bytes (the limit is {NAME_MAX}): {part[:40]}..."
    if len(os.fsencode(full)) + room > PATH_MAX:
        limit = PATH_MAX - room
        return f"is a path of {len(os.fsencode(full))} bytes (the limit here is {limit})"
    return None


def check_path_lengths(cfg: DictConfig, run_dir: Path, run_dir_key: str) -> None:
    """``ConfigError`` naming the field when the run dir or any path-valued field is longer than the file
    system allows (checked before anything is created, so a run never fails half-way with ENAMETOOLONG)."""
    problem = _too_long(str(run_dir), _RUN_DIR_ROOM)
    if problem:
        raise ConfigError(run_dir_key, f"the results dir {problem}", "use a shorter results_dir")
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # an unresolvable value was reported (or is irrelevant) elsewhere
        return
    for key, value in _path_leaves(data, ""):
        if value == "???":
            continue
        problem = _too_long(value)
        if problem:
            raise ConfigError(key, problem, "use a shorter path (or a symlink to it)")


def check_writable(run_dir: Path, run_dir_key: str) -> None:
    """``ConfigError`` naming the field unless ``run_dir`` exists as a writable directory or can be created
    (its nearest existing ancestor is a writable directory).  Checked at plan time, dry-run included."""
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            raise ConfigError(run_dir_key, f"{probe} is a broken symbolic link",
                              "fix the link or choose another results_dir")
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(run_dir_key, f"cannot create the results dir {run_dir}: {probe} is not a directory",
                          "choose another results_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        problem = (f"the results dir {run_dir} is not writable" if probe == run_dir else
                   f"{probe} is not writable, so the results dir {run_dir} cannot be created in it")
        raise ConfigError(run_dir_key, problem, "choose a results_dir you can write to, or fix its permissions")


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


def check_input_paths(net: Network, cfg: DictConfig, action: str) -> dict[str, Any]:
    """Check every ``{key: path}`` from ``net.input_paths(cfg, action)`` exists (``DataError`` otherwise)."""
    paths = dict(net.input_paths(cfg, action) or {})
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
    if not (path.is_file() or path.is_dir()):  # a directory: Hugging Face weights (docs/weights.md)
        raise ConfigError(f"{action}.checkpoint", f"{value} does not exist")
    return path.resolve()


def resume_reason(cfg: DictConfig, run_dir: Path, resume: Path | None) -> str:
    """Why training starts from ``resume`` (or from scratch), for the dry-run plan and the log."""
    if resume is None:
        return f"none: no checkpoint in {run_dir}, starting from scratch"
    if _value(cfg.get("train"), "resume_training_checkpoint_path") not in (None, ""):
        return f"{resume} (train.resume_training_checkpoint_path)"
    return (f"{resume} (latest checkpoint in the results dir: re-running train there resumes; "
            "pass a new results_dir= to start afresh)")


def check_trt_engine(cfg: DictConfig, action: str, net: Network | None = None) -> None:
    """``<action>.trt_engine`` set (evaluate/inference): a network that builds engines (``gen_trt_engine`` among its
    actions) runs one where TensorRT and a CUDA GPU exist; otherwise one line saying what is missing."""
    engine = _value(cfg.get(action) if action in cfg else None, "trt_engine")
    if engine in (None, ""):
        return
    key = f"{action}.trt_engine"
    if net is not None and "gen_trt_engine" in net.extra_actions:
        from networks.common.tensorrt_engine import require_tensorrt

        require_tensorrt(key, want="run a TensorRT engine")
        return
    name = net.name if net is not None else "this network"
    raise ConfigError(key, f"running a TensorRT engine is not supported by tao-cli for {name} yet",
                      f"unset {key} and give {action}.checkpoint to run the .pth model")


def check_intervals(cfg: DictConfig, action: str) -> None:
    """TAO's assertion: ``train.checkpoint_interval`` (unit epoch) and ``train.validation_interval`` are at most
    ``train.num_epochs`` (a larger validation interval means validation never runs)."""
    train = cfg.get("train") if action == "train" and "train" in cfg else None
    epochs = _value(train, "num_epochs")
    if epochs is None:
        return
    keys = ["validation_interval"]
    if str(_value(train, "checkpoint_interval_unit") or "epoch") == "epoch":
        keys.insert(0, "checkpoint_interval")
    for name in keys:
        value = _value(train, name)
        if value is not None and int(value) > int(epochs):
            what = "validation would never run" if name == "validation_interval" else "no periodic checkpoint"
            raise ConfigError(f"train.{name}", f"{value} is more than train.num_epochs={epochs} ({what}; TAO "
                              "asserts this)", f"set train.{name} to at most {epochs}")


def make_plan(net: Network, action: str, cfg: DictConfig, overrides: Sequence[str] = ()) -> RunPlan:
    """Decide everything about the run without writing anything; refusals raise ``TaoUserError``."""
    refuse_deploy_action(net, action)
    check_intervals(cfg, action)
    key = (cfg.get("encryption_key") if "encryption_key" in cfg else None) or None
    run_dir, why = choose_results_dir(cfg, action, overrides)
    run_dir_key = why.split(" ")[0]  # the field that chose it: results_dir or <action>.results_dir
    check_path_lengths(cfg, run_dir, run_dir_key)
    if is_launch_rank_zero():
        check_writable(run_dir, run_dir_key)  # DDP workers re-run the command inside rank 0's (locked) run
        check_free(run_dir)
    net.check(cfg, action)  # first: a network's own rule on trt_engine (e.g. "exactly one source") wins
    if action in LIGHTNING_ACTIONS:
        check_trt_engine(cfg, action, net)
    check_input_paths(net, cfg, action)
    devices = plan_for_action(cfg, action)
    plan = RunPlan(net, action, run_dir, why, devices, key=key)
    if action in LIGHTNING_ACTIONS:
        from .trainer import check_strategy

        check_strategy(cfg, action, devices)
    if action == "train":
        from .checkpoints import resolve_resume

        plan.resume = resolve_resume(cfg, run_dir, net.checkpoint_name)
    elif action in LIGHTNING_ACTIONS and _value(cfg.get(action), "onnx_file") in (None, ""):
        # a network that offers <action>.onnx_file runs it itself (ONNX Runtime) instead of a checkpoint
        plan.checkpoint = _checkpoint_for(cfg, action)
    return plan


def outputs_planned(action: str, run_dir: Path, checkpoint_name: str) -> list[str]:
    """The files and folders ``action`` writes under ``run_dir`` (what ``--dry-run`` lists)."""
    out = [run_dir / "experiment.yaml", run_dir / "status.json", run_dir / f"{action}.log"]
    if action == "train":
        out += [run_dir / "model_epoch_<EEE>_step_<SSSSS>.pth", run_dir / f"{checkpoint_name}_latest.pth",
                run_dir / f"{checkpoint_name}_best.pth", run_dir / "lightning_logs/", run_dir / "metrics.csv",
                run_dir / "plots/"]
    elif action == "evaluate":
        out += [run_dir / "metrics.json", run_dir / "overlays/"]
    return [str(p) for p in out]


def print_dry_run(plan: RunPlan, cfg: DictConfig) -> None:
    """Print the resolved spec (secrets redacted) and the plan to stdout."""
    from .experiment import redacted_yaml
    from .threads import choose_threads, loader_workers
    from .trainer import decide_precision

    action, net, devices = plan.action, plan.net, plan.devices
    lines = ["# Resolved spec (encryption_key redacted)", redacted_yaml(cfg).rstrip(), "", "# Plan"]
    lines.append(f"network:      {net.name} ({net.title})")
    lines.append(f"action:       {action}")
    lines.append(f"results dir:  {plan.run_dir} ({plan.run_dir_why})")
    lines.append(f"devices:      {devices.describe()}")
    for warning in devices.warnings:
        lines.append(f"  warning:    {warning}")
    if action in LIGHTNING_ACTIONS:
        if devices.world_size > 1:
            section = cfg.get("train") if action == "train" else None
            strategy = str(_value(section, "distributed_strategy") or "ddp")
            strategy += " (gloo)" if devices.accelerator == "cpu" else ""
        else:
            strategy = "auto (single process)"
        lines.append(f"strategy:     {strategy}")
        lines.append(f"precision:    {decide_precision(cfg, action, devices.accelerator)}")
        threads, why = choose_threads(devices.processes_per_node, loader_workers(cfg))
        lines.append(f"threads:      {threads} intra-op per process ({why})")
    if action == "train":
        lines.append(f"resume from:  {resume_reason(cfg, plan.run_dir, plan.resume)}")
        warning = random_init_warning(net, cfg, resuming=plan.resume is not None)
        if warning:
            lines.append(f"  warning:    {warning}")
    elif plan.checkpoint is not None:
        lines.append(f"checkpoint:   {plan.checkpoint}")
    elif action in LIGHTNING_ACTIONS and _value(cfg.get(action), "onnx_file") not in (None, ""):
        lines.append(f"onnx file:    {_value(cfg.get(action), 'onnx_file')} (ONNX Runtime)")
    lines.append("would write:")
    lines += [f"  {p}" for p in outputs_planned(action, plan.run_dir, net.checkpoint_name)]
    print("\n".join(lines))
    sys.stdout.flush()
