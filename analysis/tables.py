"""Comparison tables: one row per loss (its best trial) plus the untrained baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

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
    table["mode"] = runs["mode"].iloc[0] if "mode" in runs and len(runs) else "finetune"
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


def final_table(runs: pd.DataFrame, objective: str) -> pd.DataFrame:
    """The final stage on the test classes: per loss, each metric's mean over seeds and the half-width
    of its 95% confidence interval (Student's t; NaN with one seed). With folds, a seed's value is the
    mean over its fold models, and each loss has a second row for the concatenated-embedding ensemble.

    Columns: loss, seeds, runs, ``<metric>`` and ``<metric>_ci`` for each metric, mode (finetune / features).
    """
    rows = []
    done = runs[runs["state"] == "COMPLETE"]
    for stage, suffix in (("final", ""), ("ensemble", " (ensemble)")):
        for loss, group in done[done["stage"] == stage].groupby("loss", sort=False):
            seeds = group["param.seed"] if "param.seed" in group else pd.Series(0, index=group.index)
            per_seed = group.groupby(seeds.fillna("0"))[METRICS].mean()
            row = {"loss": f"{loss}{suffix}", "seeds": len(per_seed), "runs": len(group)}
            for metric in METRICS:
                row[metric], row[f"{metric}_ci"] = mean_ci(per_seed[metric].to_numpy())
            rows.append(row)
    for _, base in runs[runs["stage"] == "baseline"].iterrows():  # the untrained network, tested once
        if f"test_{objective}" in base and pd.notna(base[f"test_{objective}"]):
            rows.append({"loss": "untrained", "seeds": 1, "runs": 1} | {m: base[f"test_{m}"] for m in METRICS})
    columns = ["loss", "seeds", "runs", *[c for m in METRICS for c in (m, f"{m}_ci")]]
    table = pd.DataFrame(rows, columns=columns)
    table["mode"] = runs["mode"].iloc[0] if "mode" in runs and len(runs) else "finetune"
    return table.sort_values(objective, ascending=False, kind="stable").reset_index(drop=True)


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The mean and the half-width of its ``level`` confidence interval (Student's t), NaN for n < 2."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) < 2:
        return float(values.mean()), float("nan")
    sem = values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(stats.t.ppf((1 + level) / 2, len(values) - 1) * sem)


def final_to_markdown(table: pd.DataFrame) -> str:
    """Each metric as ``mean ± ci`` (just the mean with one seed)."""
    shown = table[["loss", "seeds", "runs"]].copy()
    for metric in METRICS:
        shown[metric] = [
            f"{m:.4f}" + ("" if np.isnan(c) else f" ± {c:.4f}")
            for m, c in zip(table[metric], table[f"{metric}_ci"], strict=True)
        ]
    shown["mode"] = table["mode"]
    return shown.to_markdown(index=False)
