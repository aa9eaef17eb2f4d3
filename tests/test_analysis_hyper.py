"""Importance, sensitivity and the papers' claims on hand-made runs frames with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.claims import check_claims, compare, trend
from analysis.hyper import importance, sensitivity


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


def test_sensitivity_is_the_drop_away_from_the_best_value():
    # temperature matters (far values score 0.1 lower), margin does not (the far ones score the same)
    runs = _trials(
        "ns",
        {"temperature": [0.1, 0.12, 0.9, 1.0], "margin": [0.0, 1.0, 0.0, 1.0], "kind": ["a", "a", "b", "a"]},
        [0.5, 0.5, 0.4, 0.4],
        states=["COMPLETE"] * 4,
    )
    runs.loc[len(runs)] = {"loss": "ns", "stage": "search", "state": "PRUNED", "map_at_r": 0.0,
                           "param.temperature": "5", "param.margin": "0", "param.kind": "a"}  # fmt: skip
    result = sensitivity(runs, "ns", "map_at_r").set_index("param")
    assert result.loc["temperature", "best_value"] == 0.1 and result.loc["temperature", "far_trials"] == 2
    assert result.loc["temperature", "drop"] == pytest.approx(0.1)
    assert result.loc["temperature", "relative_drop"] == pytest.approx(0.2)
    assert result.loc["margin", "drop"] == pytest.approx(0.05)  # far trials: 0.5 and 0.4
    assert result.loc["kind", "far_trials"] == 1 and result.loc["kind", "drop"] == pytest.approx(0.1)


def test_compare_verdicts():
    groups = {"easy": lambda v: v == "easy", "all": lambda v: v == "all"}
    strong = _trials("triplet", {"positive": ["easy"] * 4 + ["all"] * 4}, [0.9, 0.8, 0.85, 0.95, 0.1, 0.2, 0.15, 0.1])
    row = compare(strong, "triplet", "map_at_r", "positive", groups, "easy wins", "easy")
    assert row["verdict"] == "supported" and "easy: 4 trials, best 0.9500" in row["evidence"]
    reversed_ = strong.assign(map_at_r=1 - strong["map_at_r"])
    assert compare(reversed_, "triplet", "map_at_r", "positive", groups, "c", "easy")["verdict"] == "not supported"
    only_all = strong[strong["param.positive"] == "all"]
    assert compare(only_all, "triplet", "map_at_r", "positive", groups, "c", "easy")["verdict"] == "not tested"


def test_trend_verdicts():
    so = [0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    runs = _trials("proxy_anchor", {"so_weight": so}, [0.1] * 6, proxy_abs_cos=[0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    row = trend(runs, "proxy_anchor", "so_weight", "proxy_abs_cos", -1, "SO lowers |cos|")
    assert row["verdict"] == "supported" and "ρ(so_weight, proxy_abs_cos) = -1.00" in row["evidence"]
    up = runs.assign(proxy_abs_cos=runs["proxy_abs_cos"][::-1].to_numpy())
    assert trend(up, "proxy_anchor", "so_weight", "proxy_abs_cos", -1, "c")["verdict"] == "not supported"
    noisy = runs.assign(proxy_abs_cos=[0.3, 0.1, 0.5, 0.2, 0.4, 0.3])
    assert trend(noisy, "proxy_anchor", "so_weight", "proxy_abs_cos", -1, "c")["verdict"] == "inconclusive"


def test_check_claims_covers_every_claim_and_says_what_was_not_tested():
    runs = pd.concat(
        [
            _trials("soft_triple", {"centers_per_class": [1, 1, 1, 1, 10, 10, 10, 10], "tau": [0, 0.5, 1, 2] * 2},
                    [0.1, 0.12, 0.11, 0.13, 0.3, 0.32, 0.31, 0.33], effective_centers=[1] * 4 + [9, 6, 4, 3]),
            _trials("multi_similarity", {"mining": [True] * 4 + [False] * 4, "positive": ["all"] * 8},
                    [0.3, 0.31, 0.32, 0.33, 0.2, 0.21, 0.22, 0.23]),
        ]
    )  # fmt: skip
    claims = check_claims(runs, "map_at_r").set_index(["claim", "loss"])["verdict"]
    assert claims[("SoftTriple with several centers per class beats one center (K = 1)", "soft_triple")] == "supported"
    assert claims[("Multi-Similarity's pair mining helps", "multi_similarity")] == "supported"
    assert claims[("Easy positive sampling beats all positives", "multi_similarity")] == "not tested"
    # 2 vs 2 trials cannot reach p < 0.05 (Mann–Whitney's smallest one-sided p is 1/6)
    assert compare(runs.iloc[[2, 3, 4, 5]], "soft_triple", "map_at_r", "centers_per_class",
                   {"K > 1": lambda k: float(k) > 1, "K = 1": lambda k: float(k) == 1}, "c", "K > 1")["verdict"] == (
        "inconclusive"
    )  # fmt: skip
    assert claims[("The soft-orthogonality weight lowers the proxies' correlation (mean |cos|)", "proxy_anchor")] == (
        "not tested"
    )
    assert len(claims) == 9
