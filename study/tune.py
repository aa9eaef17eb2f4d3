"""Ray Tune + Optuna wiring: one Tuner per loss, OptunaSearch (TPE) + ASHA, MLflow from the driver.

Facts this module relies on (DESIGN.md §7): Ray's OptunaSearch never prunes
and tells Optuna COMPLETE for trials ASHA stopped and for trials that errored
after reporting, which misleads TPE; :class:`StudySearch` tells them PRUNED and
FAIL. The paper defaults are enqueued as the first trial of every loss.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import optuna
import ray
import yaml
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from study.config import StudyConfig, TrainConfig, search_spaces
from study.losses import loss_hyperparameters
from study.search_space import SearchSpace
from study.tracking import StudyTracker, resolve_tracking_uri
from study.train import PreparedData, evaluate_untrained, prepare_data, run_trial

# What Ray adds to every result; everything else a trial reports is a metric of the trial.
NOT_METRICS = {*AUTO_RESULT_KEYS, "done", "epoch", "trial_id", "experiment_tag"}


def trial_state(result: dict | None, errored: bool, epochs: int, metric: str) -> str:
    """COMPLETE (ran every epoch), PRUNED (stopped early by ASHA) or FAIL (raised or non-finite)."""
    value = (result or {}).get(metric)
    if errored or value is None or not math.isfinite(value):
        return "FAIL"
    return "COMPLETE" if result.get("training_iteration", 0) >= epochs else "PRUNED"


class StudySearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED for ASHA-stopped trials and FAIL for failed ones."""

    def __init__(self, *args, epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._epochs = epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        state = trial_state(result, error, self._epochs, self.metric)
        ot_trial = self._ot_trials[trial_id]
        if state == "COMPLETE":
            self._ot_study.tell(ot_trial, result[self.metric])
        else:
            self._ot_study.tell(ot_trial, state=getattr(optuna.trial.TrialState, state))
        self._completed_trials.add(trial_id)


def resolve_trial(study: StudyConfig, space: SearchSpace, config: dict) -> tuple[dict, TrainConfig]:
    """A trial's sampled values → (loss keyword arguments, the study's train config with its overrides)."""
    loss_kwargs, train_overrides = space.split(space.from_optuna(config))
    return loss_kwargs, study.train.model_copy(update=train_overrides)


class TrackingCallback(tune.Callback):
    """Mirrors each trial of one loss into its MLflow child run (runs on the driver)."""

    def __init__(self, tracker: StudyTracker, space: SearchSpace, cfg: StudyConfig, say: Callable[[str], None]):
        self.tracker, self.space, self.loss, self.cfg, self.say = tracker, space, space.loss, cfg, say

    def _key(self, trial) -> str:
        return f"{self.loss}/{trial.trial_id}"

    def _start(self, trial) -> None:
        loss_kwargs, train = resolve_trial(self.cfg, self.space, trial.config)
        resolved = {
            "loss": self.loss,
            "loss_params": {**loss_hyperparameters(self.loss), **loss_kwargs},
            "train": train.model_dump(mode="json"),
            **self.cfg.model_dump(mode="json", include={"seed", "dataset", "model", "resources"}),
        }
        number = trial.trial_id.rsplit("_", 1)[-1]
        params = self.space.from_optuna(trial.config)
        self.tracker.start_trial(self._key(trial), self.loss, "search", params, f"{self.loss}-{number}", resolved)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._start(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        values = {
            k: v
            for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.tracker.log_metrics(self._key(trial), values, step=int(result["epoch"]))
        self.say(
            f"  {self.loss} {trial.trial_id} epoch {result['epoch']}: "
            f"{self.cfg.search.objective}={result[self.cfg.search.objective]:.4f}"
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        state = trial_state(trial.last_result, False, self.cfg.train.epochs, self.cfg.search.objective)
        self.tracker.end_trial(self._key(trial), state)
        self.say(f"  {self.loss} {trial.trial_id}: {state}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._start(trial)  # a no-op unless the trial failed before it was reported started
        path = Path(trial.error_file) if trial.error_file else None
        trace = path.read_text() if path and path.is_file() else "the trial raised; Ray kept no trace"
        self.tracker.end_trial(self._key(trial), "FAIL", error=trace)
        self.say(f"  {self.loss} {trial.trial_id}: FAIL")


def _trainable(config: dict, *, study: StudyConfig, space: SearchSpace, data: PreparedData) -> None:
    loss_kwargs, train = resolve_trial(study, space, config)
    run_trial(study, space.loss, loss_kwargs, train, data=data, report=tune.report)


def _tune_loss(
    cfg: StudyConfig, space: SearchSpace, data: PreparedData, tracker: StudyTracker, say: Callable[[str], None]
) -> None:
    study_dir = cfg.study_dir.resolve()
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(study_dir / "optuna.journal"))
    )
    searcher = StudySearch(
        space=space.define_by_run,
        metric=cfg.search.objective,
        mode="max",
        points_to_evaluate=[space.to_optuna(space.defaults())],
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        study_name=f"{cfg.name}.{space.loss}",
        storage=storage,
        epochs=cfg.train.epochs,
    )
    scheduler = ASHAScheduler(
        max_t=cfg.train.epochs, grace_period=cfg.search.grace_period, reduction_factor=cfg.search.reduction_factor
    )
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, study=cfg, space=space, data=data),
        {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=cfg.search.objective,
            mode="max",
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.search.max_concurrent),
            scheduler=scheduler,
            num_samples=cfg.search.trials_per_loss,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=space.loss,
            storage_path=str(study_dir / "ray"),
            verbose=0,
            callbacks=[TrackingCallback(tracker, space, cfg, say)],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    tuner.fit()


def _init_ray() -> None:
    if ray.is_initialized():
        return
    # RAY_ADDRESS (set by `ray job submit` or the user) joins a cluster; otherwise a local instance.
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level="warning")


def run_study(cfg: StudyConfig, say: Callable[[str], None] = print) -> StudyTracker:
    """Run every loss's search; the study folder gets config.yaml, the Optuna journal and Ray results."""
    spaces = search_spaces(cfg)
    study_dir: Path = cfg.study_dir
    study_dir.mkdir(parents=True)
    config = cfg.model_dump(mode="json")
    (study_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    tracker = StudyTracker(cfg.name, resolve_tracking_uri(cfg.tracking.uri))
    config.pop("tracking")  # the tracking URI may carry credentials: never logged
    tracker.start(config, cfg.search.objective)
    failed = True
    try:
        data = prepare_data(cfg.dataset, cfg.seed)
        baseline = evaluate_untrained(cfg, data)
        tracker.start_trial("baseline", "untrained", "baseline", {}, "untrained")
        tracker.log_metrics("baseline", baseline, step=0)
        tracker.end_trial("baseline", "COMPLETE")
        say(f"untrained baseline: {cfg.search.objective}={baseline[cfg.search.objective]:.4f}")
        _init_ray()
        for loss, space in spaces.items():
            say(f"searching {loss}: {cfg.search.trials_per_loss} trials")
            _tune_loss(cfg, space, data, tracker, say)
        failed = False
    finally:
        tracker.finish(failed=failed)
    return tracker
