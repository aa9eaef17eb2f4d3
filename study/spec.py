"""A trial's contract: the frozen spec the driver resolves once, and the typed outcome it ends with.

The driver turns a sampled point (search) or the best point with a new seed (final stage) into a
:class:`TrialSpec` — loss, loss keyword arguments, the trial's training recipe, seed, fold and key —
and hands it to Ray as the trial's one config value. The worker runs it, the tracking callback logs
it and the searcher tells Optuna its :class:`Outcome`; none of them resolves anything again.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ray.tune.result import AUTO_RESULT_KEYS

from study.claims import Claim
from study.config import StudyConfig, TrainConfig
from study.search_space import SearchSpace
from study.vocab import State, TrialKey, objective_name

SPEC = "spec"  # the one key of a trial's Ray config
# result key of a trial that ended itself with an error no retry can fix (a non-finite loss, a
# deterministic exception: see study.worker.DETERMINISTIC): the reason, as text
FAILED = "failed"
# result key of a trial that found an image it cannot read before training (the message, naming the
# file): the study stops, and the trial is left unfinished (RUNNING), to run again on resume
UNREADABLE = "unreadable_image"
# result key of a trial's epochs held back by its worker (see study.worker.Reporter) and sent with the next
# result: the earlier epochs' results, oldest first, each as the trial's own result would have been
EARLIER = "earlier_epochs"
# What Ray adds to every result; everything else a trial reports is a metric of the trial.
NOT_METRICS = {*AUTO_RESULT_KEYS, "done", "epoch", "trial_id", "experiment_tag", FAILED, UNREADABLE, EARLIER}


def epoch_results(result: dict) -> list[dict]:
    """Every epoch's result a trial's ``result`` carries, oldest first: those its worker held back
    (``EARLIER``), then its own."""
    return [*result.get(EARLIER, []), result]


def is_last_word(result: dict) -> bool:
    """A trial's result that ends it (``FAILED``, ``UNREADABLE``), not an epoch's: shown and logged
    when the trial completes."""
    return FAILED in result or UNREADABLE in result


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial runs with, resolved on the driver."""

    key: TrialKey
    loss_kwargs: dict[str, Any]  # the loss's keyword arguments: sampled, the rest take the loss's defaults
    train: TrainConfig  # the study's recipe with the trial's sampled overrides (and the final stage's epochs)
    seed: int
    params: dict[str, Any] = field(default_factory=dict)  # the sampled values as MLflow params
    claim: str | None = None  # an ablation's claim (study.claims) ...
    arm: str | None = None  # ... and which arm it trains: "paper" or "alternative"
    keep_model: bool = False  # the final run whose network is kept for reuse (one per loss: final_spec)

    @property
    def loss(self) -> str:
        return self.key.loss

    @property
    def fold(self) -> int | None:
        return self.key.fold

    def __str__(self) -> str:  # what Ray prints and names the trial's folder after
        return str(self.key)


def search_spec(cfg: StudyConfig, space: SearchSpace, number: int, optuna_params: dict) -> TrialSpec:
    """Search trial ``number`` of ``space``'s loss, from its Optuna parameters."""
    values = space.from_optuna(optuna_params)
    loss_kwargs, overrides = space.split(values)
    key = TrialKey.search(space.loss, number)
    return TrialSpec(key, loss_kwargs, cfg.train.model_copy(update=overrides), cfg.seed, values)


def final_spec(
    cfg: StudyConfig, space: SearchSpace, number: int, optuna_params: dict, seed: int, fold: int | None
) -> TrialSpec:
    """A final-stage run of search trial ``number``'s point ``optuna_params`` (the loss's best) with a
    new seed; the first seed's keeps its network (:func:`keeps_model`)."""
    key = TrialKey.final(space.loss, number, seed, fold)
    spec = _retrain(cfg, space, key, space.from_optuna(optuna_params), seed, fold)
    return dataclasses.replace(spec, keep_model=keeps_model(cfg, seed, fold))


def keeps_model(cfg: StudyConfig, seed: int, fold: int | None) -> bool:
    """Whether the final run with ``seed`` (and ``fold``) keeps its network for reuse: one per loss, the
    run of the first final seed (on every training class, or on the first fold with ``train_on: folds``).
    Never the best seed: a seed is not a hyperparameter, and choosing it by the test score would pick the
    model on the test classes; the first seed's run is known before the others end, so no checkpoint
    waits for them, and a resumed study keeps the same one."""
    return [seed] == final_seeds(cfg)[:1] and fold in (None, 0)


def final_seeds(cfg: StudyConfig) -> list[int]:
    """The final stage's seeds: never the search's own seed."""
    return [cfg.seed + 1 + i for i in range(cfg.final.seeds)]


def ablation_spec(
    cfg: StudyConfig, space: SearchSpace, number: int, optuna_params: dict, claim: Claim, seed: int
) -> TrialSpec:
    """Search trial ``number``'s point with ``claim``'s factor set to the arm the point does not
    already have (:meth:`~study.claims.Claim.ablated`), trained like a final run with ``seed``."""
    values = space.from_optuna(optuna_params)
    arm, value = claim.ablated(values, space.defaults()[claim.param])
    key = TrialKey.ablation(space.loss, number, claim.factor, seed)
    spec = _retrain(cfg, space, key, {**values, claim.param: value}, seed, None)
    return dataclasses.replace(spec, claim=claim.id, arm=arm)


def _retrain(
    cfg: StudyConfig, space: SearchSpace, key: TrialKey, values: dict, seed: int, fold: int | None
) -> TrialSpec:
    """A run of the point ``values`` with the final stage's epochs, tested once."""
    loss_kwargs, overrides = space.split(values)
    train = cfg.train.model_copy(update={**overrides, "epochs": cfg.final.epochs or cfg.train.epochs})
    params = values | {"seed": seed} | ({} if fold is None else {"fold": fold})
    return TrialSpec(key, loss_kwargs, train, seed, params)


@dataclass(frozen=True)
class Outcome:
    """How a trial ended: its state, its objective value (COMPLETE only) and the error, if any."""

    state: State
    value: float | None = None
    error: str | None = None

    @classmethod
    def of(cls, spec: TrialSpec, result: dict | None, objective: str, error: str | None = None) -> Outcome:
        """COMPLETE (every epoch ran, the objective is finite), PRUNED (stopped early by the
        scheduler) or FAIL (raised: ``error``; diverged; or no finite objective). The study's
        ``objective`` is read as the stage logs it (:func:`study.vocab.objective_name`). RUNNING: it
        never trained, stopped by an unreadable image (``UNREADABLE``), and runs again on resume."""
        result = result or {}
        if error is None and UNREADABLE in result:
            return cls(State.RUNNING, error=result[UNREADABLE])
        if error is not None or FAILED in result:
            return cls(State.FAIL, error=error or result[FAILED])
        name = objective_name(spec.key.stage, objective)  # a final run's is test_<objective>
        value = result.get(name)
        if value is None or not math.isfinite(value):
            return cls(State.FAIL, error=f"no finite {name} was reported")
        if result.get("epoch", 0) < spec.train.epochs:
            return cls(State.PRUNED, value)
        return cls(State.COMPLETE, value)


def result_metrics(result: dict) -> dict[str, float]:
    """The metrics in a trial's result: its numbers, without what Ray adds."""
    return {
        k: v
        for k, v in result.items()
        if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
