"""Crashes, for real: a study whose driver is SIGKILLed resumes with nothing lost or doubled;
a trial whose Ray worker is killed is retried from its last epoch, or recorded as failed. The drivers
join the session's Ray head (the ``driver_head`` fixture) instead of each starting a Ray of its own.

The killed drivers are one study's (:func:`killed_study`, run once for the module): killed during the
search (its Optuna journal's last record then torn), resumed, killed during the final stage, resumed
to the end; each test checks one property of what it went through."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner, Result

from study.cli import app
from study.tracking import TAG_ERROR, TAG_ROLE, TAG_STATE, TAG_TRIAL
from study.vocab import Stage, TrialKey
from tests.conftest import TINY_STUDY, RayHead, copy_mlflow_db, end_drivers, write_study

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


def _start(workdir: Path, head: RayHead, *args: str, stderr: int = subprocess.STDOUT) -> subprocess.Popen:
    """``dml-study *args`` in ``workdir``, a driver on ``head`` (its stderr with its stdout unless
    ``stderr`` says otherwise)."""
    env = {**os.environ, **head.env}
    driver = subprocess.Popen(
        [DML_STUDY, *args], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    head.drivers.append(driver)
    return driver


def _wait_for(predicate, what: str, timeout: float = 180.0, driver: subprocess.Popen | None = None) -> None:
    """Wait until ``predicate()``; fail after ``timeout`` seconds, or at once if ``driver`` has exited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if driver is not None and driver.poll() is not None:
            out, err = driver.communicate(timeout=30)
            pytest.fail(f"the driver exited ({driver.returncode}) before {what}:\n{out[-5000:]}{(err or '')[-5000:]}")
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


def _check_consistent(
    workdir: Path,
    losses: list[str],
    trials: int,
    optuna_storage: str | None = None,
    search_only: bool = False,
    epochs: int = EPOCHS,
) -> dict:
    """Optuna and MLflow agree on exactly ``trials`` per loss, all ended, a COMPLETE one with its
    ``epochs``; returns key → state. With ``search_only``, of the study's runs only the search trials'
    are checked (a study with a final stage)."""
    parents, children = _mlflow_trials(workdir)
    if search_only:
        children = [r for r in children if TrialKey.parse(r.data.tags[TAG_TRIAL]).stage is Stage.SEARCH]
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
            logged = _epochs(run)
            assert logged == list(range(1, len(logged) + 1)) and logged, (run.data.tags[TAG_TRIAL], logged)
            assert run.data.tags[TAG_STATE] != "COMPLETE" or len(logged) == epochs
    assert not _checkpoints(workdir), "a finished trial's checkpoint is deleted"  # (local storage)
    return states


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


# -- one study, killed twice, for the tests below -----------------------------------------------------

LOSSES = ["multi_similarity", "normalized_softmax"]
TRIALS = 3
SEARCH_EPOCHS = 2  # each epoch over 2 folds
SEEDS, FOLDS = (1, 2), (0, 1)  # final runs: 2 seeds × 2 folds per loss, and an ensemble per seed
FINAL_EPOCHS = 3  # not SEARCH_EPOCHS: a final run trains (and logs) with its own settings


@dataclass(frozen=True)
class KilledStudy:
    """What :func:`killed_study` went through: its folder and MLflow store, what Optuna and MLflow
    held after each kill, and what its drivers printed."""

    workdir: Path
    tracking_uri: str
    unfinished: set[tuple[str, int]]  # the search trials (loss, number) Optuna had not finished at the first kill
    refused: Result  # `dml-study run` on the study after the first kill
    killed_out: str  # the first driver's output, until it was killed
    repaired_out: str  # the first resume's stdout (the journal torn): it trained until the second kill
    final_running: list[str]  # the final runs MLflow held RUNNING after the second kill
    final_before: dict[str, list[int]]  # each final run's epochs in MLflow after the second kill
    resumed: tuple[int, str]  # the last resume, to the study's end: its exit status and output


