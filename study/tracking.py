"""MLflow tracking from the driver: one parent run per study, one child run per trial.

Only this module (and ``analysis``) talks to MLflow. Runs are found again by
tags, so logging the same trial twice never creates a second run. The tag
names below are the contract with ``analysis``.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME, MLFLOW_USER
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from pydantic import SecretStr

from study import package_version
from study.redaction import redact, redact_text
from study.vocab import MODEL_ARTIFACT, SEARCH_SPACES_ARTIFACT, Stage, State, TrialKey

TAG_ROLE = "dml_study.role"  # "study" on the parent, "trial" on children
TAG_STUDY = "dml_study.study"
TAG_OBJECTIVE = "dml_study.objective"
# on the parent: what produced the study and on what, to tell studies apart in the MLflow UI
TAG_VERSION = "dml_study.version"  # the installed dml-study package's version
TAG_DATASET = "dml_study.dataset"
TAG_BACKBONE = "dml_study.backbone"
TAG_BEST_LOSS = "dml_study.best_loss"  # on the parent once the final stage ran: the loss with the best test objective
TAG_TRIAL = "dml_study.trial"  # unique trial key within a study
TAG_LOSS = "dml_study.loss"
TAG_STAGE = "dml_study.stage"  # a study.vocab.Stage
TAG_STATE = "dml_study.state"  # a study.vocab.State (COMPLETE, PRUNED or FAIL once ended)
TAG_ERROR = "dml_study.error"
TAG_STALE = "dml_study.stale"  # on final runs and ensembles of a search trial no longer the loss's best
TAG_CLAIM = "dml_study.claim"  # on ablation runs: the claim's id (study.claims)
TAG_ARM = "dml_study.arm"  # on ablation runs: "paper" or "alternative", the arm this run is
TAG_MODEL = "dml_study.model"  # on the one final run per loss that keeps its network: the artifact's name
# the learning rates a trial trained with (backbone, and the loss's own parameters): searched or the study's
TAG_LR = "dml_study.lr"
TAG_LOSS_LR = "dml_study.loss_lr"
# comma-separated: the metrics the loss reports about itself (its registration), and the searched
# hyperparameters sampled on a log scale (its search space) — what analysis needs without importing torch
TAG_TRIAL_METRICS = "dml_study.trial_metrics"
TAG_LOG_PARAMS = "dml_study.log_params"
# JSON: the machine the trial trained on (host, CPU, GPUs, driver, library versions; study.machine)
TAG_MACHINE = "dml_study.machine"

_STATUS = {State.COMPLETE: RunStatus.FINISHED, State.PRUNED: RunStatus.KILLED, State.FAIL: RunStatus.FAILED}


def resolve_tracking_uri(config_uri: SecretStr | str | None, command_line: str | None = None) -> str | None:
    """The MLflow tracking URI: the command line's (``--tracking-uri``), else ``MLFLOW_TRACKING_URI``,
    else the study config's (``tracking.uri``), else None (MLflow's default).

    The nearer a setting is to this one invocation, the more it wins: a study file is shared and
    committed, the environment is the machine's or the job's, the command line is this run's."""
    if isinstance(config_uri, SecretStr):
        config_uri = config_uri.get_secret_value()
    return command_line or os.environ.get("MLFLOW_TRACKING_URI") or config_uri or None


def check_tracking_server(uri: str | None, timeout: float = 5.0) -> None:
    """For an http(s) tracking URI, ask the server's ``/health``; ConnectionError (one line) if it
    does not answer, so a study fails before anything is scheduled. Other stores need no check."""
    if not uri or urlsplit(uri).scheme not in ("http", "https"):
        return
    try:  # requests sends a URL's user:password@ as basic auth, as MLflow's own client does
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        if response.status_code == 200:
            return
        reason = f"HTTP {response.status_code}"
    except requests.Timeout:
        reason = f"no answer within {timeout:g} s"
    except requests.RequestException as exc:  # its text repeats the URL: the cause's last words suffice
        reason = redact_text(str(exc).rsplit(": ", 1)[-1].strip(" ')\""))
    raise ConnectionError(f"MLflow tracking server {redact(uri)} is unreachable ({reason})")


