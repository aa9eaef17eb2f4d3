"""The command line a researcher starts from: ``--version``, ``check`` (what a study would run, nothing
written), ``run``/``resume --tracking-uri``, and the headline result a finished study logs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from importlib import metadata

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from study.cli import _headline, app
from study.config import load_study
from study.tracking import TAG_BEST_LOSS, StudyTracker
from study.vocab import CONFIG_FILE, PARENT_RUN_FILE, Stage, TrialKey, as_test_name
from tests.conftest import REPO, TINY_STUDY, write_study

runner = CliRunner()


def test_version_is_the_installed_packages():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"dml-study {metadata.version('dml-study')}\n"


def _check(workdir, *args: str, **changes):
    study = write_study(workdir, **changes)
    result = runner.invoke(app, ["check", str(study), *args])
    assert sorted(p.name for p in workdir.iterdir()) == ["study.yaml"]  # no runs/, no mlflow.db, nothing
    return study, result


def test_check_prints_the_resolved_study_and_the_trials_it_would_run(workdir):
    study, result = _check(workdir, final={"seeds": 2})
    assert result.exit_code == 0, result.output
    resolved, plan = result.output.split("\n# what run would train\n")
    assert yaml.safe_load(resolved) == load_study(study).public_dump()
    lines = plan.splitlines()
    assert lines[0] == (
        "multi_similarity: 3 search trials (up to 2 epochs each; ASHA stops weak ones early), "
        "6 searched hyperparameters:"
    )
    assert "  alpha     float in [0.5, 10], log scale; default 2" in lines
    assert "  mining    one of true, false; default true" in lines
    assert "  final runs: 2 (2 seeds, on all training classes; 2 epochs)" in lines
    assert "  ablation runs: 4 (2 claims × 2 seeds: mining, easy_positives)" in lines
    ns = lines.index(
        "normalized_softmax: 3 search trials (up to 2 epochs each; ASHA stops weak ones early), "
        "2 searched hyperparameters:"
    )
    assert lines[ns + 1 :] == [
        "  temperature   float in [0.01, 0.5], log scale; default 0.05",
        "  loss_lr_mult  float in [1, 100], log scale; default 1",
        "  final runs: 2 (2 seeds, on all training classes; 2 epochs)",
        "  ablation runs: 0 (no claim about normalized_softmax's searched hyperparameters)",
        "total: 14 training runs (6 search, 4 final, 4 ablation), plus the untrained baseline evaluated once",
        f"tracking: sqlite:///{workdir / 'mlflow.db'} (MLFLOW_TRACKING_URI)",
    ]


def test_check_counts_follow_the_config_and_repeated_sets(workdir):
    _, result = _check(
        workdir, "--set", "search.trials_per_loss=5", "--set", "final.seeds=3", "--set", "ablations=false"
    )
    assert result.exit_code == 0, result.output
    assert "  ablation runs: 0 (ablations: false)" in result.output
    assert "total: 16 training runs (10 search, 6 final, 0 ablation)" in result.output
    _, result = _check(workdir, final={"seeds": 0})  # the tiny study: no final stage, so no ablation either
    assert "  final runs: 0 (final.seeds: 0)" in result.output
    assert "  ablation runs: 0 (no final stage to pair with)" in result.output
    assert "total: 6 training runs (6 search, 0 final, 0 ablation)" in result.output
    options = {"num_classes": 24, "samples_per_class": 16, "image_size": 16}
    folds = {**TINY_STUDY["dataset"], "options": options, "folds": 3}
    _, result = _check(workdir, dataset=folds, final={"seeds": 2, "train_on": "folds"})
    assert result.exit_code == 0, result.output
    assert "  final runs: 6 (2 seeds × 3 folds, each on its fold's training classes; 2 epochs)" in result.output
    assert (
        "  ablation runs: 0 (they pair with final runs on all training classes: final.train_on: all)" in result.output
    )
    assert "total: 18 training runs (6 search, 12 final, 0 ablation), plus the untrained baseline, 4 fold" in (
        result.output
    )


def test_check_refuses_a_bad_study_like_run_in_one_line(workdir):
    _, result = _check(workdir, "--set", "train.nope=1")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"dml-study: {workdir / 'study.yaml'}: unknown key 'train.nope'; allowed: epochs, batch_size, "
    )
    _, result = _check(workdir, resources={"cpu": 10_000, "gpu": 0})  # a pre-flight check, as run's
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("dml-study: resources: a trial needs 10000 CPUs")


def test_check_redacts_secrets_and_names_where_the_tracking_uri_comes_from(workdir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = "http://user:s3cret@127.0.0.1:9"  # nothing listens: check contacts no server
    _, result = _check(workdir, tracking={"uri": uri})
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    assert "uri: http://user:***@127.0.0.1:9" in result.output  # the resolved study
    assert result.output.endswith("tracking: http://user:***@127.0.0.1:9 (the study's tracking.uri)\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    _, result = _check(workdir, tracking={"uri": uri})
    assert result.output.endswith("tracking: sqlite:///env.db (MLFLOW_TRACKING_URI)\n")
    _, result = _check(workdir, "--tracking-uri", "sqlite:///cli.db", tracking={"uri": uri})
    assert result.output.endswith("tracking: sqlite:///cli.db (--tracking-uri)\n")


def test_check_warns_about_an_existing_study_folder(workdir):
    study = write_study(workdir)
    (workdir / "runs" / "tiny").mkdir(parents=True)
    (workdir / "runs" / "tiny" / "config.yaml").write_text("name: tiny\n")
    result = runner.invoke(app, ["check", str(study)])
    assert result.exit_code == 0, result.output
    assert "warning: runs/tiny exists: run needs --resume to continue it or --new to replace it" in result.output


def test_run_tracking_uri_wins_over_the_environment(workdir):
    """The command line's URI is the one the pre-flight check uses (an unreachable server: exit 2 in
    seconds), although MLFLOW_TRACKING_URI names the workdir's SQLite store."""
    start = time.monotonic()
    result = runner.invoke(app, ["run", str(write_study(workdir)), "--tracking-uri", "http://u:pw@127.0.0.1:9"])
    assert result.exit_code == 2 and time.monotonic() - start < 30
    assert result.output.strip() == (
        "dml-study: MLflow tracking server http://u:***@127.0.0.1:9 is unreachable ([Errno 111] Connection refused)"
    )
    assert sorted(p.name for p in workdir.iterdir()) == ["study.yaml"]


