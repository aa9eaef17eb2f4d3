"""Shared fixtures: a tiny study file, an isolated MLflow store, one Ray instance per session (and one
Ray head for the session's ``dml-study`` driver subprocesses)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent

TINY_STUDY = {
    "name": "tiny",
    "seed": 0,
    "dataset": {
        "name": "synthetic",
        "options": {"num_classes": 16, "samples_per_class": 16, "image_size": 16},
        "val_fraction": 0.5,
    },
    "model": {"backbone": "test_resnet", "embedding_dim": 16},
    "train": {"epochs": 2, "batch_size": 16, "m_per_class": 4, "lr": 1e-3},
    "search": {
        "losses": ["multi_similarity", "normalized_softmax"],
        "trials_per_loss": 3,
        "objective": "map_at_r",
        "max_concurrent": 2,
    },
    "final": {"seeds": 0},  # the final stage has its own end-to-end test
    "resources": {"cpu": 1, "gpu": 0},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder with MLflow's SQLite store inside it (not yet created: a test that
    checks that nothing is written, or that a store is created, gets it so)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory) -> Path:
    """One empty MLflow SQLite store for the session, its tables created by MLflow's migrations
    (seconds of alembic per store, more in a fresh process), for :func:`copy_mlflow_db` to copy; never
    opened after. Without its Default experiment: MLflow adds it when a copy is first opened, with an
    artifact folder where that process runs, as it does in a store it creates."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}")
    client.search_experiments()  # creates the tables, at the schema's latest revision
    client._tracking_client.store.engine.dispose()  # (its connections closed)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("DELETE FROM experiments WHERE experiment_id = 0")
    return path


def copy_mlflow_db(template: Path, path: Path) -> Path:
    """A copy of the session's migrated empty store (:func:`migrated_mlflow_db`) at ``path``: MLflow
    opens it without creating its tables, as it opens a user's existing store."""
    shutil.copyfile(template, path)
    return path


@pytest.fixture
def mlflow_db(tmp_path, migrated_mlflow_db) -> Path:
    """``tmp_path/mlflow.db``, a copy of the session's migrated empty store: for a test that opens an
    MLflow store of its own (not one that checks how a store is created)."""
    return copy_mlflow_db(migrated_mlflow_db, tmp_path / "mlflow.db")


@pytest.fixture
def study_workdir(workdir, migrated_mlflow_db) -> Path:
    """:func:`workdir` with its MLflow store already created (an empty, migrated copy), for a test
    that runs a study (or creates the store anyway) and does not check how the store comes to be."""
    copy_mlflow_db(migrated_mlflow_db, workdir / "mlflow.db")
    return workdir


