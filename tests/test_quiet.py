"""The libraries' own log lines are off on the driver unless --verbose."""

from __future__ import annotations

import logging

import optuna
import pytest
from mlflow.tracking import MlflowClient

from study.quiet import QUIET_LOGGERS, quiet_libraries


@pytest.fixture
def restore_levels():
    saved = optuna.logging.get_verbosity(), {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    yield
    optuna.logging.set_verbosity(saved[0])
    for name, level in saved[1].items():
        logging.getLogger(name).setLevel(level)


def test_optuna_and_mlflow_keep_warnings_only(restore_levels):
    optuna.logging.set_verbosity(optuna.logging.INFO)
    logging.getLogger("mlflow").setLevel(logging.INFO)
    quiet_libraries()
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    store = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables..."
    assert not store.isEnabledFor(logging.INFO) and store.isEnabledFor(logging.WARNING)
    assert not logging.getLogger("alembic.runtime.migration").isEnabledFor(logging.INFO)


def test_mlflow_draws_no_download_progress_bar(restore_levels, monkeypatch, tmp_path, capfd, mlflow_db):
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    client.log_text(run, "{}", "search_spaces.json")
    capfd.readouterr()
    client.download_artifacts(run, "search_spaces.json", str(tmp_path))
    assert "Downloading artifacts" in capfd.readouterr().err  # MLflow's default: the control
    quiet_libraries()
    client.download_artifacts(run, "search_spaces.json", str(tmp_path))
    assert "Downloading artifacts" not in capfd.readouterr().err
