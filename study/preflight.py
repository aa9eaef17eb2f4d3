"""Everything about a study that can be decided before Ray starts is decided here, in seconds, with
one line naming the setting and what is allowed: a study that cannot run never leaves a half-made
folder behind, never waits forever for a GPU that is not there, and never retries a trial whose
batch cannot be drawn.

:func:`check_study` (before ``run`` and ``resume``): the dataset's classes against the validation split
and the batch, the data's size against memory and disk, the output folder's permissions, the local
machine's CPUs and GPUs. :func:`cluster_slots` (right after joining a cluster, before anything is
written): how many trials the cluster's nodes hold at once; none is an error. :func:`check_parent_run`
(``resume``): the study's MLflow run is in the tracking store.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
from pathlib import Path

import numpy as np
import psutil

from study.config import StudyConfig
from study.data import DEFAULT_CACHE, index_dataset, index_warnings
from study.data.splits import first_half_split, validation_folds
from study.data.synthetic import make_synthetic

MEMORY_SHARE = 0.5  # the synthetic images (generated in memory, once per worker) may use this much of it


class PreflightError(ValueError):
    """A study that cannot run as configured (one line: the setting, the value, what is allowed)."""


class RayAddressError(ValueError):
    """RAY_ADDRESS names something ``ray.init`` cannot join."""


def ray_address() -> str | None:
    """RAY_ADDRESS, if set: the cluster to join; RayAddressError for what ``ray.init`` cannot join."""
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise RayAddressError(
            f"RAY_ADDRESS={address} is a dashboard (job submission) address; dml-study needs the "
            "cluster's address: host:6379, ray://host:10001 or auto"
        )
    return address


def check_study(cfg: StudyConfig) -> list[str]:
    """Raise :class:`PreflightError` for what would stop the study after Ray started; return
    warnings (one line each) about what skews it without stopping it."""
    _check_local_resources(cfg)
    _check_output(cfg)
    labels, split, warnings = _classes(cfg)
    _check_splits(cfg, labels, split)
    return warnings


def _classes(cfg: StudyConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each image's class and official split, from the index files alone (no image is decoded),
    after checking the data's size against this machine."""
    ds = cfg.dataset
    if ds.name == "synthetic":
        options = {p.name: p.default for p in inspect.signature(make_synthetic).parameters.values()} | ds.options
        classes, per_class, size = options["num_classes"], options["samples_per_class"], options["image_size"]
        _fits(classes * per_class * 3 * size * size, psutil.virtual_memory().available * MEMORY_SHARE,
              f"dataset.options.image_size={size} with {classes} × {per_class} images", "memory")  # fmt: skip
        labels = np.repeat(np.arange(classes), per_class)
        return labels, first_half_split(labels), []
    index = index_dataset(ds.name, ds.root, **ds.options)
    cache = Path(ds.cache_dir or DEFAULT_CACHE)
    width = round(ds.image_size * ds.max_aspect)
    need = len(index.paths) * 3 * ds.image_size * width
    if not any(cache.glob(f"images_{ds.image_size}px_{len(index.paths)}_*.npy")):  # decoded before: no new file
        _fits(need, shutil.disk_usage(_existing(cache)).free, f"dataset.image_size={ds.image_size} "
              f"(max_aspect {ds.max_aspect:g}) for {len(index.paths)} images", f"free disk in {cache}")  # fmt: skip
    return index.labels, index.split, index_warnings(index, ds.name)


def _fits(need: float, have: float, what: str, where: str) -> None:
    if need > have:
        raise PreflightError(f"{what} needs {need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB of {where}")


def _check_splits(cfg: StudyConfig, labels: np.ndarray, split: np.ndarray) -> None:
    """Enough validation classes (with the search's own fold rule) and, for m-per-class batches,
    enough classes in every split a trial trains on."""
    ds, train = cfg.dataset, cfg.train
    try:
        folds = validation_folds(labels, split, val_fraction=ds.val_fraction, folds=ds.folds, seed=cfg.seed)
    except ValueError as exc:
        setting = f"dataset.folds={ds.folds}" if ds.folds else f"dataset.val_fraction={ds.val_fraction:g}"
        raise PreflightError(f"{setting}: {exc}") from None
    if train.sampler != "m_per_class":
        return
    per_batch = train.batch_size // train.m_per_class
    fewest = min(len(np.unique(labels[fit])) for fit, _ in folds)  # the final stage trains on more
    if fewest < per_batch:
        raise PreflightError(
            f"train.batch_size={train.batch_size} with m_per_class={train.m_per_class} needs {per_batch} classes "
            f"per batch, but a search trial trains on {fewest}; lower batch_size or raise m_per_class"
        )


def _check_local_resources(cfg: StudyConfig) -> None:
    """A local study (no RAY_ADDRESS) runs on this machine: a trial must fit it."""
    if os.environ.get("RAY_ADDRESS"):
        return
    import torch

    gpus, cpus = torch.cuda.device_count(), os.cpu_count() or 1
    if cfg.resources.gpu > gpus or cfg.resources.cpu > cpus:
        raise PreflightError(
            f"resources: a trial needs {cfg.resources.cpu:g} CPUs and {cfg.resources.gpu:g} GPUs, but this machine "
            f"has {cpus} CPUs and {gpus} GPUs (a local study; set RAY_ADDRESS to run on a cluster)"
        )


def trials_per_node(node: dict[str, float], cfg: StudyConfig) -> int:
    """How many trials of ``cfg.resources`` one node's resources (Ray's names: CPU, GPU) hold at once."""
    need = {"CPU": cfg.resources.cpu, "GPU": cfg.resources.gpu}
    # the epsilon: 0.3 GPUs / 0.1 per trial is 2.999… in floats, and holds 3 trials
    return min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0)


def cluster_slots(cfg: StudyConfig) -> int:
    """After joining a cluster: how many trials its live nodes hold at once, each trial on one node. None is
    an error (else Ray would wait forever)."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    slots = sum(trials_per_node(node, cfg) for node in nodes)
    if slots:
        return slots
    largest = max(nodes, key=lambda node: (node.get("GPU", 0), node.get("CPU", 0)), default={})
    raise PreflightError(
        f"resources: a trial needs {cfg.resources.cpu:g} CPUs and {cfg.resources.gpu:g} GPUs on one node, but the "
        f"cluster's largest node has {largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} GPUs "
        f"({len(nodes)} nodes)"
    )


def _check_output(cfg: StudyConfig) -> None:
    """A local output folder can be created and written (checked on the nearest existing folder:
    nothing is created here)."""
    if not cfg.storage.is_local:
        return
    folder = _existing(Path(cfg.storage.root))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise PreflightError(f"output_dir: {folder} is not a writable folder; choose another output_dir")


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def check_parent_run(tracking_uri: str | None, parent_id: str, study: str) -> None:
    """On resume: the study's parent run is in the tracking store (a moved or deleted ``mlflow.db``
    would otherwise start an empty store and fail later)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from study.redaction import redact

    uri = tracking_uri or mlflow.get_tracking_uri()
    why = f"its MLflow run {parent_id} is not in the tracking store {redact(uri)}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        why = f"its MLflow store {uri} does not exist (moved or deleted?)"  # opening it would create an empty one
    else:
        try:
            mlflow.MlflowClient(tracking_uri=uri).get_run(parent_id)
            return
        except MlflowException:
            pass
    raise PreflightError(
        f"{study}: {why}; point MLFLOW_TRACKING_URI (or tracking.uri) at the store the study was run with"
    )
