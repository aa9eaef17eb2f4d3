"""Importance, sensitivity and the exploratory claim trends on hand-made runs frames with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from analysis.claims import compare, exploratory_trends, trend
from analysis.hyper import MIN_TRIALS, _distribution, importance, sensitivity, too_few_trials
from analysis.study_report import hyperparameter_analysis


def _trials(loss: str, params: dict[str, list], scores: list[float], states=None, **metrics) -> pd.DataFrame:
    n = len(scores)
    frame = pd.DataFrame({"loss": loss, "stage": "search", "state": states or ["COMPLETE"] * n, "map_at_r": scores})
    for name, values in params.items():
        frame[f"param.{name}"] = [str(v) for v in values]
    for name, values in metrics.items():
        frame[name] = values
    return frame


def test_importance_finds_the_parameter_that_drives_the_objective():
    rng = np.random.default_rng(0)
    lr, noise = rng.uniform(1e-4, 1e-1, 40), rng.uniform(0, 1, 40)
    runs = _trials("ms", {"lr": lr, "alpha": noise}, list(np.log(lr) + 0.01 * noise))
    result = importance(runs, "ms", "map_at_r").set_index("param")
    assert result.loc["lr", "importance"] > 0.9 and result["importance"].sum() == pytest.approx(1)
    assert (result["trials"] == 40).all()
    assert importance(runs.head(2), "ms", "map_at_r").empty  # too few trials


def test_importance_and_sensitivity_need_enough_complete_trials():
    rng = np.random.default_rng(1)
    n = MIN_TRIALS + 2
    x, y = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    states = ["COMPLETE"] * (MIN_TRIALS - 1) + ["PRUNED"] * 3  # one COMPLETE trial short
    runs = _trials("ms", {"x": x, "y": y}, list(x), states=states)
    why = f"{MIN_TRIALS - 1} COMPLETE trials of ms, {MIN_TRIALS} needed"
    assert too_few_trials(runs, "ms", "map_at_r") == why
    assert importance(runs, "ms", "map_at_r").empty and sensitivity(runs, "ms", "map_at_r").empty
    imp, sens, notes = hyperparameter_analysis(runs, "map_at_r")
    assert imp.empty and sens.empty and notes == [f"importance and sensitivity not shown: {why}"]
    # a COMPLETE trial whose objective is NaN does not count either
    nan_objective = runs.assign(state="COMPLETE", map_at_r=[*x[:-3], np.nan, np.nan, np.nan])
    assert too_few_trials(nan_objective, "ms", "map_at_r") == why

    enough = runs.assign(state=["COMPLETE"] * MIN_TRIALS + ["PRUNED"] * 2)
    assert too_few_trials(enough, "ms", "map_at_r") is None
    imp, sens, notes = hyperparameter_analysis(enough, "map_at_r")
    assert set(imp["param"]) == {"x", "y"} and (imp["trials"] == MIN_TRIALS).all() and (imp["loss"] == "ms").all()
    assert set(sens["param"]) == {"x", "y"} and notes == []

    fixed = enough.assign(**{"param.x": "0.5", "param.y": "0.5"})  # nothing varies: nothing to say
    assert (
        too_few_trials(fixed, "ms", "map_at_r")
        == f"no hyperparameter of ms took two values among its {MIN_TRIALS} COMPLETE trials"
    )
    assert importance(fixed, "ms", "map_at_r").empty and sensitivity(fixed, "ms", "map_at_r").empty


def test_sensitivity_is_the_drop_away_from_the_best_value():
    # temperature matters (far values score 0.1 lower), margin does not (the far ones score the same)
    runs = _trials(
        "ns",
        {"temperature": [0.1, 0.12, 0.9, 1.0], "margin": [0.0, 1.0, 0.0, 1.0], "kind": ["a", "a", "b", "a"]},
        [0.5, 0.5, 0.4, 0.4],
        states=["COMPLETE"] * 4,
    )
    runs.loc[len(runs)] = {"loss": "ns", "stage": "search", "state": "PRUNED", "map_at_r": 0.0,
                           "param.temperature": "1.0", "param.margin": "0", "param.kind": "a"}  # fmt: skip
    result = sensitivity(runs, "ns", "map_at_r", min_trials=4).set_index("param")
    assert result.loc["temperature", "best_value"] == 0.1 and result.loc["temperature", "far_trials"] == 2
    assert result.loc["temperature", "drop"] == pytest.approx(0.1)
    assert result.loc["temperature", "relative_drop"] == pytest.approx(0.2)
    assert result.loc["margin", "drop"] == pytest.approx(0.05)  # far trials: 0.5 and 0.4
    assert result.loc["kind", "far_trials"] == 1 and result.loc["kind", "drop"] == pytest.approx(0.1)
    assert sensitivity(runs, "ns", "map_at_r").empty  # 4 COMPLETE trials: below MIN_TRIALS


# The symptom: the same drop for every hyperparameter. TPE samples near the good region and ASHA
# prunes the rest, so the COMPLETE trials crowd together. The old code measured "far" against the span of
# the COMPLETE trials alone (every other trial then lies far in every float at once) and took an integer
# hyperparameter for a category (every other K "far"): each far set was "all the other trials", each drop
# the same. Columns: a, b (floats), k (an int, SoftTriple's K), objective; row 0 is the best.
CROWDED = [
    (0.0, 0.00, 1, 0.60),
    (0.6, 0.12, 2, 0.55),
    (0.7, 0.15, 3, 0.50),
    (0.8, 0.20, 7, 0.45),
    (0.9, 0.30, 8, 0.40),
    (1.0, 0.35, 10, 0.35),
    (0.6, 0.40, 12, 0.30),
    (0.7, 0.12, 2, 0.52),
    (0.8, 0.15, 3, 0.48),
    (0.9, 0.40, 3, 0.32),
]
PRUNED_WIDE = [(0.0, 1.0, 20, 0.10), (1.0, 0.5, 1, 0.20)]  # the searched range: b up to 1, K up to 20


def _crowded_runs() -> pd.DataFrame:
    """SoftTriple's search trials: CROWDED complete, PRUNED_WIDE pruned; the space's word: nothing on a log scale."""
    rows = CROWDED + PRUNED_WIDE
    return _trials(
        "soft_triple",
        {"a": [r[0] for r in rows], "b": [r[1] for r in rows], "k": [r[2] for r in rows]},
        [r[3] for r in rows],
        states=["COMPLETE"] * len(CROWDED) + ["PRUNED"] * len(PRUNED_WIDE),
    ).assign(log_params="")


def test_sensitivity_differs_per_parameter_when_the_complete_trials_crowd_together():
    runs = _crowded_runs()
    result = sensitivity(runs, "soft_triple", "map_at_r").set_index("param")
    scores = np.array([r[3] for r in CROWDED])
    # a: every other trial lies ≥ 0.6 of [0, 1] away; b: only b > 0.25 of [0, 1]; K: (K − 1) / 19 > 0.25, K ≥ 7
    far = {"a": np.arange(1, 10), "b": [4, 5, 6, 9], "k": [3, 4, 5, 6]}
    for name, rows_far in far.items():
        assert result.loc[name, "far_trials"] == len(rows_far)
        assert result.loc[name, "drop"] == pytest.approx(0.60 - scores[rows_far].mean())
    assert result["drop"].nunique() == 3  # the old code: one drop, 0.60 − mean(all others), for all three
    assert result.loc["k", "best_value"] == 1


def test_exploratory_verdicts_of_compare():
    groups = {"easy": lambda v: v == "easy", "all": lambda v: v == "all"}
    strong = _trials("triplet", {"positive": ["easy"] * 4 + ["all"] * 4}, [0.9, 0.8, 0.85, 0.95, 0.1, 0.2, 0.15, 0.1])
    row = compare(strong, "triplet", "map_at_r", "positive", groups, "easy wins", "easy")
    assert row["verdict"] == "trend (exploratory)" and "easy: 4 trials, best 0.9500" in row["evidence"]
    reversed_ = strong.assign(map_at_r=1 - strong["map_at_r"])
    assert compare(reversed_, "triplet", "map_at_r", "positive", groups, "c", "easy")["verdict"] == (
        "no trend (exploratory)"
    )
    only_all = strong[strong["param.positive"] == "all"]
    assert compare(only_all, "triplet", "map_at_r", "positive", groups, "c", "easy")["verdict"] == (
        "not tested (exploratory)"
    )


def test_exploratory_verdicts_of_trend():
    so = [0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    runs = _trials("proxy_anchor", {"so_weight": so}, [0.1] * 6, proxy_abs_cos=[0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    row = trend(runs, "proxy_anchor", "so_weight", "proxy_abs_cos", -1, "SO lowers |cos|")
    assert row["verdict"] == "trend (exploratory)" and "ρ(so_weight, proxy_abs_cos) = -1.00" in row["evidence"]
    up = runs.assign(proxy_abs_cos=runs["proxy_abs_cos"][::-1].to_numpy())
    assert trend(up, "proxy_anchor", "so_weight", "proxy_abs_cos", -1, "c")["verdict"] == "opposite trend (exploratory)"
    noisy = runs.assign(proxy_abs_cos=[0.3, 0.1, 0.5, 0.2, 0.4, 0.3])
    assert trend(noisy, "proxy_anchor", "so_weight", "proxy_abs_cos", -1, "c")["verdict"] == "no trend (exploratory)"


def test_exploratory_trends_only_for_the_losses_the_study_searched():
    runs = pd.concat(
        [
            _trials("soft_triple", {"centers_per_class": [1, 1, 1, 1, 10, 10, 10, 10], "tau": [0, 0.5, 1, 2] * 2},
                    [0.1, 0.12, 0.11, 0.13, 0.3, 0.32, 0.31, 0.33], effective_centers=[1] * 4 + [9, 6, 4, 3]),
            _trials("multi_similarity", {"mining": [True] * 4 + [False] * 4, "positive": ["all"] * 8},
                    [0.3, 0.31, 0.32, 0.33, 0.2, 0.21, 0.22, 0.23]),
        ]
    )  # fmt: skip
    trends = exploratory_trends(runs, "map_at_r")
    assert set(trends["loss"]) == {"soft_triple", "multi_similarity"}  # no rows for proxy_anchor, triplet, …
    assert len(trends) == 4 and trends["verdict"].str.endswith("(exploratory)").all()
    verdicts = trends.set_index(["claim", "loss"])["verdict"]
    assert verdicts[("SoftTriple with several centers per class beats one center (K = 1)", "soft_triple")] == (
        "trend (exploratory)"
    )
    assert verdicts[("Multi-Similarity's pair mining helps", "multi_similarity")] == "trend (exploratory)"
    assert verdicts[("Easy positive sampling beats all positives", "multi_similarity")] == "not tested (exploratory)"
    # 2 vs 2 trials cannot reach p < 0.05 (Mann–Whitney's smallest one-sided p is 1/6)
    assert compare(runs.iloc[[2, 3, 4, 5]], "soft_triple", "map_at_r", "centers_per_class",
                   {"K > 1": lambda k: float(k) > 1, "K = 1": lambda k: float(k) == 1}, "c", "K > 1")["verdict"] == (
        "no trend (exploratory)"
    )  # fmt: skip
    several = pd.concat([runs.assign(study="one"), runs[runs["loss"] == "soft_triple"].assign(study="two")])
    per_study = exploratory_trends(several, "map_at_r")
    assert list(per_study.columns[:2]) == ["study", "claim"] and per_study["study"].value_counts().to_dict() == {
        "one": 4, "two": 2
    }  # fmt: skip


def test_the_logged_search_space_sets_the_ranges_of_sensitivity_and_importance():
    """With the study's search_spaces.json the searched bounds, not the sampled span, are the range."""
    runs = _crowded_runs()
    space = {"b": {"type": "float", "low": 0.0, "high": 4.0, "log": False}, "k": {"type": "int", "low": 1, "high": 20}}
    result = sensitivity(runs, "soft_triple", "map_at_r", space=space).set_index("param")
    assert result.loc["b", "far_trials"] == 0 and np.isnan(result.loc["b", "drop"])  # no b is 1 from 0 in [0, 4]
    assert result.loc["k", "far_trials"] == 4  # [1, 20] as the trials spanned it
    imp = importance(runs, "soft_triple", "map_at_r", space=space)
    assert set(imp["param"]) == {"a", "b", "k"} and imp["importance"].sum() == pytest.approx(1)

    weight = {"type": "float", "low": 1e-3, "high": 10.0, "log": True, "zero": True}  # 0 = off
    trials = _trials("pa", {"w": [0.01]}, [0.5]).assign(log_params="w")
    assert _distribution(trials, "w", pd.Series([0.01, 0.1]), weight) == FloatDistribution(1e-3, 10.0, log=True)
    assert _distribution(trials, "w", pd.Series([0.0, 0.1]), weight) == FloatDistribution(0.0, 10.0)
    assert _distribution(trials, "w", pd.Series([0.01, 0.1]), None) == FloatDistribution(0.01, 0.1, log=True)
    assert _distribution(trials, "m", pd.Series(["x", "y"]), None) == CategoricalDistribution(["x", "y"])
    k = {"type": "int", "low": 1, "high": 20, "log": False}  # SoftTriple's K: ordered, on its searched range
    assert _distribution(trials, "k", pd.Series([2, 3]), k) == IntDistribution(1, 20)
    assert _distribution(trials, "k", pd.Series([2, 3]), None) == IntDistribution(2, 3)
