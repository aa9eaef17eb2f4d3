"""Crashes, for real: a study whose driver is SIGKILLed resumes with nothing lost or doubled;
a trial whose Ray worker is killed is retried from its last epoch, or recorded as failed. The drivers
join the session's Ray head (the ``driver_head`` fixture) instead of each starting a Ray of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from study.cli import app
from study.tracking import TAG_ERROR, TAG_ROLE, TAG_STATE, TAG_TRIAL
from study.vocab import TrialKey
from tests.conftest import TINY_STUDY, RayHead, write_study

pytestmark = pytest.mark.slow  # real Ray studies

DML_STUDY = str(Path(sys.executable).parent / "dml-study")
EPOCHS = 4
# Slow enough per epoch (about a second) that a kill lands mid-trial.
DATASET = {**TINY_STUDY["dataset"], "options": {"num_classes": 40, "samples_per_class": 32, "image_size": 16}}


def _study(workdir: Path, losses: list[str], trials: int, **search) -> Path:
    return write_study(
        workdir,
        dataset=DATASET,
        train={**TINY_STUDY["train"], "epochs": EPOCHS},
        search={**TINY_STUDY["search"], "losses": losses, "trials_per_loss": trials, **search},
    )


def _start(workdir: Path, head: RayHead, *args: str) -> subprocess.Popen:
    """``dml-study *args`` in ``workdir``, a driver on ``head``."""
    env = {**os.environ, **head.env}
    driver = subprocess.Popen(
        [DML_STUDY, *args], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    head.drivers.append(driver)
    return driver


def _wait_for(predicate, what: str, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _kill_driver(driver: subprocess.Popen, head: RayHead) -> None:
    """SIGKILL ``driver``, then wait until Ray has ended its trials on ``head``: nothing of the dead
    driver's study runs on while the test goes on."""
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL
    head.wait_idle("Ray to end the killed driver's trials")


def _checkpoints(workdir: Path) -> list[Path]:
    return list((workdir / "runs" / "tiny" / "checkpoints").glob("*/*/trial.pt"))


def _optuna(workdir: Path, loss: str, url: str | None = None) -> list[optuna.trial.FrozenTrial]:
    storage = url or optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workdir / "runs" / "tiny" / "optuna.journal"))
    )
    return optuna.load_study(study_name=f"tiny.{loss}", storage=storage).get_trials()


def _mlflow_trials(workdir: Path) -> tuple[list, list]:
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if r.data.tags[TAG_ROLE] == "study"]
    return parents, [r for r in runs if r.data.tags[TAG_ROLE] == "trial" and r.data.tags[TAG_TRIAL] != "baseline"]


def _epochs(run, metric: str = "map_at_r") -> list[int]:
    return [m.step for m in MlflowClient().get_metric_history(run.info.run_id, metric)]


def _check_consistent(workdir: Path, losses: list[str], trials: int, optuna_storage: str | None = None) -> dict:
    """Optuna and MLflow agree on exactly ``trials`` per loss, all ended; returns key → state."""
    parents, children = _mlflow_trials(workdir)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(r.info.status != "RUNNING" for r in children)
    states = {r.data.tags[TAG_TRIAL]: r.data.tags[TAG_STATE] for r in children}
    assert len(states) == len(children) == trials * len(losses)  # one run per trial, never two
    for loss in losses:
        optuna_trials = _optuna(workdir, loss, optuna_storage)
        assert len(optuna_trials) == trials and all(t.state.is_finished() for t in optuna_trials)
        for t in optuna_trials:
            assert states[f"{loss}/{t.number}"] == t.state.name
    for run in children:  # every epoch the trial ran, once, in order
        if run.data.tags[TAG_STATE] != "FAIL":
            epochs = _epochs(run)
            assert epochs == list(range(1, len(epochs) + 1)) and epochs, (run.data.tags[TAG_TRIAL], epochs)
            assert run.data.tags[TAG_STATE] != "COMPLETE" or len(epochs) == EPOCHS
    assert not _checkpoints(workdir), "a finished trial's checkpoint is deleted"  # (local storage)
    return states


