"""The study's stages, orchestrated from the driver: every loss's search and final stage in one Ray
Tune run, the untrained baseline in a slot the trials leave idle, then the fold ensembles.

The Tune run's searcher is :class:`~study.schedule.StudySchedule`: each loss's Optuna TPE
(:class:`~study.searcher.StudySearcher`, the paper defaults first) side by side, and a loss's final
runs (its best point, new seeds) once its search has ended, behind the search trials left;
:class:`~study.schedule.PerLossASHA` stops weak search trials within each loss;
:class:`~study.callback.TrackingCallback` logs to MLflow and :func:`study.worker.run_spec` trains.
Work that needs the data otherwise (baseline, ensembles) runs as a Ray task with a trial's
resources; the driver only schedules and logs.

Resume: a study continued in its folder keeps its finished trials, hands the trials its dead driver
left RUNNING in Optuna to Ray again (they continue from their last epoch), skips final runs already
COMPLETE in MLflow, and first repairs what a driver killed between telling Optuna and MLflow left
behind (:func:`close_finished_runs`). See docs/architecture.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import optuna
import ray
import yaml
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from rich.console import Console

from study import worker
from study.callback import TrackingCallback
from study.claims import ablation_plan
from study.config import StudyConfig, search_spaces, without_secrets
from study.data.images import UnreadableImageError
from study.journal import clear_writer_lock, repair_journal
from study.local_ray import start_local_ray
from study.preflight import cluster_slots, ray_address
from study.progress import StudyProgress
from study.progress_callback import ProgressCallback
from study.progress_view import ProgressView
from study.schedule import PerLossASHA, StopOnError, StudySchedule, cluster_line, loss_asha
from study.search_space import SearchSpace
from study.searcher import DriverOnly, StudySearcher
from study.spec import SPEC, TrialSpec, ablation_spec, final_seeds, final_spec, result_metrics, search_spec
from study.tracking import TAG_STATE, StudyTracker, resolve_tracking_uri
from study.tracking_writer import TrackingWriter
from study.vocab import (
    CONFIG_FILE,
    OPTUNA_JOURNAL,
    PARENT_RUN_FILE,
    RAY_RESULTS,
    Stage,
    State,
    TrialKey,
    as_test,
    as_test_name,
    checkpoint_dir,
)

Say = Callable[[str], None]
# what the stages log through: the study's TrackingWriter (tests also pass a StudyTracker)
Tracker = StudyTracker | TrackingWriter


class StudyInterrupted(Exception):
    """Ctrl-C (SIGINT): the study stopped with trials unfinished; ``resume`` continues it."""


def init_ray(verbose: bool = False) -> None:
    """Join the cluster RAY_ADDRESS names (set by ``ray job submit`` or the user), else start a local
    instance ("local": never attach by surprise to another Ray on this machine) that listens on
    loopback only (:func:`~study.local_ray.start_local_ray`). Only with ``verbose`` do the workers'
    own output lines reach this terminal (a trial's error reaches it anyway, through Ray Tune)."""
    address = ray_address()
    # a diverged trial's last result names the reason instead of the objective (see study.spec.Outcome)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, include_dashboard=False, logging_level="warning", log_to_driver=verbose)
    else:
        start_local_ray(include_dashboard=False, logging_level="warning", log_to_driver=verbose)


def optuna_storage(cfg: StudyConfig) -> optuna.storages.BaseStorage:
    """``search.optuna_storage`` (a database shared by many drivers), else a journal file in the
    study folder (a local or shared folder: checked in config)."""
    if cfg.search.optuna_storage:
        return optuna.storages.RDBStorage(cfg.search.optuna_storage.get_secret_value())
    journal = Path(cfg.storage.root) / OPTUNA_JOURNAL
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))


def repair_optuna_journal(cfg: StudyConfig, say: Say) -> None:
    """Cut what a driver killed mid-write left at the journal's end (a torn last record, Optuna's
    writer lock): Optuna would glue its next record onto it and never read the study again. Only the
    driver writes the journal, and it holds the study's lock (:class:`~study.lock.StudyLock`)."""
    if cfg.search.optuna_storage or not cfg.storage.is_local:
        return
    journal = Path(cfg.storage.root) / OPTUNA_JOURNAL
    if cut := repair_journal(journal):
        say(f"{OPTUNA_JOURNAL}: cut a torn last record ({cut} bytes) left by a killed driver")
    clear_writer_lock(journal)


