"""Reuse the winner: a study's kept network, loaded from MLflow, embeds new images.

The final stage keeps one network per loss (:func:`study.spec.keeps_model`) as the artifact
``model.pt`` of that final run, tagged ``dml_study.model``. :func:`model_run` finds the run (the
study's best loss by default), :func:`load_embedder` turns it into a
:class:`~study.models.embedder.Embedder`::

    from study.reuse import load_embedder, model_run

    embedder = load_embedder(model_run("my-study"))
    vectors = embedder.embed_files(["query.jpg", "a.jpg", "b.jpg"])  # (3, embedding_dim), L2-normalised
    similarity = vectors @ vectors.T  # cosine similarity
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.models.embedder import Embedder, read_embedder
from study.tracking import TAG_BEST_LOSS, TAG_LOSS, TAG_MODEL, TAG_STALE, find_parent
from study.vocab import MODEL_ARTIFACT


def load_embedder(run_id: str, tracking_uri: str | None = None, device: str | torch.device = "cpu") -> Embedder:
    """The network kept on final run ``run_id`` (its ``model.pt``), on ``device``. ``tracking_uri``:
    MLflow's (default: ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run_id, MODEL_ARTIFACT, folder)
        return read_embedder(Path(path).read_bytes(), device)


def model_run(study: str, loss: str | None = None, tracking_uri: str | None = None) -> str:
    """The id of the run that keeps ``loss``'s network in study ``study`` (its latest parent run);
    ``loss`` None: the study's best loss (the parent's ``dml_study.best_loss``, set once the final stage
    has been tabled). LookupError (one line) when there is none."""
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = find_parent(client, study)  # StudyNotFoundError is a LookupError
    loss = loss or parent.data.tags.get(TAG_BEST_LOSS)
    if loss is None:
        raise LookupError(f"study {study!r} has no best loss yet (its final stage has not run): name a loss")
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}' and tags.`{TAG_LOSS}` = '{loss}' "
        f"and tags.`{TAG_MODEL}` = '{MODEL_ARTIFACT}'",
        max_results=100,
    )
    kept = [run for run in runs if TAG_STALE not in run.data.tags]  # a superseded best's model stays, unused
    if not kept:
        raise LookupError(f"study {study!r} kept no network for loss {loss!r} (its first final run did not complete)")
    return kept[0].info.run_id
