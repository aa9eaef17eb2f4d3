"""Hyperparameter analysis of a loss's search stage: importance (Optuna's fANOVA) and sensitivity.

Both read the search trials from the runs frame (``analysis.runs.load_runs``), so they work on any
study in MLflow; only COMPLETE trials with a finite objective count (a pruned trial's objective is
from an earlier epoch). Both need :data:`MIN_TRIALS` of them: below that they return an empty frame
and :func:`too_few_trials` says why, in a line the report prints instead of the table.
"""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd

from analysis.runs import best_trial, complete_search, is_log_scale
from study.vocab import Stage

FAR = 0.25  # "moved away": farther from the best value than a quarter of the searched range
# fANOVA fits a random forest to configuration → objective: with fewer than 10 trials its leaves hold
# one or two trials each and the variance split is noise; sensitivity's "far from the best" group is
# then nearly every other trial for every hyperparameter at once, so it cannot tell them apart.
MIN_TRIALS = 10
IMPORTANCE_COLUMNS = ["param", "importance", "trials"]
SENSITIVITY_COLUMNS = ["param", "best_value", "far_trials", "drop", "relative_drop"]


def search_params(runs: pd.DataFrame, loss: str, objective: str | None = None) -> tuple[pd.DataFrame, dict]:
    """The loss's COMPLETE search trials (with ``objective``: only those with a finite value of it)
    and its hyperparameters that take ≥ 2 values among them, every trial having one, parsed
    (numbers where every value is a number, else text)."""
    trials = complete_search(runs, loss, objective)
    params = {}
    for column in sorted(c for c in trials.columns if c.startswith("param.")):
        values = trials[column].dropna()
        if values.nunique() < 2 or len(values) < len(trials):
            continue
        numeric = pd.to_numeric(values, errors="coerce")
        is_number = numeric.notna().all() and not pd.api.types.is_bool_dtype(values)  # a bool is a category
        params[column.removeprefix("param.")] = numeric if is_number else values.astype(str)
    return trials, params


def too_few_trials(runs: pd.DataFrame, loss: str, objective: str, minimum: int = MIN_TRIALS) -> str | None:
    """Why importance and sensitivity of ``loss`` are not shown, in one line ("3 COMPLETE trials of
    multi_similarity, 10 needed"), or None when they can be: ≥ ``minimum`` COMPLETE trials with a
    finite objective and ≥ 1 hyperparameter taking ≥ 2 values among them."""
    trials, params = search_params(runs, loss, objective)
    if len(trials) < minimum:
        return f"{len(trials)} COMPLETE trial{'s' * (len(trials) != 1)} of {loss}, {minimum} needed"
    if not params:
        return f"no hyperparameter of {loss} took two values among its {len(trials)} COMPLETE trials"
    return None


def _is_numeric(values: pd.Series) -> bool:
    """Integers count as numbers: an int hyperparameter (SoftTriple's K) is ordered, not a category."""
    return values.dtype.kind in "iuf"


def _is_log(trials: pd.DataFrame, name: str, values: pd.Series) -> bool:
    """A numeric hyperparameter analysed on a log scale: searched so (:func:`analysis.runs.is_log_scale`)
    and every value positive (a log-scale weight that was also 0, "off", is analysed linearly)."""
    return _is_numeric(values) and values.min() > 0 and is_log_scale(trials, name, values)


def importance(
    runs: pd.DataFrame,
    loss: str,
    objective: str,
    seed: int = 0,
    min_trials: int = MIN_TRIALS,
    space: dict | None = None,
) -> pd.DataFrame:
    """fANOVA importance of each varying hyperparameter for ``objective`` (sums to 1).

    Columns: param, importance, trials. Empty with fewer than ``min_trials`` COMPLETE trials or nothing
    varying (:func:`too_few_trials` says which). The search space is the loss's as searched (``space``:
    its entry of the study's ``search_spaces.json``, :func:`analysis.runs.load_search_spaces`); without
    it, the range the trials span, log-scaled where it was searched so.
    """
    if too_few_trials(runs, loss, objective, min_trials):
        return pd.DataFrame(columns=IMPORTANCE_COLUMNS)
    trials, params = search_params(runs, loss, objective)
    distributions = {name: _distribution(trials, name, v, (space or {}).get(name)) for name, v in params.items()}
    study = optuna.create_study(direction="maximize")
    for i in range(len(trials)):
        values = {name: _value(v.iloc[i], v.dtype.kind) for name, v in params.items()}
        study.add_trial(
            optuna.trial.create_trial(
                params=values, distributions=distributions, value=float(trials[objective].iloc[i])
            )
        )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    scores = optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=True)
    return pd.DataFrame({"param": list(scores), "importance": list(scores.values()), "trials": len(trials)})


