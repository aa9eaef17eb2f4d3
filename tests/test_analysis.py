"""The comparison table from a hand-made runs frame: best COMPLETE trial per loss, counts, baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.tables import comparison_table, final_table, formatted, metric_columns, to_latex, to_markdown

METRICS = ["recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "nmi", "map_at_r", "r_precision"]


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
    runs["trial_metrics"] = ["effective_centers"] * 4 + [""] * 2  # the tag that says it is a loss metric
    runs["lr"], runs["loss_lr"] = 1e-3, [1e-3, 2e-3, 1e-3, 1e-3, 1e-3, np.nan]  # the trials' effective lrs
    table = comparison_table(runs, "map_at_r")
    assert list(table["loss"]) == ["ms", "ns", "untrained"]
    ms = table.iloc[0]
    assert (ms.trials, ms.complete, ms.pruned, ms.failed) == (4, 2, 1, 1)
    assert ms.map_at_r == 0.50 and ms["param.alpha"] == "3.25" and pd.isna(ms["param.temperature"])
    assert (ms.lr, ms.loss_lr) == (1e-3, 2e-3)  # the best trial's, shown in every table
    shown = formatted(table)
    assert shown.loc[0, "loss_lr"] == "0.002"
    assert ms["loss.effective_centers"] == 3.25 and shown.loc[0, "loss metrics"] == "effective_centers=3.25"
    assert shown.loc[0, "hyperparameters"] == "alpha=3.25"  # one cell when shown, a column each in the CSV
    assert shown.loc[1, "hyperparameters"] == "temperature=0.05" and shown.loc[1, "loss metrics"] == ""
    assert table.iloc[2].map_at_r == 0.05
    md = to_markdown(table)
    assert "| ms " in md and "**0.5000**" in md and "alpha=3.25" in md  # the best value is marked


def test_loss_metrics_come_from_the_trial_metrics_column():
    runs = pd.DataFrame([_run("ms", "search", "COMPLETE", 0.5), _run("ns", "search", "COMPLETE", 0.4)])
    runs["effective_centers"], runs["custom_metric"] = [3.0, np.nan], [np.nan, 0.25]
    assert "loss metrics" not in formatted(comparison_table(runs, "map_at_r"))  # untagged: not loss metrics
    runs["trial_metrics"] = ["effective_centers", "custom_metric"]
    shown = formatted(comparison_table(runs, "map_at_r"))
    assert shown["loss metrics"].tolist() == ["effective_centers=3", "custom_metric=0.25"]


def test_loss_without_complete_trial_still_listed():
    runs = pd.DataFrame([_run("ms", "search", "FAIL", float("nan")), _run("untrained", "baseline", "COMPLETE", 0.1)])
    table = comparison_table(runs, "map_at_r")
    ms = table[table["loss"] == "ms"].iloc[0]
    assert ms.failed == 1 and pd.isna(ms.map_at_r)


def test_metric_columns_follow_the_datasets_ks():
    runs = pd.DataFrame(columns=["recall_at_100", "recall_at_1", "recall_at_10", "nmi", "map_at_r", "r_precision"])
    assert metric_columns(runs) == ["recall_at_1", "recall_at_10", "recall_at_100", "nmi", "map_at_r", "r_precision"]


def _final(loss, seed, value, fold=None, stage="final"):
    row = {
        "loss": loss,
        "stage": stage,
        "state": "COMPLETE",
        "param.seed": str(seed),
        "cpu_hours": 0.5,
        "gpu_hours": 0.25,
        **{f"test_{m}": value for m in METRICS},
    }  # test classes: test_<metric>
    return row | ({"param.fold": str(fold)} if fold is not None else {})


def test_final_table_mean_ci_significance_and_cost():
    best, other = [0.50, 0.52, 0.54], [0.30, 0.31, 0.29]
    rows = [_final("ms", s, v) for s, v in zip((1, 2, 3), best, strict=True)]
    rows += [_final("ns", s, v - 0.01, fold=0) for s, v in zip((1, 2, 3), other, strict=True)]
    rows += [_final("ns", s, v + 0.01, fold=1) for s, v in zip((1, 2, 3), other, strict=True)]  # folds average out
    rows += [_final("ns", s, 0.4, stage="ensemble") for s in (1, 2, 3)]
    rows += [{"loss": "ns", "stage": "final", "state": "FAIL", "param.seed": "4", "cpu_hours": 1.0, "gpu_hours": 1.0}]
    rows += [{"loss": "untrained", "stage": "baseline", "state": "COMPLETE", "test_map_at_r": 0.05,
              **{f"test_{m}": 0.05 for m in METRICS}}]  # fmt: skip
    table = final_table(pd.DataFrame(rows), "map_at_r").set_index("loss")
    ms, ns = table.loc["ms"], table.loc["ns"]
    assert (ms.seeds, ms.runs, ns.seeds, ns.runs) == (3, 3, 3, 6)
    assert (ms.protocol, ns.protocol, table.loc["ns (ensemble)"].protocol) == ("all classes", "folds", "folds")
    assert ms.map_at_r == pytest.approx(0.52) and ns.map_at_r == pytest.approx(0.30)
    assert ms.map_at_r_ci == pytest.approx(stats.t.ppf(0.975, 2) * np.std(best, ddof=1) / np.sqrt(3))
    assert np.isnan(ms.p_vs_best)  # the best itself
    assert ns.p_vs_best == pytest.approx(stats.ttest_ind(other, best, equal_var=False).pvalue)
    assert ns.cpu_hours == pytest.approx(5.5) and ns.gpu_hours == pytest.approx(3.25)  # every run counts, failed too
    assert table.loc["ns (ensemble)"].map_at_r == pytest.approx(0.4) and table.loc["untrained"].map_at_r == 0.05
    shown = formatted(table.reset_index()).set_index("loss")
    assert shown.loc["ms", "map_at_r"].startswith("**0.5200 ± ") and shown.loc["ns", "p_vs_best"].endswith(" *")
    assert shown.loc["untrained", "map_at_r"] == "0.0500"
    latex = to_latex(table.reset_index())
    assert "\\textbf{52.0 $\\pm$" in latex and "ns (ensemble)" in latex and "MAP@R" in latex  # percent


def test_best_trained_loss_is_marked_even_when_the_untrained_network_scores_higher():
    runs = pd.DataFrame(
        [
            _run("a", "search", "COMPLETE", 0.30),
            _run("b", "search", "COMPLETE", 0.20),
            _run("untrained", "baseline", "COMPLETE", 0.40),
        ]
    )
    shown = formatted(comparison_table(runs, "map_at_r")).set_index("loss")
    assert shown.loc["a", "map_at_r"] == "**0.3000**"
    assert shown.loc["b", "map_at_r"] == "0.2000" and shown.loc["untrained", "map_at_r"] == "0.4000"


def test_exports_one_column_per_hyperparameter_integer_counts_and_a_paper_latex_table(tmp_path):
    from analysis.runs import typed_params
    from analysis.tables import write_tables
    from study.storage import Storage

    runs = pd.DataFrame(
        [
            _run("ms", "search", "COMPLETE", 0.632, alpha="2.0", mining="True"),
            _run("ms", "search", "PRUNED", 0.1, alpha="9.0", mining="False"),
            _run("ns", "search", "COMPLETE", 0.40, temperature="0.05"),
            {"loss": "untrained", "stage": "baseline", "state": "COMPLETE", **{m: 0.05 for m in METRICS},
             **{f"test_{m}": 0.05 for m in METRICS}},
            *[_final("ms", s, v) | {"param.alpha": "2.0", "param.mining": "True"} for s, v in ((1, 0.61), (2, 0.63))],
            *[_final("ns", s, v) | {"param.temperature": "0.05"} for s, v in ((1, 0.41), (2, 0.43))],
        ]
    )  # fmt: skip
    runs = typed_params(runs).assign(study="s", objective="map_at_r", mode="finetune")
    write_tables(runs, Storage.at(str(tmp_path)))
    results = pd.read_csv(tmp_path / "results.csv").set_index("loss")
    assert {"param.alpha", "param.mining", "param.temperature"} <= set(results.columns)
    assert "hyperparameters" not in results.columns  # not packed into one text cell
    assert results.loc["ms", "param.alpha"] == 2.0 and pd.isna(results.loc["ms", "param.temperature"])
    assert results.loc["ns", "param.temperature"] == 0.05
    rows = (tmp_path / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    ms = dict(zip(header, next(r for r in rows if r.startswith("ms,")).split(","), strict=True))
    assert (ms["trials"], ms["complete"], ms["pruned"], ms["failed"]) == ("2", "1", "1", "0")  # never "2.0"
    assert ms["param.mining"] == "True"
    final = (tmp_path / "final.csv").read_text().splitlines()
    header = final[0].split(",")
    ms = dict(zip(header, next(r for r in final if r.startswith("ms,")).split(","), strict=True))
    assert (ms["seeds"], ms["runs"], ms["param.alpha"]) == ("2", "2", "2.0")
    assert float(ms["map_at_r"]) == pytest.approx(0.62)  # the runs' test_map_at_r
    assert "alpha=2" in (tmp_path / "results.md").read_text()  # shown: one cell

    tex = (tmp_path / "results.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    lines = [line.strip() for line in tex.splitlines()]
    head = lines[lines.index("\\toprule") + 1]
    assert [c.strip() for c in head.removesuffix("\\\\").split("&")] == [
        "loss", "trials", "R@1", "R@2", "R@4", "R@8", "NMI", "MAP@R", "R-Precision"
    ]  # fmt: skip
    assert lines[0] == "\\begin{tabular}{lrrrrrrrr}"  # the numbers right-aligned
    ms_row = next(line for line in lines if line.startswith("ms &"))
    assert "\\textbf{63.2}" in ms_row  # percent, the best in bold
    assert "finetune" not in tex and "CPU" not in tex and "loss lr" not in tex  # no mode, cost or lr unless asked
    final_tex = (tmp_path / "final.tex").read_text()
    assert "\\textbf{62.0 $\\pm$ 12.7}" in final_tex and "p vs best" in final_tex and "alpha" not in final_tex
    asked = to_latex(pd.read_csv(tmp_path / "results.csv"), extra=("cpu_hours", "mode"))
    assert "finetune" in asked