@pytest.fixture(scope="module")
def killed_study(tmp_path_factory, session_ray_head, migrated_mlflow_db) -> KilledStudy:
    """One study (2 losses × 3 trials, 2 validation folds; the final stage per fold with ensembles) on
    the session's Ray head: its driver SIGKILLed during the search (a first epoch written), `run` tried
    on it, its Optuna journal's last record torn; resumed, and that driver SIGKILLed during the final
    stage; resumed to the end. The tests check that each kill landed where it was meant to."""
    head = session_ray_head
    workdir = tmp_path_factory.mktemp("killed")
    uri = f"sqlite:///{copy_mlflow_db(migrated_mlflow_db, workdir / 'mlflow.db')}"
    path = write_study(
        workdir,
        dataset={"name": "synthetic", "options": DATASET["options"], "folds": len(FOLDS)},
        train={**TINY_STUDY["train"], "epochs": SEARCH_EPOCHS},
        search={**TINY_STUDY["search"], "losses": LOSSES, "trials_per_loss": TRIALS},
        final={"seeds": len(SEEDS), "epochs": FINAL_EPOCHS, "train_on": "folds"},
    )
    with pytest.MonkeyPatch.context() as env:
        env.chdir(workdir)
        env.setenv("MLFLOW_TRACKING_URI", uri)
        try:
            driver = _start(workdir, head, "run", str(path))
            _wait_for(lambda: _checkpoints(workdir), "a first epoch checkpoint", driver=driver)
            time.sleep(1.0)
            _kill_driver(driver, head)
            killed_out, _ = driver.communicate(timeout=30)
            started = {(loss, t.number) for loss in LOSSES if _has_study(workdir, loss) for t in _optuna(workdir, loss)}
            finished = {
                (loss, t.number)
                for loss in LOSSES
                if _has_study(workdir, loss)
                for t in _optuna(workdir, loss)
                if t.state.is_finished()
            }
            unfinished = (started | {(loss, n) for loss in LOSSES for n in range(TRIALS)}) - finished
            refused = CliRunner().invoke(app, ["run", str(path)])  # (it stops before Ray: in-process)
            journal = workdir / "runs" / "tiny" / "optuna.journal"
            os.truncate(journal, journal.stat().st_size - 40)  # a record torn by the kill

            repairing = _start(workdir, head, "resume", "runs/tiny", stderr=subprocess.PIPE)
            _wait_for(lambda: _final_checkpoints(workdir), "a final-stage checkpoint", timeout=600, driver=repairing)
            _kill_driver(repairing, head)
            repaired_out, _ = repairing.communicate(timeout=30)
            _, children = _mlflow_trials(workdir)
            final = {r.data.tags[TAG_TRIAL]: r for r in children if "/final/" in r.data.tags[TAG_TRIAL]}

            resumed = _start(workdir, head, "resume", "runs/tiny")
            out, _ = resumed.communicate(timeout=900)
        finally:
            end_drivers(head)
    return KilledStudy(
        workdir=workdir,
        tracking_uri=uri,
        unfinished=unfinished,
        refused=refused,
        killed_out=killed_out,
        repaired_out=repaired_out,
        final_running=sorted(key for key, run in final.items() if run.info.status == "RUNNING"),
        final_before={key: _epochs(run, "train_loss") for key, run in final.items()},
        resumed=(resumed.returncode, out),
    )