@pytest.mark.usefixtures("study_workdir")  # runs a study: its MLflow store comes migrated
def test_sigkilled_driver_resumes_with_nothing_lost_or_doubled(workdir, driver_head):
    losses = ["multi_similarity", "normalized_softmax"]
    driver = _start(workdir, driver_head, "run", str(_study(workdir, losses, trials=3)))
    _wait_for(lambda: _checkpoints(workdir), "a first epoch checkpoint")
    time.sleep(1.0)
    _kill_driver(driver, driver_head)
    unfinished = {(loss, t.number) for loss in losses if _has_study(workdir, loss) for t in _optuna(workdir, loss)} | {
        (loss, n) for loss in losses for n in range(3)
    }
    unfinished -= {
        (loss, t.number)
        for loss in losses
        if _has_study(workdir, loss)
        for t in _optuna(workdir, loss)
        if t.state.is_finished()
    }
    assert unfinished, "the kill must land mid-study"

    again = CliRunner().invoke(app, ["run", str(workdir / "study.yaml")])  # (it stops before Ray: in-process)
    assert again.exit_code == 2 and "--resume" in again.output  # never silently overwritten

    resumed = _start(workdir, driver_head, "resume", "runs/tiny")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    _check_consistent(workdir, losses, trials=3)
    assert "| multi_similarity" in out and "| normalized_softmax" in out
    # Ray Tune ran every unfinished trial again under its Optuna number, and no other number.
    # (The killed driver's own Ray result files may be cut short: Ray buffers them.)
    numbers = set()
    for result in (workdir / "runs" / "tiny" / "ray").glob("*/*/result.json"):
        for line in result.read_text().splitlines():
            key = TrialKey.parse(json.loads(line)["config"]["spec"])  # a spec is written as its key
            numbers.add((key.loss, key.number))
    assert unfinished <= numbers <= {(loss, n) for loss in losses for n in range(3)}


def _has_study(workdir: Path, loss: str) -> bool:
    try:
        _optuna(workdir, loss)
    except KeyError:
        return False
    return True


def _kill_a_trial_worker(head: RayHead) -> None:
    """SIGKILL the Ray worker running a trial on ``head``."""
    workers = head.trial_workers()
    assert workers, "no trial worker found"
    workers[0].kill()


# What Ray Tune, Optuna and MLflow print by themselves, off unless --verbose (study.quiet)
NOISE = (
    "Configuration for experiment",
    "View detailed results",
    "tensorboard",
    "Creating initial MLflow database tables",
    "A new study created",
)
CURSOR_CODES = ("\x1b[?25l", "\x1b[2K", "\x1b[1A")  # what rich's live display draws with


@pytest.mark.parametrize("retries", [1, 0])
def test_a_trial_whose_worker_dies_is_retried_from_its_checkpoint_or_failed(workdir, driver_head, retries, request):
    if retries:  # a migrated store; the other driver creates its own, and MLflow's lines on it stay off (NOISE)
        request.getfixturevalue("study_workdir")
    path = _study(workdir, ["multi_similarity"], trials=2, max_concurrent=1, max_retries=retries)
    driver = _start(workdir, driver_head, "run", str(path))
    _wait_for(lambda: _checkpoints(workdir), "a first epoch checkpoint")
    _kill_a_trial_worker(driver_head)
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out
    # the progress view, as plain lines (stdout is a pipe), and none of the libraries' own output
    assert "▶ multi_similarity/1 started: alpha=" in out and "· search 2/2" in out
    assert "study: search 2/2 · runs 2/2 · 0 running" in out
    assert not [code for code in CURSOR_CODES if code in out]  # (Ray colours its own error lines)
    assert not [noise for noise in NOISE if noise.lower() in out.lower()], out
    states = _check_consistent(workdir, ["multi_similarity"], trials=2)
    if retries:  # the same kill as below, but the trial went on from its checkpoint
        assert "FAIL" not in states.values()
    else:
        assert states["multi_similarity/0"] == "FAIL"
        assert "✗ multi_similarity/0 FAIL" in out  # the error reaches the terminal
        _, children = _mlflow_trials(workdir)
        failed = next(r for r in children if r.data.tags[TAG_TRIAL] == "multi_similarity/0")
        assert failed.info.status == "FAILED" and failed.data.tags[TAG_ERROR]
        table = pd.read_csv(workdir / "runs" / "tiny" / "results.csv").set_index("loss")
        assert table.loc["multi_similarity", "failed"] == 1  # the table says how many failed