def optuna_trials(storage: optuna.storages.BaseStorage, study_name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # no such study yet
        return []


def _searcher(
    cfg: StudyConfig,
    storage: optuna.storages.BaseStorage,
    space: SearchSpace,
    tracker: Tracker,
    view: ProgressView,
) -> tuple[StudySearcher | None, int]:
    """``space``'s loss's searcher and how many of its ``search.trials_per_loss`` trials are left to
    run; a resumed study first repairs what its dead driver left (:func:`close_finished_runs`)."""
    study_name = f"{cfg.name}.{space.loss}"
    earlier = optuna_trials(storage, study_name)
    close_finished_runs(tracker, cfg, space.loss, [t for t in earlier if t.state.is_finished()])
    finished = sum(t.state.is_finished() for t in earlier)
    remaining = cfg.search.trials_per_loss - finished
    view.plan(space.loss, Stage.SEARCH, max(cfg.search.trials_per_loss, finished), finished, cfg.train.epochs)
    if best := best_trial(storage, cfg, space.loss):  # an earlier driver's
        view.seed_best(space.loss, best.value, best.number, space.from_optuna(best.params))
    view.say(f"searching {space.loss}: {max(remaining, 0)} of {cfg.search.trials_per_loss} trials to run")
    if remaining <= 0:
        return None, 0
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.seed + len(earlier)),  # a resumed search draws anew
        load_if_exists=True,
    )
    first = None if earlier else space.to_optuna(space.defaults())  # the paper's point first
    make_spec = lambda number, params: search_spec(cfg, space, number, params)  # noqa: E731
    return StudySearcher(study, space, make_spec, cfg.search.objective, first=first), remaining


def _folds(cfg: StudyConfig) -> list[int | None]:
    return list(range(cfg.dataset.folds)) if cfg.final.train_on == "folds" else [None]


def best_trial(storage: optuna.storages.BaseStorage, cfg: StudyConfig, loss: str) -> optuna.trial.FrozenTrial | None:
    """The loss's best COMPLETE search trial, or None."""
    complete = [t for t in optuna_trials(storage, f"{cfg.name}.{loss}") if t.state == optuna.trial.TrialState.COMPLETE]
    return max(complete, key=lambda t: t.value, default=None)


def final_specs(
    cfg: StudyConfig,
    storage: optuna.storages.BaseStorage,
    space: SearchSpace,
    tracker: Tracker,
    view: ProgressView,
) -> list[TrialSpec]:
    """The loss's final runs and ablations still to train: its best search trial's point retrained
    with each seed on every training class (``final.train_on: all``) or on each fold's, tested once;
    and, with ``ablations``, that point with one claim's factor changed (:func:`ablation_specs`).
    Runs of an earlier best (a better trial appeared on resume) are tagged stale."""
    say = view.say
    best = best_trial(storage, cfg, space.loss)
    if best is None or not cfg.final.seeds:
        say(f"final {space.loss}: " + ("no complete search trial, skipped" if cfg.final.seeds else "off"))
        view.plan(space.loss, Stage.FINAL, 0)
        view.plan(space.loss, Stage.ABLATION, 0)
        return []
    stale = tracker.supersede(space.loss, best.number)
    if stale:
        say(f"final {space.loss}: {len(stale)} runs of an earlier best trial superseded (tagged stale)")
    seeds = final_seeds(cfg)
    specs = [final_spec(cfg, space, best.number, best.params, seed, fold) for seed in seeds for fold in _folds(cfg)]
    todo = [s for s in specs if state_of(tracker, s.key) != State.COMPLETE]
    say(f"final {space.loss}: best trial {best.number}, {len(todo)} of {len(specs)} runs to train")
    view.plan(space.loss, Stage.FINAL, len(specs), len(specs) - len(todo))
    return todo + ablation_specs(cfg, space, best, tracker, view)


