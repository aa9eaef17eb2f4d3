"""The machines a study trained on, read from its runs' ``machine`` column (:mod:`study.machine`,
recorded by each trial's worker), not from the machine that reads them."""

from __future__ import annotations

import json

import pandas as pd

from study.machine import FIELDS, PACKAGES

HARDWARE = ["host", "cpu", "cpus", "gpus", "driver"]
SOFTWARE = ["python", "platform", "cuda", *PACKAGES]


def training_machines(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(hardware, software, unrecorded): one row per distinct machine (host, CPU, the CPUs and GPUs a
    trial was given, driver) and per distinct software stack (Python, OS, CUDA, library versions), each
    with the number of ``runs`` and the losses it trained; and how many runs recorded no machine
    (logged before the tag existed; the untrained baseline, evaluated outside a trial)."""
    column = runs["machine"] if "machine" in runs else pd.Series(None, index=runs.index, dtype=object)
    known = column.notna()
    rows = pd.DataFrame([_fields(text) for text in column[known]], index=column[known].index, columns=FIELDS)
    rows["loss"] = runs.loc[known, "loss"]
    return _count(rows, HARDWARE), _count(rows, SOFTWARE), int((~known).sum())


def _fields(text: str) -> dict[str, str]:
    try:
        info = json.loads(text)
    except (TypeError, ValueError):
        info = {}
    return {field: str(info.get(field, "unknown")) for field in FIELDS}


def _count(rows: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    if rows.empty:
        return pd.DataFrame(columns=[*columns, "runs", "losses"])
    grouped = rows.groupby(columns, sort=False)["loss"]
    table = grouped.agg(runs="size", losses=lambda s: ", ".join(sorted(s.dropna().unique()))).reset_index()
    return table.sort_values("runs", ascending=False, kind="stable").reset_index(drop=True)
