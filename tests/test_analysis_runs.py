"""The shared analysis rules of ``analysis.runs`` on hand-made runs frames: the best trial, the loss
metrics and the scale of a hyperparameter."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.claims import trend
from analysis.hyper import sensitivity
from analysis.runs import _NOT_METRICS, best_trial, complete_search, is_log_scale, loss_metrics
from study.vocab import Stage, State


def _trials(states, scores, loss="ms", **columns) -> pd.DataFrame:
    return pd.DataFrame({"loss": loss, "stage": "search", "state": states, "map_at_r": scores, **columns})


def test_best_trial_is_the_first_complete_search_trial_with_the_highest_finite_objective():
    runs = pd.concat(
        [
            _trials(["COMPLETE", "PRUNED", "COMPLETE", "COMPLETE", "FAIL"], [0.4, 0.9, np.nan, 0.4, np.nan]),
            _trials(["COMPLETE"], [0.95], loss="ns"),
            pd.DataFrame([{"loss": "ms", "stage": "final", "state": "COMPLETE", "map_at_r": 0.99}]),
        ],
        ignore_index=True,
    )
    runs["name"] = [f"r{i}" for i in range(len(runs))]
    best = best_trial(runs, "ms", "map_at_r")
    assert best["name"] == "r0" and best["map_at_r"] == 0.4  # a tie: the first; PRUNED, NaN, other stages ignored
    assert best_trial(runs, "ns", "map_at_r")["name"] == "r5"
    assert best_trial(runs, "other", "map_at_r") is None
    assert list(complete_search(runs, "ms")["name"]) == ["r0", "r2", "r3"]
    assert list(complete_search(runs, "ms", "map_at_r")["name"]) == ["r0", "r3"]
    assert list(complete_search(runs)["name"]) == ["r0", "r2", "r3", "r5"]


def test_best_trial_none_without_a_complete_trial_with_an_objective():
    runs = _trials(["PRUNED", "FAIL", "RUNNING", "COMPLETE"], [0.5, np.nan, 0.6, np.nan])
    assert best_trial(runs, "ms", "map_at_r") is None
    assert best_trial(runs.iloc[:0], "ms", "map_at_r") is None


def test_vocabulary_compares_equal_to_the_logged_strings():
    runs = _trials([State.COMPLETE, "COMPLETE"], [0.1, 0.2]).assign(stage=[Stage.SEARCH, "search"])
    assert best_trial(runs, "ms", "map_at_r")["map_at_r"] == 0.2


def test_loss_metrics_are_the_union_of_the_trial_metrics_column():
    runs = pd.DataFrame({"trial_metrics": ["proxy_abs_cos", "", np.nan, "effective_centers,b", " b , a"]})
    assert loss_metrics(runs) == ["a", "b", "effective_centers", "proxy_abs_cos"]
    assert loss_metrics(pd.DataFrame({"loss": ["ms"]})) == []  # runs logged before the tag
    assert {"trial_metrics", "log_params", "claim", "arm"} <= _NOT_METRICS  # tags, never metrics


def test_is_log_scale_follows_the_tag_whatever_the_range():
    tagged = pd.DataFrame({"log_params": ["alpha,lr", "alpha,lr"]})
    assert is_log_scale(tagged, "alpha", [1.0, 2.0, 4.0])  # < 100x, but searched on a log scale
    assert is_log_scale(tagged, "param.alpha", ["1", "2"])  # the runs frame's column name works too
    assert not is_log_scale(tagged, "beta", [0.001, 1.0, 10.0])  # >= 100x, but searched linearly
    partly = pd.DataFrame({"log_params": ["", "alpha"]})  # one run tagged: the tag is the rule
    assert is_log_scale(partly, "alpha", [1.0, 2.0]) and not is_log_scale(partly, "beta", [0.001, 1.0])
    none = pd.DataFrame({"log_params": ["", ""]})  # tagged: no parameter of this loss is on a log scale
    assert not is_log_scale(none, "margin", [0.001, 1.0])


@pytest.mark.parametrize(
    ("values", "log"),
    [
        ([0.001, 0.01, 0.1], True),  # 100x
        ([0.01, 0.1, 0.5], False),  # 50x
        ([0.0, 0.001, 0.5], True),  # a zero among positives spanning >= 100x: log (symlog in plots)
        ([-1.0, 0.01, 10.0], False),
        ([1, 200], True),  # integers too
        (["all", "easy"], False),
        ([0.0, 0.0], False),
    ],
)
def test_is_log_scale_without_tags_falls_back_to_the_range(values, log):
    for runs in (pd.DataFrame({"log_params": [None, np.nan]}), pd.DataFrame({"loss": ["ms"]})):
        assert is_log_scale(runs, "x", pd.Series(values)) is log


def test_sensitivity_measures_distance_on_the_searched_scale():
    # 10 lies at 1/3 of [1, 1000] on a log scale (far from the best, 1), at 1% of it on a linear one (near)
    runs = _trials(["COMPLETE"] * 4, [0.5, 0.4, 0.3, 0.2], **{"param.x": ["1.0", "10.0", "1000.0", "1000.0"]})
    assert sensitivity(runs, "ms", "map_at_r", min_trials=2).loc[0, "far_trials"] == 3  # untagged: >= 100x, log
    assert (
        sensitivity(runs.assign(log_params="other"), "ms", "map_at_r", min_trials=2).loc[0, "far_trials"] == 2
    )  # tag: linear
    # 1 … 4 spans < 100x: linear without the tag (1.5 at 0.17 of the range: near), log with it (at 0.29: far)
    small = _trials(["COMPLETE"] * 4, [0.5, 0.4, 0.3, 0.2], **{"param.x": ["1.0", "1.5", "3.5", "4.0"]})
    assert sensitivity(small, "ms", "map_at_r", min_trials=2).loc[0, "far_trials"] == 2
    assert sensitivity(small.assign(log_params="x"), "ms", "map_at_r", min_trials=2).loc[0, "far_trials"] == 3


def test_sensitivity_ignores_a_nan_objective_when_choosing_the_best():
    runs = _trials(["COMPLETE"] * 3, [np.nan, 0.4, 0.3], **{"param.x": ["1.0", "2.0", "3.0"]})
    assert sensitivity(runs, "ms", "map_at_r", min_trials=2).loc[0, "best_value"] == 2.0


def test_trend_over_a_loss_metric_counts_every_trial_when_the_tag_names_it():
    states = ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    runs = _trials(states, [0.1] * 5, **{"param.x": ["1", "2", "3", "4", "5"]})
    runs["own"] = [5.0, 4.0, 3.0, 2.0, 1.0]
    untagged = trend(runs, "ms", "x", "own", -1, "c")
    assert "3 trials" in untagged["evidence"]  # a retrieval-like metric: COMPLETE trials only
    tagged = trend(runs.assign(trial_metrics="own"), "ms", "x", "own", -1, "c")
    assert "5 trials" in tagged["evidence"] and tagged["verdict"] == "trend (exploratory)"


def _logged_study(folder, spaces: bool) -> str:
    """A study logged to MLflow (SQLite) by hand, params as MLflow keeps them (text): 3 search trials of
    one loss, a final run with test_ metrics and one logged before they were (unprefixed); with ``spaces``
    the parent run carries ``search_spaces.json``. Returns the tracking URI."""
    import json

    from mlflow.tracking import MlflowClient

    from analysis.runs import SEARCH_SPACES_ARTIFACT
    from study.search_space import Param
    from study.tracking import TAG_LOSS, TAG_OBJECTIVE, TAG_ROLE, TAG_STAGE, TAG_STATE, TAG_TRIAL

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("s", artifact_location=(folder / "artifacts").as_uri())
    parent = client.create_run(experiment, tags={TAG_ROLE: "study", TAG_OBJECTIVE: "map_at_r"}).info.run_id
    space = {
        "alpha": Param(type="float", low=1.0, high=4.0, log=True, default=2.0),  # < 100x: only the space says log
        "k": Param(type="int", low=1, high=10, default=2),
        "mining": Param(type="categorical", choices=[True, False], default=True),
        "positive": Param(type="categorical", choices=["all", "easy"], default="all"),
    }
    if spaces:
        dumped = {"ms": {name: p.model_dump(mode="json") for name, p in space.items()}}
        client.log_text(parent, json.dumps(dumped), SEARCH_SPACES_ARTIFACT)

    def child(key, stage, params, metrics):
        tags = {"mlflow.parentRunId": parent, TAG_TRIAL: key, TAG_STAGE: stage, TAG_LOSS: "ms", TAG_STATE: "COMPLETE"}
        run = client.create_run(experiment, tags=tags).info.run_id
        for name, value in params.items():
            client.log_param(run, name, str(value))
        for name, value in metrics.items():
            client.log_metric(run, name, value, step=1)
        client.set_terminated(run)

    for i, (alpha, k, mining, positive) in enumerate(
        [(1.0, 1, True, "all"), (2.5, 3, False, "easy"), (4.0, 10, True, "easy")]
    ):
        child(
            f"ms/{i}", "search", {"alpha": alpha, "k": k, "mining": mining, "positive": positive}, {"map_at_r": 0.1 * i}
        )
    child(
        "ms/final/2/s1",
        "final",
        {"alpha": 4.0, "k": 10, "mining": True, "positive": "easy", "seed": 1},
        {"test_map_at_r": 0.5, "train_loss": 1.0},
    )
    child(
        "ms/final/2/s2",
        "final",
        {"alpha": 4.0, "k": 10, "mining": True, "positive": "easy", "seed": 2},
        {"map_at_r": 0.6, "train_loss": 1.0},
    )  # logged before test metrics were test_<metric>
    return uri


@pytest.mark.parametrize("spaces", [True, False], ids=["search_spaces.json", "parsed"])
def test_load_runs_types_the_parameters_as_they_were_sampled(tmp_path, spaces, mlflow_db):
    from matplotlib.figure import Figure

    from analysis.runs import load_runs

    runs = load_runs("s", _logged_study(tmp_path, spaces)).set_index("trial")  # (into mlflow_db, migrated)
    assert runs["param.alpha"].dtype == np.float64 and runs.loc["ms/1", "param.alpha"] == 2.5
    assert runs["param.k"].dtype == "Int64" and runs.loc["ms/2", "param.k"] == 10
    assert runs["param.mining"].dtype == "boolean" and runs.loc["ms/1", "param.mining"] == False  # noqa: E712
    assert set(runs["param.positive"]) == {"all", "easy"}  # text stays text
    assert runs["param.seed"].dtype == "Int64" and runs["param.seed"].isna().sum() == 3  # no space: parsed
    search = runs[runs["stage"] == "search"]
    ax = search.plot.scatter(x="param.alpha", y="map_at_r", ax=Figure().subplots())  # a TypeError on text params
    assert sorted(ax.collections[0].get_offsets().data[:, 0].tolist()) == [1.0, 2.5, 4.0]  # numbers, not labels
    # the log scale: the space says so (alpha spans 4x, below the data's guess of 100x); no tag was logged
    assert is_log_scale(search, "alpha", search["param.alpha"]) is spaces
    # a final run's test score is test_<metric>, also for a run logged before that naming
    assert runs.loc[["ms/final/2/s1", "ms/final/2/s2"], "test_map_at_r"].tolist() == [0.5, 0.6]
    assert runs.loc[["ms/final/2/s1", "ms/final/2/s2"], "map_at_r"].isna().all()
    assert runs.loc["ms/2", "map_at_r"] == pytest.approx(0.2) and pd.isna(runs.loc["ms/2", "test_map_at_r"])


def test_typed_params_leave_text_that_does_not_fit_as_text():
    from analysis.runs import typed_params

    runs = pd.DataFrame(
        {"param.x": ["1", "x", None], "param.y": ["True", "False", None], "param.z": ["1.5", "2", None]}
    )
    spaces = {"ms": {"x": {"type": "int", "low": 1, "high": 3}}}  # the space says int, a value says otherwise
    typed = typed_params(runs, spaces)
    assert typed["param.x"].tolist()[:2] == ["1", "x"] and typed["param.y"].dtype == "boolean"
    assert typed["param.z"].dtype == np.float64 and typed["param.z"].tolist()[:2] == [1.5, 2.0]
