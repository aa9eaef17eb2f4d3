"""Ray Tune + Optuna wiring: one Tuner per loss, OptunaSearch (TPE) + ASHA, MLflow from the driver.

Facts this module relies on (checked against Ray 2.60 and Optuna 5): Ray's OptunaSearch never prunes
and tells Optuna COMPLETE for trials ASHA stopped and for trials that errored
after reporting, which misleads TPE; :class:`StudySearch` tells them PRUNED and
FAIL. The paper defaults are enqueued as the first trial of every loss.

A trial is known everywhere by its Optuna trial number: it keys the trial's
MLflow run and its checkpoint folder (``checkpoints/<loss>/<number>``), so a
retried trial or a resumed study continues the same trial, never a second one.
A resumed study first hands the trials its dead driver left RUNNING in Optuna
to Ray again; they continue from their last epoch.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import ray
import yaml
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from study import metrics
from study.config import StudyConfig, TrainConfig, search_spaces
from study.data.images import UnreadableImageError
from study.losses import has_parameters, loss_hyperparameters
from study.search_space import SearchSpace
from study.storage import Storage
from study.tracking import TAG_LOSS_LR, TAG_LR, TAG_STATE, StudyTracker, resolve_tracking_uri
from study.train import NonFiniteLossError, evaluate_untrained, load_data, load_state, run_final, run_trial

# What Ray adds to every result; everything else a trial reports is a metric of the trial.
NOT_METRICS = {*AUTO_RESULT_KEYS, "done", "epoch", "trial_id", "experiment_tag"}
NUMBER = "optuna_trial"  # config key of a search trial: its Optuna number
FINAL = "final"  # config key of a final-stage run: {"seed": …, "fold": …}
ERROR = "error"  # result key of a trial that stopped on a non-finite loss
PARENT_RUN_FILE = "mlflow_run_id"  # in the study folder: the study's parent MLflow run


def trial_state(result: dict | None, errored: bool, epochs: int, metric: str) -> str:
    """COMPLETE (ran every epoch), PRUNED (stopped early by ASHA) or FAIL (raised or non-finite)."""
    value = (result or {}).get(metric)
    if errored or value is None or not math.isfinite(value):
        return "FAIL"
    return "COMPLETE" if result.get("epoch", 0) >= epochs else "PRUNED"


class StudySearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED for ASHA-stopped trials and FAIL for failed ones."""

    def __init__(self, *args, epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._epochs = epochs
        self._unfinished: list[optuna.trial.FrozenTrial] | None = None

    def suggest(self, trial_id: str) -> dict | None:
        if self._unfinished is None:  # trials a dead driver left RUNNING go first, with their params
            self._unfinished = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if self._unfinished and trial_id not in self._ot_trials:
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, self._unfinished.pop(0)._trial_id)
        config = super().suggest(trial_id)
        return None if config is None else {**config, NUMBER: self._ot_trials[trial_id].number}

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

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if ERROR not in result:
            super().on_trial_result(trial_id, result)


def resolve_trial(study: StudyConfig, space: SearchSpace, config: dict) -> tuple[dict, TrainConfig]:
    """A trial's sampled values → (loss keyword arguments, the study's train config with its overrides;
    a final-stage run trains for :func:`final_epochs`)."""
    loss_kwargs, train_overrides = space.split(space.from_optuna(config))
    if FINAL in config:
        train_overrides["epochs"] = final_epochs(study)
    return loss_kwargs, study.train.model_copy(update=train_overrides)


def final_epochs(study: StudyConfig) -> int:
    return study.final.epochs or study.train.epochs


