"""One loss's Optuna search as a Ray Tune searcher, through Optuna's public ask/tell API.

Ray's own OptunaSearch tells Optuna COMPLETE for trials ASHA stopped and for trials that failed
after reporting, which misleads TPE; this searcher tells PRUNED and FAIL (:class:`Outcome`). A
trial is known by its Optuna number, which keys its MLflow run and checkpoint folder: trials a dead
driver left RUNNING in Optuna are handed out first, with their own numbers and parameters, so they
continue from their last epoch instead of starting a second trial.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
from ray.tune.search import Searcher

from study.search_space import SearchSpace
from study.spec import SPEC, Outcome, TrialSpec
from study.vocab import State

_TOLD = {State.PRUNED: optuna.trial.TrialState.PRUNED, State.FAIL: optuna.trial.TrialState.FAIL}


class DriverOnly:
    """Lives on the driver for one Ray Tune run and is never persisted. Ray pickles a run's searcher,
    scheduler and callbacks into its experiment state (``tuner.pkl``); these hold the study's
    tracking and Optuna storage URLs, credentials included. dml-study never restores a Tuner (a
    resumed study builds a new one from its folder, Optuna and MLflow), so they pickle as empty."""

    def __getstate__(self) -> dict:
        return {}


class StatelessSearcher(DriverOnly, Searcher):
    """A searcher whose state lives elsewhere (Optuna's storage, MLflow): nothing for Ray to save."""

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return metric in (None, self.metric) and mode in (None, self.mode) and not config

    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass


class StudySearcher(StatelessSearcher):
    """Suggests trials of ``space`` from ``study`` (TPE or any Optuna sampler); each suggestion is
    ``{SPEC: make_spec(number, optuna_params)}``. With ``first`` (a new study), the first trial is
    that point (the paper's defaults)."""

    def __init__(
        self,
        study: optuna.Study,
        space: SearchSpace,
        make_spec: Callable[[int, dict], TrialSpec],
        objective: str,
        first: dict | None = None,
    ):
        super().__init__(metric=objective, mode="max")
        self.study, self.space, self.make_spec = study, space, make_spec
        self._orphans = list(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
        self._running: dict[str, TrialSpec] = {}  # Ray trial id → the spec it runs
        if first is not None:
            study.enqueue_trial(first)

    def suggest(self, trial_id: str) -> dict | None:
        if self._orphans:
            trial = self._orphans.pop(0)
            number, params = trial.number, trial.params
        else:
            trial = self.study.ask()
            self.space.define_by_run(trial)
            number, params = trial.number, trial.params
        spec = self.make_spec(number, params)
        self._running[trial_id] = spec
        return {SPEC: spec}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        spec = self._running.pop(trial_id, None)
        if spec is None:  # told already
            return
        outcome = Outcome.of(spec, result, self.metric, error="the trial raised" if error else None)
        if outcome.state is State.RUNNING:  # never trained (an unreadable image): Optuna hands it out on resume
            return
        if outcome.state is State.COMPLETE:
            self.study.tell(spec.key.number, outcome.value)
        else:
            self.study.tell(spec.key.number, state=_TOLD[outcome.state])
