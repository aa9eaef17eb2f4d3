"""Read studies back from MLflow into tidy pandas frames (never imports torch).

:func:`load_runs`: one row per trial run and stage (baseline, search, final, ensemble, ablation) of one or
several studies, with the loss, every hyperparameter (``param.<name>``), every metric's last value,
state, wall time and resources. :func:`load_history`: every metric at every epoch, one row each.

The rules every table, figure and check shares live here too: :func:`complete_search` and
:func:`best_trial` (which trial is a loss's best), :func:`loss_metrics` (which metrics a loss reports
about itself) and :func:`is_log_scale` (which hyperparameters were searched on a log scale).

Metric columns follow the runs' naming (:mod:`analysis.names`): a search trial's ``map_at_r`` is its
validation score, a final, ablation or ensemble run's ``test_map_at_r`` its test score; the baseline
has both. Parameter columns are typed as the search space sampled them (:func:`typed_params`).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from analysis.names import as_test_name, is_retrieval
from study.tracking import (
    TAG_ARM,
    TAG_CLAIM,
    TAG_LOG_PARAMS,
    TAG_LOSS,
    TAG_LOSS_LR,
    TAG_LR,
    TAG_MACHINE,
    TAG_OBJECTIVE,
    TAG_STAGE,
    TAG_STALE,
    TAG_STATE,
    TAG_TRIAL,
    TAG_TRIAL_METRICS,
    find_parent,
)
from study.vocab import SEARCH_SPACES_ARTIFACT, Stage, State

LOG_RANGE = 100  # without the log_params tag: positive values spanning this factor are taken as log-scaled
_TESTED = (Stage.FINAL, Stage.ABLATION, Stage.ENSEMBLE)  # the stages whose runs are tested once


def load_runs(studies: str | list[str], tracking_uri: str | None = None, stale: bool = False) -> pd.DataFrame:
    """One row per child run of each study's latest parent run; final runs and ensembles superseded by
    a better search trial (tagged stale on resume) only with ``stale``.

    Columns: ``study``, ``dataset``, ``objective``, ``mode`` (finetune / features), ``run_id``,
    ``run_name``, ``trial`` (the trial key), ``loss``, ``stage``, ``state`` (RUNNING until the trial ended),
    ``claim`` and ``arm`` (an ablation run's claim id, ``study.claims``, and which arm it is, "paper" or
    "alternative"; None on every other run),
    ``wall_seconds``, ``lr`` and ``loss_lr`` (the learning rates it trained with: backbone and the loss's
    own parameters, NaN for a loss without parameters), ``trial_metrics`` and ``log_params`` (comma-separated:
    the loss's own trial metrics, the hyperparameters searched on a log scale; None for runs logged before
    those tags), ``machine`` (JSON: the machine the trial trained on, :mod:`study.machine`; None before
    that tag and for the untrained baseline),
    ``cpu``, ``gpu`` (per trial), ``cpu_hours``, ``gpu_hours``, one column per metric (its last
    value: ``test_<metric>`` on the test classes, see :mod:`analysis.names`) and one ``param.<name>``
    column per hyperparameter, typed as it was sampled (:func:`typed_params`: floats, nullable
    integers and booleans, text), so that ``runs.plot.scatter(x="param.alpha", y="map_at_r")`` works;
    the runs' settings, params named ``<section>.<key>``, are left out: the parent run's config has them.
    One MLflow query per study for its runs, one download for its search spaces.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    frames = []
    for name in [studies] if isinstance(studies, str) else studies:
        parent = find_parent(client, name)
        spaces = _search_spaces(client, parent.info.run_id)
        p = parent.data.params
        children = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
            max_results=50_000,
        )
        rows = [
            {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "trial": run.data.tags.get(TAG_TRIAL),
                "loss": run.data.tags.get(TAG_LOSS),
                "stage": run.data.tags.get(TAG_STAGE),
                "state": run.data.tags.get(TAG_STATE, State.RUNNING),
                "claim": run.data.tags.get(TAG_CLAIM),
                "arm": run.data.tags.get(TAG_ARM),
                "wall_seconds": ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000,
                "lr": float(run.data.tags.get(TAG_LR, "nan")),
                "loss_lr": float(run.data.tags.get(TAG_LOSS_LR, "nan")),
                "trial_metrics": run.data.tags.get(TAG_TRIAL_METRICS),
                "log_params": run.data.tags.get(TAG_LOG_PARAMS),
                "machine": run.data.tags.get(TAG_MACHINE),
                **run.data.metrics,
                # hyperparameters only: a dotted param is one of the run's settings (``train.lr``,
                # ``model.backbone``: study.tracking.setting_params); a searched one is also a bare param
                **{f"param.{k}": v for k, v in run.data.params.items() if "." not in k},
            }
            for run in children
            if stale or TAG_STALE not in run.data.tags
        ]
        frame = _legacy_test_names(pd.DataFrame(rows))
        if spaces and "loss" in frame:  # the space's word on log scales where a run lacks the tag
            from_space = frame["loss"].map({loss: _log_names(space) for loss, space in spaces.items()})
            frame["log_params"] = frame["log_params"].where(frame["log_params"].notna(), from_space)
        frame = typed_params(frame, spaces)
        frame.insert(0, "study", name)
        frame.insert(1, "dataset", p.get("dataset.name", ""))
        frame.insert(2, "objective", parent.data.tags[TAG_OBJECTIVE])
        frame.insert(3, "mode", p.get("train.mode", "finetune"))  # feature mode is labelled in every table
        frame["cpu"] = float(p.get("resources.cpu", 1))
        frame["gpu"] = float(p.get("resources.gpu", 0))
        frame["cpu_hours"] = frame["wall_seconds"] * frame["cpu"] / 3600
        frame["gpu_hours"] = frame["wall_seconds"] * frame["gpu"] / 3600
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _search_spaces(client: MlflowClient, parent_id: str) -> dict | None:
    """The study's search spaces (``SEARCH_SPACES_ARTIFACT`` on its parent run), or None without it."""
    if SEARCH_SPACES_ARTIFACT not in {a.path for a in client.list_artifacts(parent_id)}:
        return None
    with tempfile.TemporaryDirectory() as folder:
        return json.loads(Path(client.download_artifacts(parent_id, SEARCH_SPACES_ARTIFACT, folder)).read_text())


