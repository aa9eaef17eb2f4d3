"""The controlled claims (``analysis.claims.ablation_claims``) on hand-made runs frames: ablation runs
paired by seed with the loss's final runs, every number of a row checked against a hand computation
(scipy's t quantile and paired t-test called here), and ablation runs kept out of every loss table."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from analysis.claims import CLAIM_COLUMNS, TREND_RULE, VERDICT_RULE, ablation_claims, paired, verdict
from analysis.runs import load_runs
from analysis.tables import claims_text, comparison_table, final_table, write_tables
from study.claims import BY_ID, CLAIMS, Claim
from study.storage import Storage
from study.tracking import (
    TAG_ARM,
    TAG_CLAIM,
    TAG_LOSS,
    TAG_OBJECTIVE,
    TAG_ROLE,
    TAG_STAGE,
    TAG_STALE,
    TAG_STATE,
    TAG_TRIAL,
)
from tests.conftest import copy_mlflow_db

T = stats.t.ppf(0.975, 2)  # 3 seeds: 2 degrees of freedom


def _final(loss, seed, map_at_r, recall_at_1=0.5, number=7, fold=None, state="COMPLETE", **metrics):
    """A final-stage run of search trial ``number``'s configuration."""
    key = f"{loss}/final/{number}/s{seed}" + ("" if fold is None else f"-f{fold}")
    return {
        "trial": key, "loss": loss, "stage": "final", "state": state, "claim": None, "arm": None,
        "test_map_at_r": map_at_r, "test_recall_at_1": recall_at_1, "test_nmi": 0.1, "test_r_precision": 0.1,
        "param.seed": str(seed),
        "param.fold": None if fold is None else str(fold), "cpu_hours": 1.0, "gpu_hours": 0.5, **metrics,
    }  # fmt: skip


def _ablation(claim, arm, seed, map_at_r, recall_at_1=0.5, number=7, state="COMPLETE", **metrics):
    """An ablation run: one arm of ``claim``, the other arm being the loss's final run of the same seed."""
    c = BY_ID[claim]
    return {
        "trial": f"{c.loss}/ablation/{number}/{c.factor}/s{seed}", "loss": c.loss, "stage": "ablation",
        "state": state, "claim": claim, "arm": arm, "test_map_at_r": map_at_r, "test_recall_at_1": recall_at_1,
        "test_nmi": 0.1, "test_r_precision": 0.1, "param.seed": str(seed), "param.fold": None, "cpu_hours": 10.0,
        "gpu_hours": 5.0, **metrics,
    }  # fmt: skip


def _row(table: pd.DataFrame, claim: str, metric: str) -> pd.Series:
    return table.set_index(["claim", "metric"]).loc[(claim, metric)]


def _check(row: pd.Series, paper: list[float], alternative: list[float]) -> None:
    """Every number of ``row`` against the hand computation from the paired arm values."""
    paper, alternative = np.array(paper), np.array(alternative)
    d = paper - alternative
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert row.seeds == len(d)
    assert row.paper == pytest.approx(paper.mean()) and row.alternative == pytest.approx(alternative.mean())
    assert row.difference == pytest.approx(d.mean())
    assert row.ci_low == pytest.approx(d.mean() - half) and row.ci_high == pytest.approx(d.mean() + half)
    assert row.p == pytest.approx(stats.ttest_rel(paper, alternative).pvalue)


MS_FINAL = [0.50, 0.52, 0.55]  # mining on: the best configuration, the paper's arm
MS_NO_MINING = [0.45, 0.46, 0.47]  # the ablation trains the alternative


def _mining(recall_paper=(0.60, 0.61, 0.62), recall_alternative=(0.61, 0.59, 0.63)) -> list[dict]:
    rows = [_final("multi_similarity", s, v, r) for s, v, r in zip((1, 2, 3), MS_FINAL, recall_paper, strict=True)]
    rows += [
        _ablation("multi_similarity.mining", "alternative", s, v, r, **{"param.mining": "False"})
        for s, v, r in zip((1, 2, 3), MS_NO_MINING, recall_alternative, strict=True)
    ]
    for row in rows[:3]:
        row["param.mining"] = "True"
    return rows


