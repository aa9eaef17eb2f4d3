"""The benchmarks' measuring paths, run small against a real store: what they time is really done."""

from __future__ import annotations

import itertools

from mlflow.tracking import MlflowClient

from benchmarks.shape import best_busy, rounds_needed
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


def _fewest_rounds(losses: int, search: int, concurrent: int, slots: int) -> int:
    """The fewest rounds of equal trials that run the study, by trying every schedule (breadth first over
    each loss's search trials done, and whether its final run is); a loss's final run starts the round after
    its last search trial's. Trials of equal length can always start on a multiple of their length, so rounds lose
    nothing against any other schedule."""
    start = tuple((0, 0) for _ in range(losses))
    done = tuple((search, 1) for _ in range(losses))
    frontier, seen, rounds = {start}, {start}, 0
    while done not in frontier:
        rounds, reached = rounds + 1, set()
        for state in frontier:
            choices = [
                [(s, 0) for s in range(min(concurrent, search - ran) + 1)]
                if ran < search
                else [(0, f) for f in range(2 - ended)]
                for ran, ended in state
            ]
            for pick in itertools.product(*choices):
                if 0 < sum(s + f for s, f in pick) <= slots:
                    after = tuple(sorted((r + s, e + f) for (r, e), (s, f) in zip(state, pick, strict=True)))
                    if after not in seen:
                        seen.add(after)
                        reached.add(after)
        frontier = reached
    return rounds


def test_the_shape_bound_is_what_the_best_schedule_of_each_small_study_reaches():
    """``benchmarks/shape.py``'s rounds against every schedule of each small study: never more (the bound
    holds) and never fewer (the best schedule reaches it), so busy above ``best_busy`` cannot be, and a study
    below it loses time to its schedule or its overheads, not to its shape."""
    shapes = itertools.product(range(1, 4), range(1, 4), (1, 2, 4), range(1, 9))
    for shape in shapes:
        assert rounds_needed(*shape) == _fewest_rounds(*shape), shape
    assert best_busy(3, 3, 4, 4) == 0.75 and best_busy(9, 3, 4, 8) == 0.9 and best_busy(9, 3, 4, 2) == 1
