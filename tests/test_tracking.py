"""MLflow tracking against a real SQLite store: one parent, one run per trial, states and tags."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from study import tracking
from study.tracking import StudyTracker, resolve_tracking_uri


def test_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) is None
    assert resolve_tracking_uri("sqlite:///a.db") == "sqlite:///a.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri("sqlite:///a.db") == "sqlite:///env.db"


def test_one_run_per_trial_with_params_metrics_and_states(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
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
