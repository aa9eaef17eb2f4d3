"""A study on a real two-node Ray cluster: a head and a worker node, separate ``ray start`` processes
with their own temp dirs on this machine, the study folder shared (a local folder, or a bucket on the
local S3 server the object-store tests use, Optuna then in a database). The head has no CPUs, so every
trial (search and final) must run on the worker node; the test checks they did, and that the
study's checkpoints, test embeddings, fold ensembles and report come out as on one machine. Both
variants run on one cluster (started once for the module).

Node addresses: the head at 127.0.0.3, the worker at 127.0.0.2 (both loopback). ``ray start`` swaps
exactly 127.0.0.1 / localhost for the machine's routable address (``resolve_ip_for_localhost``), and
a worker node refuses to start with the setting that stops that (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``).
Ray's loopback-only rule then does not hold (its services listen on every interface), so this cluster
runs with Ray's token authentication on: a token drawn per test session, given to the nodes and the
driver, and a client without it is refused (checked).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from mlflow.tracking import MlflowClient

from study.storage import Storage
from study.tracking import TAG_ROLE, TAG_STAGE, TAG_STATE, TAG_TRIAL
from tests.conftest import S3_CREDENTIALS, TINY_STUDY, free_ports, s3_server, write_study
from tests.test_protocol import cub_tree

pytestmark = pytest.mark.slow  # a real Ray cluster and study

BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IP = "127.0.0.3", "127.0.0.2"
# Ray's token authentication for this cluster's nodes and its driver (the other tests turn it off)
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _ray_start(groups: list[int], *args: str, log: Path) -> None:
    """``ray start`` in its own process group: the daemons it leaves behind stay in that group, so the
    teardown kills this cluster's processes only (``ray stop`` would kill every Ray on the machine).
    The node works (its workers too) in the folder of ``log``."""
    env = {**os.environ, **S3_CREDENTIALS, **AUTH}  # the workers reach the S3 server
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--disable-usage-stats", *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent, start_new_session=True,
        )  # fmt: skip
    groups.append(proc.pid)  # killed at teardown even if it fails to start
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)  # Ray's daemons outlive a SIGTERM to the group


@contextlib.contextmanager
def ray_cluster(folder: Path, workers: list[tuple[str, int, int]], tag: str) -> Iterator[tuple[str, Path, list[Path]]]:
    """A head at HEAD_IP (no resources) and a worker node per (address, CPUs, GPUs) of ``workers``: separate
    ``ray start`` processes, each in its own process group and temp dir (``/tmp/<tag>h``, ``/tmp/<tag>w<i>``:
    short, for Unix sockets), working and logging in ``folder``. Yields (the head's address, its temp dir,
    the workers' temp dirs); at the end every process of the cluster is killed and the temp dirs removed."""
    head_dir, worker_dirs = Path(f"/tmp/{tag}h"), [Path(f"/tmp/{tag}w{i}") for i in range(len(workers))]
    address = f"{HEAD_IP}:{free_ports(1)[0]}"
    groups: list[int] = []
    try:
        _ray_start(
            groups,
            "--head", "--node-ip-address", HEAD_IP, "--port", address.split(":")[1], "--temp-dir", str(head_dir),
            "--num-cpus", "0", "--num-gpus", "0", "--include-dashboard", "false", log=folder / "head.log",
        )  # fmt: skip
        for (ip, cpus, gpus), temp_dir in zip(workers, worker_dirs, strict=True):
            _ray_start(
                groups,
                "--address", address, "--node-ip-address", ip, "--temp-dir", str(temp_dir),
                "--num-cpus", str(cpus), "--num-gpus", str(gpus), log=folder / f"worker-{ip}.log",
            )  # fmt: skip
        yield address, head_dir, worker_dirs
    finally:
        for pgid in reversed(groups):
            _kill_group(pgid)
        time.sleep(1)
        for temp_dir in (head_dir, *worker_dirs):
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (no CPUs) and a worker node (2 CPUs); yields (address, head temp dir, worker temp dir,
    the nodes' working folder)."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    with ray_cluster(tmp_path, [(WORKER_IP, 2, 0)], f"mn{os.getpid()}") as (address, head_dir, (worker_dir,)):
        # its services listen beyond loopback: a client without the token must be refused
        anonymous = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        refused = subprocess.run(
            [str(BIN / "ray"), "status", "--address", address],
            env=anonymous, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode != 0, refused.stdout[-2000:]
        allowed = subprocess.run(
            [str(BIN / "ray"), "status", "--address", address],
            env={**os.environ, **AUTH}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert allowed.returncode == 0, allowed.stdout[-2000:] + allowed.stderr[-2000:]  # the token is what differs
        yield address, head_dir, worker_dir, tmp_path


def _worker_logs(temp_dir: Path) -> dict[Path, int]:
    """The stdout file of each worker of the node of ``temp_dir``, and its size."""
    return {path: path.stat().st_size for path in (temp_dir / "session_latest" / "logs").glob("worker-*.out")}


def _actor_logs(temp_dir: Path, before: dict[Path, int]) -> list[str]:
    """The actor classes whose workers ran on the node of ``temp_dir`` since ``before`` (its
    :func:`_worker_logs`): Ray marks each actor's stdout file with ``:actor_name:<class>``."""
    names = []
    for path in _worker_logs(temp_dir):
        with path.open("rb") as out:
            out.seek(before.get(path, 0))
            for line in out.read().decode(errors="replace").splitlines():
                if line.startswith(":actor_name:"):
                    names.append(line.removeprefix(":actor_name:"))
    return names


def _files(folder: Storage) -> list[str]:
    """Every file under ``folder`` (a local folder or an object-store prefix), as paths relative to it."""
    found = folder.fs.get_file_info(pafs.FileSelector(folder.root, recursive=True, allow_not_found=True))
    return [f.path.removeprefix(folder.root).lstrip("/") for f in found if f.type == pafs.FileType.File]


@pytest.fixture(params=["shared folder", "s3"])
def output_dir(request, workdir, monkeypatch):
    """The study folder both nodes see: a local folder (a shared file system's stand-in) or a bucket
    on a local S3 server; yields (output_dir, search.optuna_storage or None)."""
    if request.param == "shared folder":
        yield str(workdir / "shared"), None
        return
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with s3_server() as options:
        yield f"s3://studies/runs?{options}", f"sqlite:///{workdir / 'optuna.db'}"


@pytest.mark.usefixtures("study_workdir")  # runs a study: its MLflow store comes migrated
def test_a_study_on_a_head_and_a_worker_node(workdir, output_dir, cluster):
    address, head_dir, worker_dir, nodes_cwd = cluster
    out, optuna_storage = output_dir
    cub_tree(workdir / "data", classes=12)
    search = {**TINY_STUDY["search"], "losses": ["multi_similarity"], "trials_per_loss": 2}
    if optuna_storage:
        search["optuna_storage"] = optuna_storage
    path = write_study(
        workdir,
        output_dir=out,
        dataset={"name": "cub200", "root": str(workdir / "data"), "folds": 3, "image_size": 20,
                 "cache_dir": str(workdir / "cache")},
        train={"epochs": 1, "batch_size": 8, "m_per_class": 2, "lr": 1e-3, "crop_size": 16},
        search=search,
        final={"seeds": 1, "train_on": "folds"},
        ablations=False,
    )  # fmt: skip
    env = {**os.environ, **AUTH, "RAY_ADDRESS": address}
    logs = {folder: _worker_logs(folder) for folder in (head_dir, worker_dir)}  # the other variant's actors ran before
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "dml-study"), "run", str(path)], cwd=workdir, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )  # fmt: skip
    print(f"study on the cluster: {time.monotonic() - started:.0f} s")
    assert done.returncode == 0, done.stdout[-5000:]

    # every trial's actor ran on the worker node; the head (no CPUs) ran none
    on_worker, on_head = _actor_logs(worker_dir, logs[worker_dir]), _actor_logs(head_dir, logs[head_dir])
    print("actors on the worker:", on_worker, "on the head:", on_head)
    # (a worker process hosts one actor after another and names only its first: so not one name per trial)
    assert on_worker and not on_head

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    trials = [r for r in runs if r.data.tags[TAG_ROLE] == "trial"]
    by_stage: dict[str, list] = {}
    for run in trials:
        by_stage.setdefault(run.data.tags[TAG_STAGE], []).append(run)
    assert len(by_stage["search"]) == 2 and len(by_stage["final"]) >= 3 and len(by_stage["ensemble"]) == 1
    assert all(r.data.tags[TAG_STATE] == "COMPLETE" for r in trials), [
        (r.data.tags[TAG_TRIAL], r.data.tags[TAG_STATE]) for r in trials
    ]
    study = Storage.at(out).child("tiny")
    files = _files(study)
    finals = [r for r in by_stage["final"] if r.data.tags[TAG_TRIAL].startswith("multi_similarity/")]
    assert len(finals) == 3
    for run in finals:  # the worker's test embeddings reached the shared folder and MLflow
        assert "embeddings.npz" in [a.path for a in client.list_artifacts(run.info.run_id)]
    saved = [f for f in files if f.startswith("embeddings/multi_similarity/final/") and "/s1-f" in f]
    assert len(saved) == 3, files
    assert "test_map_at_r" in by_stage["ensemble"][0].data.metrics
    assert not [f for f in files if f.startswith("checkpoints/") and f.endswith(".pt")], files
    assert "one model per validation fold" in study.child("results.md").read_text()
    if out.startswith("s3://"):
        # nothing went to the local disk: neither the driver's working folder nor the nodes'
        assert not (workdir / "runs").exists() and not (nodes_cwd / "runs").exists()
