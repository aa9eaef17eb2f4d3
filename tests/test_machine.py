"""The machine a trial trained on: described in the worker, sent with its first result, kept as a tag."""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

import torch

from study import machine, worker
from study.callback import TrackingCallback
from study.config import parse_study, search_spaces
from study.spec import EARLIER, SPEC, epoch_results, search_spec
from study.tracking import TAG_MACHINE
from tests.conftest import TINY_STUDY


def test_describe_machine_names_this_process_s_cpus_gpus_and_versions():
    info = machine.describe_machine()
    assert list(info) == machine.FIELDS
    assert all(isinstance(value, str) and value for value in info.values())
    assert info["host"] == socket.gethostname()
    assert info["cpus"] == str(len(os.sched_getaffinity(0)))  # the cores this worker may use, not the host's
    assert info["torch"] == torch.__version__.split("+")[0] or info["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert info["gpus"] == info["driver"] == "none"
    assert json.loads(machine.machine_json()) == info


def test_the_reporter_sends_the_first_and_due_epochs_at_once_and_the_others_together_at_most_each_second(
    monkeypatch,
):
    """Every epoch reaches the driver once, in order: the first and the due ones (ASHA's rungs, the last)
    at once, the others held until a second has passed or the next is sent; the machine rides on the
    first result, and each result carries the time spent in ``report`` before it."""
    sent, clock = [], [100.0]
    monkeypatch.setattr(worker.time, "perf_counter", lambda: clock[0])

    def report(result):  # blocks as Ray Tune's does until the driver asks for the next result
        sent.append(result)
        clock[0] += 0.25

    reporter = worker.Reporter(report, due={4})
    for epoch in range(1, 9):
        reporter({"epoch": epoch, "map_at_r": epoch / 10})
        clock[0] += 0.4  # the epoch's training
    reporter.flush()
    assert [result["epoch"] for result in sent] == [1, 4, 7, 8]  # first; due; 1.2 s after the last; flushed
    assert [[r["epoch"] for r in result.get(EARLIER, [])] for result in sent] == [[], [2, 3], [5, 6], []]
    assert [r["map_at_r"] for result in sent for r in epoch_results(result)] == [e / 10 for e in range(1, 9)]
    assert json.loads(sent[0][machine.RESULT_KEY])["host"] == socket.gethostname()
    assert all(machine.RESULT_KEY not in result for result in sent[1:])
    assert [result[worker.DRIVER_WAIT] for result in sent] == [0, 0.25, 0.5, 0.75]


class _Tracker:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_the_callback_tags_the_run_with_the_machine_and_logs_each_epoch_a_result_carries_at_its_step(tmp_path):
    import yaml

    cfg = parse_study(yaml.safe_dump({**TINY_STUDY, "output_dir": str(tmp_path)}), "study.yaml")
    spaces = search_spaces(cfg)
    tracker = _Tracker()
    callback = TrackingCallback(tracker, cfg, spaces)
    spec = search_spec(cfg, spaces["multi_similarity"], 0, {})
    trial = SimpleNamespace(config={SPEC: spec}, last_result=None, error_file=None)
    described = machine.machine_json()
    callback.on_trial_result(0, [], trial, {"epoch": 1, "map_at_r": 0.3, machine.RESULT_KEY: described})
    callback.on_trial_result(0, [], trial, {"epoch": 2, "map_at_r": 0.4})
    held = [{"epoch": 3, "map_at_r": 0.5}, {"epoch": 4, "map_at_r": 0.6}]
    callback.on_trial_result(0, [], trial, {"epoch": 5, "map_at_r": 0.7, EARLIER: held})
    tags = [args for name, args, _ in tracker.calls if name == "set_tag"]
    assert tags == [(str(spec.key), TAG_MACHINE, described)]  # once, from the first result
    logged = [(args[1], kwargs["step"]) for name, args, kwargs in tracker.calls if name == "log_metrics"]
    assert logged == [({"map_at_r": value / 10}, epoch) for epoch, value in enumerate(range(3, 8), start=1)]
