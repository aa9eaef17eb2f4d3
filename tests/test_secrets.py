"""Secrets (database and tracking URLs) are excluded by the schema: ``SecretStr`` fields, redacted in
``public_dump`` (config.yaml, MLflow), hidden in ``repr``, and restored from the environment on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, SecretStr
from typer.testing import CliRunner

import study.cli
from study.cli import app
from study.config import (
    ConfigError,
    load_study,
    parse_study,
    public_dump,
    restore_secrets,
    secret_env,
    secret_fields,
)
from study.redaction import redact, redact_text
from study.tracking import StudyTracker, resolve_tracking_uri
from tests.conftest import TINY_STUDY, write_study

OPTUNA_URL = "postgresql://alice:s3cr3t@db:5432/optuna"
TRACKING_URI = "http://bob:t0ken@127.0.0.1:5999"
SECRETS = ("s3cr3t", "t0ken")

runner = CliRunner()


def _secret_study(folder: Path, optuna_storage: str = OPTUNA_URL, tracking_uri: str = TRACKING_URI):
    search = {**TINY_STUDY["search"], "optuna_storage": optuna_storage}
    return load_study(write_study(folder, search=search, tracking={"uri": tracking_uri}))


def test_public_dump_redacts_credentials_and_keeps_the_rest(tmp_path):
    cfg = _secret_study(tmp_path)
    public = cfg.public_dump()
    text = yaml.safe_dump(public)
    assert not any(secret in text for secret in SECRETS)
    assert public["search"]["optuna_storage"] == "postgresql://alice:***@db:5432/optuna"
    assert public["tracking"]["uri"] == "http://bob:***@127.0.0.1:5999"
    assert public["train"] == cfg.train.model_dump(mode="json")  # everything else as model_dump's
    for shown in (repr(cfg), str(cfg), repr(cfg.search), str(cfg.tracking)):
        assert not any(secret in shown for secret in SECRETS)
    # the real values are there for the code that needs them
    assert cfg.search.optuna_storage.get_secret_value() == OPTUNA_URL
    assert cfg.tracking.uri.get_secret_value() == TRACKING_URI


def test_values_without_credentials_are_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _secret_study(tmp_path, "sqlite:///o.db", "http://127.0.0.1:5000")
    assert cfg.public_dump()["search"]["optuna_storage"] == "sqlite:///o.db"
    assert cfg.public_dump()["tracking"]["uri"] == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(cfg.tracking.uri) == "http://127.0.0.1:5000"
    assert load_study(write_study(tmp_path)).public_dump()["tracking"] == {"uri": None}
    # --set keeps taking plain strings
    overridden = load_study(tmp_path / "study.yaml", ["search.optuna_storage=sqlite:///p.db"])
    assert overridden.search.optuna_storage.get_secret_value() == "sqlite:///p.db"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://alice:s3cr3t@db:5432/optuna", "postgresql://alice:***@db:5432/optuna"),
        ("https://u:p@host:5000/x", "https://u:***@host:5000/x"),
        ("https://t0ken@host/x", "https://***@host/x"),  # a user-info without password may be a token
        ("postgresql://a:p%40ss@[::1]:5432/db", "postgresql://a:***@[::1]:5432/db"),
        ("postgresql://db/optuna?user=a&password=s3cr3t", "postgresql://db/optuna?user=a&password=***"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:///a/b.db", "sqlite:///a/b.db"),
        ("sqlite:////abs/o.db?timeout=20", "sqlite:////abs/o.db?timeout=20"),
        ("databricks", "databricks"),
    ],
)
def test_redact(uri, shown):
    assert redact(uri) == shown
    assert redact(shown) == shown  # idempotent


def test_a_validation_error_does_not_quote_credentials(workdir):
    study = write_study(workdir, tracking=TRACKING_URI)  # a URL where a section belongs
    result = runner.invoke(app, ["run", str(study)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "tracking" in result.output and "t0ken" not in result.output
    assert redact_text(f"got '{OPTUNA_URL}'") == "got 'postgresql://***@db:5432/optuna'"


class _Inner(BaseModel):
    key: SecretStr
    plain: str = "x"


class _Future(BaseModel):
    """A schema with secrets where nobody would remember them: nested, in a list, in a dict."""

    inner: _Inner
    many: list[_Inner]
    by_name: dict[str, SecretStr]
    token: SecretStr | None = None


def test_public_dump_finds_secrets_by_type():
    model = _Future(
        inner={"key": "https://u:s3cr3t@h"},
        many=[{"key": "https://v:s3cr3t@h"}],
        by_name={"db": "postgresql://w:s3cr3t@h/db"},
        token="https://x:s3cr3t@h",
    )
    public = public_dump(model)
    assert "s3cr3t" not in json.dumps(public) and "**********" not in json.dumps(public)
    assert public == {
        "inner": {"key": "https://u:***@h", "plain": "x"},
        "many": [{"key": "https://v:***@h", "plain": "x"}],
        "by_name": {"db": "postgresql://w:***@h/db"},
        "token": "https://x:***@h",
    }
    assert set(secret_fields(model)) == {("inner", "key"), ("many", 0, "key"), ("by_name", "db"), ("token",)}


def test_restore_secrets_from_the_environment(tmp_path):
    cfg = _secret_study(tmp_path)
    assert secret_env(("search", "optuna_storage")) == "DML_STUDY_OPTUNA_STORAGE"
    assert secret_env(("tracking", "uri")) == "MLFLOW_TRACKING_URI"
    assert secret_env(("by_name", "db")) == "DML_STUDY_BY_NAME_DB"  # a field that names no variable
    saved = parse_study(yaml.safe_dump(cfg.public_dump()), "config.yaml")
    assert saved != cfg and saved.public_dump() == cfg.public_dump()
    env = {"DML_STUDY_OPTUNA_STORAGE": OPTUNA_URL, "MLFLOW_TRACKING_URI": TRACKING_URI}
    assert restore_secrets(saved, env) == cfg
    with pytest.raises(ConfigError, match=r"^tracking.uri: .*set MLFLOW_TRACKING_URI"):
        restore_secrets(saved, {"DML_STUDY_OPTUNA_STORAGE": OPTUNA_URL})
    plain = _secret_study(tmp_path, "sqlite:///o.db", "http://127.0.0.1:5000")
    assert restore_secrets(plain, {}) == plain  # nothing redacted: nothing needed


def _study_folder(workdir: Path) -> Path:
    """A study folder as ``dml-study run`` leaves it (config.yaml from public_dump, the parent
    run's id), without running anything."""
    cfg = _secret_study(workdir)
    folder = workdir / "runs" / cfg.name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.public_dump(), sort_keys=False))
    (folder / "mlflow_run_id").write_text("0" * 32)
    assert not any(secret in (folder / "config.yaml").read_text() for secret in SECRETS)
    return folder


