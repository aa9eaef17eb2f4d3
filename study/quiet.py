"""The libraries' own chatter off the driver's terminal, where the study's progress view speaks.

What each prints by itself, and where it is turned off:

- Optuna: an INFO line per created study and per finished trial (``optuna.logging``): WARNING here.
- MLflow: INFO lines from its stores ("Creating initial MLflow database tables", alembic's migration
  lines): WARNING here; the "Downloading artifacts" progress bar it draws on stderr whenever the tables
  and the report read an artifact: ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` false. (The run URLs it
  prints when a run ends: :mod:`study.tracking`.)
- Ray Tune: its output engine's "Configuration for experiment" box, "View detailed results here"
  and a TensorBoard hint, printed even at ``verbose=0``; ``RAY_AIR_NEW_OUTPUT=0`` and ``verbose=0``
  in :func:`study.stages.search_and_final`.
- Ray: the workers' stdout and stderr forwarded to the driver: ``log_to_driver`` in
  :func:`study.stages.init_ray`.

Warnings and errors still come through: a failed trial's error is shown by the progress view and
logged by Ray Tune.
"""

from __future__ import annotations

import logging
import os

import mlflow  # noqa: F401  (importing it sets its loggers to INFO: first, so that the levels set here stay)
import optuna

QUIET_LOGGERS = ("mlflow", "alembic")


def no_progress_bars() -> None:
    """MLflow draws no "Downloading artifacts" bar (one per download) unless the environment asks for it."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def quiet_libraries() -> None:
    """Optuna and MLflow log warnings and errors only, in this process (the driver); MLflow draws no
    progress bars (:func:`no_progress_bars`)."""
    no_progress_bars()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
