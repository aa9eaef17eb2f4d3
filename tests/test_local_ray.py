"""A local study's Ray instance listens on loopback only (:mod:`study.local_ray`).

Each check starts its own Ray in a subprocess (the session's Ray instance stays as it is), runs a task
there, and lists the listening TCP sockets of every process of that instance: the driver's process
tree (GCS, raylet, agents, workers) and whatever names its temp dir on its command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from study.local_ray import is_loopback, start_local_ray
from tests.conftest import REPO

# argv[1]: "loopback" (start_local_ray, and a Ray Tune trial) or "plain" (what init_ray did before)
PROBE = r"""
import json, os, shutil, sys, time

import psutil
import ray

temp_dir = f"/tmp/rl{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
kwargs = dict(num_cpus=1, include_dashboard=False, logging_level="error", _temp_dir=temp_dir)
if sys.argv[1] == "loopback":
    from study.local_ray import start_local_ray

    start_local_ray(**kwargs)
else:
    ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)


def instance_pids():
    me = psutil.Process()
    pids = {me.pid} | {child.pid for child in me.children(recursive=True)}
    for process in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(process.info["cmdline"] or ()):
            pids.add(process.pid)
    return pids


def listening():
    found = []
    for pid in sorted(instance_pids()):
        try:
            process = psutil.Process(pid)
            name = process.name()
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append({"pid": pid, "name": name, "ip": conn.laddr.ip, "port": conn.laddr.port})
        except psutil.Error:  # a worker that has just exited
            pass
    return found


try:
    task_ip = ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote())
    trial_ip = None
    if sys.argv[1] == "loopback":
        from ray import tune

        trial = lambda config: {"ip": ray.util.get_node_ip_address()}  # noqa: E731
        run_config = tune.RunConfig(storage_path=f"{temp_dir}/tune", verbose=0)
        trial_ip = tune.Tuner(trial, run_config=run_config).fit()[0].metrics["ip"]
    # the agents may open their ports a little after the first task has run
    deadline = time.monotonic() + 30
    while True:
        found = listening()
        names = {entry["name"] for entry in found}
        if {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    node_ip = ray.util.get_node_ip_address()
    print("PROBE", json.dumps({"node_ip": node_ip, "task_ip": task_ip, "trial_ip": trial_ip, "listening": found}))
finally:
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
"""


def probe(mode: str) -> dict:
    """Run PROBE in a fresh interpreter (token auth off, as in the test session) and read its report."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = next(line for line in done.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(report.removeprefix("PROBE "))


def exposed(report: dict) -> list[dict]:
    return [entry for entry in report["listening"] if not is_loopback(entry["ip"])]


def test_is_loopback():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2", "fe80::1%eth0", "example.org"):
        assert not is_loopback(host), host


@pytest.mark.parametrize(
    "kwargs",
    [{"address": "auto"}, {"_node_ip_address": "127.0.0.1"}, {"dashboard_host": "0.0.0.0"}],
)
def test_refuses_arguments_that_leave_loopback(kwargs):
    with pytest.raises(ValueError):
        start_local_ray(**kwargs)


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only():
    report = probe("loopback")
    names = {entry["name"] for entry in report["listening"]}
    # the whole instance was looked at, not only the driver
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, report
    assert exposed(report) == [], report
    assert report["node_ip"] == report["task_ip"] == report["trial_ip"]
    assert is_loopback(report["node_ip"])


@pytest.mark.slow
def test_plain_local_ray_is_exposed():
    """The check above can fail: Ray's own local start, even asked for 127.0.0.1, listens beyond
    loopback on a machine with a routable address."""
    report = probe("plain")
    if is_loopback(report["node_ip"]):
        pytest.skip("no routable address here: Ray's plain local start stays on loopback too")
    assert exposed(report), report
