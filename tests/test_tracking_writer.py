"""The tracking writer against a real SQLite store: the callback's calls in order and exactly once,
a slow tracking server that never holds up the caller, a failed write raised in the driver."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from study.callback import TrackingCallback
from study.cli import app
from study.config import parse_study, search_spaces
from study.spec import SPEC, search_spec
from study.tracking import TAG_STATE, StudyTracker
from study.tracking_writer import LINGER_S, TrackingError, TrackingWriter, failure_text
from study.vocab import CONFIG_FILE, PARENT_RUN_FILE, checkpoint_dir
from tests.conftest import TINY_STUDY, write_study

METRICS = ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r", "r_precision", "nmi")


@pytest.fixture
def cfg(tmp_path):
    text = yaml.safe_dump({**TINY_STUDY, "output_dir": str(tmp_path / "runs")})
    return parse_study(text, "study.yaml")


@pytest.fixture
def uri(mlflow_db):
    return f"sqlite:///{mlflow_db}"


class SlowClient:
    """A real MlflowClient that waits ``delay`` seconds before every call: a slow tracking server.
    ``calls`` names each call (``log_batch(metrics)`` for a batch of metrics)."""

    def __init__(self, client: MlflowClient, delay: float):
        self._client, self._delay = client, delay
        self.calls: list[str] = []

    def __getattr__(self, name):
        method = getattr(self._client, name)

        def slow(*args, **kwargs):
            self.calls.append(f"{name}(metrics)" if kwargs.get("metrics") else name)
            time.sleep(self._delay)
            return method(*args, **kwargs)

        return slow


def _trial(spec, last_result=None):
    return SimpleNamespace(config={SPEC: spec}, last_result=last_result, error_file=None)


def _result(epoch: int) -> dict:
    return {**{name: epoch / 100 for name in METRICS}, "train_loss": 1.0 / epoch, "epoch": epoch}


def _history(uri: str, run_id: str, metric: str = "map_at_r") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, metric))


def test_a_resumed_trial_is_logged_in_order_and_exactly_once(cfg, uri):
    """Through the real callback and writer: a trial logs 3 epochs, the driver dies, a new driver
    resumes it; the trial re-reports those 3 epochs from its checkpoint and goes on to 5. One run,
    every epoch once, ended COMPLETE, and the checkpoint deleted only after the run ended."""
    space = search_spaces(cfg)["multi_similarity"]
    spec = search_spec(cfg, space, 0, {})
    tracker = StudyTracker(cfg.name, uri)
    parent = tracker.start({}, "map_at_r")
    writer = TrackingWriter(tracker, uri)
    callback = TrackingCallback(writer, cfg, {"multi_similarity": space})
    trial = _trial(spec)
    callback.on_trial_start(0, [], trial)
    for epoch in (1, 2, 3):
        callback.on_trial_result(0, [], trial, _result(epoch))
    writer.close()  # the first driver's writes are in; then it dies

    again = StudyTracker(cfg.name, uri)
    again.resume(parent)
    writer = TrackingWriter(again, uri)
    callback = TrackingCallback(writer, cfg, {"multi_similarity": space})
    folder = checkpoint_dir(cfg.storage, spec.key)
    folder.child("trial.pt").write_bytes(b"weights")
    ended = threading.Event()
    callback.on_trial_start(0, [], trial)
    for epoch in (1, 2, 3, 4, 5):  # the resumed trial re-reports its checkpoint's epochs first
        callback.on_trial_result(0, [], trial, _result(epoch))
    trial.last_result = _result(5)
    writer.after_logged(ended.wait)  # holds the writer: what the callback queues next waits
    callback.on_trial_complete(0, [], trial)
    assert folder.exists()  # the deletion is queued after the run's end, not done by the caller
    ended.set()
    writer.flush()
    assert not folder.exists()

    runs = MlflowClient(uri).search_runs([tracker.experiment_id], filter_string="tags.`dml_study.role` = 'trial'")
    assert len(runs) == 1
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.tags[TAG_STATE] == "COMPLETE"
    for metric in METRICS:
        assert _history(uri, run.info.run_id, metric) == [1, 2, 3, 4, 5]
    writer.close()


def test_interleaved_trials_keep_each_trials_order(cfg, uri):
    """Many trials' calls interleaved as Tune delivers them: each run is created before its metrics
    and ended after them (out of order, log_metrics would find no run and the writer would fail)."""
    space = search_spaces(cfg)["multi_similarity"]
    tracker = StudyTracker(cfg.name, uri)
    tracker.start({}, "map_at_r")
    writer = TrackingWriter(tracker, uri)
    callback = TrackingCallback(writer, cfg, {"multi_similarity": space})
    trials = [_trial(search_spec(cfg, space, n, {})) for n in range(6)]
    for trial in trials:
        callback.on_trial_start(0, [], trial)
    for epoch in (1, 2, 3):
        for trial in trials:
            callback.on_trial_result(0, [], trial, _result(epoch))
    for trial in trials:
        trial.last_result = _result(3)
        callback.on_trial_complete(0, [], trial)
    writer.close()
    runs = MlflowClient(uri).search_runs([tracker.experiment_id], filter_string="tags.`dml_study.role` = 'trial'")
    assert len(runs) == 6
    for run in runs:
        assert run.data.tags[TAG_STATE] == "COMPLETE" and _history(uri, run.info.run_id) == [1, 2, 3]


def test_a_slow_tracking_server_does_not_hold_up_the_caller(cfg, uri):
    """Every MLflow call takes 0.2 s more (fault injection on the real client): the callback's N
    results take far less than N × 0.2 s; the results that queued up while the writer waited on the
    server reach it in one ``log_batch``; after the flush every metric is in MLflow."""
    delay, n = 0.2, 10
    space = search_spaces(cfg)["multi_similarity"]
    tracker = StudyTracker(cfg.name, uri)
    tracker.start({}, "map_at_r")
    tracker.client = SlowClient(tracker.client, delay)
    writer = TrackingWriter(tracker, uri)
    callback = TrackingCallback(writer, cfg, {"multi_similarity": space})
    trial = _trial(search_spec(cfg, space, 0, {}))
    start = time.perf_counter()
    callback.on_trial_start(0, [], trial)  # a search, a run, its params and config.json: 4 slow calls
    for epoch in range(1, n + 1):
        callback.on_trial_result(0, [], trial, _result(epoch))
    caller = time.perf_counter() - start
    writer.flush()
    drained = time.perf_counter() - start
    assert caller < n * delay / 10, caller
    assert tracker.client.calls.count("log_batch(metrics)") == 1
    assert drained >= 5 * delay  # the writer did wait for the server: 4 calls to start the run, 1 for the results
    (run,) = MlflowClient(uri).search_runs([tracker.experiment_id], filter_string="tags.`dml_study.role` = 'trial'")
    for metric in METRICS:
        assert _history(uri, run.info.run_id, metric) == list(range(1, n + 1))
    writer.close()


def test_held_results_reach_mlflow_without_a_flush(uri):
    """A result waits in the writer at most ``LINGER_S`` for others: with no call after it, it is
    written all the same, not left for the next flush."""
    tracker = StudyTracker("held", uri)
    tracker.start({}, "map_at_r")
    writer = TrackingWriter(tracker, uri)
    writer.start_trial("ms/0", "multi_similarity", "search", {}, "ms-0")
    run_id = writer.find_trial("ms/0").info.run_id
    for epoch in (1, 2, 3):
        writer.log_metrics("ms/0", {"map_at_r": epoch / 10}, step=epoch)
    deadline = time.monotonic() + 10 * LINGER_S
    while _history(uri, run_id) != [1, 2, 3]:
        assert time.monotonic() < deadline, _history(uri, run_id)
        time.sleep(0.1)
    writer.close()


def test_a_full_queue_makes_the_caller_wait(uri):
    """The queue is bounded: once ``max_queued`` calls wait, the next one waits for a free slot."""
    writer = TrackingWriter(StudyTracker("bounded", uri), uri, max_queued=1)
    busy = threading.Event()
    writer.after_logged(lambda: (busy.set(), time.sleep(0.5)))
    busy.wait(5)  # the writer holds the first call
    writer.after_logged(lambda: None)  # fills the queue
    start = time.perf_counter()
    writer.after_logged(lambda: None)  # waits until the first call is done
    assert time.perf_counter() - start > 0.2
    writer.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def _dead_server(tracker: StudyTracker, monkeypatch) -> str:
    """Point ``tracker`` at a tracking server that does not answer (port 9 refuses), without
    MLflow's minutes of retries; returns its URI, with a password."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = "http://user:pw-never-shown@127.0.0.1:9"
    tracker.client = MlflowClient(dead)
    return dead


