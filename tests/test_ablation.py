"""The ablation stage, for real: every claim about the study's losses trained as the second arm of a
paired experiment (the final runs are the first), resumable after a kill, and the verdict read back
from MLflow equal to a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from analysis.claims import ablation_claims
from analysis.runs import load_runs
from study.claims import BY_ID
from study.tracking import TAG_ARM, TAG_CLAIM, TAG_LOSS, TAG_STAGE, TAG_STATE, TAG_TRIAL
from study.vocab import TrialKey
from tests.conftest import TINY_STUDY, write_study
from tests.test_resume import _kill_driver, _mlflow_trials, _start, _wait_for

pytestmark = pytest.mark.slow  # real Ray studies in driver subprocesses

SEEDS = (1, 2)
LOSSES = ["multi_similarity", "proxy_anchor"]  # two losses whose claims apply: mining and easy positives; SO


def _ablation_checkpoints(workdir):
    return list((workdir / "runs" / "tiny" / "checkpoints").glob("*/ablation/*/*/s*/trial.pt"))


@pytest.mark.usefixtures("study_workdir")  # runs a study: its MLflow store comes migrated
def test_ablations_pair_with_the_final_runs_survive_a_kill_and_decide_the_claims(workdir, driver_head):
    path = write_study(
        workdir,
        search={**TINY_STUDY["search"], "losses": LOSSES, "trials_per_loss": 2},
        final={"seeds": len(SEEDS), "epochs": 4},
    )
    driver = _start(workdir, driver_head, "run", str(path))
    _wait_for(lambda: _ablation_checkpoints(workdir), "an ablation run's first epoch", timeout=300)
    _kill_driver(driver, driver_head)
    resumed = _start(workdir, driver_head, "resume", "runs/tiny")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "ablations multi_similarity: 2 claims × 2 seeds: mining, easy_positives" in out
    assert "ablations proxy_anchor: 1 claim × 2 seeds: soft_orthogonality" in out

    parents, children = _mlflow_trials(workdir)
    assert parents[0].info.status == "FINISHED"
    runs = {r.data.tags[TAG_TRIAL]: r for r in children}
    assert len(runs) == len(children)  # one run per key, never two
    finals = {(r.data.tags[TAG_LOSS], TrialKey.parse(k).seed): r for k, r in runs.items() if "/final/" in k}
    ablations = [r for r in children if r.data.tags[TAG_STAGE] == "ablation"]
    best = {loss: TrialKey.parse(str(finals[loss, 1].data.tags[TAG_TRIAL])).number for loss in LOSSES}
    factors = {"multi_similarity": ("mining", "easy_positives"), "proxy_anchor": ("soft_orthogonality",)}
    assert sorted(r.data.tags[TAG_TRIAL] for r in ablations) == sorted(
        f"{loss}/ablation/{best[loss]}/{factor}/s{s}" for loss in LOSSES for factor in factors[loss] for s in SEEDS
    )
    assert all(r.data.tags[TAG_STATE] == "COMPLETE" for r in [*ablations, *finals.values()])
    client = MlflowClient()
    for run in ablations:
        claim = BY_ID[run.data.tags[TAG_CLAIM]]
        final = finals[claim.loss, int(run.data.params["seed"])]
        assert run.data.params[claim.param] != final.data.params[claim.param]  # the claim's factor, and only it
        factor = {claim.param, f"loss.{claim.param}"}  # the sampled value and the loss's argument it set
        assert {k: v for k, v in run.data.params.items() if k not in factor} == {
            k: v for k, v in final.data.params.items() if k not in factor
        }
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_map_at_r")] == [4]  # tested once
        assert "map_at_r" not in run.data.metrics  # a test score is never logged under the validation name
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4]
        is_alternative = run.data.params[claim.param] == str(claim.alternative)
        assert run.data.tags[TAG_ARM] == ("alternative" if is_alternative else "paper")

    table = ablation_claims(load_runs("tiny"), "map_at_r").set_index(["claim", "metric"])
    for claim in ("multi_similarity.mining", "multi_similarity.easy_positives", "proxy_anchor.soft_orthogonality"):
        differences = []
        for run in (r for r in ablations if r.data.tags[TAG_CLAIM] == claim):
            final = finals[BY_ID[claim].loss, int(run.data.params["seed"])]
            sign = 1 if run.data.tags[TAG_ARM] == "paper" else -1
            differences.append(sign * (run.data.metrics["test_map_at_r"] - final.data.metrics["test_map_at_r"]))
        row = table.loc[(claim, "map_at_r")]
        mean, sem = np.mean(differences), stats.sem(differences)
        half = stats.t.ppf(0.975, len(differences) - 1) * sem
        assert row.seeds == len(SEEDS)
        assert np.isclose(row.difference, mean) and np.isclose(row.ci_low, mean - half)
        assert np.isclose(row.ci_high, mean + half)
        inconclusive = f"inconclusive ({len(SEEDS)} seeds)"
        assert row.verdict == ("supported" if mean - half > 0 else "refuted" if mean + half < 0 else inconclusive)
    assert ("proxy_anchor.soft_orthogonality", "proxy_abs_cos") in table.index  # SO's own claim, on its proxies
