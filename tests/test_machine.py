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
from study.spec import SPEC, search_spec
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


def test_only_the_first_result_carries_the_machine_and_each_the_time_spent_in_report_before_it(monkeypatch):
    sent, clock = [], [100.0]
    monkeypatch.setattr(worker.time, "perf_counter", lambda: clock[0])

    def report(metrics, **kwargs):  # blocks as Ray Tune's does until the driver asks for the next result
        sent.append((metrics, kwargs))
        clock[0] += 0.25 * len(sent)

    report = worker._reporter(report)
    report({"epoch": 1, "map_at_r": 0.1}, checkpoint="c1")
    report({"epoch": 2, "map_at_r": 0.2})
    report({"epoch": 3, "map_at_r": 0.3})
    first, second, third = sent
    assert json.loads(first[0][machine.RESULT_KEY])["host"] == socket.gethostname()
    assert first[0]["map_at_r"] == 0.1 and first[1] == {"checkpoint": "c1"}
    assert machine.RESULT_KEY not in second[0] and machine.RESULT_KEY not in third[0]
    waits = [metrics[worker.DRIVER_WAIT] for metrics, _ in sent]
    assert waits == [0, 0.25, 0.75]  # the first report's wait, then the first two's


class _Tracker:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args))


def test_the_callback_tags_the_run_with_the_machine_and_logs_no_metric_of_it(tmp_path):
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
    tags = [args for name, args in tracker.calls if name == "set_tag"]
    assert tags == [(str(spec.key), TAG_MACHINE, described)]  # once, from the first result
    logged = [args[1] for name, args in tracker.calls if name == "log_metrics"]
    assert logged == [{"map_at_r": 0.3}, {"map_at_r": 0.4}]
