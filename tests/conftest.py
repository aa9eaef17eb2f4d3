"""Shared fixtures: a tiny study file, an isolated MLflow store, one Ray instance per session."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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
    """Run in an empty folder with MLflow's SQLite store inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


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