def write_study(folder: Path, **changes) -> Path:
    """Write TINY_STUDY (top-level sections replaced by ``changes``) to folder/study.yaml."""
    study = {**TINY_STUDY, **changes}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server():
    """A local S3 server (moto) on 127.0.0.1 with an empty bucket ``studies``; yields the URI query
    that reaches it (``endpoint_override=…&scheme=http&region=…``). The caller sets
    :data:`S3_CREDENTIALS` in the environment first."""
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"http://127.0.0.1:{port}"):
            assert time.monotonic() < deadline, "the S3 server did not start"
            time.sleep(0.1)
        pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1", allow_bucket_creation=True
        ).create_dir("studies")
        yield f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance for the whole session (auth off; a short temp dir for its sockets)."""
    import ray

    from study.local_ray import start_local_ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    start_local_ray(num_cpus=2, include_dashboard=False, _temp_dir=f"/tmp/rt{os.getpid()}", logging_level="error")
    yield ray
    ray.shutdown()


def free_ports(n: int) -> list[int]:
    """``n`` different TCP ports free on 127.0.0.1 (held at once while drawn, so that they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_head(proc: subprocess.Popen) -> None:
    """Stop `ray start --block` and everything in its process group (never `ray stop`: other Ray instances)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the leader first: it drains its node while the GCS is still up
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    for sig in (signal.SIGTERM, signal.SIGKILL):  # then whatever is left of its process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + 5
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@dataclass(frozen=True)
class RayHead:
    """A running ``ray start --head --block``: its process (every process of the node, the trials'
    workers included, descends from it), its working folder (the workers'), the environment variables
    a ``dml-study`` driver joins it with, and the drivers a test started on it."""

    process: subprocess.Popen
    cwd: Path
    env: dict[str, str]
    drivers: list[subprocess.Popen] = field(default_factory=list)

    def trial_workers(self) -> list[psutil.Process]:
        """The workers running a trial (Ray Tune's ``ImplicitFunc`` actor) on this node."""
        workers = []
        for process in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if "ImplicitFunc" in " ".join(process.cmdline()):
                    workers.append(process)
            except psutil.Error:  # exited meanwhile (a zombie has no command line)
                pass
        return workers

    def wait_idle(self, what: str) -> None:
        """Wait (a minute at most) until no trial runs on this node: Ray ends a driver's trials when
        the driver is gone, within a second or so."""
        deadline = time.monotonic() + 60
        while self.trial_workers():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)


@pytest.fixture(scope="session")
def session_ray_head(tmp_path_factory):
    """One Ray head for the session's ``dml-study`` driver subprocesses to join (RAY_ADDRESS), so
    that each driver does not start a Ray of its own: 2 CPUs, auth off, in its own process group, its
    workers with the S3 test credentials (as test_multinode's nodes). It stays on loopback as
    :func:`~study.local_ray.start_local_ray` keeps an in-process Ray there: with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, ``ray start`` keeps node IP 127.0.0.1 instead of swapping it
    for the machine's routable address, and so does a driver given the same setting (else it looks
    for the head at that address). A SIGKILLed driver's job ends with it: Ray kills its trials."""
    port, client, agent = free_ports(3)
    cwd = tmp_path_factory.mktemp("ray_head")
    temp_dir = f"/tmp/rh{os.getpid()}"  # short: Unix socket paths
    loopback = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(S3_CREDENTIALS, RAY_USAGE_STATS_ENABLED="0", **loopback)
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(port), "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
        "--temp-dir", temp_dir, "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
    ]  # fmt: skip
    log_path = cwd / "head.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield RayHead(proc, cwd, {**loopback, "RAY_ADDRESS": f"127.0.0.1:{port}"})
    finally:
        stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def end_drivers(head: RayHead) -> None:
    """Kill the drivers started on ``head`` that still run (their test failed midway), and wait for
    their trials to end: the next test starts on an idle head."""
    for driver in head.drivers:
        if driver.poll() is None:
            driver.kill()
        driver.communicate(timeout=30)
    head.drivers.clear()
    head.wait_idle("Ray to end a left-over driver's trials")


@pytest.fixture
def driver_head(session_ray_head):
    """The session's Ray head for one test's drivers; at the end, :func:`end_drivers`."""
    yield session_ray_head
    end_drivers(session_ray_head)


def unit(n: int, dim: int, seed: int = 0, dtype=None):
    """``n`` random unit-norm rows (float64 draws, then cast), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    return rows.to(dtype or torch.float32)


def assert_same_value_and_grads(value, reference, inputs, atol: float = 1e-10, rtol: float = 0.0) -> None:
    """``value`` equals ``reference`` to ``atol`` and so do their gradients w.r.t. each of ``inputs``
    (the first backward keeps its graph: the two may share a normalisation of the inputs)."""
    assert abs(value.item() - reference.item()) < atol
    grads = torch.autograd.grad(value, inputs, retain_graph=True)
    for g, r in zip(grads, torch.autograd.grad(reference, inputs), strict=True):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


def assert_matches_pml(ours, theirs, ours_inputs, theirs_inputs, tol: float, transposed=()) -> None:
    """Our loss and pytorch-metric-learning's agree (rtol = atol = ``tol``) in value and in their
    gradients w.r.t. matching inputs; ``transposed``: positions of inputs PML stores transposed
    (its class weights and centers are embedding_size × classes)."""
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=tol, atol=tol)
    grads = torch.autograd.grad(ours, ours_inputs)
    for i, (g, r) in enumerate(zip(grads, torch.autograd.grad(theirs, theirs_inputs), strict=True)):
        torch.testing.assert_close(g, (r.T if i in transposed else r).to(g.dtype), rtol=tol, atol=tol)
