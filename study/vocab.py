"""The study's shared vocabulary: trial states, stages, trial keys and the study folder's layout.

Imports neither torch, Ray nor MLflow: the pipeline (``study``) and the analysis (``analysis``) both
speak it, so a state, a stage or a key is spelled in this one place.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from study.storage import Storage


class State(StrEnum):
    """How a trial ended (MLflow tag ``dml_study.state``); RUNNING while it has not."""

    COMPLETE = "COMPLETE"  # ran every epoch
    PRUNED = "PRUNED"  # stopped early by the scheduler (ASHA)
    FAIL = "FAIL"  # raised, or its loss or metrics became non-finite
    RUNNING = "RUNNING"


class Stage(StrEnum):
    """What a run is for (MLflow tag ``dml_study.stage``)."""

    BASELINE = "baseline"  # the untrained network, evaluated once
    SEARCH = "search"  # one hyperparameter trial, scored on validation classes
    FINAL = "final"  # the best trial's configuration retrained with a new seed, tested once
    ABLATION = "ablation"  # the best configuration with one claim's factor changed, final seeds, tested once
    ENSEMBLE = "ensemble"  # one seed's fold models, their embeddings concatenated, tested once


# Metric names: one meaning each, on every run. A metric on the validation classes (search trials, the
# baseline's validation score) is logged under its own name (``map_at_r``); the same metric on the test
# classes (final, ablation and ensemble runs, the baseline's test score, the parent run's headline) as
# ``test_<name>`` (``test_map_at_r``). What a loss reports about its own parameters (``trial_metrics()``:
# effective centers, proxy correlation) is about the model, not about a set of classes, and what every
# epoch reports (``train_loss``, ``epoch_seconds``, ``driver_wait_seconds``) about the training: both keep
# their names.
TEST_PREFIX = "test_"


# (no function here starts with "test": pytest would collect it where a test module imports it)
def as_test_name(name: str) -> str:
    """The name metric ``name`` takes when measured on the test classes: ``map_at_r`` → ``test_map_at_r``."""
    return TEST_PREFIX + name


def as_test(metrics: dict[str, float]) -> dict[str, float]:
    """Retrieval metrics measured on the test classes, renamed :func:`as_test_name` (see ``TEST_PREFIX``)."""
    return {as_test_name(name): value for name, value in metrics.items()}


def objective_name(stage: Stage, objective: str) -> str:
    """The name the study's ``objective`` is logged under on a trial of ``stage``: its own on a search
    trial (validation classes), ``test_<objective>`` on a final, ablation or ensemble run (test classes)."""
    return objective if stage is Stage.SEARCH else as_test_name(objective)


@dataclass(frozen=True)
class TrialKey:
    """A run's identity within a study: its MLflow tag, run name and folder all derive from it.

    Spelled ``baseline``, ``<loss>/<number>`` (search: the Optuna trial number),
    ``<loss>/final/<number>/s<seed>`` (``-f<fold>`` when trained on one fold) and
    ``<loss>/ensemble/<number>/s<seed>`` and ``<loss>/ablation/<number>/<factor>/s<seed>`` (the claim
    ``<loss>.<factor>``, :mod:`study.claims`): a final run, an ensemble and an ablation carry the
    number of the search trial whose point they retrain, so a better trial found later (on resume)
    gets runs of its own.
    """

    stage: Stage
    loss: str | None = None
    number: int | None = None
    seed: int | None = None
    fold: int | None = None
    factor: str | None = None  # ablations: the claim's factor

    @classmethod
    def baseline(cls) -> TrialKey:
        return cls(Stage.BASELINE)

    @classmethod
    def search(cls, loss: str, number: int) -> TrialKey:
        return cls(Stage.SEARCH, loss, number=number)

    @classmethod
    def final(cls, loss: str, number: int, seed: int, fold: int | None = None) -> TrialKey:
        return cls(Stage.FINAL, loss, number=number, seed=seed, fold=fold)

    @classmethod
    def ensemble(cls, loss: str, number: int, seed: int) -> TrialKey:
        return cls(Stage.ENSEMBLE, loss, number=number, seed=seed)

    @classmethod
    def ablation(cls, loss: str, number: int, factor: str, seed: int) -> TrialKey:
        return cls(Stage.ABLATION, loss, number=number, seed=seed, factor=factor)

    def __str__(self) -> str:
        if self.stage is Stage.BASELINE:
            return "baseline"
        if self.stage is Stage.SEARCH:
            return f"{self.loss}/{self.number}"
        fold = "" if self.fold is None else f"-f{self.fold}"
        factor = "" if self.factor is None else f"{self.factor}/"
        return f"{self.loss}/{self.stage}/{self.number}/{factor}s{self.seed}{fold}"

    @classmethod
    def parse(cls, text: str) -> TrialKey:
        """The key spelled ``text`` (the inverse of ``str``); ValueError for anything else."""
        parts = text.split("/")
        try:
            if parts == ["baseline"]:
                return cls.baseline()
            if len(parts) == 2 and parts[1].isdigit():
                return cls.search(parts[0], int(parts[1]))
            if len(parts) == 5 and parts[1] == Stage.ABLATION and parts[4].startswith("s"):
                key = cls.ablation(parts[0], int(parts[2]), parts[3], int(parts[4][1:]))
                if str(key) == text and key.number >= 0 and parts[3]:
                    return key
            if len(parts) == 4 and parts[3].startswith("s") and parts[1] in (Stage.FINAL, Stage.ENSEMBLE):
                seed, _, fold = parts[3][1:].partition("-f")
                number = int(parts[2])
                key = cls(Stage(parts[1]), parts[0], number=number, seed=int(seed), fold=int(fold) if fold else None)
                if str(key) == text and number >= 0 and not (fold and key.stage is Stage.ENSEMBLE):
                    return key
        except ValueError:
            pass
        raise ValueError(f"not a trial key: {text!r}")

    @property
    def run_name(self) -> str:
        """The MLflow run name: the key with dashes (a slash reads as a path in the UI)."""
        return str(self).replace("/", "-")


# The study folder (``<output_dir>/<study>``): what lives where.
CONFIG_FILE = "config.yaml"  # the study's resolved configuration, secrets redacted: what resume reads
PARENT_RUN_FILE = "mlflow_run_id"  # the study's parent MLflow run
OPTUNA_JOURNAL = "optuna.journal"  # Optuna's storage unless search.optuna_storage names a database
RAY_RESULTS = "ray"  # Ray Tune's experiment folders
CHECKPOINT_FILE = "trial.pt"  # inside a trial's checkpoint folder


def checkpoint_dir(storage: Storage, key: TrialKey) -> Storage:
    """A trial's checkpoint folder: ``checkpoints/<key>``; deleted once the trial has ended."""
    return storage.child("checkpoints", *str(key).split("/"))


