"""The driver's MLflow writes off Ray Tune's event loop: queued in order, written by one thread.

:class:`~study.callback.TrackingCallback` runs inside Tune's event loop, on the driver. Calling
MLflow there directly makes every result wait for the tracking server (a ``log_batch`` round trip;
minutes of retries when the server is down), and while it waits no trial is scheduled, stopped or
told anything. :class:`TrackingWriter` puts each call on a queue and returns; one thread executes
the queue against a :class:`~study.tracking.StudyTracker`.

- **Order and exactly once.** One FIFO queue, one writer thread: a trial's run is created before its
  metrics are logged and ended after them, as before. The tracker's own state (``_runs``,
  ``_last_step``: which run a trial has, which epoch MLflow already holds) is touched by the writer
  thread only, so the resume logic (a resumed trial re-reports its epochs; those MLflow holds are
  skipped) is the same code, run in the same order.
- **Reads see every write.** :meth:`find_trial` and :meth:`supersede` go through the queue too and
  wait for their answer: it is read after everything queued before it has been written.
- **Flush.** :meth:`flush` waits until the queue is drained; the study flushes at the end of the
  Tune run and :meth:`close` (flush, then stop) runs before the parent run is ended, also when the
  study is interrupted or failed, so nothing queued is lost.
- **Errors are not swallowed.** The first failed write (the server down beyond MLflow's own
  retries) is kept, the writes queued after it are dropped (they would fail, or log to a run
  that was never created), and every later call, :meth:`flush` and :meth:`close` raise
  :class:`TrackingError`: one line naming the tracking URI, credentials redacted.
- **A killed driver** (``kill -9``) loses what was still queued. Nothing is lost for good: on
  resume each unfinished trial re-reports every epoch its checkpoint holds and the tracker logs
  those MLflow lacks; a trial's checkpoint is deleted only once its run has ended in MLflow
  (:meth:`after_logged`), so a finished trial's epochs can be recovered until then.

**Results written together.** A result waits up to :data:`LINGER_S` in the writer for others
(at most :data:`MAX_HELD`), and then they are logged with one ``log_batch`` per run
(:meth:`StudyTracker.log_results <study.tracking.StudyTracker.log_results>`): each ``log_batch`` is
a request to the tracking server, and with a SQLite store a committed transaction, whose cost hardly
depends on how many metrics it carries. Any other call writes the held results first, so the order
above holds; each metric keeps the time its result reached the writer's queue.

**A bounded queue** (:data:`MAX_QUEUED` calls). Unbounded, a server slower than the results arrive
would grow the driver's memory without limit and widen what a killed driver loses. Bounded, once
it is full the caller waits for a free slot: the driver falls back to today's pace (the server's)
instead of failing. The bound is far above what a study queues while the writer keeps up: a queued
result (a dozen metrics) takes about 1.2 kB, so 10,000 calls hold about 12 MB, and at a realistic
arrival rate (64 GPUs, one epoch each per 30 s: ~2 results/s) they are more than an hour of
results: a short stall of the server (a restart, a slow query) never makes the driver wait.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from study.redaction import redact, redact_text
from study.tracking import StudyTracker

MAX_QUEUED = 10_000  # calls waiting for the writer; see the module's docstring
LINGER_S = 1.0  # how long a result waits in the writer for others to be written with
MAX_HELD = 256  # results held at most, then written
_STOP = object()  # the writer thread's last item
_RESULT = object()  # marks a queued result: (_RESULT, (key, values, step, timestamp), {}, None)


class TrackingError(RuntimeError):
    """A write to MLflow failed (the tracking server is down beyond MLflow's own retries, or refused
    the write); the study stops. Its text is one line naming the tracking URI."""


class TrackingWriter:
    """``tracker``'s methods, executed in order by one background thread (see the module's docstring).
    ``uri`` is the tracking URI, named (redacted) when a write fails."""

    def __init__(self, tracker: StudyTracker, uri: str | None, max_queued: int = MAX_QUEUED):
        self.tracker = tracker
        self._uri = uri
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._error: Exception | None = None
        self._closed = False
        # a daemon: a second Ctrl-C while the queue drains must still end the process
        self._thread = threading.Thread(target=self._write, name="dml-study-tracking", daemon=True)
        self._thread.start()

    # Writes: queued, the caller goes on at once.

    def start_trial(self, *args, **kwargs) -> None:
        self._submit(self.tracker.start_trial, args, kwargs)

    def log_metrics(self, key: str, values: dict, step: int) -> None:
        self._submit(_RESULT, (key, values, step, int(time.time() * 1000)), {})

    def log_file(self, key: str, name: str, data: bytes) -> None:
        self._submit(self.tracker.log_file, (key, name, data), {})

    def log_search_spaces(self, spaces: dict[str, dict[str, dict]]) -> None:
        self._submit(self.tracker.log_search_spaces, (spaces,), {})

    def log_model(self, key: str, data: bytes) -> None:
        self._submit(self.tracker.log_model, (key, data), {})

    def set_tag(self, key: str, name: str, value: str) -> None:
        self._submit(self.tracker.set_tag, (key, name, value), {})

    def end_trial(self, key: str, state: str, error: str | None = None) -> None:
        self._submit(self.tracker.end_trial, (key, state), {"error": error})

    def after_logged(self, action: Callable[[], Any]) -> None:
        """Run ``action`` (e.g. delete an ended trial's checkpoint) once everything queued before it
        has been written; it is dropped, like the writes, after a failed one."""
        self._submit(action, (), {})

    # Reads and the parent run: they wait for the writes queued before them, then answer.

    def find_trial(self, key: str):
        return self._call(self.tracker.find_trial, key)

    def supersede(self, loss: str, best: int) -> list[str]:
        return self._call(self.tracker.supersede, loss, best)

    def flush(self) -> None:
        """Wait until every queued call has been executed (held results too); TrackingError if one
        failed."""
        self._call(_nothing)

    def close(self) -> None:
        """Flush, then stop the writer thread; later calls are refused. A failed write is raised
        (the thread, idle, ends with the process)."""
        if self._closed:
            return self._raise_failure()
        self.flush()
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()

    # The queue.

    def _submit(self, function: Callable, args: tuple, kwargs: dict, answer: Future | None = None) -> None:
        self._raise_failure()
        if self._closed:
            raise RuntimeError("the tracking writer is closed")
        self._queue.put((function, args, kwargs, answer))  # waits only while MAX_QUEUED calls wait

    def _call(self, function: Callable, *args):
        answer: Future = Future()
        self._submit(function, args, {}, answer)
        return answer.result()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._failure()

    def _failure(self) -> TrackingError:
        failure = TrackingError(failure_text(self._uri, self._error))
        failure.__cause__ = self._error
        return failure

    def _write(self) -> None:
        held: list[tuple] = []  # results taken from the queue, to be written together
        deadline = 0.0
        while True:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0) if held else None)
            except queue.Empty:  # the held results have waited long enough
                item = None
            if item is not None and item is not _STOP and item[0] is _RESULT:
                deadline = deadline if held else time.monotonic() + LINGER_S
                held.append(item[1])
                if len(held) < MAX_HELD:
                    continue
            if held:  # before any other call: the order of the calls holds
                self._execute(self.tracker.log_results, (held,), {}, None)
                held = []
            if item is _STOP:
                return
            if item is not None and item[0] is not _RESULT:
                self._execute(*item)

    def _execute(self, function: Callable, args: tuple, kwargs: dict, answer: Future | None) -> None:
        if self._error is None:  # after a failed write nothing more is written
            try:
                value = function(*args, **kwargs)
            except Exception as exc:  # kept for the driver: raised at its next call or flush
                self._error = exc
            else:
                if answer is not None:
                    answer.set_result(value)
                return
        if answer is not None:
            answer.set_exception(self._failure())


def _nothing() -> None:
    """What :meth:`TrackingWriter.flush` queues: done once everything before it is."""


def failure_text(uri: str | None, error: Exception) -> str:
    """One line: which tracking store failed and why. MLflow's HTTP errors repeat the request's URL,
    credentials included, and the whole chain of causes: the innermost is what the user can act on
    (``[Errno 111] Connection refused``, ``Remote end closed connection without response``)."""
    text = redact_text(str(error)).strip()
    if "(Caused by " in text:  # requests' chain: "... (Caused by NewConnectionError(\"...: [Errno 111] ...\"))"
        text = _balanced(re.split(r": |\('|\(\"", text.rsplit("(Caused by ", 1)[-1])[-1])
    lines = [line for line in text.splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")
    return f"MLflow tracking at {redact(uri or 'sqlite:///mlflow.db')} failed ({reason})"


def _balanced(text: str) -> str:
    """``text`` without the quotes and closing parentheses the chain around it left at its end."""
    text = text.rstrip("'\" ")
    while text.endswith(")") and text.count(")") > text.count("("):
        text = text[:-1].rstrip("'\" ")
    return text
