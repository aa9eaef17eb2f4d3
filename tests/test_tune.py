"""End to end: `dml-study run` through a real local Ray instance, Optuna journal and MLflow SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from study.cli import app
from study.tracking import TAG_ERROR, TAG_LOSS_LR, TAG_LR, TAG_STATE
from study.vocab import TrialKey
from tests.conftest import TINY_STUDY, write_study

runner = CliRunner()
OPTUNA_TO_MLFLOW = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


@pytest.mark.slow
@pytest.mark.usefixtures("study_workdir")  # runs a study: its MLflow store comes migrated
def test_study_end_to_end(workdir, ray_instance):
    # normalized_softmax's class weights get an absurd lr multiplier in its space: its trials diverge
    # to a non-finite loss, must be FAIL in Optuna and FAILED in MLflow, and the study goes on.
    spaces = workdir / "spaces"
    spaces.mkdir()
    for name, text in {
        "multi_similarity": {
            "loss": "multi_similarity",
            "params": {
                "alpha": {"type": "float", "low": 1.0, "high": 4.0, "default": 2.0},
                "base": {"type": "float", "low": 0.3, "high": 0.7, "default": 0.5},
            },
        },
        "normalized_softmax": {
            "loss": "normalized_softmax",
            "train": {"loss_lr_mult": {"type": "float", "low": 1e30, "high": 1e30, "default": 1e30}},
        },
    }.items():
        (spaces / f"{name}.yaml").write_text(yaml.safe_dump(text))
    path = write_study(workdir, search={**TINY_STUDY["search"], "space_dir": str(spaces)})

    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    study_dir = workdir / "runs" / "tiny"
    table = pd.read_csv(study_dir / "results.csv")
    assert list(table.columns[:5]) == ["loss", "trials", "complete", "pruned", "failed"]
    assert "| multi_similarity" in result.output and "| untrained" in result.output

    # Optuna: 3 trials per loss, the paper defaults first, states consistent with MLflow.
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(study_dir / "optuna.journal"))
    )
    ms = optuna.load_study(study_name="tiny.multi_similarity", storage=storage)
    ns = optuna.load_study(study_name="tiny.normalized_softmax", storage=storage)
    assert len(ms.trials) == 3 and len(ns.trials) == 3
    assert ms.trials[0].params == {"alpha": 2.0, "base": 0.5}
    assert {t.state.name for t in ns.trials} == {"FAIL"}
    assert {t.state.name for t in ms.trials} <= {"COMPLETE", "PRUNED"} and "COMPLETE" in {
        t.state.name for t in ms.trials
    }

    client = MlflowClient()
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 7  # baseline + 2 losses x 3 trials
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert all(r.info.status != "RUNNING" for r in runs)
    by_loss = {}
    for run in children:
        by_loss.setdefault(run.data.tags["dml_study.loss"], []).append(run)
        assert run.info.status == OPTUNA_TO_MLFLOW[run.data.tags[TAG_STATE]]
    assert sorted(r.data.tags[TAG_STATE] for r in by_loss["multi_similarity"]) == sorted(
        t.state.name for t in ms.trials
    )
    for run in by_loss["normalized_softmax"]:
        assert "NonFiniteLossError: normalized_softmax: training loss is nan" in run.data.tags[TAG_ERROR]
    for run in by_loss["multi_similarity"]:  # the resolved config: sampled values over the defaults
        resolved = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", str(workdir))).read_text())
        assert resolved["loss_params"] == {
            "alpha": float(run.data.params["alpha"]),
            "beta": 50.0,
            "base": float(run.data.params["base"]),
            "epsilon": 0.1,
            "positive": "all",
            "mining": True,
        }
        assert resolved["train"]["epochs"] == 2 and resolved["model"]["backbone"] == "test_resnet"
    for run in by_loss["normalized_softmax"]:
        assert float(run.data.params["loss_lr_mult"]) == 1e30
        assert (run.data.tags[TAG_LR], float(run.data.tags[TAG_LOSS_LR])) == ("0.001", 1e27)  # effective lrs
    for run in by_loss["multi_similarity"]:  # per-epoch history for every epoch the trial ran
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "map_at_r")]
        expected = 2 if run.data.tags[TAG_STATE] == "COMPLETE" else 1
        assert steps == list(range(1, expected + 1))

    # The table reflects MLflow: the best COMPLETE multi_similarity trial, the failures counted.
    best = max(
        (r for r in by_loss["multi_similarity"] if r.data.tags[TAG_STATE] == "COMPLETE"),
        key=lambda r: r.data.metrics["map_at_r"],
    )
    row = table.set_index("loss").loc["multi_similarity"]
    assert abs(row.map_at_r - best.data.metrics["map_at_r"]) < 1e-12
    assert table.set_index("loss").loc["normalized_softmax"].failed == 3
    baseline = by_loss["untrained"][0].data.metrics["map_at_r"]
    assert abs(table.set_index("loss").loc["untrained"].map_at_r - baseline) < 1e-12

    # `report` rebuilds the same table from MLflow alone.
    (study_dir / "results.csv").unlink()
    report = runner.invoke(app, ["report", "tiny"])
    assert report.exit_code == 0, report.output
    pd.testing.assert_frame_equal(pd.read_csv(study_dir / "results.csv"), table)


def test_report_of_unknown_study_fails_cleanly(workdir):
    result = runner.invoke(app, ["report", "nope"])
    assert result.exit_code == 2 and "no study named 'nope'" in result.output


@pytest.mark.usefixtures("study_workdir")
def test_the_untrained_baseline_takes_a_slot_only_once_the_schedule_has_left_one_idle(workdir, ray_instance):
    """Nothing waits for the baseline: started with the trials, it held back a trial and every trial after
    it on that slot. It starts once the schedule has had a free slot and nothing to give it, and only once."""
    import os

    from ray.tune.search import Searcher

    from study.config import parse_study, search_spaces
    from study.schedule import StudySchedule
    from study.spec import final_spec
    from study.stages import Baseline
    from study.tracking import StudyTracker

    cfg = parse_study(yaml.safe_dump({**TINY_STUDY, "output_dir": str(workdir / "runs")}), "tiny.yaml")
    space = search_spaces(cfg)["multi_similarity"]
    finals = lambda loss: [final_spec(cfg, space, 0, {}, seed=1, fold=None)]  # noqa: E731
    schedule = StudySchedule({"multi_similarity": (None, 0)}, finals, 1)  # a search that has ended
    tracker = StudyTracker(cfg.name, os.environ["MLFLOW_TRACKING_URI"])
    tracker.start(cfg.public_dump(), cfg.search.objective)
    said = []
    baseline = Baseline(cfg, tracker, said.append, schedule)
    assert schedule.suggest("a") is not None  # the final run takes the free slot
    baseline.on_step_begin(0, [])
    assert baseline.task is None
    assert schedule.suggest("b") == Searcher.FINISHED and schedule.left_a_slot_idle  # a slot with nothing
    baseline.on_step_begin(1, [])
    assert baseline.task is not None
    baseline.wait()
    run = tracker.find_trial(str(TrialKey.baseline()))
    assert run.data.tags[TAG_STATE] == "COMPLETE" and {"map_at_r", "test_map_at_r"} <= set(run.data.metrics)
    assert said == [f"untrained baseline: map_at_r={run.data.metrics['map_at_r']:.4f}"]
    again = Baseline(cfg, tracker, said.append, schedule)  # a resumed study: its baseline is done
    again.on_step_begin(2, [])
    again.start()
    assert again.task is None
