"""Comparison tables: one row per loss (its best trial) plus the untrained baseline."""

from __future__ import annotations

import pandas as pd

METRICS = ["recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "nmi", "map_at_r", "r_precision"]
# What losses report about their own parameters (trial_metrics()): SoftTriple, Proxy Anchor.
LOSS_METRICS = ["effective_centers", "proxy_abs_cos"]


def comparison_table(runs: pd.DataFrame, objective: str) -> pd.DataFrame:
    """Best COMPLETE search trial per loss by ``objective`` (validation classes), then the baseline.

    Columns: loss, trials, complete, pruned, failed, the metrics, and the best
    trial's hyperparameters and loss metrics (``LOSS_METRICS``) as ``name=value`` text.
    """
    params = sorted(c for c in runs.columns if c.startswith("param."))
    rows = []
    search = runs[runs["stage"] == "search"]
    for loss, group in search.groupby("loss", sort=False):
        complete = group[group["state"] == "COMPLETE"]
        row = {
            "loss": loss,
            "trials": len(group),
            "complete": len(complete),
            "pruned": int((group["state"] == "PRUNED").sum()),
            "failed": int((group["state"] == "FAIL").sum()),
        }
        if len(complete):
            best = complete.loc[complete[objective].idxmax()]
            row |= {m: best.get(m) for m in METRICS}
            row["hyperparameters"] = ", ".join(
                f"{p.removeprefix('param.')}={_short(best[p])}" for p in params if pd.notna(best[p])
            )
            row["loss metrics"] = ", ".join(
                f"{m}={_short(best[m])}" for m in LOSS_METRICS if m in best and pd.notna(best[m])
            )
        rows.append(row)
    for _, base in runs[runs["stage"] == "baseline"].iterrows():
        rows.append({"loss": "untrained", "trials": 0} | {m: base.get(m) for m in METRICS})
    columns = ["loss", "trials", "complete", "pruned", "failed", *METRICS, "hyperparameters", "loss metrics"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(objective, ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def _short(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def to_markdown(table: pd.DataFrame) -> str:
    """Metrics to 4 decimals, counts as integers, blanks where a value does not apply."""
    counts = ["trials", "complete", "pruned", "failed"]
    shown = table.astype({c: "Int64" for c in counts}).astype(object)
    return shown.where(table.notna(), None).to_markdown(index=False, floatfmt=".4f", missingval="")
