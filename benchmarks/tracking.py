"""The driver's tracking at scale: synthetic trial results through the real callback into a real MLflow server.

Starts ``mlflow server`` (SQLite backend, artifacts in a folder, 127.0.0.1, a free port) in a temporary
folder and drives :class:`~study.callback.TrackingCallback` → :class:`~study.tracking_writer.TrackingWriter`
→ :class:`~study.tracking.StudyTracker` → MLflow with N trials × E epochs × 12 metrics, as fast as the
caller can deliver them: trials in waves of ``--concurrent`` (as many as a cluster runs at once), each
wave started, then its results epoch by epoch, trial by trial, then ended — the order Ray Tune
delivers them. Each trial is a real child run (a search for its tag, the run, its params and
``config.json``; its results, one ``log_batch`` per run for those the writer holds together; at its end its
state tag and status). Nothing is mocked.

It prints one table:

- **callback per result**: the time ``on_trial_result`` takes in the caller, i.e. how long Ray Tune's event
  loop is held per result (mean, p99, max), and how many results found the queue full and waited;
- **writer**: the time each MLflow step takes in the writer thread (per result: the writes of results over
  how many results they carried, and how many a write carried on average; per trial start and end),
  the sustained rate it writes results at (trial starts and ends included), and the time to drain the queue
  after the last result;
- **arrival rates** of realistic clusters (trials running at once / seconds per epoch) against that
  sustained rate: below it the queue stays empty, above it the queue grows (until ``MAX_QUEUED`` calls wait,
  then the caller waits at the server's pace).

Without the writer (before it) the caller waited for every MLflow call itself, one ``log_batch`` per result:
see RESULTS.md for what each result held the event loop for then.

Run from the repository root: ``PYTHONPATH=. .venv/bin/python benchmarks/tracking.py [--trials 1000]
[--epochs 40] [--concurrent 64] [--max-queued 10000]`` (the defaults are the issue's study: 1,000 trials ×
40 epochs × 12 metrics).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import yaml
from tabulate import tabulate

from study.callback import TrackingCallback
from study.config import parse_study, search_spaces
from study.spec import SPEC, search_spec
from study.tracking import StudyTracker
from study.tracking_writer import MAX_QUEUED, TrackingWriter

# 12 numbers per result, named as a trial reports them
METRICS = (
    *(f"recall_at_{k}" for k in (1, 2, 4, 8)),
    "map_at_r",
    "r_precision",
    "nmi",
    "submode_recall_at_1",
    "submode_chance_at_1",
    "queries_left_out",
    "train_loss",
    "epoch_seconds",
)
# clusters a study of this size runs on: trials at once, seconds per epoch
CLUSTERS = (
    ("16 GPUs, 1 trial each, 30 s/epoch (CUB, ResNet-50)", 16, 30.0),
    ("64 GPUs, 1 trial each, 30 s/epoch", 64, 30.0),
    ("64 GPUs, 4 trials each (gpu: 0.25), 10 s/epoch (feature mode)", 256, 10.0),
)


def start_server(folder: Path, workers: int) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 and a free port with its store in ``folder``; its URI once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination", str(folder / "artifacts"), "--workers", str(workers),
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1):
                return server, uri
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError("mlflow server did not start within 180 s")


def timed(method, durations: list[float]):
    """``method``, appending each call's duration (seconds) to ``durations``: runs in the writer thread."""

    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            durations.append(time.perf_counter() - start)

    return call


def drive(uri: str, folder: Path, trials: int, epochs: int, concurrent: int, max_queued: int) -> dict:
    """Every trial's start, results and end through the callback; the caller's and the writer's times."""
    study = {
        "name": "tracking-benchmark",
        "output_dir": str(folder / "runs"),
        "model": {"backbone": "test_resnet", "embedding_dim": 16},
        "search": {"losses": ["multi_similarity"], "trials_per_loss": trials},
        "train": {"epochs": epochs},
    }
    cfg = parse_study(yaml.safe_dump(study), "benchmark.yaml")
    spaces = search_spaces(cfg)
    space = spaces["multi_similarity"]
    tracker = StudyTracker(cfg.name, uri)
    tracker.start(cfg.public_dump(), cfg.search.objective)
    writer_times: dict[str, list[float]] = defaultdict(list)
    for name in ("start_trial", "log_results", "end_trial"):  # instance attributes: what the writer calls
        setattr(tracker, name, timed(getattr(tracker, name), writer_times[name]))
    writer = TrackingWriter(tracker, uri, max_queued=max_queued)
    callback = TrackingCallback(writer, cfg, spaces)
    point = space.defaults()
    caller, waited, peak = [], 0, 0
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for first in range(0, trials, concurrent):
        wave = [
            SimpleNamespace(config={SPEC: search_spec(cfg, space, n, point)}, last_result=None, error_file=None)
            for n in range(first, min(first + concurrent, trials))
        ]
        for trial in wave:
            callback.on_trial_start(0, [], trial)
        for epoch in range(1, epochs + 1):
            for trial in wave:
                result = {**dict(zip(METRICS, rng.random(len(METRICS)).tolist(), strict=True)), "epoch": epoch}
                waited += writer._queue.full()
                t = time.perf_counter()
                callback.on_trial_result(0, [], trial, result)
                caller.append(time.perf_counter() - t)
                trial.last_result = result
            peak = max(peak, writer._queue.qsize())
        for trial in wave:
            callback.on_trial_complete(0, [], trial)
    last = time.perf_counter()
    writer.close()
    drained = time.perf_counter()
    tracker.finish()
    return {
        "caller": np.array(caller),
        "waited": waited,
        "peak": peak,
        "writer": {k: np.array(v) for k, v in writer_times.items()},
        "arrival_s": last - start,
        "drain_s": drained - last,
        "total_s": drained - start,
    }