def _value(value, kind: str):
    """A trial's value as its Optuna distribution takes it."""
    return float(value) if kind == "f" else int(value) if kind in "iu" else value


def _distribution(trials: pd.DataFrame, name: str, values: pd.Series, spec: dict | None):
    """The Optuna distribution ``values`` were drawn from: the searched bounds and scale of ``spec``
    (a ``study.search_space.Param`` as JSON) where they hold every value — a log-scale weight that was
    also 0 ("off") is taken on a linear scale from 0 — else the values' own span."""
    low, high = (spec or {}).get("low"), (spec or {}).get("high")
    if values.dtype.kind in "iu":  # an integer hyperparameter (SoftTriple's K) is ordered, not a category
        log = bool((spec or {}).get("log")) and values.min() > 0
        low, high = (values.min(), values.max()) if low is None or high is None else (low, high)
        return optuna.distributions.IntDistribution(int(min(low, values.min())), int(max(high, values.max())), log=log)
    if values.dtype.kind != "f":  # search_params gives numbers as numbers and anything else as text
        return optuna.distributions.CategoricalDistribution(sorted(values.unique()))
    if low is None or high is None or spec.get("type") == "categorical":
        return optuna.distributions.FloatDistribution(values.min(), values.max(), log=_is_log(trials, name, values))
    log = bool(spec.get("log")) and values.min() > 0
    low = low if log or values.min() >= low else min(0.0, values.min())
    return optuna.distributions.FloatDistribution(low, max(high, values.max()), log=log)


def _searched_span(runs: pd.DataFrame, loss: str, name: str, log: bool, spec: dict | None = None) -> float:
    """The extent of hyperparameter ``name``'s searched range (on the log scale with ``log``): the bounds
    of ``spec`` (its entry of the study's ``search_spaces.json``) where the study logged them, else as far
    as the runs frame knows it: the span of the values every search trial of ``loss`` sampled —
    PRUNED, FAIL and RUNNING ones too, whose configurations were drawn from the space alike.

    The COMPLETE trials alone are no measure of the space: ASHA prunes the bad region and TPE samples
    near the good one, so the survivors crowd together, and against their own span every one of them
    lies "far" from the best in every hyperparameter at once.
    """
    low, high = (spec or {}).get("low"), (spec or {}).get("high")
    if low is not None and high is not None and high > low and (low > 0 or not log):
        return float(np.log(high / low) if log else high - low)
    column = f"param.{name}"
    sampled = runs.loc[(runs["stage"] == Stage.SEARCH) & (runs["loss"] == loss), column]
    x = pd.to_numeric(sampled, errors="coerce").to_numpy(float)
    x = x[np.isfinite(x) & (x > 0)] if log else x[np.isfinite(x)]
    x = np.log(x) if log else x
    return float(x.max() - x.min())


def sensitivity(
    runs: pd.DataFrame, loss: str, objective: str, min_trials: int = MIN_TRIALS, space: dict | None = None
) -> pd.DataFrame:
    """How much ``objective`` falls when one hyperparameter moves away from its best value.

    For each varying hyperparameter: the distance of every COMPLETE trial's value from the best
    trial's, as a fraction of the searched range (:func:`_searched_span`: the bounds of ``space``, the
    loss's logged search space, else the span of every search trial of the loss; log scale where it
    was searched so; for a categorical, 0 if equal else 1).
    ``drop`` = best objective − mean objective of the trials farther than ``FAR`` (NaN when none is);
    ``relative_drop`` = drop / best. Columns: param, best_value, far_trials, drop, relative_drop.
    A small drop means the loss is robust to that hyperparameter. Empty with fewer than
    ``min_trials`` COMPLETE trials or nothing varying (:func:`too_few_trials`).
    """
    if too_few_trials(runs, loss, objective, min_trials):
        return pd.DataFrame(columns=SENSITIVITY_COLUMNS)
    trials, params = search_params(runs, loss, objective)
    trials = trials.reset_index(drop=True)
    scores = trials[objective].to_numpy(dtype=float)
    best = int(best_trial(trials, loss, objective).name)  # its position among the trials
    rows = []
    for name, values in params.items():
        if _is_numeric(values):
            log = _is_log(trials, name, values)
            x = values.to_numpy(float)
            x = np.log(x) if log else x
            distance = np.abs(x - x[best]) / _searched_span(runs, loss, name, log, (space or {}).get(name))
        else:
            distance = (values.to_numpy() != values.iloc[best]).astype(float)
        far = distance > FAR
        drop = scores[best] - scores[far].mean() if far.any() else float("nan")
        rows.append(
            {
                "param": name,
                "best_value": values.iloc[best],
                "far_trials": int(far.sum()),
                "drop": drop,
                "relative_drop": drop / scores[best] if scores[best] else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=SENSITIVITY_COLUMNS)
