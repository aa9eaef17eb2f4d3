"""The benchmarks' measuring paths, run small against a real store: what they time is really done."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from benchmarks.tracking import METRICS, drive
from study.tracking import TAG_STATE


def test_the_tracking_benchmark_logs_every_result_of_every_trial(mlflow_db, tmp_path):
    """``benchmarks/tracking.py``'s trials through the real callback and writer: each trial one run
    ended COMPLETE with every epoch of all 12 metrics, and the figures count every call timed."""
    uri = f"sqlite:///{mlflow_db}"
    measured = drive(uri, tmp_path, trials=3, epochs=4, concurrent=2, max_queued=100)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tracking-benchmark")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`dml_study.role` = 'trial'")
    assert len(runs) == 3 and len(METRICS) == 12
    for run in runs:
        assert run.data.tags[TAG_STATE] == "COMPLETE"
        for metric in METRICS:
            assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2, 3, 4], metric
    writer = measured["writer"]
    assert len(measured["caller"]) == 12 and len(writer["start_trial"]) == len(writer["end_trial"]) == 3
    assert 1 <= len(writer["log_results"]) <= 12