class TrackingCallback(tune.Callback):
    """Mirrors each trial of one loss, search or final stage, into its MLflow child run (on the driver)."""

    def __init__(
        self, tracker: StudyTracker, space: SearchSpace, cfg: StudyConfig, say: Callable[[str], None], epochs: int
    ):
        self.tracker, self.space, self.loss, self.cfg, self.say = tracker, space, space.loss, cfg, say
        self.epochs = epochs
        self.has_parameters = has_parameters(self.loss)  # then its runs are tagged with their loss_lr

    def _key(self, trial) -> str:
        return config_key(self.loss, trial.config)

    def _start(self, trial) -> None:
        loss_kwargs, train = resolve_trial(self.cfg, self.space, trial.config)
        resolved = {
            "loss": self.loss,
            "loss_params": {**loss_hyperparameters(self.loss), **loss_kwargs},
            "train": train.model_dump(mode="json"),
            **self.cfg.model_dump(mode="json", include={"seed", "dataset", "model", "resources"}),
        }
        params = self.space.from_optuna({k: v for k, v in trial.config.items() if k not in (NUMBER, FINAL)})
        final = trial.config.get(FINAL)
        if final:  # the seed and fold of a final-stage run are parameters too
            params |= {k: v for k, v in final.items() if v is not None}
            resolved |= final
        name = self._key(trial).replace("/", "-")
        lrs = {TAG_LR: str(train.lr)}
        if self.has_parameters:
            lrs[TAG_LOSS_LR] = str(train.lr * train.loss_lr_mult)
        stage = "final" if final else "search"
        self.tracker.start_trial(self._key(trial), self.loss, stage, params, name, resolved, tags=lrs)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._start(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if ERROR in result:  # the trial's final word: a non-finite loss; told at completion
            return
        self.tracker.log_metrics(self._key(trial), _metrics(result), step=int(result["epoch"]))
        value = result.get(self.cfg.search.objective)
        shown = f"{self.cfg.search.objective}={value:.4f}" if value is not None else f"loss={result['train_loss']:.4f}"
        self.say(f"  {self._key(trial)} epoch {result['epoch']}: {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        state = trial_state(result, False, self.epochs, self.cfg.search.objective)
        self._end(trial, state, error=result.get(ERROR))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._start(trial)  # a no-op unless the trial failed before it was reported started
        path = Path(trial.error_file) if trial.error_file else None
        trace = path.read_text() if path and path.is_file() else "the trial raised; Ray kept no trace"
        self._end(trial, "FAIL", error=trace)

    def _end(self, trial, state: str, error: str | None) -> None:
        embeddings = embeddings_of(self.cfg.storage, self._key(trial))
        if FINAL in trial.config and embeddings.exists():  # for the report's projection of test embeddings
            self.tracker.log_file(self._key(trial), "embeddings.npz", embeddings.read_bytes())
        self.tracker.end_trial(self._key(trial), state, error=error)
        # a finished trial's checkpoint (weights + optimizer, tens of MB) is not needed any more
        checkpoint_of(self.cfg.storage, self._key(trial)).delete()
        self.say(f"  {self._key(trial)}: {state}")


def _metrics(result: dict) -> dict[str, float]:
    """The metrics in a trial's result: its numbers, without what Ray adds."""
    return {
        k: v
        for k, v in result.items()
        if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def trial_key(loss: str, number: int) -> str:
    """A search trial's key in MLflow (tag) and on disk: the loss and its Optuna trial number."""
    return f"{loss}/{number}"


def final_key(loss: str, seed: int, fold: int | None) -> str:
    """A final-stage run's key: ``<loss>/final/s<seed>`` (``-f<fold>`` with folds)."""
    return f"{loss}/final/s{seed}" + ("" if fold is None else f"-f{fold}")


def config_key(loss: str, config: dict) -> str:
    final = config.get(FINAL)
    return final_key(loss, final["seed"], final["fold"]) if final else trial_key(loss, config[NUMBER])


def checkpoint_of(storage: Storage, key: str) -> Storage:
    return storage.child("checkpoints", *key.split("/"))


def embeddings_of(storage: Storage, key: str) -> Storage:
    """Where a final-stage run's test embeddings are kept (``.npz``): for ensembles and plots."""
    return storage.child("embeddings", *key.split("/")[:-1], key.split("/")[-1] + ".npz")


def _trainable(config: dict, *, study: StudyConfig, space: SearchSpace, storage: Storage) -> None:
    loss_kwargs, train = resolve_trial(study, space, config)
    key = config_key(space.loss, config)
    folder = checkpoint_of(storage, key)  # resolved on the driver: workers run elsewhere
    try:
        if FINAL not in config:
            run_trial(study, space.loss, loss_kwargs, train, report=tune.report, checkpoint_dir=folder)
            return
        final = config[FINAL]
        _, saved = run_final(
            study,
            space.loss,
            loss_kwargs,
            train,
            seed=final["seed"],
            fold=final["fold"],
            report=tune.report,
            checkpoint_dir=folder,
        )
        buffer = io.BytesIO()
        np.savez(buffer, **saved)
        embeddings_of(storage, key).write_bytes(buffer.getvalue())
    except NonFiniteLossError as exc:  # a diverged trial is not retried: FAIL at once, with the reason
        tune.report({study.search.objective: float("nan"), ERROR: f"{type(exc).__name__}: {exc}"})


def _tuner(cfg: StudyConfig, space: SearchSpace, tracker, say, epochs: int, name: str, **tune_config) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, study=cfg, space=space, storage=cfg.storage),
        {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu},
    )
    return tune.Tuner(
        trainable,
        param_space=tune_config.pop("param_space", None),
        tune_config=tune.TuneConfig(reuse_actors=True, **tune_config),
        run_config=tune.RunConfig(
            name=name,
            storage_path=cfg.storage.child("ray").root,
            storage_filesystem=cfg.storage.fs,
            verbose=0,
            callbacks=[TrackingCallback(tracker, space, cfg, say, epochs)],
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_retries, fail_fast=False),
        ),
    )