def ablation_specs(
    cfg: StudyConfig, space: SearchSpace, best: optuna.trial.FrozenTrial, tracker: Tracker, view: ProgressView
) -> list[TrialSpec]:
    """Each claim about the loss (:func:`study.claims.claims_for`) as its second arm: the best point
    with the claim's factor changed, trained with every final seed on all training classes and
    tested once; the final runs (same seeds) are the first arm."""
    claims, why = ablation_plan(
        space.loss, space.params, ablations=cfg.ablations, seeds=cfg.final.seeds, train_on=cfg.final.train_on
    )
    if not claims:
        if cfg.ablations and cfg.final.train_on != "all":
            view.say(f"ablations {space.loss}: skipped ({why})")
        view.plan(space.loss, Stage.ABLATION, 0)
        return []
    seeds = final_seeds(cfg)
    specs = [ablation_spec(cfg, space, best.number, best.params, claim, seed) for claim in claims for seed in seeds]
    todo = [s for s in specs if state_of(tracker, s.key) != State.COMPLETE]
    view.say(f"ablations {space.loss}: {why}; {len(todo)} of {len(specs)} runs to train")
    view.plan(space.loss, Stage.ABLATION, len(specs), len(specs) - len(todo))
    return todo


def plan_progress(cfg: StudyConfig, spaces: dict[str, SearchSpace], view: ProgressView) -> None:
    """Every loss's runs as the study file plans them, so that the totals are known from the start;
    a loss's search (:func:`_searcher`) and final stage (:func:`final_specs`) correct them for a
    resumed study and for a final stage that is skipped."""
    final_epochs = cfg.final.epochs or cfg.train.epochs
    for loss, space in spaces.items():
        claims, _ = ablation_plan(
            loss, space.params, ablations=cfg.ablations, seeds=cfg.final.seeds, train_on=cfg.final.train_on
        )
        view.plan(loss, Stage.SEARCH, cfg.search.trials_per_loss, epochs=cfg.train.epochs)
        view.plan(loss, Stage.FINAL, cfg.final.seeds * len(_folds(cfg)), epochs=final_epochs)
        view.plan(loss, Stage.ABLATION, len(claims) * cfg.final.seeds, epochs=final_epochs)


def search_and_final(
    cfg: StudyConfig,
    spaces: dict[str, SearchSpace],
    tracker: TrackingWriter,
    view: ProgressView,
    slots: int,
    verbose: bool = False,
) -> None:
    """Every loss's search and final stage in one Ray Tune run (:mod:`study.schedule`), then the
    fold ensembles; at most ``search.max_concurrent_total`` trials at once, default ``slots`` (what the
    cluster holds). Ray Tune prints nothing of its own unless ``verbose``: ``view`` shows the run."""
    say = view.say
    storage = optuna_storage(cfg)
    searches = {loss: _searcher(cfg, storage, space, tracker, view) for loss, space in spaces.items()}
    schedule = StudySchedule(
        searches, lambda loss: final_specs(cfg, storage, spaces[loss], tracker, view), cfg.search.max_concurrent
    )
    limit = cfg.search.max_concurrent_total or slots
    say(cluster_line(slots, limit, schedule.search_width, cfg.search.max_concurrent))
    scheduler = PerLossASHA(lambda: loss_asha(cfg))
    trainable = tune.with_resources(
        tune.with_parameters(worker.run_spec, cfg=without_secrets(cfg), storage=cfg.storage),
        {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu},
    )
    if not verbose:
        # Ray Tune's output engine prints its "Configuration for experiment" box, the results folder
        # and a TensorBoard hint even at verbose=0; the legacy engine prints nothing at verbose=0.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Of Ray Tune's per-result files, only result.json (each trial's results, for a look into its folder):
    # MLflow holds the study's record; its CSV and TensorBoard files would cost the driver at every result
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    baseline = Baseline(cfg, tracker, say, schedule)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=cfg.search.objective,
            mode="max",
            search_alg=schedule,
            scheduler=scheduler,
            num_samples=-1,  # until the schedule says it is finished
            # also how many trials Ray Tune starts workers for at once: without a limit it starts one
            # worker at a time (one pending trial for a custom searcher), however large the cluster
            max_concurrent_trials=limit,
            reuse_actors=cfg.search.reuse_actors,
            trial_dirname_creator=lambda trial: trial.config[SPEC].key.run_name,
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=cfg.storage.child(RAY_RESULTS).root,
            storage_filesystem=cfg.storage.fs,
            verbose=1 if verbose else 0,  # 1: Ray Tune's own status table every 30 s
            stop=StopOnError(schedule),
            callbacks=[
                baseline,
                TrackingCallback(tracker, cfg, spaces),
                ProgressCallback(view, cfg.search.objective),
                JsonLoggerCallback(),
            ],
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_retries, fail_fast=False),
        ),
    )
    tuner.fit()  # Ctrl-C: Ray Tune stops its trials (each keeps its last epoch's checkpoint) and returns
    tracker.flush()  # the callback's queued writes (and checkpoint deletions) are done before going on
    if schedule.finished:
        baseline.start()  # where no slot was left idle (one slot, say)
        baseline.wait()
    baseline.cancel()
    if schedule.error is not None:
        raise schedule.error
    if not schedule.finished:
        raise StudyInterrupted
    for loss in spaces:
        # A pruned trial's worker may still write one more epoch after the callback deleted its folder.
        for trial in optuna_trials(storage, f"{cfg.name}.{loss}"):
            if trial.state.is_finished():
                checkpoint_dir(cfg.storage, TrialKey.search(loss, trial.number)).delete()
        best = best_trial(storage, cfg, loss)
        if cfg.final.train_on == "folds" and cfg.final.seeds and best is not None:
            for seed in final_seeds(cfg):
                ensemble(cfg, loss, best.number, seed, _folds(cfg), tracker, say)