def test_supported_and_inconclusive_rows_match_the_hand_computation():
    runs = pd.DataFrame(_mining())
    table = ablation_claims(runs, "map_at_r")
    assert list(table.columns) == CLAIM_COLUMNS
    assert list(table["metric"]) == ["map_at_r", "recall_at_1"]  # objective, Recall@1; no extra metric
    row = _row(table, "multi_similarity.mining", "map_at_r")
    _check(row, MS_FINAL, MS_NO_MINING)
    assert row.ci_low > 0 and row.verdict == "supported"
    assert row.loss == "multi_similarity" and row.statement == BY_ID["multi_similarity.mining"].statement
    assert row.expected == "paper > alternative" and row.arms == "mining: paper True, alternative False"
    recall = _row(table, "multi_similarity.mining", "recall_at_1")  # differences −0.01, +0.02, −0.01
    _check(recall, [0.60, 0.61, 0.62], [0.61, 0.59, 0.63])
    assert recall.ci_low < 0 < recall.ci_high and recall.verdict == "inconclusive (3 seeds)"


def test_refuted_when_the_paper_arm_is_the_ablation_and_scores_lower():
    # triplet's best uses all positives (the alternative): the ablation trains easy positives, the paper's arm
    finals = [0.40, 0.42, 0.41]
    easy = [0.30, 0.33, 0.34]
    rows = [_final("triplet", s, v) for s, v in zip((1, 2, 3), finals, strict=True)]
    rows += [_ablation("triplet.easy_positives", "paper", s, v) for s, v in zip((1, 2, 3), easy, strict=True)]
    row = _row(ablation_claims(pd.DataFrame(rows), "map_at_r"), "triplet.easy_positives", "map_at_r")
    _check(row, easy, finals)  # paper − alternative = ablation − final
    assert row.ci_high < 0 and row.verdict == "refuted"


def test_one_seed_has_no_confidence_interval():
    runs = pd.DataFrame(
        [_final("multi_similarity", 1, 0.5), _ablation("multi_similarity.mining", "alternative", 1, 0.4)]
    )
    row = _row(ablation_claims(runs, "map_at_r"), "multi_similarity.mining", "map_at_r")
    assert row.seeds == 1 and row.difference == pytest.approx(0.1)
    assert np.isnan(row.ci_low) and np.isnan(row.ci_high) and np.isnan(row.p)
    assert row.verdict == "inconclusive (1 seed: no confidence interval)"


def test_a_seed_missing_in_either_arm_is_dropped_from_both():
    rows = [_final("multi_similarity", s, v) for s, v in ((1, 0.50), (2, 0.52), (4, 0.90))]  # no seed 3, seed 4 extra
    rows += [_ablation("multi_similarity.mining", "alternative", s, v) for s, v in ((1, 0.45), (2, 0.46), (3, 0.10))]
    row = _row(ablation_claims(pd.DataFrame(rows), "map_at_r"), "multi_similarity.mining", "map_at_r")
    _check(row, [0.50, 0.52], [0.45, 0.46])  # seed 3's 0.10 and seed 4's 0.90 in neither mean
    assert row.seeds == 2 and row.verdict in ("supported", "inconclusive (2 seeds)")
    assert row.verdict == verdict(row.ci_low, row.ci_high, 2)


def test_only_complete_fold_free_finals_of_the_same_search_trial_pair():
    rows = _mining()
    rows += [
        _final("multi_similarity", 1, 0.99, number=3),  # a superseded best's final run (load_runs drops it if stale)
        _final("multi_similarity", 2, 0.99, fold=0),  # a fold model: another protocol
        _final("multi_similarity", 3, 0.99, state="FAIL"),
        _final("triplet", 1, 0.99),  # another loss
        _ablation("multi_similarity.mining", "alternative", 1, 0.01, state="FAIL"),  # a failed ablation
        _ablation("multi_similarity.mining", "alternative", 2, 0.01, number=3),  # an ablation of the old best
    ]
    row = _row(ablation_claims(pd.DataFrame(rows), "map_at_r"), "multi_similarity.mining", "map_at_r")
    _check(row, MS_FINAL, MS_NO_MINING)  # exactly as without those runs