def test_a_failed_write_is_raised_at_flush_and_at_every_later_call(uri, monkeypatch):
    tracker = StudyTracker("down", uri)
    tracker.start({}, "map_at_r")
    tracker.start_trial("ms/0", "multi_similarity", "search", {}, "ms-0")
    dead = _dead_server(tracker, monkeypatch)
    writer = TrackingWriter(tracker, dead)
    writer.log_metrics("ms/0", {"map_at_r": 0.1}, step=1)  # returns at once; fails in the writer
    later = []
    writer.after_logged(lambda: later.append("ran"))  # queued after the failure: dropped
    with pytest.raises(TrackingError) as raised:
        writer.flush()
    message = str(raised.value)
    assert (
        message
        == "MLflow tracking at http://user:***@127.0.0.1:9 failed (MlflowException: [Errno 111] Connection refused)"
    )
    assert later == []
    with pytest.raises(TrackingError):  # the next call from the driver (the callback's next result)
        writer.log_metrics("ms/0", {"map_at_r": 0.2}, step=2)
    with pytest.raises(TrackingError):
        writer.find_trial("ms/0")
    with pytest.raises(TrackingError):
        writer.close()


# how MLflow words a request that failed (the password is the URI's, repeated)
REQUESTS_FAILED = (
    "API request to http://u:pw@127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed with exception HTTPConnectionPool"
    "(host='127.0.0.1', port=9): Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch "
)