def state_of(tracker: Tracker, key: TrialKey) -> str | None:
    """The state MLflow holds for run ``key``; None if it has no run."""
    run = tracker.find_trial(str(key))
    return None if run is None else run.data.tags.get(TAG_STATE)


def _task(cfg: StudyConfig, function):
    """``function`` as a Ray task with a trial's resources (the driver may have no GPU)."""
    return ray.remote(function).options(num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu)


def ensemble(cfg: StudyConfig, loss: str, number: int, seed: int, folds: list[int], tracker: Tracker, say: Say) -> None:
    """Seed ``seed``'s fold models (retraining search trial ``number``) as one ensemble, evaluated on a
    worker and logged as its own run."""
    key = TrialKey.ensemble(loss, number, seed)
    if state_of(tracker, key) == State.COMPLETE:
        return
    result = ray.get(_task(cfg, worker.ensemble).remote(cfg.storage, loss, number, seed, folds))
    if isinstance(result, str):
        say(f"  {key}: {result}, no ensemble")
        return
    tracker.start_trial(str(key), loss, Stage.ENSEMBLE, {"seed": seed, "folds": len(folds)}, key.run_name)
    tracker.log_metrics(str(key), result, step=0)
    tracker.end_trial(str(key), State.COMPLETE)
    name = as_test_name(cfg.search.objective)
    say(f"  {key}: {name}={result[name]:.4f}")


def close_finished_runs(
    tracker: Tracker, cfg: StudyConfig, loss: str, finished: list[optuna.trial.FrozenTrial]
) -> None:
    """A driver killed between telling Optuna and MLflow leaves a finished trial's run RUNNING:
    log the epochs its checkpoint holds and end the run with Optuna's state."""
    for trial in finished:
        key = TrialKey.search(loss, trial.number)
        run = tracker.find_trial(str(key))
        if run is None or run.info.status != "RUNNING":
            continue
        tracker.start_trial(str(key), loss, Stage.SEARCH, {}, run.info.run_name)
        from study.train import load_state  # only here: the training code stays off the driver (study.worker)

        state = load_state(checkpoint_dir(cfg.storage, key))
        for result in state["history"] if state else []:
            tracker.log_metrics(str(key), result_metrics(result), step=int(result["epoch"]))
        tracker.end_trial(str(key), State(trial.state.name))