def load_search_spaces(name: str, tracking_uri: str | None = None) -> dict | None:
    """Study ``name``'s search spaces as logged on its parent run, ``{loss: {param: spec}}`` (a spec:
    ``study.search_space.Param`` as JSON), or None for a study logged before they were."""
    client = MlflowClient(tracking_uri=tracking_uri)
    return _search_spaces(client, find_parent(client, name).info.run_id)


def _log_names(space: dict | None) -> str | None:
    """A space's log-scale parameters as the ``log_params`` tag spells them; None without the space."""
    return None if space is None else ",".join(n for n, spec in space.items() if spec.get("log"))


_INT = re.compile(r"[+-]?\d+")
_BOOLS = {"True": True, "False": False, "true": True, "false": False}


def _kind(specs: list[dict]) -> str | None:
    """The dtype kind of a hyperparameter from its specs in the losses' spaces: "float", "int", "bool",
    or None (text, or spaces that disagree: parsed from the values instead)."""
    kinds = set()
    for spec in specs:
        if spec.get("type") in ("float", "int"):
            kinds.add(spec["type"])
        else:  # a categorical is typed like its choices
            choices = spec.get("choices") or []
            if choices and all(isinstance(c, bool) for c in choices):
                kinds.add("bool")
            elif choices and all(isinstance(c, int) and not isinstance(c, bool) for c in choices):
                kinds.add("int")
            elif choices and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
                kinds.add("float")
            else:
                return None
    if kinds == {"int", "float"}:  # one name, an int in one loss's space and a float in another's
        return "float"
    return kinds.pop() if len(kinds) == 1 else None


def _parsed_kind(values: pd.Series) -> str | None:
    """The kind MLflow's text says, for a parameter no space describes: every value an integer, a
    number, or True/False; else None (text)."""
    text = values.dropna().astype(str)
    if text.empty:
        return None
    if text.map(lambda v: bool(_INT.fullmatch(v))).all():
        return "int"
    if pd.to_numeric(text, errors="coerce").notna().all():
        return "float"
    return "bool" if text.isin(list(_BOOLS)).all() else None


def _as_kind(values: pd.Series, kind: str | None) -> pd.Series:
    """``values`` (MLflow's text) as ``kind``; unchanged where a value does not fit it."""
    if kind is None:
        return values
    text = values.astype(object).where(values.notna(), None)
    if kind == "bool":
        mapped = text.map(lambda v: v if v is None else _BOOLS.get(str(v), "?"))
        return values if (mapped == "?").any() else mapped.astype("boolean")
    numbers = pd.to_numeric(text, errors="coerce")
    if (numbers.isna() & text.notna()).any():
        return values
    if kind == "int" and (numbers.dropna() % 1 == 0).all():
        return numbers.astype("Int64")
    return numbers.astype(float)


def typed_params(runs: pd.DataFrame, spaces: dict | None = None) -> pd.DataFrame:
    """``runs`` with each ``param.<name>`` column typed as it was sampled: floats as ``float64``, ints
    as ``Int64`` and booleans as ``boolean`` (nullable: a loss without the hyperparameter leaves it
    empty), text as text. The type comes from ``spaces`` (the study's search spaces,
    ``{loss: {param: spec}}``) where they describe the hyperparameter; else (seed, fold, a study logged
    before the spaces were) from its values: every one an integer, a number, or True/False."""
    runs = runs.copy()
    for column in [c for c in runs.columns if c.startswith("param.")]:
        name = column.removeprefix("param.")
        specs = [space[name] for space in (spaces or {}).values() if name in space]
        kind = _kind(specs) if specs else None
        runs[column] = _as_kind(runs[column], kind if specs and kind else _parsed_kind(runs[column]))
    return runs


