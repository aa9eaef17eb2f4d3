"""Display names: how a metric or a table column is shown in headers, axis labels and figure titles.

One map for the report, the figures and the notebook (``recall_at_1`` → ``R@1``, ``map_at_r`` →
``MAP@R``); the data keep their MLflow-safe names. The ``test_``/``val_`` prefix is dropped: a table
or figure says which classes it shows.
"""

from __future__ import annotations

import re

_RECALL = re.compile(r"(submode_)?recall_at_(\d+)")
METRICS = {
    "map_at_r": "MAP@R",
    "r_precision": "R-Precision",
    "nmi": "NMI",
    "submode_chance": "sub-mode chance",
    "train_loss": "training loss",
    "effective_centers": "effective centers",
    "proxy_abs_cos": "proxy |cos|",
}
COLUMNS = {
    "p_vs_best": "p vs best",
    "cpu_hours": "CPU-h",
    "gpu_hours": "GPU-h",
    "loss_lr": "loss lr",
}


def metric_label(metric: str) -> str:
    """``recall_at_4`` → ``R@4``, ``test_map_at_r`` → ``MAP@R``, ``submode_recall_at_1`` → ``sub-mode R@1``;
    a name not in the map keeps its words (underscores as spaces)."""
    name = re.sub(r"^(test|val)_", "", metric)
    if match := _RECALL.fullmatch(name):
        return ("sub-mode " if match[1] else "") + f"R@{match[2]}"
    return METRICS.get(name, name.replace("_", " "))


def column_label(column: str) -> str:
    """A table header: metrics by :func:`metric_label`, ``p_vs_best`` → ``p vs best``, hours as CPU-h /
    GPU-h; any other column as it is."""
    if column in COLUMNS:
        return COLUMNS[column]
    if _RECALL.fullmatch(re.sub(r"^(test|val)_", "", column)) or re.sub(r"^(test|val)_", "", column) in METRICS:
        return metric_label(column)
    return column
