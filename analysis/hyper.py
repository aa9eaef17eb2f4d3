"""Hyperparameter analysis of a loss's search stage: importance (Optuna's fANOVA) and sensitivity.

Both read the search trials from the runs frame (``analysis.runs.load_runs``), so they work on any
study in MLflow; only COMPLETE trials count (a pruned trial's objective is from an earlier epoch).
"""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd

from analysis.runs import best_trial, complete_search, is_log_scale

FAR = 0.25  # "moved away": farther from the best value than a quarter of the searched range


def search_params(runs: pd.DataFrame, loss: str) -> tuple[pd.DataFrame, dict[str, pd.Series]]:
    """The loss's COMPLETE search trials and its hyperparameters that vary among them, parsed
    (floats where every value is a number, else text)."""
    trials = complete_search(runs, loss)
    params = {}
    for column in sorted(c for c in trials.columns if c.startswith("param.")):
        values = trials[column].dropna()
        if values.nunique() < 2 or len(values) < len(trials):
            continue
        numeric = pd.to_numeric(values, errors="coerce")
        params[column.removeprefix("param.")] = numeric if numeric.notna().all() else values.astype(str)
    return trials, params


def _is_log(trials: pd.DataFrame, name: str, values: pd.Series) -> bool:
    """A float hyperparameter analysed on a log scale: searched so (:func:`analysis.runs.is_log_scale`)
    and every value positive (a log-scale weight that was also 0, "off", is analysed linearly)."""
    return values.dtype.kind == "f" and values.min() > 0 and is_log_scale(trials, name, values)


def importance(runs: pd.DataFrame, loss: str, objective: str, seed: int = 0) -> pd.DataFrame:
    """fANOVA importance of each varying hyperparameter for ``objective`` (sums to 1).

    Columns: param, importance, trials. Empty with fewer than 3 COMPLETE trials or nothing varying.
    The search space is taken as the range the trials span, log-scaled where it was searched so.
    """
    trials, params = search_params(runs, loss)
    if len(trials) < 3 or not params:
        return pd.DataFrame(columns=["param", "importance", "trials"])
    distributions = {
        name: optuna.distributions.FloatDistribution(v.min(), v.max(), log=_is_log(trials, name, v))
        if v.dtype.kind == "f"
        else optuna.distributions.CategoricalDistribution(sorted(v.unique()))
        for name, v in params.items()
    }
    study = optuna.create_study(direction="maximize")
    for i in range(len(trials)):
        values = {name: (float(v.iloc[i]) if v.dtype.kind == "f" else v.iloc[i]) for name, v in params.items()}
        study.add_trial(
            optuna.trial.create_trial(
                params=values, distributions=distributions, value=float(trials[objective].iloc[i])
            )
        )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    scores = optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=True)
    return pd.DataFrame({"param": list(scores), "importance": list(scores.values()), "trials": len(trials)})


def sensitivity(runs: pd.DataFrame, loss: str, objective: str) -> pd.DataFrame:
    """How much ``objective`` falls when one hyperparameter moves away from its best value.

    For each varying hyperparameter: the distance of every COMPLETE trial's value from the best
    trial's, as a fraction of the searched range (log scale where it was searched so; for a
    categorical, 0 if equal else 1). ``drop`` = best objective − mean objective of the trials
    farther than ``FAR``; ``relative_drop`` = drop / best. Columns: param, best_value, far_trials,
    drop, relative_drop. A small drop means the loss is robust to that hyperparameter.
    """
    trials, params = search_params(runs, loss)
    rows = []
    if len(trials) < 2:
        return pd.DataFrame(columns=["param", "best_value", "far_trials", "drop", "relative_drop"])
    scores = trials[objective].to_numpy(dtype=float)
    chosen = best_trial(trials.reset_index(drop=True), loss, objective)
    if chosen is None:
        return pd.DataFrame(columns=["param", "best_value", "far_trials", "drop", "relative_drop"])
    best = int(chosen.name)  # its position among the trials
    for name, values in params.items():
        if values.dtype.kind == "f":
            x = np.log(values.to_numpy()) if _is_log(trials, name, values) else values.to_numpy()
            distance = np.abs(x - x[best]) / (x.max() - x.min())
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
    return pd.DataFrame(rows, columns=["param", "best_value", "far_trials", "drop", "relative_drop"])
