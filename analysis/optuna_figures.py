"""Figures Optuna draws from the study's own journal (``optuna.journal``, one Optuna study per loss,
named ``<study>.<loss>``): the journal holds each hyperparameter's real distribution (its range, log
scale, choices), which MLflow's string params do not.

Optuna's matplotlib module draws through pyplot; every figure is closed here once it is returned to
the caller's hands as a plain :class:`~matplotlib.figure.Figure` (nothing left in pyplot's state).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from matplotlib.figure import Figure

from analysis.hyper import MIN_TRIALS
from analysis.names import metric_label


def load_journal(path: Path, study: str, losses: list[str]) -> dict[str, optuna.Study]:
    """Per loss, its Optuna study in the journal at ``path`` (losses without one left out). The file is
    only read; a missing file gives ``{}``."""
    if not Path(path).is_file():
        return {}
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    names = {summary.study_name for summary in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    return {
        loss: optuna.load_study(study_name=f"{study}.{loss}", storage=storage)
        for loss in losses
        if f"{study}.{loss}" in names
    }


def param_importances(study: optuna.Study, loss: str, objective: str) -> Figure | None:
    """Optuna's hyperparameter-importance bar chart (fANOVA, seeded) of one loss's search, on the
    journal's distributions; None with fewer than :data:`analysis.hyper.MIN_TRIALS` COMPLETE trials (the
    report's rule for importance) or nothing searched."""
    import matplotlib.pyplot as plt
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization.matplotlib import plot_param_importances

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS or not any(t.params for t in complete):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=0), target_name=metric_label(objective)
        )
    figure = ax.get_figure()
    for where in ("left", "center", "right"):
        ax.set_title("", loc=where)
    ax.set_title(f"{loss}: hyperparameter importance (fANOVA on {len(complete)} complete trials, Optuna)")
    figure.set_size_inches(8, 0.5 * max(len(ax.patches), 2) + 1.5)
    plt.close(figure)  # out of pyplot's registry: the caller saves it like any other figure
    return figure
