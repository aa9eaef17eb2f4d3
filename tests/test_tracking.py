"""MLflow tracking against a real SQLite store: one parent, one run per trial, states and tags."""

from __future__ import annotations

import getpass
import json
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pydantic import SecretStr

from study import tracking
from study.tracking import StudyTracker, resolve_tracking_uri


def test_uri_precedence(monkeypatch):
    """Command line (``--tracking-uri``), then MLFLOW_TRACKING_URI, then the study's tracking.uri."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) is None
    assert resolve_tracking_uri("sqlite:///a.db") == "sqlite:///a.db"
    assert resolve_tracking_uri(SecretStr("sqlite:///a.db")) == "sqlite:///a.db"
    assert resolve_tracking_uri("sqlite:///a.db", "sqlite:///cli.db") == "sqlite:///cli.db"
    assert resolve_tracking_uri(None, "sqlite:///cli.db") == "sqlite:///cli.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri("sqlite:///a.db") == "sqlite:///env.db"
    assert resolve_tracking_uri(None) == "sqlite:///env.db"
    assert resolve_tracking_uri("sqlite:///a.db", "sqlite:///cli.db") == "sqlite:///cli.db"
    assert resolve_tracking_uri("sqlite:///a.db", None) == "sqlite:///env.db"


def test_one_run_per_trial_with_params_metrics_and_states(mlflow_db, tmp_path):
    uri = f"sqlite:///{mlflow_db}"
    tracker = StudyTracker("s1", uri)
    parent = tracker.start({"seed": 0, "train": {"epochs": 2}}, "map_at_r")
    first = tracker.start_trial("ms/1", "multi_similarity", "search", {"alpha": 2.0}, "ms-1")
    tracker._runs.clear()  # a restarted driver: the run is found again by its tag
    assert tracker.start_trial("ms/1", "multi_similarity", "search", {"alpha": 2.0}, "ms-1") == first
    for epoch in (1, 2):
        tracker.log_metrics("ms/1", {"map_at_r": 0.1 * epoch, "note": "text is skipped"}, step=epoch)
    tracker.end_trial("ms/1", "PRUNED")
    tracker.start_trial("ms/2", "multi_similarity", "search", {"alpha": 3.0}, "ms-2")
    tracker.end_trial("ms/2", "FAIL", error="Traceback (most recent call last):\n  ...\nValueError: boom\n")
    tracker.finish()

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("s1")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"s1", "ms-1", "ms-2"}
    assert runs["s1"].data.params == {"seed": "0", "train.epochs": "2"}
    assert runs["s1"].info.status == "FINISHED"
    ms1, ms2 = runs["ms-1"], runs["ms-2"]
    assert ms1.data.tags["mlflow.parentRunId"] == parent
    assert ms1.data.params == {"alpha": "2.0"}
    history = client.get_metric_history(ms1.info.run_id, "map_at_r")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2)]
    assert "note" not in ms1.data.metrics
    assert (ms1.info.status, ms1.data.tags[tracking.TAG_STATE]) == ("KILLED", "PRUNED")
    assert (ms2.info.status, ms2.data.tags[tracking.TAG_ERROR]) == ("FAILED", "ValueError: boom")
    trace = Path(client.download_artifacts(ms2.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert trace.startswith("Traceback") and trace.rstrip().endswith("ValueError: boom")


def test_results_of_several_trials_go_in_one_log_batch_per_run_within_mlflows_limit(mlflow_db):
    """``log_results``: one trial's 100 epochs of 12 metrics (1,200, over MLflow's 1,000 per batch) and
    another's 2 epochs go in as 3 ``log_batch`` calls, each metric with its result's own time; an
    epoch MLflow already holds (a resumed trial re-reporting it) is skipped."""
    uri = f"sqlite:///{mlflow_db}"
    tracker = StudyTracker("s1", uri)
    tracker.start({}, "map_at_r")
    runs = {key: tracker.start_trial(key, "multi_similarity", "search", {}, key) for key in ("ms/0", "ms/1")}
    tracker.log_metrics("ms/1", {"map_at_r": 0.0}, step=1)
    values = lambda epoch: {f"m{i}": epoch + i / 100 for i in range(12)}  # noqa: E731
    results = [("ms/0", values(epoch), epoch, 1_000 + epoch) for epoch in range(1, 101)]
    results += [("ms/1", values(epoch), epoch, 2_000 + epoch) for epoch in (1, 2)]
    batches = []
    log_batch = tracker.client.log_batch
    tracker.client.log_batch = lambda run_id, **kw: batches.append(len(kw["metrics"])) or log_batch(run_id, **kw)
    tracker.log_results(results)
    assert batches == [1_000, 200, 12]
    client = MlflowClient(uri)
    history = client.get_metric_history(runs["ms/0"], "m11")
    assert [(m.step, m.value, m.timestamp) for m in history] == [(e, e + 0.11, 1_000 + e) for e in range(1, 101)]
    assert [(m.step, m.timestamp) for m in client.get_metric_history(runs["ms/1"], "m0")] == [(2, 2_002)]
    assert [m.step for m in client.get_metric_history(runs["ms/1"], "map_at_r")] == [1]


CONFIG = {"dataset": {"name": "synthetic"}, "model": {"backbone": "resnet10t"}, "seed": 0}


def _parent_tags(uri: str, name: str) -> dict[str, str]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([exp.experiment_id])
    return parent.data.tags


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_parent_run_names_the_commit_user_version_dataset_and_backbone(mlflow_db, tmp_path, monkeypatch):
    repo = tmp_path / "checkout"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "first"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True)
    monkeypatch.chdir(repo)
    uri = f"sqlite:///{mlflow_db}"
    StudyTracker("s2", uri).start(CONFIG, "map_at_r")
    tags = _parent_tags(uri, "s2")
    assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags[tracking.TAG_VERSION] == metadata.version("dml-study")
    assert (tags[tracking.TAG_DATASET], tags[tracking.TAG_BACKBONE]) == ("synthetic", "resnet10t")


def test_parent_run_without_git_skips_the_commit_quietly(mlflow_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git to run
    uri = f"sqlite:///{mlflow_db}"
    StudyTracker("s3", uri).start({"seed": 0}, "map_at_r")  # a config without dataset or model: no such tags
    tags = _parent_tags(uri, "s3")
    assert "mlflow.source.git.commit" not in tags
    assert tracking.TAG_DATASET not in tags and tracking.TAG_BACKBONE not in tags
    assert tags[tracking.TAG_VERSION] == metadata.version("dml-study")


def test_log_headline_puts_each_losss_test_objective_and_the_best_on_the_parent(mlflow_db, tmp_path):
    uri = f"sqlite:///{mlflow_db}"
    tracker = StudyTracker("s4", uri)
    parent = tracker.start(CONFIG, "map_at_r")
    assert tracker.log_headline("map_at_r", {}) is None
    assert tracker.log_headline("map_at_r", {"ms": 0.25, "ns": 0.5, "pa": float("nan")}) == "ns"
    run = MlflowClient(uri).get_run(parent)
    assert run.data.metrics == {"test_map_at_r.ms": 0.25, "test_map_at_r.ns": 0.5, "test_map_at_r": 0.5}
    assert run.data.tags[tracking.TAG_BEST_LOSS] == "ns"


def test_trial_runs_log_their_settings_as_dotted_params_and_a_found_run_only_what_it_lacks(mlflow_db, tmp_path):
    uri = f"sqlite:///{mlflow_db}"
    tracker = StudyTracker("s5", uri)
    tracker.start(CONFIG, "map_at_r")
    many = {f"k{i:03d}": i for i in range(150)}  # more than one log_batch call may carry
    settings = {
        "train": {"lr": 0.002, "epochs": 2, "betas": [0.9, 0.999], "grad_clip": None},
        "dataset": {"name": "synthetic", "options": {"num_classes": 16}, "root": "x" * 7000},
        "trial": {"seed": 0},
        "extra": many,
    }
    tracker.start_trial("ms/1", "multi_similarity", "search", {"alpha": 2.0, "lr": 0.002}, "ms-1", settings=settings)
    client = MlflowClient(uri)
    params = client.get_run(tracker._runs["ms/1"]).data.params
    assert (params["alpha"], params["lr"], params["train.lr"], params["train.epochs"]) == ("2.0", "0.002", "0.002", "2")
    assert (params["train.betas"], params["train.grad_clip"], params["trial.seed"]) == ("[0.9, 0.999]", "None", "0")
    assert params["dataset.options.num_classes"] == "16" and params["dataset.root"] == "x" * 6000  # MLflow's longest
    assert len(params) == 2 + 4 + 3 + 1 + 150

    # a restarted driver finds the run: a param already logged keeps its value (MLflow refuses a change),
    # one the run lacks (logged by an older version) is added
    tracker._runs.clear()
    changed = {**settings, "train": {**settings["train"], "epochs": 3}, "model": {"backbone": "resnet10t"}}
    tracker.start_trial("ms/1", "multi_similarity", "search", {"alpha": 2.0, "lr": 0.002}, "ms-1", settings=changed)
    params = client.get_run(tracker._runs["ms/1"]).data.params
    assert (params["train.epochs"], params["model.backbone"]) == ("2", "resnet10t")

    with pytest.raises(ValueError, match="must not contain a dot"):  # the naming rule: dotted names are settings
        tracker.start_trial("ms/2", "multi_similarity", "search", {"train.lr": 0.1}, "ms-2")


def test_search_spaces_go_to_the_parent_run_once_and_again_only_when_they_change(mlflow_db, tmp_path):
    uri = f"sqlite:///{mlflow_db}"
    tracker = StudyTracker("s6", uri)
    parent = tracker.start(CONFIG, "map_at_r")
    spaces = {"ms": {"alpha": {"type": "float", "low": 1.0, "high": 4.0, "log": True, "default": 2.0}}}
    tracker.log_search_spaces(spaces)
    client = MlflowClient(uri)
    logged = Path(client.download_artifacts(parent, "search_spaces.json", str(tmp_path / "a")))
    assert json.loads(logged.read_text()) == spaces
    stored = Path(client.get_run(parent).info.artifact_uri.removeprefix("file://")) / "search_spaces.json"
    written = stored.stat().st_mtime_ns
    resumed = StudyTracker("s6", uri)
    resumed.resume(parent)
    resumed.log_search_spaces(spaces)
    assert stored.stat().st_mtime_ns == written  # the same spaces: not written again
    wider = {"ms": {**spaces["ms"], "beta": {"type": "categorical", "choices": [1, 2], "default": 1}}}
    resumed.log_search_spaces(wider)
    assert json.loads(stored.read_text()) == wider