@pytest.mark.parametrize(
    "message, reason",
    [
        (
            REQUESTS_FAILED
            + "(Caused by NewConnectionError(\"HTTPConnection(host='127.0.0.1', port=9): Failed to establish a new "
            'connection: [Errno 111] Connection refused"))',
            "[Errno 111] Connection refused",
        ),
        (
            REQUESTS_FAILED
            + "(Caused by ProtocolError('Connection aborted.', RemoteDisconnected('Remote end closed connection "
            "without response')))",
            "Remote end closed connection without response",
        ),
        (
            REQUESTS_FAILED
            + "(Caused by ReadTimeoutError(\"HTTPConnectionPool(host='127.0.0.1', port=9): Read timed out. (read "
            'timeout=120)"))',
            "Read timed out. (read timeout=120)",
        ),
        (
            "INTERNAL_ERROR: Response: {'error_code': 'INTERNAL_ERROR'}\nmore",
            "INTERNAL_ERROR: Response: {'error_code': 'INTERNAL_ERROR'}",
        ),
    ],
)
def test_a_failure_is_one_line_with_the_innermost_cause(message, reason):
    from mlflow.exceptions import MlflowException

    text = failure_text("http://u:pw@127.0.0.1:9", MlflowException(message))
    assert text == f"MLflow tracking at http://u:***@127.0.0.1:9 failed (MlflowException: {reason})"


@pytest.mark.usefixtures("study_workdir")  # creates the MLflow store anyway: it comes migrated
def test_a_failed_write_stops_the_study_with_one_line(workdir, monkeypatch):
    """``run`` around a stand-in for the stages (no Ray) that logs through the writer as the real
    ones do, the server gone mid-study: one line naming the tracking URI (redacted) and how to go on,
    exit 1, and no traceback."""
    import study.stages  # imports Ray (not started): here only

    def run_study(cfg, resume, verbose):
        tracker = StudyTracker(cfg.name, os.environ["MLFLOW_TRACKING_URI"])
        cfg.storage.child(CONFIG_FILE).write_text(yaml.safe_dump(cfg.public_dump()))
        cfg.storage.child(PARENT_RUN_FILE).write_text(tracker.start(cfg.public_dump(), cfg.search.objective))
        writer = TrackingWriter(tracker, _dead_server(tracker, monkeypatch))
        try:
            writer.start_trial("multi_similarity/0", "multi_similarity", "search", {}, "multi_similarity-0")
        finally:
            writer.close()
            tracker.finish()

    monkeypatch.setattr(study.stages, "run_study", run_study)
    result = CliRunner().invoke(app, ["run", str(write_study(workdir))])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "pw-never-shown" not in result.output
    assert result.output.splitlines()[-1] == (  # the last line, after any log line of MLflow's
        "dml-study: MLflow tracking at http://user:***@127.0.0.1:9 failed (MlflowException: [Errno 111] Connection "
        "refused); the study stopped; fix it, then: dml-study resume runs/tiny"
    )


@pytest.mark.slow
def test_a_tracking_server_lost_mid_study_stops_it_with_one_line(workdir, monkeypatch, driver_head, migrated_mlflow_db):
    """For real: a study logging to an ``mlflow server`` whose server is killed after the first
    epoch. The driver stops (Ray Tune's trials with it) with one line naming the server, exit 1."""
    from tests.test_resume import _checkpoints, _start, _study, _wait_for
    from tests.test_tracking_server import start_mlflow_server

    server, port = start_mlflow_server(workdir, migrated_mlflow_db)
    try:
        uri = f"http://user:pw-never-shown@127.0.0.1:{port}"
        _wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), "the mlflow server")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # not MLflow's minutes of retries
        study = _study(workdir, ["multi_similarity"], trials=3, max_concurrent=1)
        driver = _start(workdir, driver_head, "run", str(study))
        _wait_for(lambda: _checkpoints(workdir), "a first epoch checkpoint")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 1, out
    # refused, or cut off mid-request: which one depends on when the server died
    head = f"dml-study: MLflow tracking at http://user:***@127.0.0.1:{port} failed (MlflowException: "
    tail = "); the study stopped; fix it, then: dml-study resume runs/tiny"
    assert [line for line in out.splitlines() if line.startswith(head) and line.endswith(tail)], out
    assert "pw-never-shown" not in out and "Traceback" not in out