def test_extra_metrics_are_judged_in_the_direction_the_claim_says():
    so = "proxy_anchor.soft_orthogonality"
    cos_on, cos_off = [0.10, 0.12, 0.11], [0.30, 0.35, 0.31]  # SO on (the best, paper) lowers |cos|
    rows = [_final("proxy_anchor", s, 0.5, proxy_abs_cos=c) for s, c in zip((1, 2, 3), cos_on, strict=True)]
    rows += [
        _ablation(so, "alternative", s, 0.5 - s / 100, proxy_abs_cos=c) for s, c in zip((1, 2, 3), cos_off, strict=True)
    ]
    table = ablation_claims(pd.DataFrame(rows), "map_at_r")
    assert list(table["metric"]) == ["map_at_r", "recall_at_1", "proxy_abs_cos"]
    row = _row(table, so, "proxy_abs_cos")
    _check(row, cos_on, cos_off)
    assert row.ci_high < 0 and row.expected == "paper < alternative" and row.verdict == "supported"
    flipped = pd.DataFrame(rows).assign(proxy_abs_cos=[*cos_off, *cos_on])  # SO raised the correlation
    assert _row(ablation_claims(flipped, "map_at_r"), so, "proxy_abs_cos").verdict == "refuted"
    # the directions live on the claims: lower for proxy correlation and effective centers, higher otherwise
    assert BY_ID[so].direction("proxy_abs_cos") == -1 and BY_ID[so].direction("recall_at_1") == 1
    assert BY_ID["soft_triple.merge"].direction("effective_centers") == -1
    assert BY_ID["triplet.easy_positives"].direction("submode_recall_at_1") == 1
    assert all(set(c.paper_lowers) <= set(c.metrics) for c in CLAIMS)
    with pytest.raises(ValueError, match="paper_lowers"):
        Claim("x.y", "x", "y", 0, 1, "s", "src", metrics=(), paper_lowers=("proxy_abs_cos",))


def test_submode_recall_row_where_the_runs_report_it():
    rows = [_final("contrastive", s, 0.5, test_submode_recall_at_1=0.8 + s / 100) for s in (1, 2, 3)]
    rows += [_ablation("contrastive.easy_positives", "paper", s, 0.5, test_submode_recall_at_1=0.9) for s in (1, 2, 3)]
    row = _row(ablation_claims(pd.DataFrame(rows), "map_at_r"), "contrastive.easy_positives", "submode_recall_at_1")
    _check(row, [0.9] * 3, [0.81, 0.82, 0.83])
    assert row.expected == "paper > alternative" and row.verdict == "supported"


def test_verdict_and_paired_edge_cases():
    assert verdict(0.01, 0.02, 3) == "supported" and verdict(-0.02, -0.01, 3) == "refuted"
    assert verdict(-0.02, -0.01, 3, direction=-1) == "supported" and verdict(0.0, 0.01, 3) == "inconclusive (3 seeds)"
    assert verdict(float("nan"), float("nan"), 0) == "inconclusive (0 seeds: no confidence interval)"
    same = paired(np.array([0.5, 0.6]), np.array([0.4, 0.5]))  # equal differences: a zero-width interval
    assert same["ci_low"] == pytest.approx(0.1) and same["ci_high"] == pytest.approx(0.1)


def test_claims_without_pairs_say_why_and_claims_without_ablations_are_not_listed():
    assert ablation_claims(pd.DataFrame([_final("multi_similarity", 1, 0.5)]), "map_at_r").empty  # no ablation stage
    assert ablation_claims(pd.DataFrame({"loss": ["ms"], "stage": ["search"]}), "map_at_r").empty  # no claim column
    failed = [_ablation("multi_similarity.mining", "alternative", s, np.nan, state="FAIL") for s in (1, 2)]
    table = ablation_claims(pd.DataFrame([_final("multi_similarity", 1, 0.5), *failed]), "map_at_r")
    assert len(table) == 1 and table.iloc[0].verdict == "not run: no COMPLETE ablation run (2 FAIL)"
    assert table.iloc[0].seeds == 0 and np.isnan(table.iloc[0].difference)
    unpaired = [_final("multi_similarity", 1, 0.5), _ablation("multi_similarity.mining", "alternative", 2, 0.4)]
    row = ablation_claims(pd.DataFrame(unpaired), "map_at_r").iloc[0]
    assert row.verdict == "not run: no seed with a COMPLETE run in both arms reporting map_at_r"
    no_final = [_ablation("multi_similarity.mining", "alternative", 1, 0.4)]
    assert ablation_claims(pd.DataFrame(no_final), "map_at_r").iloc[0].verdict == (
        "not run: no COMPLETE fold-free final run of multi_similarity to pair with"
    )