def _final_checkpoints(workdir: Path) -> list[Path]:
    return list((workdir / "runs" / "tiny" / "checkpoints").glob("*/final/*/*/trial.pt"))


@pytest.mark.usefixtures("study_workdir")  # runs a study: its MLflow store comes migrated
def test_sigkilled_driver_during_the_final_stage_resumes_each_run_once(workdir, driver_head):
    # 2 seeds × 2 folds of final runs, 6 epochs each: the kill lands while they train.
    final_epochs = 6
    path = write_study(
        workdir,
        dataset={"name": "synthetic", "options": DATASET["options"], "folds": 2},
        train={**TINY_STUDY["train"], "epochs": 2},
        search={**TINY_STUDY["search"], "losses": ["multi_similarity"], "trials_per_loss": 1},
        final={"seeds": 2, "epochs": final_epochs, "train_on": "folds"},
    )
    driver = _start(workdir, driver_head, "run", str(path))
    _wait_for(lambda: _final_checkpoints(workdir), "a final-stage checkpoint", timeout=300)
    _kill_driver(driver, driver_head)
    _, children = _mlflow_trials(workdir)
    final = {r.data.tags[TAG_TRIAL]: r for r in children if "/final/" in r.data.tags[TAG_TRIAL]}
    assert any(r.info.status == "RUNNING" for r in final.values()), "the kill must land mid-final-stage"
    before = {key: _epochs(run, "train_loss") for key, run in final.items()}

    resumed = _start(workdir, driver_head, "resume", "runs/tiny")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out

    parents, children = _mlflow_trials(workdir)
    assert parents[0].info.status == "FINISHED"
    keys = [r.data.tags[TAG_TRIAL] for r in children]
    (best,) = {TrialKey.parse(k).number for k in keys if "/final/" in k}  # all retrain the best trial
    expected = {f"multi_similarity/final/{best}/s{s}-f{f}" for s in (1, 2) for f in (0, 1)}
    assert sorted(k for k in keys if "/final/" in k) == sorted(expected)  # one run each, never two
    client = MlflowClient()
    for run in children:
        key = run.data.tags[TAG_TRIAL]
        assert run.info.status == "FINISHED" and run.data.tags[TAG_STATE] == "COMPLETE", key
        if key in expected:
            epochs = _epochs(run, "train_loss")
            assert epochs == list(range(1, final_epochs + 1)), key  # every epoch once, in order
            assert before.get(key, []) == epochs[: len(before.get(key, []))]  # the killed driver's epochs kept
            assert _epochs(run, "test_recall_at_1") == [final_epochs], key  # tested once, after the last epoch
            assert "recall_at_1" not in run.data.metrics, key  # a test score, never under the validation name
            assert "embeddings.npz" in {a.path for a in client.list_artifacts(run.info.run_id)}
            logged = json.loads(
                Path(client.download_artifacts(run.info.run_id, "config.json", str(workdir))).read_text()
            )
            assert logged["train"]["epochs"] == final_epochs, key  # the run's own settings, not the search's
    assert {k for k in keys if "/ensemble/" in k} == {f"multi_similarity/ensemble/{best}/s{s}" for s in (1, 2)}
    assert not _final_checkpoints(workdir)
    ms = pd.read_csv(workdir / "runs" / "tiny" / "final.csv").set_index("loss").loc["multi_similarity"]
    assert (ms.seeds, ms.runs) == (2, 4)
