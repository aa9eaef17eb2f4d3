"""What can be decided before Ray starts fails in seconds: one line naming the setting, exit 2,
nothing written (no study folder, no MLflow store)."""

from __future__ import annotations

import os
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from study.cli import app
from study.config import load_study
from study.preflight import PreflightError, cluster_slots, trials_per_node
from study.tracking import StudyTracker
from tests.conftest import TINY_STUDY, copy_mlflow_db, write_study

runner = CliRunner()


def _refused(workdir, *fragments, args=None, **changes):
    study = write_study(workdir, **changes)
    start = time.monotonic()
    result = runner.invoke(app, args or ["run", str(study)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dml-study: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert time.monotonic() - start < 30  # seconds, not a hang
    assert not (workdir / "runs").exists() and not (workdir / "mlflow.db").exists()  # nothing written
    return lines[0]


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a GPU")
def test_a_gpu_this_machine_does_not_have(workdir):
    _refused(workdir, "resources: a trial needs 1 CPUs and 1 GPUs, but this machine has", "0 GPUs",
             resources={"cpu": 1, "gpu": 1})  # fmt: skip


def test_more_cpus_than_this_machine_has(workdir):
    _refused(workdir, f"has {os.cpu_count()} CPUs", resources={"cpu": os.cpu_count() + 1, "gpu": 0})


def test_images_larger_than_memory(workdir):
    options = {**TINY_STUDY["dataset"]["options"], "image_size": 100_000}
    _refused(workdir, "dataset.options.image_size=100000 with 16 × 16 images needs", "GiB of memory",
             dataset={**TINY_STUDY["dataset"], "options": options})  # fmt: skip


def test_no_validation_class(workdir):
    _refused(workdir, "dataset.val_fraction=0.05: 8 training classes leave 8 training and 0 validation classes",
             dataset={**TINY_STUDY["dataset"], "val_fraction": 0.05})  # fmt: skip


def test_a_batch_needing_more_classes_than_a_trial_trains_on(workdir):
    needs = "train.batch_size=16 with m_per_class=2 needs 8 classes per batch, but a search trial trains on 4"
    _refused(workdir, needs, train={**TINY_STUDY["train"], "m_per_class": 2})


def test_a_study_name_too_long_for_a_folder(workdir):
    _refused(workdir, "name", "100 characters", name="x" * 300)


def test_an_output_folder_that_cannot_be_made(workdir):
    (workdir / "a_file").write_text("")
    line = _refused(workdir, "output_dir:", "is not a writable folder", output_dir=str(workdir / "a_file" / "runs"))
    assert "a_file" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_output_folder(workdir):
    (workdir / "ro").mkdir(mode=0o555)
    _refused(workdir, "is not a writable folder", output_dir=str(workdir / "ro"))


def test_resume_without_the_studys_mlflow_store(study_workdir, migrated_mlflow_db):
    workdir = study_workdir  # its store and the other one are created anyway: they come migrated
    study = write_study(workdir)
    cfg = load_study(study)
    folder = workdir / "runs" / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.public_dump(), sort_keys=False))
    parent = StudyTracker(cfg.name, os.environ["MLFLOW_TRACKING_URI"]).start(cfg.public_dump(), "map_at_r")
    (folder / "mlflow_run_id").write_text(parent)
    (workdir / "mlflow.db").unlink()  # moved or deleted
    result = runner.invoke(app, ["resume", "runs/tiny"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"its MLflow store {os.environ['MLFLOW_TRACKING_URI']} does not exist" in result.output
    assert not (workdir / "mlflow.db").exists()  # not replaced by an empty store

    other = copy_mlflow_db(migrated_mlflow_db, workdir / "other.db")
    StudyTracker("elsewhere", f"sqlite:///{other}")  # a store without the study's run
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{other}"
    result = runner.invoke(app, ["resume", "runs/tiny"])
    assert result.exit_code == 2 and f"its MLflow run {parent} is not in the tracking store" in result.output


@pytest.mark.parametrize("command", [["report", "tiny"], ["compare", "a", "b"]])
def test_report_and_compare_fail_in_seconds_on_an_unreachable_server(workdir, command):
    start = time.monotonic()
    result = runner.invoke(app, [*command, "--tracking-uri", "http://u:pw@127.0.0.1:9"])
    assert result.exit_code == 2 and time.monotonic() - start < 15
    assert result.output.strip() == (
        "dml-study: MLflow tracking server http://u:***@127.0.0.1:9 is unreachable ([Errno 111] Connection refused)"
    )


@pytest.mark.parametrize(
    ("resources", "node", "trials"),
    [
        ({"cpu": 1, "gpu": 0}, {"CPU": 8.0, "GPU": 2.0}, 8),  # no GPU asked: CPUs alone decide
        ({"cpu": 2, "gpu": 1}, {"CPU": 8.0, "GPU": 2.0}, 2),  # GPUs decide
        ({"cpu": 2, "gpu": 1}, {"CPU": 5.0, "GPU": 4.0}, 2),  # CPUs decide, rounded down
        ({"cpu": 1, "gpu": 0.25}, {"CPU": 16.0, "GPU": 1.0}, 4),  # a packed GPU
        ({"cpu": 1, "gpu": 0.1}, {"CPU": 16.0, "GPU": 0.3}, 3),  # 0.3 / 0.1 is 2.999… in floats
        ({"cpu": 1, "gpu": 1}, {"CPU": 16.0}, 0),  # a node without GPUs
    ],
)
def test_how_many_trials_a_node_holds(workdir, resources, node, trials):
    assert trials_per_node(node, load_study(write_study(workdir, resources=resources))) == trials


@pytest.mark.slow
def test_a_trial_no_node_of_the_cluster_can_hold(workdir, ray_instance):
    cfg = load_study(write_study(workdir, resources={"cpu": 1, "gpu": 4}))
    with pytest.raises(PreflightError, match=r"the cluster's largest node has 2 CPUs and 0 GPUs \(1 nodes\)"):
        cluster_slots(cfg)
    assert cluster_slots(load_study(write_study(workdir))) == 2  # 1 CPU, no GPU: one trial per CPU
    assert cluster_slots(load_study(write_study(workdir, resources={"cpu": 0.5}))) == 4
