"""Reuse the winner: the final run that keeps its network puts it in MLflow; loaded back through the public
API it embeds the test images exactly as the run did. The worker, the callback and the tracker are the
real ones (a real MLflow SQLite store, a really trained checkpoint); only Ray is left out: the worker's
reports are collected instead of going to a Tune session."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from study import worker
from study.callback import TrackingCallback
from study.config import parse_study, search_spaces
from study.data import create_dataset, index_dataset
from study.reuse import load_embedder, model_run
from study.spec import SPEC, final_spec
from study.tracking import TAG_MODEL, StudyTracker
from study.vocab import EMBEDDINGS_ARTIFACT, MODEL_ARTIFACT, checkpoint_dir, model_file, read_embeddings
from tests.conftest import TINY_STUDY
from tests.test_protocol import cub_tree


def _study(tmp_path: Path, mode: str):
    """Proxy Anchor (it has parameters of its own: the proxies), one final seed. ``features``: the synthetic
    data in feature mode with a random trunk (the head trains on the study seed's trunk, not the final
    run's); ``images``: CUB-layout files, fine-tuned, decoded once and center-cropped for evaluation."""
    study = {**TINY_STUDY, "output_dir": str(tmp_path / "runs"), "final": {"seeds": 2}}
    study["search"] = {**TINY_STUDY["search"], "losses": ["proxy_anchor"]}
    if mode == "features":
        study["train"] = {**TINY_STUDY["train"], "mode": "features"}
    else:
        cub_tree(tmp_path / "data", classes=8, per_class=6)
        study["dataset"] = {"name": "cub200", "root": str(tmp_path / "data"), "val_fraction": 0.5, "image_size": 20,
                            "cache_dir": str(tmp_path / "cache")}  # fmt: skip
        study["train"] = {"epochs": 1, "batch_size": 8, "m_per_class": 2, "lr": 1e-3, "crop_size": 16}
    return parse_study(yaml.safe_dump(study), "study.yaml")


def _test_images(cfg, embedder) -> np.ndarray:
    """The embedder's embeddings of the study's test images: arrays (synthetic) or the image files."""
    if cfg.dataset.name == "synthetic":
        data = create_dataset("synthetic", **cfg.dataset.options)
        return embedder.embed(data.images[data.split == "test"])
    index = index_dataset(cfg.dataset.name, cfg.dataset.root)
    return embedder.embed_files([path for path, split in zip(index.paths, index.split, strict=True) if split == "test"])


@pytest.mark.parametrize("mode", ["features", "images"])
def test_the_kept_network_embeds_the_test_images_as_its_final_run_did(mlflow_db, tmp_path, monkeypatch, mode):
    cfg = _study(tmp_path, mode)
    uri = f"sqlite:///{mlflow_db}"
    tracker = StudyTracker(cfg.name, uri)
    tracker.start(cfg.public_dump(), "map_at_r")
    callback = TrackingCallback(tracker, cfg, search_spaces(cfg))
    spaces = search_spaces(cfg)
    spec = final_spec(cfg, spaces["proxy_anchor"], 0, {"alpha": 16.0}, seed=1, fold=None)
    assert spec.keep_model and not final_spec(cfg, spaces["proxy_anchor"], 0, {}, seed=2, fold=None).keep_model

    reports = []
    monkeypatch.setattr(tune, "report", reports.append)  # what a Tune session would receive
    trial = SimpleNamespace(config={SPEC: spec}, last_result=None, error_file=None)
    callback.on_trial_start(0, [], trial)
    worker.run_spec({SPEC: spec}, cfg=cfg, storage=cfg.storage)
    trial.last_result = reports[-1]
    callback.on_trial_complete(0, [], trial)

    client = MlflowClient(uri)
    with pytest.raises(LookupError, match="no best loss yet"):
        model_run(cfg.name, tracking_uri=uri)
    run_id = model_run(cfg.name, "proxy_anchor", tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.tags[TAG_MODEL] == MODEL_ARTIFACT and run.data.params["seed"] == "1"
    assert {a.path for a in client.list_artifacts(run_id)} >= {MODEL_ARTIFACT, EMBEDDINGS_ARTIFACT}
    # MLflow holds the network now: the study folder keeps neither it nor the checkpoint
    assert not model_file(cfg.storage, spec.key).exists() and not checkpoint_dir(cfg.storage, spec.key).exists()
    tracker.log_headline("map_at_r", {"proxy_anchor": reports[-1]["test_map_at_r"]})
    assert model_run(cfg.name, tracking_uri=uri) == run_id  # the best loss's, by default

    embedder = load_embedder(run_id, tracking_uri=uri)
    saved = read_embeddings(Path(client.download_artifacts(run_id, EMBEDDINGS_ARTIFACT, str(tmp_path))).read_bytes())
    embeddings = _test_images(cfg, embedder)
    assert embeddings.dtype == np.float32 and embeddings.shape == saved["test"].shape
    np.testing.assert_allclose(embeddings, saved["test"], rtol=0, atol=1e-5)

    # the loss's own trained parameters come with it: the proxies score the test embeddings
    assert embedder.info["loss"]["kwargs"]["alpha"] == 16.0 and embedder.info["trial"] == str(spec.key)
    loss = embedder.loss_module()
    assert loss.proxies.shape == (embedder.info["loss"]["num_classes"], cfg.model.embedding_dim)
    labels = torch.arange(len(embeddings)) % loss.proxies.shape[0]
    assert torch.isfinite(loss(torch.from_numpy(embeddings), labels))


def test_one_final_run_per_loss_keeps_its_network(tmp_path):
    cfg = _study(tmp_path, "features")
    space = search_spaces(cfg)["proxy_anchor"]
    keep = {(s, f): final_spec(cfg, space, 0, {}, seed=s, fold=f).keep_model for s in (1, 2) for f in (None, 0, 1)}
    assert [k for k, kept in keep.items() if kept] == [(1, None), (1, 0)]  # the first seed (first fold with folds)
