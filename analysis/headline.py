"""The study's conclusion in one sentence: which loss won on the test classes, by how much, and whether
the margin over the runner-up is significant — or why the study cannot say.

Built on :func:`analysis.tables.final_table` (its means, 95% CIs and ``p_vs_best``, Welch's t-test of
each loss's per-seed objective against the best loss's): the margin's CI is the same Welch test's
interval for the difference of the two means, so "significant" here and ``p_vs_best < 0.05`` in the
table always agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from analysis.names import final_column, metric_label
from analysis.tables import ALPHA, seed_means
from study.vocab import Stage, State

ENSEMBLE = " (ensemble)"  # the suffix final_table gives a fold ensemble's row


@dataclass(frozen=True)
class Headline:
    """``verdict``: "significant", "inconclusive" or "none" (nothing to compare); ``text``: the sentence."""

    verdict: str
    text: str
    winner: str | None = None
    runner_up: str | None = None
    margin: float = float("nan")  # winner − runner-up, the test objective's means over seeds
    ci_low: float = float("nan")  # 95% CI of the margin (Welch)
    ci_high: float = float("nan")
    p: float = float("nan")  # Welch's t-test, as the final table's p_vs_best


def headline(runs: pd.DataFrame, final: pd.DataFrame, objective: str, search: pd.DataFrame | None = None) -> Headline:
    """The headline of one study: ``final`` is its :func:`~analysis.tables.final_table`, ``search`` its
    :func:`~analysis.tables.comparison_table` (used only when the final stage did not run)."""
    name = metric_label(objective)
    trained = final[(final["loss"] != "untrained") & final[objective].notna()]
    trained = trained.sort_values(objective, ascending=False, kind="stable")
    if trained.empty:
        return _no_final(search, objective, name)
    best = trained.iloc[0]
    others = trained[trained["loss"].str.removesuffix(ENSEMBLE) != best["loss"].removesuffix(ENSEMBLE)]
    if others.empty:
        return Headline(
            "none", f"Only {best['loss']} was tested ({name} {_mean_ci(best, objective)}): nothing to compare it with."
        )
    second = others.iloc[0]
    mine, theirs = _per_seed(runs, best["loss"], objective), _per_seed(runs, second["loss"], objective)
    margin = float(best[objective] - second[objective])
    said = (
        f"{best['loss']} {{}} on the test classes: {name} {_mean_ci(best, objective)} against "
        f"{second['loss']}'s {_mean_ci(second, objective)}, a margin of {margin:+.4f}"
    )
    if min(len(mine), len(theirs)) < 2:
        seeds = ", ".join(f"{loss}: {len(s)}" for loss, s in ((best["loss"], mine), (second["loss"], theirs)))
        reason = f"one final seed gives no confidence interval (seeds {seeds}; set final.seeds ≥ 3)"
        return Headline(
            "inconclusive",
            f"{said.format('leads')} — inconclusive: {reason}.",
            best["loss"],
            second["loss"],
            margin=margin,
        )
    test = stats.ttest_ind(mine, theirs, equal_var=False)
    low, high = test.confidence_interval(1 - ALPHA)
    p = float(test.pvalue)
    interval = f"95% CI [{low:+.4f}, {high:+.4f}], Welch's t-test p = {p:.3f}, {len(mine)} vs {len(theirs)} seeds"
    if p < ALPHA:
        text = f"{said.format('wins')} ({interval}): significant at {ALPHA:g}."
        verdict = "significant"
    else:
        text = f"{said.format('leads')} ({interval}) — inconclusive: the confidence interval of the margin includes 0."
        verdict = "inconclusive"
    return Headline(verdict, text, best["loss"], second["loss"], margin, float(low), float(high), p)


def _per_seed(runs: pd.DataFrame, row_loss: str, objective: str) -> np.ndarray:
    """A final-table row's per-seed objective, as final_table computes it (folds averaged within a seed)."""
    stage, loss = (
        (Stage.ENSEMBLE, row_loss.removesuffix(ENSEMBLE))
        if row_loss.endswith(ENSEMBLE)
        else (
            Stage.FINAL,
            row_loss,
        )
    )
    group = runs[(runs["stage"] == stage) & (runs["state"] == State.COMPLETE) & (runs["loss"] == loss)]
    column = final_column(runs.columns, objective)  # test_<objective>
    values = seed_means(group, [column])[column].to_numpy(float) if column in group else np.array([])
    return values[np.isfinite(values)]


def _mean_ci(row: pd.Series, objective: str) -> str:
    ci = row.get(f"{objective}_ci")
    return f"{row[objective]:.4f}" + ("" if ci is None or pd.isna(ci) else f" ± {ci:.4f}")


def _no_final(search: pd.DataFrame | None, objective: str, name: str) -> Headline:
    reason = "the final stage did not run (final.seeds: 0, or it has not finished): no loss was tested"
    trained = None if search is None else search[(search["loss"] != "untrained") & search[objective].notna()]
    if trained is None or trained.empty:
        return Headline("none", f"No result yet: {reason}.")
    best = trained.sort_values(objective, ascending=False, kind="stable").iloc[0]
    return Headline(
        "inconclusive",
        f"Inconclusive: {reason}. On the validation classes the best search trial was {best['loss']}'s "
        f"({name} {best[objective]:.4f}), one trial chosen as the best of several: not a test result.",
        best["loss"],
    )
