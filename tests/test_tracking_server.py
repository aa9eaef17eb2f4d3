"""Cluster set-up: a study against a real MLflow tracking server (SQLite backend, artifact folder) on
127.0.0.1 with Optuna in a database; one-line failures for an unreachable server or a wrong RAY_ADDRESS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from study.cli import app
from study.tracking import TAG_ROLE, StudyTracker
from tests.conftest import TINY_STUDY, copy_mlflow_db, free_ports, write_study

runner = CliRunner()
PASSWORD = "pw-9c1e-never-written"


def start_mlflow_server(folder: Path, store: Path | None = None) -> tuple[subprocess.Popen, int]:
    """A real ``mlflow server`` on 127.0.0.1 (a free port) storing into ``folder``, in its own process
    group; the caller waits for it and stops it. With ``store`` (the session's migrated empty store),
    its database starts as a copy of it instead of being created. Returns the process and its port."""
    port = free_ports(1)[0]
    if store is not None:
        copy_mlflow_db(store, folder / "server.db")
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination", str(folder / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return server, port


@pytest.fixture
def mlflow_server(tmp_path, migrated_mlflow_db):
    server, port = start_mlflow_server(tmp_path, migrated_mlflow_db)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_study_logs_to_a_tracking_server_and_optuna_to_an_rdb(workdir, ray_instance, mlflow_server, monkeypatch):
    """The cluster set-up: MLflow behind a server, Optuna in a database (SQLite standing in for
    PostgreSQL), neither URL logged as a parameter. The tracking URL carries a password (the server
    ignores it): no file the study or Ray writes holds it, and Ray holds neither URL."""
    secret_uri = mlflow_server.replace("http://", f"http://user:{PASSWORD}@")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    optuna_url = f"sqlite:///{workdir / 'optuna-db-4f2a.db'}"  # SQLite has no password: its path stands in
    search = {
        **TINY_STUDY["search"],
        "losses": ["multi_similarity"],
        "trials_per_loss": 2,
        "optuna_storage": optuna_url,
    }
    study = write_study(workdir, search=search, tracking={"uri": secret_uri})
    result = runner.invoke(app, ["run", str(study)])
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    ray_temp = Path(f"/tmp/rt{os.getpid()}")  # the session's Ray instance (tests/conftest.py)
    for folder, secrets in (
        (workdir / "runs", [PASSWORD]),
        (workdir / "artifacts", [PASSWORD]),
        (workdir / "runs" / "tiny" / "ray", [PASSWORD, "optuna-db-4f2a"]),
        (ray_temp, [PASSWORD, "optuna-db-4f2a"]),
    ):
        for file in (f for f in folder.rglob("*") if f.is_file() and not f.is_socket()):
            data = file.read_bytes()
            assert not [s for s in secrets if s.encode() in data], file
    assert not (workdir / "mlflow.db").exists()  # nothing went to the local default store
    assert not (workdir / "runs" / "tiny" / "optuna.journal").exists()
    trials = optuna.load_study(study_name="tiny.multi_similarity", storage=optuna_url).get_trials()
    assert len(trials) == 2 and all(t.state.is_finished() for t in trials)

    client = MlflowClient(tracking_uri=mlflow_server)  # read back through the server
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags[TAG_ROLE] for r in runs) == ["study", "trial", "trial", "trial"]
    assert all(r.info.status != "RUNNING" for r in runs)
    parent = next(r for r in runs if r.data.tags[TAG_ROLE] == "study")
    # the config's URLs are logged redacted (tests/test_secrets.py); these carry no credentials
    assert parent.data.params["search.optuna_storage"] == optuna_url
    assert parent.data.params["tracking.uri"] == mlflow_server.replace("http://", "http://user:***@")
    trial = next(r for r in runs if r.data.tags.get("dml_study.stage") == "search")
    config = json.loads(Path(client.download_artifacts(trial.info.run_id, "config.json", str(workdir))).read_text())
    assert config["loss"] == "multi_similarity"  # the artifact went through the server's artifact proxy

    rebuilt = runner.invoke(app, ["report", "tiny", "--tracking-uri", mlflow_server, "--out", str(workdir / "rep")])
    assert rebuilt.exit_code == 0 and "| multi_similarity" in rebuilt.output


def test_unreachable_server_fails_before_anything_starts(workdir, monkeypatch):
    uri = f"http://user:s3cret@127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = runner.invoke(app, ["run", str(write_study(workdir))])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert (
        len(lines) == 1
        and "MLflow tracking server http://user:***@127.0.0.1:" in lines[0]
        and "unreachable" in lines[0]
    )
    assert "s3cret" not in result.output
    assert not (workdir / "runs").exists()


def test_dashboard_address_as_ray_address_fails_before_anything_is_written(workdir, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    result = runner.invoke(app, ["run", str(write_study(workdir))])
    assert result.exit_code == 2
    assert "RAY_ADDRESS=http://127.0.0.1:8265 is a dashboard" in result.output
    assert not (workdir / "runs").exists() and not (workdir / "mlflow.db").exists()


def test_sqlite_artifacts_live_next_to_the_database_not_in_the_working_folder(workdir, monkeypatch, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("store")
    tracker = StudyTracker("art", f"sqlite:///{elsewhere / 'mlflow.db'}")
    location = tracker.client.get_experiment(tracker.experiment_id).artifact_location
    assert location == (elsewhere / "mlruns" / "art").as_uri()