def embeddings_file(storage: Storage, key: TrialKey) -> Storage:
    """A final-stage run's test embeddings: ``embeddings/<key>.npz`` (for ensembles and plots)."""
    *folders, name = str(key).split("/")
    return storage.child("embeddings", *folders, f"{name}.npz")


EMBEDDINGS_ARTIFACT = "embeddings.npz"  # the same file, attached to the final run in MLflow


def model_file(storage: Storage, key: TrialKey) -> Storage:
    """The network a final run keeps (:mod:`study.models.embedder`): ``models/<key>.pt``, written by the
    worker, moved to the run in MLflow by the driver (``model.pt``)."""
    *folders, name = str(key).split("/")
    return storage.child("models", *folders, f"{name}.pt")


MODEL_ARTIFACT = "model.pt"  # on the one final run per loss that keeps its network (TrialSpec.keep_model)
# on the study's parent run: {loss: {param: Param.model_dump(mode="json")}}, every searched parameter's
# type, bounds, scale and default (the loss's own and the study's shared training settings)
SEARCH_SPACES_ARTIFACT = "search_spaces.json"


def embeddings_bytes(saved: dict[str, np.ndarray]) -> bytes:
    """Test embeddings as ``.npz`` bytes: ``test``, ``test_labels``, ``ks`` (the Recall@K list) and,
    with a query/gallery protocol, ``gallery`` and ``gallery_labels``."""
    buffer = io.BytesIO()
    np.savez(buffer, **saved)
    return buffer.getvalue()


def read_embeddings(data: bytes) -> dict[str, np.ndarray]:
    """The inverse of :func:`embeddings_bytes`."""
    with np.load(io.BytesIO(data)) as npz:
        return {name: npz[name] for name in npz.files}
