"""What runs on Ray's workers: a trial from its spec, the untrained baseline, a fold ensemble.

The driver may have no GPU and no dataset nearby; everything that touches the data or a model runs
here, with a trial's resources. Results travel back through ``tune.report`` (trials) or as a task's
return value (baseline, ensemble); test embeddings through the study folder.

The driver imports this module to hand its functions to Ray, so the training side (:mod:`study.train`,
:mod:`study.metrics`, :mod:`study.models`, with faiss and scikit-learn: seconds of imports at every
driver start) is imported by the functions that use it, on the worker; tests/test_cli.py checks that
the driver never imports it.
"""

from __future__ import annotations

import math
import time
import traceback
from typing import TYPE_CHECKING

import numpy as np
from ray import tune

from study.config import StudyConfig
from study.data.images import UnreadableImageError
from study.losses import loss_hyperparameters
from study.machine import RESULT_KEY, machine_json
from study.schedule import rung_epochs
from study.spec import EARLIER, FAILED, SPEC, UNREADABLE, TrialSpec
from study.storage import Storage
from study.vocab import (
    Stage,
    TrialKey,
    as_test,
    checkpoint_dir,
    embeddings_bytes,
    embeddings_file,
    model_file,
    read_embeddings,
)

if TYPE_CHECKING:
    from study import train

# in every result of a trial: the seconds its training has so far spent paused in ``tune.report``, waiting
# for the driver to take its previous result (see Reporter); a retried or resumed trial counts from 0 again
DRIVER_WAIT = "driver_wait_seconds"
REPORT_EVERY_S = 1.0  # a trial's epochs reach the driver in one result at most this often (see Reporter)

# Errors a trial's code raises the same way on every attempt (a bug, a setting the data cannot
# satisfy); anything else (a lost worker, out of memory, I/O) may pass and is retried by Ray Tune.
DETERMINISTIC = (ValueError, TypeError, KeyError, IndexError, AttributeError, AssertionError, NotImplementedError)


def run_spec(config: dict, *, cfg: StudyConfig, storage: Storage) -> None:
    """Ray Tune's trainable: the trial ``config[SPEC]`` — a search trial, or a final-stage run that
    also leaves its test embeddings in the study folder ``storage`` (resolved on the driver: a worker
    runs in its trial's folder). A non-finite loss or a deterministic error ends it at once (a retry
    would fail again) with a result that names the reason; an unreadable image, with a result that
    names it (``UNREADABLE``: the driver stops the study and leaves the trial unfinished)."""
    from study import train

    spec = config[SPEC]
    train.set_threads(cfg.resources.cpu)
    try:
        data = train.load_data(cfg.dataset, cfg.model, cfg.train, cfg.seed)
    except UnreadableImageError as exc:  # the study stops, naming it; this trial runs again on resume
        tune.report({UNREADABLE: str(exc)})
        return
    folder = checkpoint_dir(storage, spec.key)
    model, loss, kwargs = cfg.model, spec.loss, spec.loss_kwargs
    due = {spec.train.epochs}  # the last epoch, and the epochs its ASHA decides at
    if spec.key.stage is Stage.SEARCH:
        due |= rung_epochs(cfg)
    report = Reporter(tune.report, due)
    try:
        if spec.key.stage is Stage.SEARCH:
            train.run_trial(model, loss, kwargs, spec.train, data, seed=spec.seed, report=report, checkpoint_dir=folder)
            return
        _, saved = train.run_final(
            model,
            loss,
            kwargs,
            spec.train,
            data,
            seed=spec.seed,
            fold=spec.fold,
            report=report,
            checkpoint_dir=folder,
        )
        embeddings_file(storage, spec.key).write_bytes(embeddings_bytes(saved))
        if spec.keep_model:  # one final run per loss: its network, for reuse (study.reuse.load_embedder)
            model_file(storage, spec.key).write_bytes(export_model(cfg, spec, data, folder))
    except train.NonFiniteLossError as exc:
        report.flush()
        tune.report({FAILED: f"{type(exc).__name__}: {exc}"})
    except DETERMINISTIC:  # the same spec would raise again: fail now, with the trace, instead of retrying
        report.flush()
        tune.report({FAILED: traceback.format_exc()})


