"""Read a study back from MLflow into one tidy DataFrame (one row per trial run)."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from study.tracking import TAG_LOSS, TAG_OBJECTIVE, TAG_ROLE, TAG_STAGE, TAG_STATE


class StudyNotFoundError(LookupError):
    """No study of that name in the tracking store."""


def load_study(name: str, tracking_uri: str | None = None) -> tuple[str, pd.DataFrame]:
    """The latest run of study ``name``: (objective metric, one row per child run).

    Columns: ``run_id``, ``run_name``, ``loss``, ``stage``, ``state``, ``mode``, one column per
    metric (its last logged value) and one ``param.<name>`` column per hyperparameter.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    parents = (
        client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{TAG_ROLE}` = 'study'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if experiment
        else []
    )
    if not parents:
        raise StudyNotFoundError(f"no study named {name!r} in the tracking store {client.tracking_uri}")
    parent = parents[0]
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        max_results=50_000,
    )
    rows = [
        {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "loss": run.data.tags.get(TAG_LOSS),
            "stage": run.data.tags.get(TAG_STAGE),
            "state": run.data.tags.get(TAG_STATE, "RUNNING"),
            **run.data.metrics,
            **{f"param.{k}": v for k, v in run.data.params.items()},
        }
        for run in children
    ]
    frame = pd.DataFrame(rows)
    # feature mode (frozen trunk, trained head) is labelled in every table
    frame["mode"] = parent.data.params.get("train.mode", "finetune")
    return parent.data.tags[TAG_OBJECTIVE], frame