def _artifact_root(tracking_uri: str | None, name: str) -> str | None:
    """For a SQLite store, artifacts go next to the database file (an absolute folder), not to
    ``./mlruns`` of whatever folder the driver runs in (a Ray job's is temporary). A tracking
    server chooses its own artifact root."""
    uri = tracking_uri or "sqlite:///mlflow.db"  # MLflow's own default store
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns" / name).as_uri()


class StudyTracker:
    """Logs a study into MLflow experiment ``name``; the parent run is created by ``start``."""

    def __init__(self, name: str, tracking_uri: str | None):
        # MLflow prints each ended run's URL, a tracking URL's credentials included: never
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.name = name
        experiment = self.client.get_experiment_by_name(name)
        self.experiment_id = (
            experiment.experiment_id
            if experiment
            else self.client.create_experiment(name, artifact_location=_artifact_root(tracking_uri, name))
        )
        self.parent_id: str | None = None
        self._runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}  # per trial: the last epoch already in MLflow

    def start(self, config: dict, objective: str) -> str:
        """Create the study's parent run: its config as params and ``config.json``, and tags naming
        what produced it (code commit, user, dml-study version) and on what (dataset, backbone).
        ``config`` is the study's public dump: credentials already redacted."""
        tags = {TAG_ROLE: "study", TAG_STUDY: self.name, TAG_OBJECTIVE: objective, MLFLOW_RUN_NAME: self.name}
        tags |= _context_tags(config)
        run = self.client.create_run(self.experiment_id, tags=tags)
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, _flatten(config))
        self.client.log_text(self.parent_id, json.dumps(config, indent=2, default=str), "config.json")
        return self.parent_id

    def log_search_spaces(self, spaces: dict[str, dict[str, dict]]) -> None:
        """Put every loss's search space (``{loss: {param: definition}}``: :meth:`SearchSpace.dump
        <study.search_space.SearchSpace.dump>`) on the parent run as ``search_spaces.json``, what
        analysis reads to type and scale parameter columns. Written once: a resumed study rewrites it
        only if it is missing (a study begun by an older version) or its spaces changed since."""
        names = {a.path for a in self.client.list_artifacts(self.parent_id)}
        if SEARCH_SPACES_ARTIFACT in names:
            with tempfile.TemporaryDirectory() as folder:
                logged = self.client.download_artifacts(self.parent_id, SEARCH_SPACES_ARTIFACT, folder)
                if json.loads(Path(logged).read_text()) == spaces:
                    return
        self.client.log_text(self.parent_id, json.dumps(spaces, indent=2), SEARCH_SPACES_ARTIFACT)

    def log_headline(self, objective: str, per_loss: dict[str, float]) -> str | None:
        """Put the study's result on its parent run, where the MLflow UI lists and compares studies:
        ``test_<objective>.<loss>`` for each loss's mean test objective over its final runs,
        ``test_<objective>`` for the best loss's, and the tag ``dml_study.best_loss``. Non-finite
        values are left out; returns the best loss, or None when no value is left."""
        values = {loss: float(v) for loss, v in per_loss.items() if math.isfinite(float(v))}
        if not values:
            return None
        best = max(values, key=values.__getitem__)  # ties: the first given
        now = int(time.time() * 1000)
        metrics = [Metric(f"test_{objective}.{loss}", v, now, 0) for loss, v in values.items()]
        metrics.append(Metric(f"test_{objective}", values[best], now, 0))
        self.client.log_batch(self.parent_id, metrics=metrics)
        self.client.set_tag(self.parent_id, TAG_BEST_LOSS, best)
        return best

    def resume(self, parent_id: str) -> None:
        """Continue the study's existing parent run (after its driver died)."""
        self.parent_id = parent_id
        self.client.update_run(parent_id, status="RUNNING")

    def find_trial(self, key: str):
        """The child run of trial ``key`` (found by its tag), or None."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_TRIAL}` = '{key}' and tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_id}'",
            max_results=1,
        )
        return found[0] if found else None

    def finish(self, status: str = "FINISHED") -> None:
        """End the parent run: FINISHED, FAILED, or KILLED (interrupted; ``resume`` continues it)."""
        self.client.set_terminated(self.parent_id, status)

    def supersede(self, loss: str, best: int) -> list[str]:
        """Tag stale the final runs, ablations and ensembles of ``loss`` that retrain a search trial other than
        ``best`` (a better one was found after they ran, on resume): kept in MLflow, out of every
        table. Returns their keys."""
        stale = []
        for stage in (Stage.FINAL, Stage.ABLATION, Stage.ENSEMBLE):
            runs = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_id}' and tags.`{TAG_LOSS}` = '{loss}' "
                f"and tags.`{TAG_STAGE}` = '{stage}'",
                max_results=10_000,
            )
            for run in runs:
                key = run.data.tags[TAG_TRIAL]
                if TrialKey.parse(key).number != best and TAG_STALE not in run.data.tags:
                    self.client.set_tag(run.info.run_id, TAG_STALE, f"superseded by {loss}/{best}")
                    stale.append(key)
        return stale

    def start_trial(
        self,
        key: str,
        loss: str,
        stage: str,
        params: dict,
        run_name: str,
        config: dict | None = None,
        tags: dict[str, str] | None = None,
        settings: dict[str, dict] | None = None,
    ) -> str:
        """The child run of trial ``key``: found by its tag if it exists, else created.

        ``params`` are the sampled hyperparameters (MLflow params under their own, dot-free names);
        ``settings``, every setting that shaped the run by section (``{"train": {"lr": …}, …}``), are
        params too, named ``<section>.<key>`` (:func:`setting_params`): a dot never appears in a
        hyperparameter's name, so the two cannot collide. ``config``, the trial's fully resolved
        settings, is stored as the run's ``config.json`` artifact; ``tags`` are added to the run's own.
        A run found again (a resumed study) gets only the params it lacks: MLflow refuses to change one.
        """
        if key in self._runs:
            return self._runs[key]
        dotted = [name for name in params if "." in name]
        if dotted:
            raise ValueError(f"{key}: hyperparameter names must not contain a dot (kept for settings): {dotted}")
        params = {**{k: str(v) for k, v in params.items()}, **setting_params(settings or {})}
        found = self.find_trial(key)
        if found:  # logged by an earlier driver of this study: never a second run, no epoch twice
            run_id = found.info.run_id
            # every metric's history: a final run logs its test metrics at the last epoch only
            steps = [m.step for name in found.data.metrics for m in self.client.get_metric_history(run_id, name)]
            self._last_step[key] = max(steps, default=-1)
            # a run logged by an older version lacks its settings; one logged already keeps its values
            self._log_params(run_id, {k: v for k, v in params.items() if k not in found.data.params})
        else:
            tags = {
                MLFLOW_PARENT_RUN_ID: self.parent_id,
                MLFLOW_RUN_NAME: run_name,
                TAG_ROLE: "trial",
                TAG_STUDY: self.name,
                TAG_TRIAL: key,
                TAG_LOSS: loss,
                TAG_STAGE: stage,
                **(tags or {}),
            }
            run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
            self._log_params(run_id, params)
            if config is not None:
                self.client.log_text(run_id, json.dumps(config, indent=2), "config.json")
        self._runs[key] = run_id
        return run_id

    def _log_params(self, run_id: str, params: dict) -> None:
        """Log ``params`` (values as text, cut to MLflow's longest) in batches MLflow accepts."""
        items = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, key: str, values: dict, step: int) -> None:
        """Log trial ``key``'s numbers of epoch ``step``, timed now."""
        self.log_results([(key, values, step, int(time.time() * 1000))])

    def log_results(self, results: list[tuple[str, dict, int, int]]) -> None:
        """Log ``(key, values, step, timestamp)`` results of one or more trials with one ``log_batch``
        per run (split at MLflow's limit of metrics per batch): one database commit for several of a
        run's epochs. An epoch MLflow already holds (a resumed trial re-reports its checkpoint's) is
        skipped."""
        batches: dict[str, list[Metric]] = {}
        for key, values, step, timestamp in results:
            if step <= self._last_step.get(key, -1):
                continue
            batch = batches.setdefault(key, [])
            batch += [Metric(k, float(v), timestamp, step) for k, v in values.items() if isinstance(v, (int, float))]
            self._last_step[key] = step
        for key, metrics in batches.items():
            for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self._runs[key], metrics=metrics[start : start + MAX_METRICS_PER_BATCH])

    def set_tag(self, key: str, name: str, value: str) -> None:
        self.client.set_tag(self._runs[key], name, value)

    def after_logged(self, action) -> None:
        """Run ``action`` now: this tracker writes synchronously, so what was logged before is in MLflow
        (the :class:`~study.tracking_writer.TrackingWriter` queues it instead)."""
        action()

    def log_file(self, key: str, name: str, data: bytes) -> None:
        """Attach ``data`` to trial ``key``'s run as the artifact ``name``."""
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / name).write_bytes(data)
            self.client.log_artifact(self._runs[key], str(Path(folder) / name))

    def log_model(self, key: str, data: bytes) -> None:
        """Attach a kept network (:mod:`study.models.embedder`) to trial ``key``'s run as ``model.pt``
        and tag the run with it, so :func:`study.reuse.model_run` finds it."""
        self.log_file(key, MODEL_ARTIFACT, data)
        self.client.set_tag(self._runs[key], TAG_MODEL, MODEL_ARTIFACT)

    def end_trial(self, key: str, state: str, error: str | None = None) -> None:
        run_id = self._runs[key]
        self.client.set_tag(run_id, TAG_STATE, state)
        if error:  # the last line (the exception) as a tag, the whole trace as an artifact
            lines = [line for line in error.strip().splitlines() if line.strip()]
            self.client.set_tag(run_id, TAG_ERROR, lines[-1][:4000] if lines else error)
            self.client.log_text(run_id, error, "error.txt")
        self.client.set_terminated(run_id, RunStatus.to_string(_STATUS[state]))


