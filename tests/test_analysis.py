"""The comparison table from a hand-made runs frame: best COMPLETE trial per loss, counts, baseline."""

from __future__ import annotations

import pandas as pd

from analysis.tables import METRICS, comparison_table, to_markdown


def _run(loss, stage, state, map_at_r, **params):
    metrics = {m: map_at_r for m in METRICS}
    return {"loss": loss, "stage": stage, "state": state, **metrics, **{f"param.{k}": v for k, v in params.items()}}


def test_best_complete_trial_per_loss_and_baseline_row():
    runs = pd.DataFrame(
        [
            _run("ms", "search", "COMPLETE", 0.30, alpha="2.0"),
            _run("ms", "search", "COMPLETE", 0.50, alpha="3.25"),
            _run("ms", "search", "PRUNED", 0.90, alpha="9.0"),  # stopped early: never the winner
            _run("ms", "search", "FAIL", float("nan"), alpha="1.0"),
            _run("ns", "search", "COMPLETE", 0.40, temperature="0.05"),
            _run("untrained", "baseline", "COMPLETE", 0.05),
        ]
    )
    runs.loc[1, "effective_centers"] = 3.25  # reported by the loss of the best ms trial
    runs.loc[0, "effective_centers"] = 9.0
    table = comparison_table(runs, "map_at_r")
    assert list(table["loss"]) == ["ms", "ns", "untrained"]
    ms = table.iloc[0]
    assert (ms.trials, ms.complete, ms.pruned, ms.failed) == (4, 2, 1, 1)
    assert ms.map_at_r == 0.50 and ms.hyperparameters == "alpha=3.25"
    assert ms["loss metrics"] == "effective_centers=3.25"
    assert table.iloc[1].hyperparameters == "temperature=0.05" and table.iloc[1]["loss metrics"] == ""
    assert table.iloc[2].map_at_r == 0.05
    md = to_markdown(table)
    assert "| ms " in md and "0.5000" in md and "alpha=3.25" in md


def test_loss_without_complete_trial_still_listed():
    runs = pd.DataFrame([_run("ms", "search", "FAIL", float("nan")), _run("untrained", "baseline", "COMPLETE", 0.1)])
    table = comparison_table(runs, "map_at_r")
    ms = table[table["loss"] == "ms"].iloc[0]
    assert ms.failed == 1 and pd.isna(ms.map_at_r)
