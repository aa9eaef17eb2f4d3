"""A study whose storage is an object store: a real S3 API (moto's server) on 127.0.0.1, reached
through pyarrow like Ray Tune's own results; Optuna in a database, as the config requires."""

from __future__ import annotations

import io
import time

import pandas as pd
import pyarrow.fs as pafs
import pytest
from typer.testing import CliRunner

from study.cli import app
from study.storage import Storage
from tests.conftest import S3_CREDENTIALS, s3_server, write_study
from tests.test_resume import _check_consistent, _kill_driver, _optuna, _start, _study, _wait_for


@pytest.fixture
def bucket(monkeypatch):
    """An empty bucket on a local S3 server; yields the output_dir URI of a folder in it."""
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with s3_server() as options:
        yield f"s3://studies/runs?{options}"


@pytest.mark.slow
@pytest.mark.usefixtures("study_workdir")  # runs a study: its MLflow store comes migrated
def test_study_on_an_object_store_survives_a_killed_driver(workdir, bucket, driver_head):
    optuna_url = f"sqlite:///{workdir / 'optuna.db'}"
    path = _study(workdir, ["multi_similarity"], trials=3, optuna_storage=optuna_url)
    driver = _start(workdir, driver_head, "run", str(path), "--set", f"output_dir={bucket}")
    study = Storage.at(bucket).child("tiny")
    _wait_for(lambda: study.child("checkpoints").exists(), "a first checkpoint in the bucket")
    time.sleep(1.0)
    _kill_driver(driver, driver_head)
    finished = [t for t in _optuna(workdir, "multi_similarity", optuna_url) if t.state.is_finished()]
    assert len(finished) < 3, "the kill must land mid-study"

    resumed = _start(workdir, driver_head, "resume", f"s3://studies/runs/tiny?{bucket.split('?', 1)[1]}")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    # nothing went to the local disk: neither the driver's working folder nor the trials' (the head's)
    assert not (workdir / "runs").exists() and not (driver_head.cwd / "runs").exists()
    for name in ("config.yaml", "mlflow_run_id", "results.md", "results.csv"):
        assert study.child(name).exists(), name
    assert study.child("ray", "tiny").exists()  # Ray Tune wrote its results there too
    left = study.fs.get_file_info(
        pafs.FileSelector(study.child("checkpoints").root, recursive=True, allow_not_found=True)
    )
    assert not [f.path for f in left if f.path.endswith("trial.pt")]  # finished trials' checkpoints are deleted
    table = pd.read_csv(io.StringIO(study.child("results.csv").read_text())).set_index("loss")
    assert table.loc["multi_similarity", "trials"] == 3
    _check_consistent(workdir, ["multi_similarity"], trials=3, optuna_storage=optuna_url)


def test_object_store_without_a_database_for_optuna_is_refused(workdir):
    result = CliRunner().invoke(app, ["run", str(write_study(workdir, output_dir="s3://b/runs"))])
    assert result.exit_code == 2 and "needs search.optuna_storage" in result.output


def test_unreachable_object_store_is_one_line(workdir, monkeypatch):
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    output = "s3://nobucket/runs?endpoint_override=127.0.0.1:1&scheme=http"
    search = {"losses": ["multi_similarity"], "optuna_storage": f"sqlite:///{workdir / 'o.db'}"}
    result = CliRunner().invoke(app, ["run", str(write_study(workdir, output_dir=output, search=search))])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "s3://nobucket/runs/tiny: cannot read the study storage" in lines[0]
