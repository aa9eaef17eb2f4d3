"""How metrics are named: in MLflow and the runs frame (``study.vocab``'s rule) and for people (headers, labels).

In a run, a metric measured on the validation classes keeps its own name (``map_at_r``: search
trials, the baseline's validation score) and the same metric on the test classes is ``test_<name>``
(``test_map_at_r``: final, ablation and ensemble runs, the baseline's test score, the parent run's
headline). What a loss reports about its own parameters (``effective_centers``, ``proxy_abs_cos``) and
what every epoch reports (``train_loss``, ``epoch_seconds``, ``driver_wait_seconds``) keep their names on
every run.

:func:`display_name` is the one map from a metric's name to what a table header or an axis shows
(``recall_at_1`` → ``R@1``), shared by the LaTeX tables, the report and the figures.
"""

from __future__ import annotations

import re

from study.vocab import TEST_PREFIX, as_test_name

__all__ = [
    "TEST_PREFIX",
    "as_test_name",
    "column_label",
    "display_name",
    "final_column",
    "is_retrieval",
    "is_test_name",
    "metric_label",
    "plain_name",
]

_RECALL = re.compile(r"recall_at_(\d+)")
DISPLAY_NAMES = {
    "map_at_r": "MAP@R",
    "r_precision": "R-Precision",
    "nmi": "NMI",
    "submode_recall_at_1": "sub-mode R@1",
    "submode_chance": "sub-mode chance",
    "queries_without_positives": "queries without positives",
    "train_loss": "training loss",
    "effective_centers": "effective centers",
    "proxy_abs_cos": "proxy |cos|",
    "unit_score_std": "PDDM unit score std",
    "p_vs_best": "p vs best",
    "cpu_hours": "CPU-h",
    "gpu_hours": "GPU-h",
    "loss_lr": "loss lr",
}


# what study.metrics.evaluate reports: retrieval on a set of classes (validation, or test as test_<name>)
RETRIEVAL = re.compile(
    r"recall_at_\d+|map_at_r|r_precision|nmi|submode_recall_at_1|submode_chance|queries_without_positives"
)


def is_retrieval(name: str) -> bool:
    """Whether ``name`` (without the ``test_`` prefix) is a retrieval metric, measured on a set of classes."""
    return RETRIEVAL.fullmatch(name) is not None


def is_test_name(name: str) -> bool:
    """Whether ``name`` is a test-classes metric's (``test_map_at_r``)."""
    return name.startswith(TEST_PREFIX)


def plain_name(name: str) -> str:
    """The metric a name measures, wherever measured: ``test_map_at_r`` → ``map_at_r``."""
    return name.removeprefix(TEST_PREFIX)


def display_name(name: str, recall: str = "R@") -> str:
    """A readable header or axis label: ``recall_at_4`` → ``R@4`` (``recall="Recall@"``: ``Recall@4``),
    ``map_at_r`` → ``MAP@R``, ``nmi`` → ``NMI``; a ``test_`` name as its
    metric's (the table or axis says which classes); a ``<metric>_ci`` column as ``± <metric>``;
    anything else with spaces for underscores."""
    if name.endswith("_ci"):
        return "± " + display_name(name.removesuffix("_ci"), recall)
    name = plain_name(name)
    if match := _RECALL.fullmatch(name):
        return f"{recall}{match[1]}"
    return DISPLAY_NAMES.get(name, name.replace("_", " "))


def final_column(columns, metric: str) -> str:
    """The column of a runs frame (``columns``) that holds ``metric`` of a final, ablation or ensemble
    run: ``test_<metric>`` for a retrieval metric (there is one), the name itself for what a loss
    reports about its own parameters (never prefixed)."""
    tested = as_test_name(metric)
    return tested if tested in columns else metric


def metric_label(metric: str) -> str:
    """A figure's axis label or title: :func:`display_name` (``recall_at_4`` → ``R@4``, ``test_map_at_r`` →
    ``MAP@R``)."""
    return display_name(metric)


def column_label(column: str) -> str:
    """A table header: metrics and the named columns (``p_vs_best`` → ``p vs best``, CPU-h, GPU-h) by
    :func:`display_name`; any other column (``loss``, ``trials``) as it is."""
    name = plain_name(column.removesuffix("_ci"))
    return display_name(column) if is_retrieval(name) or name in DISPLAY_NAMES else column