@pytest.mark.usefixtures("study_workdir")  # creates the MLflow store anyway: it comes migrated
def test_resume_tracking_uri_wins_over_the_environment(workdir):
    study = write_study(workdir)
    cfg = load_study(study)
    folder = workdir / "runs" / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.public_dump(), sort_keys=False))
    (folder / "mlflow_run_id").write_text(StudyTracker("tiny", f"sqlite:///{workdir / 'mlflow.db'}").start({}, "x"))
    missing = f"sqlite:///{workdir / 'moved.db'}"
    result = runner.invoke(app, ["resume", "runs/tiny", "--tracking-uri", missing])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"its MLflow store {missing} does not exist" in result.output
    assert not (workdir / "moved.db").exists()


def test_run_help_says_set_repeats():
    result = runner.invoke(app, ["run", "--help"], terminal_width=200)
    assert "repeat it" in result.output and "--tracking-uri" in result.output


def test_headline_is_each_losss_mean_test_objective_over_its_final_runs():
    rows = [
        ("final", "COMPLETE", "ms", "1", 0.5),
        ("final", "COMPLETE", "ms", "2", 0.7),
        ("final", "FAIL", "ms", "3", float("nan")),
        ("final", "COMPLETE", "ns", "1", 0.4),
        ("final", "COMPLETE", "ns", "1", 0.6),  # two folds of one seed: their mean is the seed's value
        ("final", "COMPLETE", "ns", "2", 0.8),
        ("search", "COMPLETE", "pa", None, 0.9),  # validation classes: not a test result
    ]
    runs = pd.DataFrame(rows, columns=["stage", "state", "loss", "param.seed", "test_map_at_r"])
    headline = _headline(runs, "map_at_r")
    assert headline.keys() == {"ms", "ns"}
    assert math.isclose(headline["ms"], 0.6) and math.isclose(headline["ns"], 0.65)
    assert _headline(runs[runs["stage"] == "search"], "map_at_r") == {}
    assert _headline(runs, "recall_at_1") == {}