@pytest.fixture
def ran(monkeypatch):
    """study.cli._run replaced: records the config a resume would run with, starts nothing (and checks
    no dataset or MLflow run: tests/test_preflight.py does)."""
    calls = []
    monkeypatch.setattr(study.cli, "_run", lambda cfg, resume, verbose=False: calls.append((cfg, resume)))
    monkeypatch.setattr(study.cli, "_preflight", lambda cfg, parent_id=None: None)
    return calls


def test_resume_from_the_folder_needs_the_redacted_secret_from_the_environment(workdir, monkeypatch, ran):
    folder = _study_folder(workdir)
    monkeypatch.delenv("DML_STUDY_OPTUNA_STORAGE", raising=False)
    result = runner.invoke(app, ["resume", str(folder)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dml-study: "), result.output
    assert "search.optuna_storage" in lines[0] and "DML_STUDY_OPTUNA_STORAGE" in lines[0]
    assert "Traceback" not in result.output and not ran

    monkeypatch.setenv("DML_STUDY_OPTUNA_STORAGE", OPTUNA_URL)
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]  # the workdir's SQLite store
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    result = runner.invoke(app, ["resume", str(folder)])
    assert result.exit_code == 2 and "tracking.uri" in result.output and "MLFLOW_TRACKING_URI" in result.output

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    result = runner.invoke(app, ["resume", str(folder)])
    assert result.exit_code == 0, result.output
    [(cfg, resume)] = ran
    assert resume and cfg.search.optuna_storage.get_secret_value() == OPTUNA_URL
    assert cfg.tracking.uri.get_secret_value() == tracking_uri
    assert cfg.storage.root == folder.as_posix()


def test_resume_with_the_study_file_uses_its_secrets(workdir, monkeypatch, ran):
    _study_folder(workdir)
    monkeypatch.delenv("DML_STUDY_OPTUNA_STORAGE", raising=False)
    result = runner.invoke(app, ["run", str(workdir / "study.yaml"), "--resume"])
    assert result.exit_code == 0, result.output  # redaction is no difference
    [(cfg, _)] = ran
    assert cfg.search.optuna_storage.get_secret_value() == OPTUNA_URL
    assert cfg.tracking.uri.get_secret_value() == TRACKING_URI

    other = {**TINY_STUDY["search"], "optuna_storage": "postgresql://alice:s3cr3t@other:5432/optuna"}
    write_study(workdir, search=other, tracking={"uri": TRACKING_URI})
    result = runner.invoke(app, ["run", str(workdir / "study.yaml"), "--resume"])
    assert result.exit_code == 2 and "differs from the study being resumed in 'search'" in result.output
    assert "s3cr3t" not in result.output


def test_the_parent_run_logs_no_secret(tmp_path, mlflow_db):
    cfg = _secret_study(tmp_path)
    tracker = StudyTracker(cfg.name, "sqlite:///" + str(mlflow_db))
    run_id = tracker.start(cfg.public_dump(), "map_at_r")
    client = MlflowClient(tracking_uri="sqlite:///" + str(mlflow_db))
    run = client.get_run(run_id)
    config = Path(client.download_artifacts(run_id, "config.json", str(tmp_path))).read_text()
    logged = json.dumps([run.data.params, run.data.tags]) + config
    assert not any(secret in logged for secret in SECRETS)
    assert run.data.params["search.optuna_storage"] == "postgresql://alice:***@db:5432/optuna"
    assert json.loads(config)["tracking"]["uri"] == "http://bob:***@127.0.0.1:5999"
