"""``tao automl <net>``: hyper-parameter search on Optuna, each trial an ordinary train run (docs/automl.md).

Modules: ``settings`` (the spec's ``automl`` section), ``space`` (the search space from the train schema),
``algorithms`` (TAO's algorithm names → sampler and pruner), ``trial_spec`` (a trial's spec), ``trial_run``
(one trial's train process and its KPI stream), ``plan`` (checks and the dry-run print), ``study`` (storage,
budget, retries, the worker loop), ``results`` (best spec, best model, trials.csv, plots, table).
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["run_automl", "policy_is_auto"]


def policy_is_auto(cfg) -> bool:
    """True when a loaded train spec asks ``tao model <net> train`` to run its AutoML study instead."""
    return "automl" in cfg and str(cfg.automl.automl_policy) == "auto"


def run_automl(net, spec_path: str | Path, overrides: list[str], *, dry_run: bool = False,
               via_policy: bool = False, runner=None) -> int:
    """Plan (and unless ``dry_run``, run) the study of ``net`` with the train spec at ``spec_path`` plus
    ``overrides``; returns the exit code.  Bad input raises ``TaoUserError`` before anything is written.
    ``runner`` replaces the train subprocess of each trial (tests)."""
    from .plan import prepare, print_plan
    from .study import run_study

    prep = prepare(net, Path(spec_path), list(overrides))
    if dry_run:
        print_plan(prep, via_policy=via_policy)
        return 0
    return run_study(prep, runner)