@pytest.mark.parametrize("args", [[], ["--help"]])
def test_no_command_shows_the_commands(args):
    result = runner.invoke(app, args)
    for command in ("check", "run", "resume", "report", "compare", "--version"):
        assert command in result.output


@pytest.mark.usefixtures("study_workdir")  # creates the MLflow store anyway: it comes migrated
def test_a_finished_run_logs_its_headline_on_the_parent_run(workdir, monkeypatch):
    """``run`` end to end around a stand-in for the stages (no Ray): the tables are written, then
    each loss's mean test objective over its final runs and the best loss go to the parent run."""
    import study.stages  # imports Ray (not started): here only

    tests = {"multi_similarity": (0.5, 0.7), "normalized_softmax": (0.2, 0.4)}

    def run_study(cfg, resume, verbose):  # what the stages log: search trials, then final runs per seed
        tracker = StudyTracker(cfg.name, os.environ["MLFLOW_TRACKING_URI"])
        cfg.storage.child(CONFIG_FILE).write_text(yaml.safe_dump(cfg.public_dump()))
        cfg.storage.child(PARENT_RUN_FILE).write_text(tracker.start(cfg.public_dump(), cfg.search.objective))
        for loss, values in tests.items():
            runs = [(TrialKey.search(loss, 0), {}, 0.9)]
            runs += [(TrialKey.final(loss, 0, seed), {"seed": seed}, v) for seed, v in enumerate(values, 1)]
            for key, params, value in runs:
                tracker.start_trial(str(key), loss, key.stage, params, key.run_name)
                names = ("recall_at_1", "nmi", "map_at_r", "r_precision")  # test_<name> on a final run
                metrics = {as_test_name(n) if key.stage == Stage.FINAL else n: value for n in names}
                tracker.log_metrics(str(key), metrics, step=2)
                tracker.end_trial(str(key), "COMPLETE")
        tracker.finish()
        return tracker

    monkeypatch.setattr(study.stages, "run_study", run_study)
    result = runner.invoke(app, ["run", str(write_study(workdir))])
    assert result.exit_code == 0, result.output
    assert (workdir / "runs" / "tiny" / "final.csv").exists()
    parent = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(
        (workdir / "runs" / "tiny" / PARENT_RUN_FILE).read_text()
    )
    metrics = {k: round(v, 6) for k, v in parent.data.metrics.items()}
    expected = {"test_map_at_r.multi_similarity": 0.6, "test_map_at_r.normalized_softmax": 0.3, "test_map_at_r": 0.6}
    assert metrics == expected
    assert parent.data.tags[TAG_BEST_LOSS] == "multi_similarity"


EXIT_PROBE = """
import atexit, concurrent.futures, sys, threading, time
import study.cli

atexit.register(lambda: print("atexit ran"))
threading.Thread(target=lambda: (time.sleep(0.5), print("thread joined"))).start()
pool = concurrent.futures.ThreadPoolExecutor(1)  # left open: its idle thread ends with threading's exit hook
pool.submit(int).result()
sys.stdout.write("buffered, ")  # nothing here flushes stdout (a pipe): the exit must
sys.argv = ["dml-study", *sys.argv[1:]]
study.cli.main()
"""


@pytest.mark.parametrize(
    ("args", "code"), [(["--version"], 0), (["check", "no-such.yaml"], 2), (["no-such-command"], 2)]
)
def test_the_command_exits_with_its_status_after_threads_atexit_and_flushing(args, code, tmp_path):
    """``main`` skips the interpreter's teardown (os._exit) but nothing else that ``sys.exit`` does."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as in a pipe
    done = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert done.returncode == code, done.stderr
    assert done.stdout.startswith("buffered, ") and done.stdout.index("thread joined") < done.stdout.index("atexit ran")
    if code:
        assert done.stderr.strip(), "the reason goes to stderr"
    else:
        assert f"dml-study {metadata.version('dml-study')}" in done.stdout


def test_the_driver_imports_no_training_code():
    """What a driver imports (study.cli, study.stages): not the workers' side (study.train, study.metrics,
    study.models: faiss, scikit-learn), seconds of imports at every start."""
    code = (
        "import sys, study.cli, study.stages; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('faiss', 'sklearn') "
        "or m.startswith(('study.train', 'study.metrics', 'study.models'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]"