@pytest.fixture
def killed(killed_study, monkeypatch) -> KilledStudy:
    """:func:`killed_study`, its folder the working folder and its MLflow store the tracking URI."""
    monkeypatch.chdir(killed_study.workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", killed_study.tracking_uri)
    return killed_study


def test_run_on_a_killed_study_refuses_without_resume(killed):
    assert killed.refused.exit_code == 2 and "--resume" in killed.refused.output  # never silently overwritten


def test_sigkilled_driver_resumes_with_nothing_lost_or_doubled(killed):
    workdir = killed.workdir
    assert killed.unfinished, "the kill must land mid-study"
    code, out = killed.resumed
    assert code == 0, out
    _check_consistent(workdir, LOSSES, trials=TRIALS, search_only=True, epochs=SEARCH_EPOCHS)
    assert "| multi_similarity" in out and "| normalized_softmax" in out
    # Ray Tune ran every unfinished trial again under its Optuna number, and no other number: the
    # trials each resume started (the "▶ <key> started" lines Ray Tune's on_trial_start prints), and
    # those in Ray's result files. (A killed driver's Ray result files may be cut short or missing: Ray
    # buffers them; the first resume, which ran the rest of the search, was killed too.)
    again = _search_numbers(killed.repaired_out) | _search_numbers(killed.resumed[1])
    numbers = again | _search_numbers(killed.killed_out)
    for result in (workdir / "runs" / "tiny" / "ray").glob("*/*/result.json"):
        for line in result.read_text().splitlines():
            key = TrialKey.parse(json.loads(line)["config"]["spec"])  # a spec is written as its key
            if key.stage is Stage.SEARCH:  # (a final run's key names the trial it retrains)
                numbers.add((key.loss, key.number))
    assert killed.unfinished <= again and numbers <= {(loss, n) for loss in LOSSES for n in range(TRIALS)}


def _search_numbers(out: str) -> set[tuple[str, int]]:
    """(loss, number) of each search trial a driver's output says Ray Tune started (or retried)."""
    keys = [TrialKey.parse(m) for m in re.findall(r"^▶ (\S+) (?:started|retried):", out, re.MULTILINE)]
    return {(key.loss, key.number) for key in keys if key.stage is Stage.SEARCH}


def test_a_torn_journal_tail_is_repaired_on_resume(killed):
    # The resume that cut the torn record went on (the repaired journal read and written to) until it
    # was killed in the final stage; the next resume read the journal again and ended the study.
    assert "optuna.journal: cut a torn last record (" in killed.repaired_out
    code, out = killed.resumed
    assert code == 0, out
    parents, children = _mlflow_trials(killed.workdir)
    assert [p.info.status for p in parents] == ["FINISHED"]
    expected = {}
    for loss in LOSSES:
        trials = _optuna(killed.workdir, loss)
        assert len(trials) == TRIALS and all(t.state.is_finished() for t in trials)
        expected |= {f"{loss}/{t.number}": t.state.name for t in trials}
    search = [r for r in children if TrialKey.parse(r.data.tags[TAG_TRIAL]).stage is Stage.SEARCH]
    assert {r.data.tags[TAG_TRIAL]: r.data.tags[TAG_STATE] for r in search} == expected


def test_sigkilled_driver_during_the_final_stage_resumes_each_run_once(killed, tmp_path):
    assert killed.final_running, "the kill must land mid-final-stage"
    code, out = killed.resumed
    assert code == 0, out

    parents, children = _mlflow_trials(killed.workdir)
    assert parents[0].info.status == "FINISHED"
    keys = [r.data.tags[TAG_TRIAL] for r in children]
    expected, ensembles = set(), set()
    for loss in LOSSES:
        (best,) = {TrialKey.parse(k).number for k in keys if k.startswith(f"{loss}/final/")}  # all retrain the best
        expected |= {f"{loss}/final/{best}/s{s}-f{f}" for s in SEEDS for f in FOLDS}
        ensembles |= {f"{loss}/ensemble/{best}/s{s}" for s in SEEDS}
    assert sorted(k for k in keys if "/final/" in k) == sorted(expected)  # one run each, never two
    client = MlflowClient()
    for run in children:
        key = run.data.tags[TAG_TRIAL]
        if TrialKey.parse(key).stage is Stage.SEARCH:  # (may be PRUNED: checked against Optuna above)
            continue
        assert run.info.status == "FINISHED" and run.data.tags[TAG_STATE] == "COMPLETE", key
        if key in expected:
            epochs = _epochs(run, "train_loss")
            before = killed.final_before.get(key, [])
            assert epochs == list(range(1, FINAL_EPOCHS + 1)), key  # every epoch once, in order
            assert before == epochs[: len(before)]  # the killed driver's epochs kept
            assert _epochs(run, "test_recall_at_1") == [FINAL_EPOCHS], key  # tested once, after the last epoch
            assert "recall_at_1" not in run.data.metrics, key  # a test score, never under the validation name
            assert "embeddings.npz" in {a.path for a in client.list_artifacts(run.info.run_id)}
            logged = json.loads(
                Path(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read_text()
            )
            assert logged["train"]["epochs"] == FINAL_EPOCHS, key  # the run's own settings, not the search's
    assert {k for k in keys if "/ensemble/" in k} == ensembles
    assert not _final_checkpoints(killed.workdir)
    table = pd.read_csv(killed.workdir / "runs" / "tiny" / "final.csv").set_index("loss")
    for loss in LOSSES:
        assert (table.loc[loss].seeds, table.loc[loss].runs) == (len(SEEDS), len(SEEDS) * len(FOLDS))