def test_seeds_of_different_studies_never_pair():
    one = pd.DataFrame(_mining()).assign(study="one")
    two = pd.DataFrame(_mining()).assign(study="two", test_map_at_r=lambda f: f["test_map_at_r"] - 0.2)
    two = two[two["stage"] == "final"]  # study two ran no ablation
    table = ablation_claims(pd.concat([one, two], ignore_index=True), "map_at_r")
    assert list(table.columns) == ["study", *CLAIM_COLUMNS] and set(table["study"]) == {"one"}
    _check(table.set_index(["claim", "metric"]).loc[("multi_similarity.mining", "map_at_r")], MS_FINAL, MS_NO_MINING)


def _study_frame(rows: list[dict]) -> pd.DataFrame:
    search = [
        {"trial": f"multi_similarity/{i}", "loss": "multi_similarity", "stage": "search", "state": "COMPLETE",
         "map_at_r": 0.3 + i / 100, "recall_at_1": 0.4, "nmi": 0.1, "r_precision": 0.1,
         "param.mining": str(i % 2 == 0), "param.positive": "all",
         "cpu_hours": 2.0, "gpu_hours": 1.0}
        for i in range(4)
    ]  # fmt: skip
    runs = pd.DataFrame(search + rows)
    runs["study"], runs["dataset"], runs["objective"], runs["mode"] = "s", "synthetic", "map_at_r", "finetune"
    return runs


def test_ablation_runs_stay_out_of_every_loss_table():
    finals_only = _study_frame(_mining()[:3])
    with_ablations = _study_frame(_mining())
    for build in (final_table, comparison_table):
        pd.testing.assert_frame_equal(build(with_ablations, "map_at_r"), build(finals_only, "map_at_r"))
    final = final_table(with_ablations, "map_at_r").set_index("loss")
    assert final.loc["multi_similarity", "runs"] == 3 and final.loc["multi_similarity", "seeds"] == 3
    assert final.loc["multi_similarity", "cpu_hours"] == pytest.approx(3 * 1.0 + 4 * 2.0)  # no ablation hours
    assert final.loc["multi_similarity", "map_at_r"] == pytest.approx(np.mean(MS_FINAL))


def test_results_md_has_the_controlled_claims_then_the_exploratory_trends(tmp_path):
    markdown, _, _ = write_tables(_study_frame(_mining()), Storage.at(str(tmp_path)))
    assert markdown == (tmp_path / "results.md").read_text()
    claims_at, trends_at = markdown.index("## Claims"), markdown.index("### Exploratory trends")
    assert markdown.index("Final stage") < claims_at < markdown.index(VERDICT_RULE) < trends_at
    assert markdown.index(TREND_RULE) > trends_at and "(exploratory)" in markdown[trends_at:]
    assert "(exploratory)" not in markdown[:trends_at]
    assert BY_ID["multi_similarity.mining"].statement in markdown and "supported" in markdown[claims_at:trends_at]
    saved = pd.read_csv(tmp_path / "claims.csv")
    assert list(saved.columns) == CLAIM_COLUMNS and list(saved["verdict"]) == ["supported", "inconclusive (3 seeds)"]
    for name in ("claims", "exploratory_trends"):
        assert {p.suffix for p in tmp_path.glob(f"{name}.*")} == {".csv", ".md", ".tex", ".html"}
    shown = claims_text(ablation_claims(_study_frame(_mining()), "map_at_r"))
    assert list(shown["claim"]) == [BY_ID["multi_similarity.mining"].statement, ""]  # the statement once per claim
    d = np.array(MS_FINAL) - np.array(MS_NO_MINING)
    half = T * d.std(ddof=1) / np.sqrt(3)
    assert shown.loc[0, "difference [95% CI]"] == f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]"

    no_ablation, _, _ = write_tables(_study_frame(_mining()[:3]), Storage.at(str(tmp_path / "plain")))
    assert "No ablation runs" in no_ablation and VERDICT_RULE not in no_ablation


