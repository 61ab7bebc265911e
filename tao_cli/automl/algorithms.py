"""TAO's ``automl_algorithm`` names → an Optuna sampler and pruner.

| automl_algorithm | sampler | pruner | TAO's algorithm |
|---|---|---|---|
| ``bayesian`` | ``GPSampler(seed)`` (TPE when GP cannot be built) | none: every trial runs all epochs | GP + EI, sequential |
| ``hyperband`` | ``RandomSampler(seed)`` | ``HyperbandPruner(min_resource=1, max_resource=R, reduction_factor=eta)`` | Hyperband |
| ``bohb`` | ``TPESampler(seed, multivariate=True)`` | ``HyperbandPruner`` as above | TPE/KDE + Hyperband |
| ``asha`` | ``RandomSampler(seed)`` | ``SuccessiveHalvingPruner(min_resource=1, reduction_factor=eta)`` | ASHA |
| ``pbt``, ``bfbo``, ``dehb``, ``hyperband_es`` | refused (:data:`REFUSED` gives the reason) | | |

R is ``automl_max_epochs`` (else ``train.num_epochs``), eta ``automl_reduction_factor``.  A pruner sees one
report per validated epoch at step ``epoch + 1`` (epochs trained), so R is the resource of a full trial.

Seeds: the sampler is rebuilt for every trial with ``seed + trial.number`` (:class:`PerTrialSeed`), so one
worker gives the same sequence twice, a resumed study samples what an unbroken one would, and two workers never
draw the same random proposals.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial

__all__ = ["Algorithm", "ALGORITHMS", "REFUSED", "PerTrialSeed", "make_sampler", "make_pruner", "describe_pruner"]


@dataclass(frozen=True)
class Algorithm:
    """One supported ``automl_algorithm``: how its sampler is described and whether a pruner stops trials."""

    name: str
    sampler: str
    pruner: str | None

    @property
    def pruned(self) -> bool:
        """True for the Hyperband family: trials validate every epoch and may be stopped at a rung."""
        return self.pruner is not None


ALGORITHMS: dict[str, Algorithm] = {
    "bayesian": Algorithm("bayesian", "GPSampler", None),
    "hyperband": Algorithm("hyperband", "RandomSampler", "HyperbandPruner"),
    "bohb": Algorithm("bohb", "TPESampler(multivariate)", "HyperbandPruner"),
    "asha": Algorithm("asha", "RandomSampler", "SuccessiveHalvingPruner"),
}

#: TAO algorithms Optuna cannot run as TAO defines them, and why (the refusal names them).
REFUSED: dict[str, str] = {
    "pbt": "population-based training copies weights between running trials and perturbs them; an Optuna trial "
           "is one independent training run",
    "bfbo": "Optuna has no BFBO sampler",
    "dehb": "Optuna has no differential-evolution Hyperband",
    "hyperband_es": "TAO's early-stop variant of Hyperband has no Optuna counterpart (use hyperband or asha)",
}


def _base_sampler(name: str, seed: int) -> tuple[BaseSampler, str | None]:
    if name == "bayesian":
        try:
            return optuna.samplers.GPSampler(seed=seed), None
        except Exception as exc:  # noqa: BLE001 - GP needs torch and scipy; the fallback is announced
            return optuna.samplers.TPESampler(seed=seed), f"GPSampler unavailable ({exc}); using TPESampler"
    if name == "bohb":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True), None
    return optuna.samplers.RandomSampler(seed=seed), None


class PerTrialSeed(BaseSampler):
    """A sampler rebuilt with ``seed + trial.number`` before each trial, then delegated to.

    Optuna's samplers read the history from the storage, so rebuilding them loses nothing but a GP fit's warm
    start; what it buys is that a trial's proposals depend only on its number and the finished trials.
    """

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int):
        self._factory = factory
        self._seed = seed
        self._inner = factory(seed)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._inner = self._factory(self._seed + trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: Any, values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(name: str, seed: int) -> tuple[BaseSampler, str | None]:
    """The per-trial-seeded sampler of a supported algorithm and a note when it fell back (else None)."""
    _, note = _base_sampler(name, seed)
    return PerTrialSeed(lambda s: _base_sampler(name, s)[0], seed), note


def make_pruner(name: str, max_epochs: int, reduction_factor: int) -> optuna.pruners.BasePruner:
    """The pruner of a supported algorithm (``NopPruner`` for bayesian)."""
    if name in ("hyperband", "bohb"):
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs,
                                              reduction_factor=reduction_factor)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=reduction_factor)
    return optuna.pruners.NopPruner()


def describe_pruner(name: str, max_epochs: int, reduction_factor: int) -> str:
    """One line for the plan: the pruner and its arguments."""
    if name in ("hyperband", "bohb"):
        return f"HyperbandPruner(min_resource=1, max_resource={max_epochs}, reduction_factor={reduction_factor})"
    if name == "asha":
        return f"SuccessiveHalvingPruner(min_resource=1, reduction_factor={reduction_factor})"
    return "none (every trial trains all its epochs)"