class StudyNotFoundError(LookupError):
    """No study of that name in the tracking store."""


def find_parent(client: MlflowClient, name: str):
    """The latest parent run of study ``name`` (its MLflow experiment)."""
    experiment = client.get_experiment_by_name(name)
    parents = (
        client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{TAG_ROLE}` = 'study'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if experiment
        else []
    )
    if not parents:
        raise StudyNotFoundError(f"no study named {name!r} in the tracking store {client.tracking_uri}")
    return parents[0]


def _context_tags(config: dict) -> dict[str, str]:
    """The parent run's context tags; the ones that cannot be known here (no git checkout, no user
    name in a container) are left out rather than failing the study."""
    tags = {TAG_VERSION: package_version()}
    commit = _git_commit()
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    try:
        tags[MLFLOW_USER] = getpass.getuser()
    except (OSError, KeyError):  # no USER/LOGNAME and a uid without a passwd entry
        pass
    for tag, section, key in ((TAG_DATASET, "dataset", "name"), (TAG_BACKBONE, "model", "backbone")):
        value = (config.get(section) or {}).get(key)
        if value is not None:
            tags[tag] = str(value)
    return tags


def _git_commit() -> str | None:
    """``git rev-parse HEAD`` of the working directory's checkout: the code the driver runs from is
    usually the project's clone. None without git, outside a checkout, or before its first commit."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def setting_params(settings: dict[str, dict]) -> dict[str, str]:
    """A run's settings by section as MLflow params named ``<section>.<key>`` (nested keys dotted
    further: ``dataset.options.num_classes``), values as text (``None`` for a setting left unset, as
    on the parent run), to sort and filter by in the MLflow UI (``params.`train.lr```)."""
    return {k: str(v) for k, v in _flatten(settings).items()}


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
