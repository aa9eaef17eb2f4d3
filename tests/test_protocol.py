"""The protocol end to end on an image dataset in CUB-200-2011's layout: decode-once cache, k
validation folds for the search, then the final stage (seeds × folds on the training classes,
tested once on the test classes) with its concatenated-embedding ensembles and mean ± CI table."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from study.cli import app
from study.tracking import TAG_STAGE, TAG_STATE, TAG_TRIAL
from study.vocab import OPTUNA_JOURNAL, TrialKey
from tests.conftest import TINY_STUDY, write_study

runner = CliRunner()


def cub_tree(root, classes: int = 12, per_class: int = 6, seed: int = 0) -> None:
    """CUB's layout (images.txt, image_class_labels.txt, images/): a colour per class, jittered;
    classes 1.. and 101.. (CUB's test classes are 101–200)."""
    rng = np.random.default_rng(seed)
    top = root / "CUB_200_2011"
    ids, labels = [], []
    for c in [*range(1, classes // 2 + 1), *range(101, 101 + classes // 2)]:
        folder = top / "images" / f"{c:03d}.class"
        folder.mkdir(parents=True)
        colour = rng.integers(90, 166, 3)  # close colours under heavy noise: not trivially separable
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 70, (24, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg")
            ids.append(f"{len(ids) + 1} {c:03d}.class/{i}.jpg")
            labels.append(f"{len(labels) + 1} {c}")
    (top / "images.txt").write_text("\n".join(ids) + "\n")
    (top / "image_class_labels.txt").write_text("\n".join(labels) + "\n")


def _run_folds_study(workdir, epochs: int, trials: int, final: dict) -> None:
    """MS on a CUB-layout tree of 12 classes: 1–6 train (3 folds of 2 validation classes), 101–106 test."""
    cub_tree(workdir / "data", classes=12)
    path = write_study(
        workdir,
        dataset={"name": "cub200", "root": str(workdir / "data"), "folds": 3, "image_size": 20,
                 "cache_dir": str(workdir / "cache")},
        train={"epochs": epochs, "batch_size": 8, "m_per_class": 2, "lr": 1e-3, "crop_size": 16},
        search={**TINY_STUDY["search"], "losses": ["multi_similarity"], "trials_per_loss": trials},
        final=final,
        ablations=False,  # (tests/test_ablation.py)
    )  # fmt: skip
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.usefixtures("study_workdir")  # runs a study: its MLflow store comes migrated
def test_folds_final_stage_and_ensemble(workdir, ray_instance):
    _run_folds_study(workdir, epochs=2, trials=2, final={"seeds": 2, "train_on": "folds"})
    assert len(list((workdir / "cache").glob("*.npy"))) == 1  # decoded once for every trial

    client = MlflowClient()
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], "tags.`dml_study.role` = 'trial'")
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags[TAG_STAGE], []).append(run)
    assert len(by_stage["search"]) == 2
    finals = [r for r in by_stage["final"] if r.data.tags[TAG_TRIAL].startswith("multi_similarity/")]
    keys = [TrialKey.parse(r.data.tags[TAG_TRIAL]) for r in finals]
    (best,) = {key.number for key in keys}  # all retrain the loss's best search trial
    assert sorted((key.seed, key.fold) for key in keys) == [
        (s, f) for s in (1, 2) for f in range(3)
    ]  # seeds 1, 2 (never the search's seed 0), per fold
    assert all(r.data.tags[TAG_STATE] == "COMPLETE" for r in finals + by_stage["ensemble"])
    assert len(by_stage["ensemble"]) == 2

    # Each final run is tested once, after its last epoch, on the 6 test classes (36 images).
    run = finals[0]
    history = client.get_metric_history(run.info.run_id, "test_recall_at_1")
    assert [m.step for m in history] == [2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    # the search trials never saw a test class: their configs train and validate on classes 1–6 only
    study_dir = workdir / "runs" / "tiny"
    saved = np.load(io.BytesIO((study_dir / f"embeddings/multi_similarity/final/{best}/s1-f0.npz").read_bytes()))
    assert saved["test"].shape == (36, 16) and set(saved["test_labels"]) == set(range(101, 107))
    # ... and the same embeddings are an artifact of its MLflow run (the report projects them)
    s1f0 = next(r for r in finals if r.data.tags[TAG_TRIAL].endswith("s1-f0"))
    # ... and, the first seed's first fold being the run that keeps the loss's network, its model
    assert [a.path for a in client.list_artifacts(s1f0.info.run_id)] == ["config.json", "embeddings.npz", "model.pt"]
    # the ensemble of seed 1 concatenates its three fold models
    ensemble = next(r for r in by_stage["ensemble"] if r.data.tags[TAG_TRIAL].endswith("s1"))
    assert ensemble.data.params["folds"] == "3"
    for run in [*finals, ensemble]:  # test classes: test_<metric> only, never a validation metric's name
        assert "test_map_at_r" in run.data.metrics and "map_at_r" not in run.data.metrics

    final = pd.read_csv(study_dir / "final.csv")
    ms = final.set_index("loss").loc["multi_similarity"]
    assert (ms.seeds, ms.runs, ms.protocol) == (2, 6, "folds")
    per_seed = [
        np.mean([r.data.metrics["test_map_at_r"] for r in finals if f"/s{s}-" in r.data.tags[TAG_TRIAL]])
        for s in (1, 2)
    ]
    assert np.isclose(ms.map_at_r, np.mean(per_seed))
    assert np.isclose(ms.map_at_r_ci, 12.706 * np.std(per_seed, ddof=1) / np.sqrt(2), rtol=1e-3)
    assert "multi_similarity (ensemble)" in set(final["loss"]) and "untrained" in set(final["loss"])
    assert " ± " in (study_dir / "results.md").read_text()
    assert "one model per validation fold" in (study_dir / "results.md").read_text()
    assert not (study_dir / "checkpoints").exists() or not any((study_dir / "checkpoints").rglob("*.pt"))
    assert not any(study_dir.glob("models/**/*.pt"))  # the kept network lives in MLflow only


@pytest.mark.slow
@pytest.mark.usefixtures("study_workdir")  # runs a study: its MLflow store comes migrated
def test_the_final_stage_trains_each_seed_on_every_training_class_by_default(workdir, ray_instance):
    """final.train_on: all (the papers' protocol): with validation folds for the search, each final run
    still trains on all 6 training classes — one run per seed, no fold, no ensemble."""
    _run_folds_study(workdir, epochs=1, trials=1, final={"seeds": 2})
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.`dml_study.role` = 'trial'")
    finals = [r for r in runs if r.data.tags[TAG_STAGE] == "final"]
    assert sorted(r.data.tags[TAG_TRIAL] for r in finals) == [f"multi_similarity/final/0/s{s}" for s in (1, 2)]
    assert not [r for r in runs if r.data.tags[TAG_STAGE] == "ensemble"]
    config = json.loads(Path(client.download_artifacts(finals[0].info.run_id, "config.json", str(workdir))).read_text())
    assert config["train"]["epochs"] == 1 and "fold" not in finals[0].data.params and config.get("fold") is None
    final = pd.read_csv(workdir / "runs" / "tiny" / "final.csv").set_index("loss").loc["multi_similarity"]
    assert (final.seeds, final.runs, final.protocol) == (2, 2, "all classes")
    assert "each seed trained on every training class" in (workdir / "runs" / "tiny" / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.usefixtures("study_workdir")  # runs a study: its MLflow store comes migrated
def test_an_unreadable_image_stops_the_study_naming_it_and_resume_runs_every_trial_once(workdir, ray_instance):
    """The first trials read the images (a test class's too) side by side: whichever meets the broken one
    stops the study, naming it, and no trial is told to Optuna or ended in MLflow; once the image is
    fixed, resume runs the study's trials (those left unfinished under their own numbers) and the baseline."""
    cub_tree(workdir / "data", classes=8, per_class=4)
    broken = workdir / "data" / "CUB_200_2011" / "images" / "102.class" / "1.jpg"
    good = broken.read_bytes()
    broken.write_bytes(b"not a jpeg")
    path = write_study(
        workdir,
        dataset={"name": "cub200", "root": str(workdir / "data"), "val_fraction": 0.5, "image_size": 16,
                 "cache_dir": str(workdir / "cache")},
        train={"epochs": 1, "batch_size": 4, "m_per_class": 2},
        search={**TINY_STUDY["search"], "losses": ["multi_similarity"], "trials_per_loss": 2},
    )  # fmt: skip
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    message = result.output.strip().splitlines()[-1]
    assert message.startswith(f"dml-study: {broken}: cannot read image") and "--resume" in message
    assert "Traceback" not in result.output
    assert not list((workdir / "cache").glob("*.npy"))  # nothing half-written
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tiny").experiment_id
    runs = client.search_runs([experiment])
    assert [r.data.tags["dml_study.role"] for r in runs if r.info.status != "RUNNING"] == ["study"]  # none ended
    assert not [r for r in runs if r.data.tags.get(TAG_STAGE) == "baseline"] and not any(r.data.metrics for r in runs)
    journal = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workdir / "runs" / "tiny" / OPTUNA_JOURNAL))
    )
    left = optuna.load_study(study_name="tiny.multi_similarity", storage=journal).get_trials()
    assert {t.state for t in left} <= {optuna.trial.TrialState.RUNNING}  # none told FAIL: it was not theirs

    broken.write_bytes(good)
    result = runner.invoke(app, ["run", str(path), "--resume"])
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="tiny.multi_similarity", storage=journal).get_trials()
    assert [t.number for t in trials] == [0, 1] and all(t.state.is_finished() for t in trials)
    assert [t.params for t in trials[: len(left)]] == [t.params for t in left]  # run again, not replaced
    runs = client.search_runs([experiment], "tags.`dml_study.role` = 'trial'")
    assert sorted(r.data.tags[TAG_TRIAL] for r in runs) == ["baseline", "multi_similarity/0", "multi_similarity/1"]
    assert all(r.info.status == "FINISHED" and r.data.tags[TAG_STATE] != "RUNNING" for r in runs)


def test_a_wrong_dataset_folder_fails_before_anything_starts(workdir):
    (workdir / "data").mkdir()
    path = write_study(workdir, dataset={"name": "cub200", "root": str(workdir / "data")})
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "images.txt" in result.output and "CUB_200_2011" in result.output
    assert not (workdir / "runs").exists()
