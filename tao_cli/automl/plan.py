"""Everything a study decides before it writes a file, and the ``--dry-run`` print of it.

:func:`prepare` loads the train spec, reads the ``automl`` section, builds the search space from the network's
train schema (``tao_cli/automl/space.py``) and runs the engine's train plan on the spec of a first trial, so a
dry run that exits 0 means the trials would start.  Any refusal is a ``TaoUserError`` (exit 2).
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from networks.common.errors import ConfigError
from networks.common.network import Network

from .algorithms import ALGORITHMS, describe_pruner
from .settings import Settings, read_settings
from .trial_spec import trial_config

__all__ = ["Prepared", "prepare", "print_plan", "trial_dir_of"]


@dataclass
class Prepared:
    """A study ready to run: the network, the user's validated train spec (``cfg``) and where it came from,
    the settings, the search space (``space.Param`` list), the KPI key and its direction, the automl dir."""

    net: Network
    cfg: DictConfig
    spec_path: Path
    overrides: list[str]
    settings: Settings
    space: list[Any]
    kpi: str
    direction: str
    automl_dir: Path


def trial_dir_of(automl_dir: Path, number: int) -> Path:
    """``<automl_dir>/trial_<NNN>`` (NNN = the Optuna trial number, zero-padded to 3)."""
    return Path(automl_dir) / f"trial_{number:03d}"


def _automl_dir(cfg: DictConfig) -> Path:
    root = cfg.get("results_dir") or ""
    if not str(root).strip():
        raise ConfigError("results_dir", "AutoML needs a results directory", "set results_dir=/path/to/results "
                          "(trials go to <results_dir>/automl/trial_<NNN>)")
    return (Path(str(root)).expanduser() / "automl").resolve()


def _check_keys(net: Network, keys: list[str] | None, what: str) -> None:
    from tao_cli.fields import field_map

    fields = field_map(net.config_class)
    leaves = [k for k, f in fields.items() if not f.section and not k.startswith("automl.")]
    for key in keys or ():
        if key not in fields or fields[key].section:
            close = difflib.get_close_matches(key, leaves, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"`tao model {net.name} train -h` lists the keys"
            raise ConfigError(what, f"'{key}' is not a {net.name} train-spec field", hint)


def _kpi(net: Network, cfg: DictConfig, settings: Settings) -> tuple[str, str]:
    if settings.metric == "loss":
        return "val_loss", "min"
    key, mode = net.main_kpi(cfg)
    return key, mode


def prepare(net: Network, spec_path: Path, overrides: list[str]) -> Prepared:
    """Load and check everything a study of ``net`` needs (see the module docstring); raises TaoUserError."""
    from tao_cli import schema as schema_mod
    from tao_cli import spec as spec_mod
    from tao_cli.engine.plan import make_plan

    from . import space as space_mod

    if "train" not in net.actions:
        raise ConfigError("network", f"{net.name} has no train action", "AutoML tunes training")
    cfg = spec_mod.load_spec(net.config_class, "train", spec_path, list(overrides))
    automl_dir = _automl_dir(cfg)
    settings = read_settings(cfg, net.name, automl_dir)
    _check_keys(net, settings.hyperparameters, "automl.automl_hyperparameters")
    _check_keys(net, list(settings.range_override), "automl.automl_range_override")
    schema = schema_mod.json_schema(net.config_class, net.name, "train", net.actions)
    spec_dict = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    space = space_mod.build_space(schema, spec_dict, settings.hyperparameters, settings.range_override,
                                  settings.override_disabled)
    # The automl section steers the study; sampling it would change the study from inside a trial.
    space = [p for p in space if not str(p.name).startswith("automl.")]
    if not space:
        raise ConfigError("automl.automl_hyperparameters", "the search space is empty",
                          "list train-spec keys to search, e.g. automl.automl_hyperparameters=[train.lr]")
    kpi, direction = _kpi(net, cfg, settings)
    # The engine's own plan on a first trial's spec: bad paths, devices or intervals are refused now.
    # A directory no trial uses: a running worker's lock on trial_000 must not refuse a second worker.
    first = trial_config(cfg, {}, automl_dir / ".plan_check", settings)
    make_plan(net, "train", first, [])
    return Prepared(net, cfg, Path(spec_path), list(overrides), settings, space, kpi, direction, automl_dir)


def print_plan(prep: Prepared, *, via_policy: bool = False) -> None:
    """The ``--dry-run`` print: algorithm, sampler, pruner, storage, trials, epochs and the search space."""
    from . import space as space_mod

    s = prep.settings
    algo = ALGORITHMS[s.algorithm]
    lines = ["# AutoML plan"]
    if via_policy:
        lines.append(f"automl_policy: auto -> `tao model {prep.net.name} train` runs this AutoML study "
                     f"(`tao automl {prep.net.name}`)")
    lines += [
        f"network:      {prep.net.name} ({prep.net.title})",
        f"spec:         {prep.spec_path}",
        f"algorithm:    {s.algorithm}",
        f"sampler:      {algo.sampler} (seed {s.seed}; trial N uses seed + N)",
        f"pruner:       {describe_pruner(s.algorithm, s.max_epochs, s.reduction_factor)}",
        f"metric:       {prep.kpi} ({'maximise' if prep.direction == 'max' else 'minimise'}); a trial's result "
        "is its best epoch",
        f"storage:      {s.storage}",
        f"study:        {s.study_name}",
        f"trials:       {s.max_trials} (automl_max_recommendations)",
        f"epochs:       R={s.max_epochs} per trial" + (f", eta={s.reduction_factor}" if algo.pruned else ""),
        f"train.seed:   {s.seed} in every trial",
        f"trial dirs:   {prep.automl_dir}/trial_<NNN>",
        f"results:      {prep.automl_dir}/best_spec.yaml, best_model/, trials.csv, *.png",
        f"search space: {len(prep.space)} parameter(s)",
    ]
    lines += [f"  {line}" for line in space_mod.describe(prep.space)]
    print("\n".join(lines))
    sys.stdout.flush()
