"""Ray Tune → MLflow, on the driver: every trial of every stage mirrored into its child run.

A trial's run is keyed by its :class:`~study.vocab.TrialKey` (a tag), so a retried or resumed trial
continues its run and no epoch is logged twice. When a trial ends its test embeddings (final stage)
and, for the one final run per loss that keeps it, its network (``model.pt``) are attached to the run,
and its checkpoint folder is deleted.
"""

from __future__ import annotations

from pathlib import Path

from ray import tune

from study.config import StudyConfig, public_dump
from study.losses import declared_trial_metrics, has_parameters, loss_hyperparameters
from study.machine import RESULT_KEY as MACHINE
from study.search_space import SearchSpace
from study.searcher import DriverOnly
from study.spec import SPEC, Outcome, TrialSpec, epoch_results, is_last_word, result_metrics
from study.tracking import TAG_ARM, TAG_CLAIM, TAG_LOG_PARAMS, TAG_LOSS_LR, TAG_LR, TAG_MACHINE, TAG_TRIAL_METRICS
from study.vocab import EMBEDDINGS_ARTIFACT, Stage, State, checkpoint_dir, embeddings_file, model_file


def error_trace(trial) -> str:
    """The traceback Ray Tune kept for an errored ``trial`` (its error file), for the run's error.txt
    and the terminal's failure line."""
    path = Path(trial.error_file) if trial.error_file else None
    return path.read_text() if path and path.is_file() else "the trial raised; Ray kept no trace"


class TrackingCallback(DriverOnly, tune.Callback):
    """Logs each trial of the losses in ``spaces`` to its MLflow child run through ``tracker``
    (a :class:`~study.tracking_writer.TrackingWriter`: it queues the calls and returns at once, so a
    slow tracking server never holds up Tune's event loop). The terminal shows them through
    :class:`~study.progress_callback.ProgressCallback`."""

    def __init__(self, tracker, cfg: StudyConfig, spaces: dict[str, SearchSpace]):
        self.tracker, self.cfg, self.spaces = tracker, cfg, spaces
        self.objective = cfg.search.objective
        # tags every run of a loss carries: its own trial metrics, its log-scale parameters
        self._loss_tags = {
            loss: {
                TAG_TRIAL_METRICS: ",".join(declared_trial_metrics(loss)),
                TAG_LOG_PARAMS: ",".join(name for name, p in space.params.items() if p.log),
            }
            for loss, space in spaces.items()
        }
        self._has_parameters = {loss: has_parameters(loss) for loss in spaces}
        # the study's sections every trial shares, credentials redacted (found by type)
        public = cfg.public_dump()
        self._shared = {section: public[section] for section in ("dataset", "model", "resources")}

    def _start(self, spec: TrialSpec) -> None:
        train = spec.train
        loss_kwargs = {**loss_hyperparameters(spec.loss), **spec.loss_kwargs}
        train_settings = public_dump(train)
        resolved = {
            "loss": spec.loss,
            "loss_params": loss_kwargs,
            "train": train_settings,
            **self._shared,
            "seed": spec.seed,
            "fold": spec.fold,
        }
        # the same as params: ``loss.<kwarg>`` (defaults included), ``train.<key>``, ``model.<key>``, ...
        trial = {"seed": spec.seed} | ({} if spec.fold is None else {"fold": spec.fold})
        settings = {"loss": loss_kwargs, "train": train_settings, **self._shared, "trial": trial}
        tags = {TAG_LR: str(train.lr), **self._loss_tags[spec.loss]}
        if spec.claim:
            tags |= {TAG_CLAIM: spec.claim, TAG_ARM: spec.arm}
        if self._has_parameters[spec.loss]:  # the lr its own parameters (proxies, centers) trained with
            tags[TAG_LOSS_LR] = str(train.lr * train.loss_lr_mult)
        self.tracker.start_trial(
            str(spec.key),
            spec.loss,
            spec.key.stage,
            spec.params,
            spec.key.run_name,
            resolved,
            tags=tags,
            settings=settings,
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        self._start(trial.config[SPEC])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if is_last_word(result):
            return
        key = trial.config[SPEC].key
        if MACHINE in result:  # the worker's machine, sent with a trial's first result
            self.tracker.set_tag(str(key), TAG_MACHINE, result[MACHINE])
        for epoch in epoch_results(result):  # the epochs its worker held back, then its own
            self.tracker.log_metrics(str(key), result_metrics(epoch), step=int(epoch["epoch"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        spec = trial.config[SPEC]
        self._end(spec, Outcome.of(spec, trial.last_result, self.objective))

    def on_trial_error(self, iteration, trials, trial, **info):
        spec = trial.config[SPEC]
        self._start(spec)  # a no-op unless the trial failed before it was reported started
        self._end(spec, Outcome.of(spec, trial.last_result, self.objective, error=error_trace(trial)))

    def _end(self, spec: TrialSpec, outcome: Outcome) -> None:
        if outcome.state is State.RUNNING:  # never trained (an unreadable image): its run goes on at resume
            return
        key, storage = spec.key, self.cfg.storage
        embeddings = embeddings_file(storage, key)
        if key.stage is Stage.FINAL and embeddings.exists():  # for the report's projection of test embeddings
            self.tracker.log_file(str(key), EMBEDDINGS_ARTIFACT, embeddings.read_bytes())
        model = model_file(storage, key)
        if spec.keep_model and outcome.state is State.COMPLETE and model.exists():  # the loss's network, for reuse
            self.tracker.log_model(str(key), model.read_bytes())
        self.tracker.end_trial(str(key), outcome.state, error=outcome.error)
        # a finished trial's checkpoint (weights + optimizer, tens of MB) is not needed any more once
        # its run has ended in MLflow (until then a resumed study recovers its epochs from it), nor the
        # study folder's copy of a kept network (MLflow has it)
        self.tracker.after_logged(checkpoint_dir(storage, key).delete)
        self.tracker.after_logged(model.delete)