@pytest.fixture(scope="module")
def store(tmp_path_factory, migrated_mlflow_db) -> str:
    """A study logged to MLflow by hand (no Ray): 3 search trials, final and ablation runs for seeds 1–3
    (the mining claim), and a stale final run of a superseded best. Returns the tracking URI."""
    folder = tmp_path_factory.mktemp("claims_store")
    uri = f"sqlite:///{copy_mlflow_db(migrated_mlflow_db, folder / 'mlflow.db')}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("s")
    parent = client.create_run(experiment, tags={TAG_ROLE: "study", TAG_OBJECTIVE: "map_at_r"}).info.run_id
    client.log_text(parent, json.dumps({"name": "s"}), "config.json")

    def child(key, stage, value, params, **tags):
        tags |= {"mlflow.parentRunId": parent, TAG_TRIAL: key, TAG_STAGE: stage, TAG_LOSS: "multi_similarity"}
        run = client.create_run(experiment, tags=tags | {TAG_STATE: "COMPLETE"}).info.run_id
        for name, v in params.items():
            client.log_param(run, name, str(v))
        for metric in ("map_at_r", "recall_at_1", "nmi", "r_precision"):  # test classes: test_<metric>
            client.log_metric(run, metric if stage == "search" else f"test_{metric}", value, step=1)
        client.log_metric(run, "train_loss", value, step=1)
        client.set_terminated(run)

    for i in range(3):
        # a setting (dotted) beside the hyperparameters: in MLflow, not a hyperparameter column
        params = {"alpha": 1 + i, "mining": i % 2 == 0, "train.lr": 0.001}
        child(f"multi_similarity/{i}", "search", 0.3 + i / 100, params)
    for seed, (final, ablated) in enumerate(zip(MS_FINAL, MS_NO_MINING, strict=True), 1):
        child(f"multi_similarity/final/2/s{seed}", "final", final, {"alpha": 3, "mining": True, "seed": seed})
        child(f"multi_similarity/ablation/2/mining/s{seed}", "ablation", ablated,
              {"alpha": 3, "mining": False, "seed": seed},
              **{TAG_CLAIM: "multi_similarity.mining", TAG_ARM: "alternative"})  # fmt: skip
    child("multi_similarity/final/0/s1", "final", 0.99, {"alpha": 1, "mining": True, "seed": 1},
          **{TAG_STALE: "superseded by multi_similarity/2"})  # fmt: skip
    return uri


def test_load_runs_reads_the_claim_and_arm_and_drops_stale_finals(store):
    runs = load_runs("s", store)
    assert len(runs) == 9 and "multi_similarity/final/0/s1" not in set(runs["trial"])
    assert {c for c in runs if c.startswith("param.")} == {"param.alpha", "param.mining", "param.seed"}
    ablations = runs[runs["stage"] == "ablation"]
    assert (ablations["claim"] == "multi_similarity.mining").all() and (ablations["arm"] == "alternative").all()
    assert runs.loc[runs["stage"] != "ablation", ["claim", "arm"]].isna().all().all()
    _check(_row(ablation_claims(runs, "map_at_r"), "multi_similarity.mining", "map_at_r"), MS_FINAL, MS_NO_MINING)
    assert len(load_runs("s", store, stale=True)) == 10


def test_report_shows_the_controlled_claims_then_the_exploratory_trends_and_why_importance_is_missing(store, tmp_path):
    from analysis.study_report import build_report

    build_report("s", store, tmp_path)
    page = html.unescape((tmp_path / "report.html").read_text())  # the text as shown, whatever the entities
    titles = re.findall(r"<h2>(.*?)</h2>", page)
    assert titles.index("Hyperparameters") < titles.index("The papers' claims: controlled experiments")
    assert titles.index("The papers' claims: controlled experiments") + 1 == titles.index(
        "Exploratory trends in the search trials"
    )
    assert "importance and sensitivity not shown: 3 COMPLETE trials of multi_similarity, 10 needed" in page
    assert "<caption>Importance" not in page and "<caption>Sensitivity" not in page
    assert VERDICT_RULE in page and TREND_RULE in page
    claims = page[page.index("<caption>Claims (paired by seed, test classes)") :]
    claims = claims[: claims.index("</table>")]
    assert BY_ID["multi_similarity.mining"].statement in claims and claims.count("<tr>") == 3  # header + 2 rows
    assert "3 ablation runs testing 1 of the papers' claims" in page
