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