def _tune_loss(cfg: StudyConfig, space: SearchSpace, tracker: StudyTracker, say: Callable[[str], None]) -> None:
    storage = cfg.storage
    optuna_storage = _optuna_storage(cfg)
    study_name = f"{cfg.name}.{space.loss}"
    earlier = _optuna_trials(optuna_storage, study_name)  # a resumed study: what its earlier drivers left
    finished = [t for t in earlier if t.state.is_finished()]
    _close_finished_runs(tracker, cfg, space.loss, finished)
    remaining = cfg.search.trials_per_loss - len(finished)
    say(f"searching {space.loss}: {remaining} of {cfg.search.trials_per_loss} trials to run")
    if remaining <= 0:
        return
    searcher = StudySearch(
        space=space.define_by_run,
        metric=cfg.search.objective,
        mode="max",
        points_to_evaluate=None if earlier else [space.to_optuna(space.defaults())],
        sampler=optuna.samplers.TPESampler(seed=cfg.seed + len(earlier)),  # a resumed search draws anew
        study_name=study_name,
        storage=optuna_storage,
        epochs=cfg.train.epochs,
    )
    scheduler = ASHAScheduler(
        time_attr="epoch",
        max_t=cfg.train.epochs,
        grace_period=cfg.search.grace_period,
        reduction_factor=cfg.search.reduction_factor,
    )
    search_alg = ConcurrencyLimiter(searcher, max_concurrent=cfg.search.max_concurrent)
    tuner = _tuner(
        cfg,
        space,
        tracker,
        say,
        cfg.train.epochs,
        space.loss,
        metric=cfg.search.objective,
        mode="max",
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=remaining,
    )
    tuner.fit()
    # A pruned trial's worker may still write one more epoch after the callback deleted its folder.
    for trial in _optuna_trials(optuna_storage, study_name):
        if trial.state.is_finished():
            checkpoint_of(storage, trial_key(space.loss, trial.number)).delete()


