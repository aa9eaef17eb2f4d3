"""Faults a user meets, for real (integration layer): Ctrl-C stops a study, which then resumes with
nothing lost, doubled or mislabelled. The interrupted driver starts its own Ray, as in a terminal
(the signal reaches its processes too); the resume joins the session's Ray head. (A second driver on
the same study: tests/test_lock.py; a torn Optuna journal: tests/test_resume.py's killed study.)"""

from __future__ import annotations

import os
import signal
import subprocess

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from study.tracking import TAG_STATE, TAG_TRIAL
from study.vocab import TrialKey
from tests.conftest import RayHead
from tests.test_resume import DML_STUDY, _checkpoints, _mlflow_trials, _optuna, _study, _wait_for

pytestmark = pytest.mark.slow  # real Ray studies in driver subprocesses


def _start_in_terminal(workdir, head: RayHead | None, *args: str) -> subprocess.Popen:
    """A driver in its own process group, as a terminal runs it: Ctrl-C signals the whole group. On
    ``head``, else with a local Ray of its own (in that group)."""
    env = {**os.environ, **(head.env if head else {"RAY_AUTH_MODE": "disabled"})}
    driver = subprocess.Popen(
        [DML_STUDY, *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    if head:
        head.drivers.append(driver)
    return driver


@pytest.mark.usefixtures("study_workdir")  # runs a study: its MLflow store comes migrated
def test_ctrl_c_stops_the_study_and_resume_finishes_it(workdir, driver_head):
    path = _study(workdir, ["multi_similarity"], trials=3, max_concurrent=1)
    study = yaml.safe_load(path.read_text())
    # one final run, no ablation runs (tests/test_ablation.py kills and resumes those)
    path.write_text(yaml.safe_dump(study | {"final": {"seeds": 1}, "ablations": False}))
    driver = _start_in_terminal(workdir, None, "run", str(path))
    _wait_for(lambda: _checkpoints(workdir), "a first epoch checkpoint")
    os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, out + err
    assert "interrupted" in err and "dml-study resume runs/tiny" in err
    assert "results:" not in out  # nothing after the interrupt: no tables

    parents, children = _mlflow_trials(workdir)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert not [r for r in children if "/final/" in r.data.tags[TAG_TRIAL]]  # the final stage never started
    trials = _optuna(workdir, "multi_similarity")
    assert not [t for t in trials if t.state == optuna.trial.TrialState.FAIL]  # an interrupt is not a failure
    assert any(t.state == optuna.trial.TrialState.RUNNING for t in trials)  # left for resume

    resumed = _start_in_terminal(workdir, driver_head, "resume", "runs/tiny")  # (any Ray will do: the session's)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out + err
    parents, children = _mlflow_trials(workdir)
    assert [p.info.status for p in parents] == ["FINISHED"]
    trials = _optuna(workdir, "multi_similarity")
    assert len(trials) == 3 and all(t.state.is_finished() for t in trials)
    states = {r.data.tags[TAG_TRIAL]: r.data.tags[TAG_STATE] for r in children}
    for t in trials:
        assert states[f"multi_similarity/{t.number}"] == t.state.name
    best = max((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    finals = [TrialKey.parse(k) for k in states if "/final/" in k]
    assert [(k.number, k.seed) for k in finals] == [(best.number, 1)]  # the best trial's point, retrained
    assert all(state == "COMPLETE" for key, state in states.items() if "/final/" in key)
    assert MlflowClient().get_run(parents[0].info.run_id).info.status == "FINISHED"
