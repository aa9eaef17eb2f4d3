"""Ray Tune → the terminal, on the driver: each trial's start, epochs and end told to the study's
:class:`~study.progress_view.ProgressView`, with the state :class:`~study.spec.Outcome` gives it (the
one the tracking callback logs and the searcher tells Optuna)."""

from __future__ import annotations

from ray import tune

from study.callback import error_trace
from study.progress_view import ProgressView
from study.searcher import DriverOnly
from study.spec import SPEC, Outcome, is_last_word
from study.vocab import State


class ProgressCallback(DriverOnly, tune.Callback):
    """Shows every trial of the Tune run in ``view``; ``objective`` decides its state and value."""

    def __init__(self, view: ProgressView, objective: str):
        self.view, self.objective = view, objective

    def on_trial_start(self, iteration, trials, trial, **info):
        spec = trial.config[SPEC]
        self.view.started(spec.key, spec.params)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not is_last_word(result):
            self.view.result(trial.config[SPEC].key, result.get("epoch"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, Outcome.of(trial.config[SPEC], trial.last_result, self.objective))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, Outcome.of(trial.config[SPEC], trial.last_result, self.objective, error=error_trace(trial)))

    def _ended(self, trial, outcome: Outcome) -> None:
        if outcome.state is State.RUNNING:  # never trained (an unreadable image): the study's error names it
            return
        spec = trial.config[SPEC]
        self.view.ended(spec.key, outcome.state, outcome.value, spec.params, outcome.error)
