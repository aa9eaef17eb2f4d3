"""The report's headline (winner, margin with CI, significant or why not), display names, the training
machines read from the runs, and Optuna's figures from a journal."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pandas as pd
import pytest
from scipy import stats

from analysis.environment import training_machines
from analysis.headline import headline
from analysis.hyper import MIN_TRIALS
from analysis.names import column_label, metric_label
from analysis.optuna_figures import load_journal, param_importances
from analysis.tables import comparison_table, final_table
from study.machine import FIELDS


def _run(loss, stage, seed, value, fold=None, machine=None):
    # a tested run (final, ensemble) logs its metrics as test_<metric>, a search trial unprefixed
    prefix = "" if stage == "search" else "test_"
    return {
        "study": "s",
        "objective": "map_at_r",
        "mode": "finetune",
        "loss": loss,
        "stage": stage,
        "state": "COMPLETE",
        "trial": f"{loss}/{stage}/0/s{seed}",
        "param.seed": str(seed),
        "param.fold": None if fold is None else str(fold),
        f"{prefix}map_at_r": value,
        f"{prefix}recall_at_1": value * 2,
        f"{prefix}nmi": 0.5,
        f"{prefix}r_precision": value,
        "cpu_hours": 0.1,
        "gpu_hours": 0.0,
        "machine": machine,
    }


def _study(finals: dict[str, list[float]], stage: str = "final") -> pd.DataFrame:
    rows = [_run(loss, stage, seed, v) for loss, values in finals.items() for seed, v in enumerate(values, 1)]
    rows += [_run(loss, "search", 0, max(values) + 0.1) for loss, values in finals.items()]
    return pd.DataFrame(rows)


def test_a_significant_winner_with_the_tables_welch_test_and_its_ci():
    a, b, c = [0.50, 0.52, 0.51], [0.40, 0.41, 0.43], [0.20, 0.22, 0.21]
    runs = _study({"b": b, "a": a, "c": c})
    final = final_table(runs, "map_at_r")
    h = headline(runs, final, "map_at_r")
    assert (h.verdict, h.winner, h.runner_up) == ("significant", "a", "b")
    assert h.margin == pytest.approx(np.mean(a) - np.mean(b))
    assert h.p == pytest.approx(final.set_index("loss").loc["b", "p_vs_best"])  # the table's own test
    welch = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (h.ci_low, h.ci_high) == pytest.approx((welch.low, welch.high))
    assert h.ci_low > 0
    assert h.text.startswith("a wins on the test classes: MAP@R 0.5100 ± ")
    assert f"a margin of {h.margin:+.4f} (95% CI [{h.ci_low:+.4f}, {h.ci_high:+.4f}]" in h.text
    assert "significant at 0.05" in h.text and "3 vs 3 seeds" in h.text


def test_overlapping_intervals_are_inconclusive_and_say_so():
    runs = _study({"a": [0.50, 0.30, 0.45], "b": [0.44, 0.40, 0.35]})
    h = headline(runs, final_table(runs, "map_at_r"), "map_at_r")
    assert h.verdict == "inconclusive" and h.winner == "a" and h.ci_low < 0 < h.ci_high and h.p >= 0.05
    assert h.text.startswith("a leads") and "inconclusive: the confidence interval of the margin includes 0" in h.text


def test_one_final_seed_is_inconclusive_with_the_reason():
    runs = _study({"a": [0.5], "b": [0.4]})
    h = headline(runs, final_table(runs, "map_at_r"), "map_at_r")
    assert h.verdict == "inconclusive" and np.isnan(h.p) and h.margin == pytest.approx(0.1)
    assert "one final seed gives no confidence interval (seeds a: 1, b: 1" in h.text


def test_nothing_to_compare_and_no_final_stage():
    runs = _study({"a": [0.5, 0.6]})
    assert headline(runs, final_table(runs, "map_at_r"), "map_at_r").verdict == "none"
    search_only = _study({"a": [0.5], "b": [0.3]}).query("stage == 'search'")
    h = headline(
        search_only, final_table(search_only, "map_at_r"), "map_at_r", comparison_table(search_only, "map_at_r")
    )
    assert h.verdict == "inconclusive" and h.winner == "a"
    assert "the final stage did not run" in h.text and "validation classes" in h.text and "0.6000" in h.text


def test_an_ensemble_row_is_compared_with_another_loss_not_its_own_folds():
    runs = pd.concat([_study({"a": [0.50, 0.51], "b": [0.30, 0.31]}), _study({"a": [0.60, 0.61]}, "ensemble")])
    runs = runs[~((runs["stage"] == "search") & runs.duplicated(["loss", "stage"]))]
    h = headline(runs, final_table(runs, "map_at_r"), "map_at_r")
    assert (h.winner, h.runner_up) == ("a (ensemble)", "b")
    assert h.margin == pytest.approx(0.605 - 0.305)


def test_display_names():
    assert [metric_label(m) for m in ("recall_at_1", "test_recall_at_100", "map_at_r", "nmi", "r_precision")] == [
        "R@1", "R@100", "MAP@R", "NMI", "R-Precision",
    ]  # fmt: skip
    assert metric_label("submode_recall_at_1") == "sub-mode R@1" and metric_label("epoch_seconds") == "epoch seconds"
    assert [column_label(c) for c in ("p_vs_best", "cpu_hours", "loss", "map_at_r", "hyperparameters")] == [
        "p vs best", "CPU-h", "loss", "MAP@R", "hyperparameters",
    ]  # fmt: skip


def test_training_machines_come_from_the_runs():
    gpu = {field: "x" for field in FIELDS} | {"host": "node-1", "gpus": "2 × NVIDIA H100", "torch": "2.14.1"}
    cpu = gpu | {"host": "laptop", "gpus": "none", "driver": "none"}
    runs = pd.DataFrame(
        [_run("a", "search", 0, 0.1, machine=json.dumps(gpu))] * 3
        + [_run("b", "final", 1, 0.1, machine=json.dumps(gpu)), _run("b", "search", 0, 0.1, machine=json.dumps(cpu))]
        + [_run("untrained", "baseline", 0, 0.1)]
    )
    hardware, software, unrecorded = training_machines(runs)
    assert hardware[["host", "gpus", "runs", "losses"]].values.tolist() == [
        ["node-1", "2 × NVIDIA H100", 4, "a, b"],
        ["laptop", "none", 1, "b"],
    ]
    assert software[["torch", "runs"]].values.tolist() == [["2.14.1", 5]] and unrecorded == 1
    hardware, software, unrecorded = training_machines(runs.drop(columns="machine"))
    assert hardware.empty and software.empty and unrecorded == len(runs)


def test_optuna_importance_from_the_journal(tmp_path):
    path = tmp_path / "optuna.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    study = optuna.create_study(study_name="s.a", storage=storage, direction="maximize")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(
        lambda t: -((np.log10(t.suggest_float("lr", 1e-4, 1e-1, log=True)) + 2) ** 2) + 0.01 * t.suggest_int("k", 1, 3),
        n_trials=MIN_TRIALS + 2,
    )
    few = optuna.create_study(study_name="s.b", storage=storage, direction="maximize")
    few.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=MIN_TRIALS - 1)
    studies = load_journal(path, "s", ["a", "b", "c"])
    assert sorted(studies) == ["a", "b"]  # c has no study in the journal
    figure = param_importances(studies["a"], "a", "map_at_r")
    ax = figure.axes[0]
    assert "a: hyperparameter importance (fANOVA on 12 complete trials" in ax.get_title()
    bars = {label.get_text(): patch.get_width() for label, patch in zip(ax.get_yticklabels(), ax.patches, strict=True)}
    assert set(bars) == {"lr", "k"} and bars["lr"] > bars["k"]  # lr is what moves the objective
    assert param_importances(studies["b"], "b", "map_at_r") is None  # below the report's minimum
    assert load_journal(tmp_path / "missing.journal", "s", ["a"]) == {}
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # nothing left in pyplot's registry


def test_the_report_keeps_only_the_study_s_losses_and_finds_its_journal(tmp_path):
    from analysis.study_report import find_journal, study_only

    claims = pd.DataFrame({"claim": ["a.x", "b.y", "c.z"], "loss": ["a", "b", "c"]})
    assert study_only(claims, ["a", "c"])["claim"].tolist() == ["a.x", "c.z"]
    assert study_only(pd.DataFrame(columns=["claim", "loss"]), ["a"]).empty

    config = {"output_dir": str(tmp_path / "elsewhere"), "search": {"optuna_storage": None}}
    journal, why = find_journal("s", config, [tmp_path / "out"])
    assert journal is None and why.startswith("Optuna's figures not shown: no Optuna journal here (")
    assert (
        str(tmp_path / "out" / "optuna.journal") in why and str(tmp_path / "elsewhere" / "s" / "optuna.journal") in why
    )
    (tmp_path / "elsewhere" / "s").mkdir(parents=True)
    (tmp_path / "elsewhere" / "s" / "optuna.journal").write_text("")
    assert find_journal("s", config, [tmp_path / "out"]) == (tmp_path / "elsewhere" / "s" / "optuna.journal", "")
    database = {"search": {"optuna_storage": "**********"}}
    journal, why = find_journal("s", database, [tmp_path / "elsewhere" / "s"])
    assert journal is None and "database (search.optuna_storage)" in why