def final_seeds(cfg: StudyConfig) -> list[int]:
    """The final stage's seeds: never the search's own seed."""
    return [cfg.seed + 1 + i for i in range(cfg.final.seeds)]


def _final_stage(cfg: StudyConfig, space: SearchSpace, tracker: StudyTracker, say: Callable[[str], None]) -> None:
    """Retrain the loss's best configuration with each seed on every training class (``final.train_on:
    all``) or per fold, and test it once; per fold, then evaluate each seed's concatenated-embedding
    ensemble of its fold models."""
    trials = [t for t in _optuna_trials(_optuna_storage(cfg), f"{cfg.name}.{space.loss}") if t.state.name == "COMPLETE"]
    if not trials or not cfg.final.seeds:
        say(f"final {space.loss}: " + ("no complete search trial, skipped" if cfg.final.seeds else "off"))
        return
    best = max(trials, key=lambda t: t.value)
    folds = list(range(cfg.dataset.folds)) if cfg.final.train_on == "folds" else [None]
    runs = [{"seed": s, "fold": f} for s in final_seeds(cfg) for f in folds]
    todo = [r for r in runs if _state(tracker, final_key(space.loss, r["seed"], r["fold"])) != "COMPLETE"]
    say(f"final {space.loss}: best trial {best.number}, {len(todo)} of {len(runs)} runs to train")
    if todo:
        param_space = {**best.params, FINAL: tune.grid_search(todo)}
        limit = {"max_concurrent_trials": cfg.search.max_concurrent}
        name = f"{space.loss}-final"
        _tuner(cfg, space, tracker, say, final_epochs(cfg), name, param_space=param_space, **limit).fit()
    if cfg.final.train_on == "folds":
        for seed in final_seeds(cfg):
            _ensemble(cfg, space.loss, seed, folds, tracker, say)


def _state(tracker: StudyTracker, key: str) -> str | None:
    run = tracker.find_trial(key)
    return None if run is None else run.data.tags.get(TAG_STATE)


def _ensemble(cfg: StudyConfig, loss: str, seed: int, folds: list[int], tracker, say) -> None:
    """Reality Check's ensemble: the fold models' test embeddings concatenated (each block unit-norm,
    the whole scaled back to unit norm), evaluated like one model's."""
    key = f"{loss}/ensemble/s{seed}"
    if _state(tracker, key) == "COMPLETE":
        return
    parts = []
    for fold in folds:
        path = embeddings_of(cfg.storage, final_key(loss, seed, fold))
        if not path.exists():
            say(f"  {key}: fold {fold} has no test embeddings (its run failed), no ensemble")
            return
        parts.append(np.load(io.BytesIO(path.read_bytes())))
    scale = 1 / math.sqrt(len(parts))
    test = np.concatenate([p["test"] for p in parts], axis=1) * scale
    gallery = None
    if "gallery" in parts[0]:
        gallery = (np.concatenate([p["gallery"] for p in parts], axis=1) * scale, parts[0]["gallery_labels"])
    result = metrics.evaluate(test, parts[0]["test_labels"], ks=parts[0]["ks"].tolist(), seed=seed, gallery=gallery)
    tracker.start_trial(key, loss, "ensemble", {"seed": seed, "folds": len(folds)}, key.replace("/", "-"))
    tracker.log_metrics(key, result, step=0)
    tracker.end_trial(key, "COMPLETE")
    say(f"  {key}: {cfg.search.objective}={result[cfg.search.objective]:.4f}")


def _optuna_storage(cfg: StudyConfig) -> optuna.storages.BaseStorage:
    if cfg.search.optuna_storage:
        return optuna.storages.RDBStorage(cfg.search.optuna_storage)
    journal = Path(cfg.storage.root) / "optuna.journal"  # a local or shared folder (checked in config)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))