def _legacy_test_names(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs logged before test metrics were ``test_<metric>`` (a final, ablation or ensemble run with a
    retrieval metric but no ``test_`` one) get their test scores renamed so: one naming in every frame."""
    if "stage" not in runs:
        return runs
    plain = [c for c in runs.columns if is_retrieval(c)]
    tested = [c for c in runs.columns if c.startswith("test_") and is_retrieval(c.removeprefix("test_"))]
    old = runs["stage"].isin(_TESTED) & runs[plain].notna().any(axis=1)
    if tested:
        old &= runs[tested].isna().all(axis=1)
    if not old.any():
        return runs
    runs = runs.copy()
    for column in plain:
        runs.loc[old, as_test_name(column)] = runs.loc[old, column]
        runs.loc[old, column] = np.nan
    return runs


def load_history(runs: pd.DataFrame, tracking_uri: str | None = None) -> pd.DataFrame:
    """Every metric of every run at every epoch: columns ``run_id``, ``study``, ``loss``, ``stage``,
    ``trial``, ``epoch`` (MLflow's step), ``metric``, ``value``."""
    client = MlflowClient(tracking_uri=tracking_uri)
    metric_columns = [c for c in runs.columns if c not in _NOT_METRICS and not c.startswith("param.")]
    rows = []
    for run in runs.itertuples(index=False):
        for metric in metric_columns:
            if pd.isna(getattr(run, metric, float("nan"))):
                continue
            for m in client.get_metric_history(run.run_id, metric):
                rows.append((run.run_id, run.study, run.loss, run.stage, run.trial, m.step, metric, m.value))
    columns = ["run_id", "study", "loss", "stage", "trial", "epoch", "metric", "value"]
    return pd.DataFrame(rows, columns=columns).sort_values(["run_id", "metric", "epoch"], ignore_index=True)


def load_parent_config(name: str, tracking_uri: str | None = None) -> dict:
    """The study's resolved configuration, as logged on its parent run (``config.json``)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = find_parent(client, name)
    with tempfile.TemporaryDirectory() as folder:
        return json.loads(Path(client.download_artifacts(parent.info.run_id, "config.json", folder)).read_text())


def complete_search(runs: pd.DataFrame, loss: str | None = None, objective: str | None = None) -> pd.DataFrame:
    """The COMPLETE search trials (of ``loss`` when given), in frame order; with ``objective``, only
    those with a finite value of it. A pruned trial's objective is from an earlier epoch: never compared."""
    keep = (runs["stage"] == Stage.SEARCH) & (runs["state"] == State.COMPLETE)
    if loss is not None:
        keep &= runs["loss"] == loss
    if objective is not None:
        keep &= np.isfinite(pd.to_numeric(runs[objective], errors="coerce").astype(float))
    return runs[keep]


def best_trial(runs: pd.DataFrame, loss: str, objective: str) -> pd.Series | None:
    """The best trial of ``loss``: its COMPLETE search trial with the highest finite ``objective``
    (ties: the first in frame order), or None when it has none. Every table and figure picks it so."""
    done = complete_search(runs, loss, objective)
    if done.empty:
        return None
    return done.iloc[int(np.argmax(pd.to_numeric(done[objective]).to_numpy(float)))]


def _names(text) -> set[str]:
    """The names of a comma-separated tag value ("" or NaN: none)."""
    return {name.strip() for name in str(text).split(",") if name.strip()} if pd.notna(text) else set()


def loss_metrics(runs: pd.DataFrame) -> list[str]:
    """The metrics the runs' losses report about their own parameters (``trial_metrics()``: SoftTriple's
    effective centers, Proxy Anchor's proxy correlation), as the ``trial_metrics`` column lists them:
    their union, sorted; empty without the column."""
    if "trial_metrics" not in runs:
        return []
    return sorted(set().union(*map(_names, runs["trial_metrics"])))


def is_log_scale(runs: pd.DataFrame, param: str, values) -> bool:
    """Whether hyperparameter ``param`` (``alpha`` or ``param.alpha``) was searched on a log scale.

    ``runs`` are the trials it was searched in (one loss's): True when any of them lists ``param`` in its
    ``log_params`` column (the search space says so), whatever range ``values`` span. Runs logged before
    that tag (the column absent or None in every run) fall back to the data: ``values`` are numbers,
    none negative, and the positive ones span ≥ ``LOG_RANGE``×. A caller that takes logarithms must
    still handle a 0 among the values (a log-scale weight with 0 allowed: "off")."""
    tagged = runs["log_params"].dropna() if "log_params" in runs else []
    if len(tagged):  # the search space's word, even "none of them" (an empty tag)
        return any(param.removeprefix("param.") in _names(names) for names in tagged)
    numbers = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(float)
    positive = numbers[numbers > 0]
    return bool(
        len(positive)
        and np.isfinite(numbers).all()
        and numbers.min() >= 0
        and positive.max() / positive.min() >= LOG_RANGE
    )


_NOT_METRICS = {
    "study", "dataset", "objective", "mode", "run_id", "run_name", "trial", "loss", "stage", "state", "claim", "arm",
    "wall_seconds", "cpu", "gpu", "cpu_hours", "gpu_hours", "lr", "loss_lr", "trial_metrics", "log_params",
    "machine",
}  # fmt: skip