class Baseline(DriverOnly, tune.Callback):
    """The untrained network's validation metrics (mean over folds) and test metrics (``test_<metric>``),
    a Ray task with a trial's resources, logged once it returns; looked at each step of Ray Tune's loop.
    Nothing waits for it, so it takes a slot only once ``schedule`` has had one it could not fill
    (:attr:`StudySchedule.left_a_slot_idle`: at the latest, when the last trials run), or after the Tune
    run: started with the trials, it held back a trial, and with it every trial after it on that slot.
    Its failure stops the study through ``schedule``: an unreadable image as :class:`UnreadableImageError`,
    naming it (every trial reads the images first, and stops the study the same way:
    :func:`study.worker.run_spec`)."""

    def __init__(self, cfg: StudyConfig, tracker: Tracker, say: Say, schedule: StudySchedule):
        self.cfg, self.tracker, self.say, self.schedule = cfg, tracker, say, schedule
        self.todo = state_of(tracker, TrialKey.baseline()) != State.COMPLETE
        self.task = None

    def on_step_begin(self, iteration, trials, **info):
        if self.schedule.left_a_slot_idle:
            self.start()
        if self.task is not None and ray.wait([self.task], timeout=0)[0]:
            self.wait()

    def start(self) -> None:
        """Start its task, unless it has started or is done."""
        if self.todo and self.task is None:
            self.task = _task(self.cfg, worker.untrained).remote(without_secrets(self.cfg))

    def wait(self) -> None:
        """Log the baseline once its task has returned (waiting for it); a failure stops the study."""
        if self.task is None:
            return
        task, self.task, self.todo = self.task, None, False
        try:
            val, test = ray.get(task)
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)
            self.schedule.stop(cause if isinstance(cause, UnreadableImageError) else exc)
            return
        cfg, key = self.cfg, TrialKey.baseline()
        public = cfg.public_dump()  # what shaped the untrained network's numbers, credentials redacted
        settings = {section: public[section] for section in ("train", "model", "dataset", "resources")}
        settings["trial"] = {"seed": cfg.seed}
        self.tracker.start_trial(str(key), "untrained", Stage.BASELINE, {}, "untrained", settings=settings)
        self.tracker.log_metrics(str(key), val | as_test(test), step=0)
        self.tracker.end_trial(str(key), State.COMPLETE)
        self.say(f"untrained baseline: {cfg.search.objective}={val[cfg.search.objective]:.4f}")

    def cancel(self) -> None:
        if self.task is not None:
            ray.cancel(self.task)
            self.task = None


def run_study(
    cfg: StudyConfig, resume: bool = False, verbose: bool = False, console: Console | None = None
) -> StudyTracker:
    """Run every stage of the study; the study folder gets config.yaml, the Optuna journal,
    checkpoints and Ray results. With ``resume`` the study in that folder continues: finished trials
    are kept, unfinished ones go on from their last epoch, and the parent MLflow run is reused.

    Its progress goes to ``console`` (default: stdout; :class:`~study.progress_view.ProgressView`);
    Ray's own output (its status tables, the workers' lines) only with ``verbose``."""
    spaces = search_spaces(cfg)
    view = ProgressView(StudyProgress(cfg.search.objective, list(spaces)), console)
    plan_progress(cfg, spaces, view)
    with view:
        return _run_study(cfg, spaces, view, resume, verbose)


def _run_study(
    cfg: StudyConfig, spaces: dict[str, SearchSpace], view: ProgressView, resume: bool, verbose: bool
) -> StudyTracker:
    say, storage = view.say, cfg.storage
    init_ray(verbose)  # before anything is written: a wrong cluster address leaves no trace
    slots = cluster_slots(cfg)  # ... nor a trial no node can hold
    uri = resolve_tracking_uri(cfg.tracking.uri)
    tracker = StudyTracker(cfg.name, uri)
    if resume:
        repair_optuna_journal(cfg, say)
        tracker.resume(storage.child(PARENT_RUN_FILE).read_text().strip())
    else:
        storage.fs.create_dir(storage.root, recursive=True)
        config = cfg.public_dump()  # credentials redacted: the file and MLflow never see them
        storage.child(CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        storage.child(PARENT_RUN_FILE).write_text(tracker.start(config, cfg.search.objective))
    # from here on every MLflow call goes through one writer thread, off Ray Tune's event loop
    writer = TrackingWriter(tracker, uri)
    status = "FAILED"
    try:
        writer.log_search_spaces({loss: space.dump() for loss, space in spaces.items()})
        search_and_final(cfg, spaces, writer, view, slots, verbose)
        status = "FINISHED"
    except (KeyboardInterrupt, StudyInterrupted):  # Ctrl-C in a Ray task, or during the Tune run
        status = "KILLED"
        raise StudyInterrupted from None
    finally:
        # everything queued reaches MLflow before the parent run ends; a failed write (TrackingError)
        # is raised here instead, leaving the parent RUNNING for `resume`
        writer.close()
        tracker.finish(status)
    return tracker