def _optuna_trials(storage: optuna.storages.BaseStorage, study_name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # no such study yet
        return []


def _close_finished_runs(
    tracker: StudyTracker, cfg: StudyConfig, loss: str, finished: list[optuna.trial.FrozenTrial]
) -> None:
    """A driver killed between telling Optuna and MLflow leaves a finished trial's run RUNNING:
    log the epochs its checkpoint holds and end the run with Optuna's state."""
    for trial in finished:
        key = trial_key(loss, trial.number)
        run = tracker.find_trial(key)
        if run is None or run.info.status != "RUNNING":
            continue
        tracker.start_trial(key, loss, "search", {}, run.info.run_name)
        state = load_state(checkpoint_of(cfg.storage, key))
        for result in state["history"] if state else []:
            tracker.log_metrics(key, _metrics(result), step=int(result["epoch"]))
        tracker.end_trial(key, trial.state.name)


class RayAddressError(ValueError):
    """RAY_ADDRESS names something ``ray.init`` cannot join."""


def _init_ray() -> None:
    # RAY_ADDRESS (set by `ray job submit` or the user) joins a cluster; otherwise a new local instance
    # ("local": never attach by surprise to another Ray started on this machine).
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise RayAddressError(
            f"RAY_ADDRESS={address} is a dashboard (job submission) address; dml-study needs the "
            "cluster's address: host:6379, ray://host:10001 or auto"
        )
    if ray.is_initialized():
        return
    local = {} if address else {"_node_ip_address": "127.0.0.1"}  # a local instance listens on loopback only
    ray.init(address=address or "local", include_dashboard=False, logging_level="warning", **local)


def _untrained(study: StudyConfig) -> tuple[dict, dict]:
    return evaluate_untrained(study, load_data(study))


def _baseline(cfg: StudyConfig, tracker: StudyTracker, say: Callable[[str], None]) -> None:
    """The untrained network's validation metrics (mean over folds) and test metrics (``test_<metric>``),
    evaluated by a Ray task with a trial's resources: the driver may have no GPU."""
    if _state(tracker, "baseline") == "COMPLETE":
        return
    task = ray.remote(_untrained).options(num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu)
    try:  # the first to read the images: an unreadable one stops the study, named, before any trial
        val, test = ray.get(task.remote(cfg))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UnreadableImageError):
            raise exc.cause from None
        raise
    tracker.start_trial("baseline", "untrained", "baseline", {}, "untrained")
    tracker.log_metrics("baseline", val | {f"test_{k}": v for k, v in test.items()}, step=0)
    tracker.end_trial("baseline", "COMPLETE")
    say(f"untrained baseline: {cfg.search.objective}={val[cfg.search.objective]:.4f}")


def run_study(cfg: StudyConfig, say: Callable[[str], None] = print, resume: bool = False) -> StudyTracker:
    """Run every loss's search; the study folder gets config.yaml, the Optuna journal, checkpoints and
    Ray results. With ``resume`` the study in that folder continues: finished trials are kept,
    unfinished ones go on from their last epoch, and the parent MLflow run is reused."""
    spaces = search_spaces(cfg)
    storage = cfg.storage
    _init_ray()  # before anything is written: a wrong cluster address leaves no trace
    tracker = StudyTracker(cfg.name, resolve_tracking_uri(cfg.tracking.uri))
    if resume:
        tracker.resume(storage.child(PARENT_RUN_FILE).read_text().strip())
    else:
        storage.fs.create_dir(storage.root, recursive=True)
        config = cfg.model_dump(mode="json")
        storage.child("config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        config.pop("tracking")  # URIs may carry credentials: never logged
        config["search"].pop("optuna_storage")
        storage.child(PARENT_RUN_FILE).write_text(tracker.start(config, cfg.search.objective))
    failed = True
    try:
        _baseline(cfg, tracker, say)
        for space in spaces.values():
            _tune_loss(cfg, space, tracker, say)
        for space in spaces.values():
            _final_stage(cfg, space, tracker, say)
        failed = False
    finally:
        tracker.finish(failed=failed)
    return tracker