def export_model(cfg: StudyConfig, spec: TrialSpec, data: train.PreparedData, folder: Storage) -> bytes:
    """Final run ``spec``'s trained network and loss, read from its last checkpoint in ``folder``, as a
    model file (:mod:`study.models.embedder`): what embeds new images as the run embedded its test images."""
    from study import train
    from study.models.embedder import embedder_bytes

    learner = train.load_state(folder)["learners"][0]
    weights = learner["model"]
    if data.features:
        # The head trained on the features of the trunk the data was prepared with (the study's seed draws it
        # when not pretrained: train.prepare_data), not on the learner's own trunk, which never ran.
        trunk = train.build_model(cfg.model, cfg.seed).trunk.state_dict()
        weights = weights | {f"trunk.{name}": value for name, value in trunk.items()}
    fit = data.trainval if spec.fold is None else data.folds[spec.fold][0]
    preprocessing = {
        "crop_size": spec.train.crop_size,
        "image_size": cfg.dataset.image_size,
        "max_aspect": cfg.dataset.max_aspect,
        "input_size": None if data.features else list(data.inputs.shape[-2:]),  # without a crop: the padded arrays
    }
    loss = {
        "name": spec.loss,
        "kwargs": {**loss_hyperparameters(spec.loss), **spec.loss_kwargs},
        "num_classes": len(np.unique(data.labels[fit])),
        "weights": learner["loss"],
    }
    model = cfg.model.model_dump(include={"backbone", "backbone_options", "embedding_dim", "pooling", "freeze_bn"})
    return embedder_bytes(model, weights, preprocessing, loss, trial=str(spec.key), dataset=cfg.dataset.name)


class Reporter:
    """A trial's ``report`` for its epochs' results, sending them through ``report`` (``tune.report``).

    Ray Tune runs a function trainable until its next result and then holds it there until the driver has
    taken that result and asks for the next one: a round trip through the driver at every result (4–19 ms
    measured on a 2-core machine, growing with its load), during which the trial does not train. So an
    epoch's result goes at most every ``REPORT_EVERY_S``; the epochs in between are held and go with the
    next result (``EARLIER``), each logged under its own epoch. The first epoch, and every epoch in ``due``
    (the last, and a search trial's ASHA rungs: ASHA decides on the same epochs as if every one were sent),
    go at once. ``flush`` sends what is held (before a trial ends itself with an error).

    The first result also carries this worker's machine (:func:`study.machine.machine_json`), for the
    driver to tag the trial's run with, and every result ``DRIVER_WAIT``: the seconds the trial has spent
    in ``report`` before it, the training time it lost to the driver (it grows when the driver falls
    behind)."""

    def __init__(self, report, due: set[int]):
        self._report, self._due = report, due
        self._held: list[dict] = []
        self._waited, self._sent_at, self._first = 0.0, -math.inf, True  # (the first result: never sent before)

    def __call__(self, result: dict) -> None:
        if result["epoch"] in self._due or time.perf_counter() - self._sent_at >= REPORT_EVERY_S:
            self._send(result)
        else:
            self._held.append(result)

    def flush(self) -> None:
        if self._held:
            self._send(self._held.pop())

    def _send(self, result: dict) -> None:
        result = {**result, DRIVER_WAIT: self._waited}
        if self._held:
            result[EARLIER], self._held = self._held, []
        if self._first:
            result[RESULT_KEY], self._first = machine_json(), False
        start = time.perf_counter()
        self._report(result)
        self._sent_at = time.perf_counter()
        self._waited += self._sent_at - start


def untrained(cfg: StudyConfig) -> tuple[dict, dict]:
    """The untrained network's validation metrics (mean over folds) and test metrics (not yet renamed
    ``test_<metric>``: the caller logs both on one run)."""
    from study import train

    train.set_threads(cfg.resources.cpu)
    data = train.load_data(cfg.dataset, cfg.model, cfg.train, cfg.seed)
    return train.evaluate_untrained(cfg.model, cfg.train, data, cfg.seed)


def ensemble(storage: Storage, loss: str, number: int, seed: int, folds: list[int]) -> dict[str, float] | str:
    """Reality Check's ensemble of one seed's fold models (retraining search trial ``number``): their
    test embeddings concatenated (each block unit-norm, the whole scaled back to unit norm), evaluated
    like one model's. Returns the test metrics (``test_<metric>``), or why there are none (a fold's run
    left no embeddings)."""
    from study import metrics

    parts = []
    for fold in folds:
        path = embeddings_file(storage, TrialKey.final(loss, number, seed, fold))
        if not path.exists():
            return f"fold {fold} has no test embeddings (its run failed)"
        parts.append(read_embeddings(path.read_bytes()))
    scale = 1 / math.sqrt(len(parts))
    test = np.concatenate([p["test"] for p in parts], axis=1) * scale
    gallery = None
    if "gallery" in parts[0]:
        gallery = (np.concatenate([p["gallery"] for p in parts], axis=1) * scale, parts[0]["gallery_labels"])
    submodes = parts[0].get("test_submodes") if gallery is None else None
    labels, ks = parts[0]["test_labels"], parts[0]["ks"].tolist()
    return as_test(metrics.evaluate(test, labels, ks=ks, seed=seed, gallery=gallery, submodes=submodes))