def tenth(durations: np.ndarray, which: int) -> float:
    """Mean milliseconds of the first (``which`` 0) or last (-1) tenth of ``durations``, in call order."""
    part = np.array_split(durations, 10)[which] if len(durations) >= 10 else durations
    return float(part.mean()) * 1e3


def table(measured: dict, trials: int, epochs: int, max_queued: int) -> str:
    results = trials * epochs
    caller, writer = measured["caller"] * 1e6, measured["writer"]
    busy = sum(float(v.sum()) for v in writer.values())
    sustained = results / busy  # results/s the writer keeps up with, trial starts and ends included
    ms = lambda name: f"{writer[name].mean() * 1e3:.1f} ms (p99 {np.percentile(writer[name], 99) * 1e3:.1f})"  # noqa: E731
    rows = [
        ("results (trials × epochs, 12 metrics each)", f"{results:,} ({trials:,} × {epochs})"),
        ("callback per result: mean / p99 / max", f"{caller.mean():.0f} / {np.percentile(caller, 99):.0f} / "
         f"{caller.max():,.0f} µs"),
        (f"results that found the queue full ({max_queued:,} calls) and waited", f"{measured['waited']:,}"),
        ("results delivered in", f"{measured['arrival_s']:.1f} s ({results / measured['arrival_s']:,.0f} results/s)"),
        ("queue length at most", f"{measured['peak']:,} calls"),
        ("writer per result (results written together)", f"{writer['log_results'].sum() / results * 1e3:.1f} ms "
         f"({results / len(writer['log_results']):.1f} results per write on average)"),
        ("writer per trial start (search, run, params, config.json)", ms("start_trial")),
        ("writer per trial start: first / last tenth of the trials", f"{tenth(writer['start_trial'], 0):.1f} / "
         f"{tenth(writer['start_trial'], -1):.1f} ms (how a start grows with the runs)"),
        ("writer per trial end (state tag, status)", ms("end_trial")),
        ("writer sustained, starts and ends included", f"{sustained:,.1f} results/s ({1e3 / sustained:.1f} ms each)"),
        ("drain after the last result", f"{measured['drain_s']:.1f} s"),
        ("first result to all in MLflow", f"{measured['total_s']:.1f} s"),
    ]  # fmt: skip
    for name, running, epoch_s in CLUSTERS:
        arrival = running / epoch_s
        verdict = "keeps up" if arrival < sustained else "falls behind: the queue grows"
        rows.append((f"arrival: {name}", f"{arrival:.2f} results/s — {verdict} (×{sustained / arrival:,.2g} headroom)"))
    rows.append(("the queue grows above", f"{sustained:,.1f} results/s arriving"))
    return tabulate(rows, ["", "measured"], "github", disable_numparse=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--concurrent", type=int, default=64, help="trials running at once (a wave)")
    parser.add_argument("--max-queued", type=int, default=MAX_QUEUED, help="the writer's queue bound")
    parser.add_argument("--server-workers", type=int, default=1, help="mlflow server --workers")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dml-tracking-") as tmp:
        folder = Path(tmp)
        server, uri = start_server(folder, args.server_workers)
        try:
            print(f"mlflow server at {uri}; {args.trials} trials × {args.epochs} epochs × {len(METRICS)} metrics")
            measured = drive(uri, folder, args.trials, args.epochs, args.concurrent, args.max_queued)
        finally:  # the server's workers are its children: stop its whole process group
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    print("\n" + table(measured, args.trials, args.epochs, args.max_queued))


if __name__ == "__main__":
    main()
