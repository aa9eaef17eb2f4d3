"""Comparison tables: the search (best trial per loss, validation classes) and the final stage (test
classes, mean ± 95% CI over seeds, a significance test against the best loss), with the CPU- and
GPU-hours each loss cost, exported as CSV, Markdown, LaTeX and HTML with the best value per column
marked; and the papers' claims (``analysis.claims``): the controlled verdicts, then the exploratory
trends. Ablation runs (a claim's arm) enter the claims only, never a loss's row, count or cost.

A table names its metric columns after the metric (``map_at_r``, ``map_at_r_ci``) whichever classes
it was measured on: the search table's are the validation classes' (the runs' ``map_at_r``), the final
table's the test classes' (the runs' ``test_map_at_r``), as their captions say. The tables are
frames of numbers (the CSV: full precision, counts as integers, one ``param.<name>`` column per
hyperparameter, one ``loss.<metric>`` column per metric a loss reports about itself); the Markdown
and HTML show them as text (:func:`formatted`), the LaTeX as a paper shows them (:func:`to_latex`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from analysis.claims import ABLATION, TREND_RULE, VERDICT_RULE, ablation_claims, exploratory_trends
from analysis.names import as_test_name, display_name
from analysis.runs import best_trial, loss_metrics
from study.storage import Storage
from study.vocab import Stage, State

FIXED_METRICS = ["nmi", "map_at_r", "r_precision"]
_COST_COLUMNS = ["cpu_hours", "gpu_hours"]
COUNTS = ["trials", "complete", "pruned", "failed", "seeds", "runs"]
LR_COLUMNS = ["lr", "loss_lr"]  # the effective learning rates of a trial (backbone, the loss's own parameters)
ALPHA = 0.05  # significance level of the test against the best loss
PARAM, LOSS_METRIC = "param.", "loss."  # a table's hyperparameter and loss-metric columns
# what the LaTeX table leaves out unless asked (to_latex's ``extra``): a paper's table shows the losses' results
LATEX_HIDDEN = ["complete", "pruned", "failed", "runs", "protocol", *LR_COLUMNS, "hyperparameters", "loss metrics",
                *_COST_COLUMNS, "mode"]  # fmt: skip


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """``recall_at_<k>`` in increasing k (the dataset's Ks, from validation or ``test_`` columns), then
    NMI, MAP@R and R-Precision."""
    ks = {int(m[1]) for c in runs.columns if (m := re.fullmatch(r"(?:test_)?recall_at_(\d+)", c))}
    return [f"recall_at_{k}" for k in sorted(ks)] + FIXED_METRICS


def _groups(runs: pd.DataFrame) -> list[str]:
    """Rows per loss, and per study (with its dataset) when several studies are combined."""
    if "study" not in runs or runs["study"].nunique() < 2:
        return ["loss"]
    return ["study", "dataset", "loss"] if "dataset" in runs else ["study", "loss"]


def _cost(runs: pd.DataFrame, keys: list[str]) -> dict[tuple, dict[str, float]]:
    """CPU- and GPU-hours per loss (keyed like ``groupby(keys)``), every stage but the ablations
    included: the budget each loss took to reach its result (an ablation run is a claim's cost, and a
    loss with a claim to test would otherwise look dearer than one without)."""
    columns = [c for c in ("cpu_hours", "gpu_hours") if c in runs]
    if not columns:
        return {}
    runs = runs[runs["stage"].astype(str) != ABLATION]
    return {key: group[columns].sum().to_dict() for key, group in runs.groupby(keys)}


def _ordered(table: pd.DataFrame, runs: pd.DataFrame, keys: list[str], objective: str) -> pd.DataFrame:
    """``table`` with each row's ``mode`` (its study's: feature-mode results are labelled as such in
    every table) and its rows by ``objective``, best first — within each study, in the order given."""
    table = table.sort_values(objective, ascending=False, na_position="last", kind="stable")
    if "study" in keys:
        table["mode"] = table["study"].map(runs.groupby("study")["mode"].first())
        order = {name: i for i, name in enumerate(dict.fromkeys(runs["study"]))}
        table = table.sort_values("study", key=lambda s: s.map(order), kind="stable")
    else:
        table["mode"] = runs["mode"].iloc[0] if "mode" in runs and len(runs) else "finetune"
    return table.reset_index(drop=True)


def comparison_table(runs: pd.DataFrame, objective: str) -> pd.DataFrame:
    """Best COMPLETE search trial per loss by ``objective`` (validation classes), then the baseline.

    Columns: loss, trials, complete, pruned, failed (integers), the metrics, the best trial's learning
    rates (``lr`` of the backbone, ``loss_lr`` of the loss's own parameters — the same for every loss
    unless the study searched them), its hyperparameters (``param.<name>``, typed as :func:`load_runs`
    gives them; empty where a loss has no such hyperparameter) and loss metrics
    (``loss.<metric>``: :func:`analysis.runs.loss_metrics`, what the losses report about their own
    parameters), cpu_hours, gpu_hours, mode.
    """
    metrics = metric_columns(runs)
    params = sorted(c for c in runs.columns if c.startswith(PARAM))
    own_metrics = loss_metrics(runs)
    keys = _groups(runs)
    cost = _cost(runs, keys)
    rows = []
    search = runs[runs["stage"] == Stage.SEARCH]
    for key, group in search.groupby(keys, sort=False):
        row = dict(zip(keys, key, strict=True)) | {
            "trials": len(group),
            "complete": int((group["state"] == State.COMPLETE).sum()),
            "pruned": int((group["state"] == State.PRUNED).sum()),
            "failed": int((group["state"] == State.FAIL).sum()),
        }
        if (best := best_trial(group, row["loss"], objective)) is not None:
            row |= {m: best.get(m) for m in metrics} | {c: best.get(c) for c in LR_COLUMNS}
            row |= {p: best[p] for p in params if pd.notna(best[p])}
            row |= {LOSS_METRIC + m: best[m] for m in own_metrics if m in best and pd.notna(best[m])}
        row |= cost.get(key, {})
        rows.append(row)
    for _, base in runs[runs["stage"] == Stage.BASELINE].iterrows():
        rows.append(
            {k: base.get(k) for k in keys} | {"loss": "untrained", "trials": 0} | {m: base.get(m) for m in metrics}
        )
    shown_params = [p for p in params if any(p in row for row in rows)]  # the searched losses' only
    shown_own = [LOSS_METRIC + m for m in own_metrics if any(LOSS_METRIC + m in row for row in rows)]
    columns = [*keys, "trials", "complete", "pruned", "failed", *metrics, *LR_COLUMNS, *shown_params, *shown_own]
    table = pd.DataFrame(rows, columns=columns + _COST_COLUMNS[: len(next(iter(cost.values()), {}))])
    for column in shown_params:  # each hyperparameter keeps the type load_runs gave it
        table[column] = table[column].astype(runs[column].dtype)
    return _ordered(_as_counts(table), runs, keys, objective)


def _as_counts(table: pd.DataFrame) -> pd.DataFrame:
    """The count columns as integers (nullable: a row without the count stays empty, never ``2.0``)."""
    for column in COUNTS:
        if column in table:
            table[column] = table[column].astype("Int64")
    return table


def _short(value) -> str:
    """A hyperparameter's or loss metric's value in a text cell: a number to 4 significant digits."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        return str(value)
    return f"{float(value):.4g}"


def final_table(runs: pd.DataFrame, objective: str) -> pd.DataFrame:
    """The final stage on the test classes: per loss, each metric's mean over seeds and the half-width
    of its 95% confidence interval (Student's t; NaN with one seed). With folds, a seed's value is the
    mean over its fold models, and each loss has a second row for the concatenated-embedding ensemble.
    ``p_vs_best``: Welch's t-test of the loss's per-seed ``objective`` against the best loss's.

    Columns: loss, protocol ("all classes": each seed trained on every training class, as the papers;
    "folds": one model per validation fold, the Reality Check protocol), seeds, runs (integers),
    ``<metric>`` and ``<metric>_ci`` for each metric (read from the runs' ``test_<metric>``), p_vs_best,
    the configuration the final runs retrained (``param.<name>``, without seed and fold), cpu_hours,
    gpu_hours, mode (finetune / features).
    """
    metrics = metric_columns(runs)
    tested = [as_test_name(m) for m in metrics]
    keys = _groups(runs)
    cost = _cost(runs, keys)
    rows, samples = [], {}
    done = runs[runs["state"] == State.COMPLETE]
    params = [c for c in runs.columns if c.startswith(PARAM) and c not in (f"{PARAM}seed", f"{PARAM}fold")]
    for stage, suffix in ((Stage.FINAL, ""), (Stage.ENSEMBLE, " (ensemble)")):
        for key, group in done[done["stage"] == stage].groupby(keys, sort=False):
            per_seed = seed_means(group.reindex(columns=[*group.columns, *set(tested) - set(group)]), tested)
            row = dict(zip(keys, key, strict=True)) | {"seeds": len(per_seed), "runs": len(group)}
            row["protocol"] = "folds" if stage == Stage.ENSEMBLE or _per_fold(group) else "all classes"
            row["loss"] += suffix
            for metric, name in zip(metrics, tested, strict=True):
                row[metric], row[f"{metric}_ci"] = mean_ci(per_seed[name].to_numpy(float))
            if stage == Stage.FINAL:
                row |= {p: group[p].dropna().iloc[0] for p in params if group[p].notna().any()} | cost.get(key, {})
            samples[tuple(row[k] for k in keys)] = per_seed[as_test_name(objective)].to_numpy(float)
            rows.append(row)
    for _, base in runs[runs["stage"] == Stage.BASELINE].iterrows():  # the untrained network, tested once
        if as_test_name(objective) in base and pd.notna(base[as_test_name(objective)]):
            untrained = {k: base.get(k) for k in keys} | {"loss": "untrained", "seeds": 1, "runs": 1}
            rows.append(untrained | {m: base.get(name) for m, name in zip(metrics, tested, strict=True)})
    columns = [*keys, "protocol", "seeds", "runs", *[c for m in metrics for c in (m, f"{m}_ci")]]
    shown_params = [p for p in params if any(p in row for row in rows)]
    cost_columns = _COST_COLUMNS[: len(next(iter(cost.values()), {}))]
    table = pd.DataFrame(rows, columns=columns + shown_params + cost_columns)
    for column in shown_params:
        table[column] = table[column].astype(runs[column].dtype)
    table.insert(len(columns), "p_vs_best", _p_vs_best(table, samples, keys, objective))
    return _ordered(_as_counts(table), runs, keys, objective)


def _per_fold(runs: pd.DataFrame) -> bool:
    return "param.fold" in runs and bool(runs["param.fold"].notna().any())


def protocol_text(runs: pd.DataFrame) -> str:
    """How the final stage trained, in a sentence for the tables' captions."""
    final = runs[runs["stage"] == Stage.FINAL]
    if _per_fold(final):
        return (
            "one model per validation fold on that fold's training classes (the Reality Check protocol): a seed's "
            "value is the mean of its fold models; '(ensemble)' rows concatenate the fold models' embeddings"
        )
    return "each seed trained on every training class, as in the papers"


def seed_means(group: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """One row per seed: the mean of ``columns`` over the seed's runs (with folds, its fold models)."""
    # one spelling per seed, whether load_runs typed it (3) or MLflow's text came through ("3", "3.0")
    seeds = group["param.seed"].map(_seed_key) if "param.seed" in group else pd.Series("0", index=group.index)
    return group.groupby(seeds)[columns].mean()


def _seed_key(value) -> str:
    if pd.isna(value):
        return "0"
    try:
        return str(int(float(value)))
    except ValueError:
        return str(value)


def _p_vs_best(table: pd.DataFrame, samples: dict, keys: list[str], objective: str) -> list[float]:
    """Welch's t-test p-value of each row's per-seed objective against the best row's (per dataset);
    NaN for the best row itself and where either side has fewer than two seeds."""
    p_values = []
    for _, row in table.iterrows():
        same = table if len(keys) == 1 else table[table["study"] == row["study"]]
        best = same.loc[same[objective].idxmax()]
        mine, theirs = samples.get(tuple(row[k] for k in keys)), samples.get(tuple(best[k] for k in keys))
        if row["loss"] == best["loss"] or mine is None or theirs is None or min(len(mine), len(theirs)) < 2:
            p_values.append(float("nan"))
        else:
            p_values.append(float(stats.ttest_ind(mine, theirs, equal_var=False).pvalue))
    return p_values


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The mean and the half-width of its ``level`` confidence interval (Student's t), NaN for n < 2."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) < 2:
        return float(values.mean()), float("nan")
    sem = values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(stats.t.ppf((1 + level) / 2, len(values) - 1) * sem)


def best_mask(table: pd.DataFrame) -> pd.DataFrame:
    """Per metric column of ``table``, True where the value is the best (highest) of a trained loss —
    per study when the table holds several (a ``study`` column first); the untrained baseline is
    never the best loss, even where it scores higher."""
    metrics = [c for c in table.columns if c in metric_columns(table)]
    by_study = "study" in table.columns[:1]
    mask = pd.DataFrame(False, index=table.index, columns=metrics)
    for column in metrics:
        trained = pd.to_numeric(table[column], errors="coerce").where(table["loss"] != "untrained")
        best = trained.groupby(table["study"]).transform("max") if by_study else trained.max()
        mask[column] = (trained == best) & trained.notna()
    return mask


def _packed(table: pd.DataFrame, prefix: str) -> list[str]:
    """Each row's ``prefix`` columns (``param.``, ``loss.``) as ``name=value`` text, in one cell."""
    columns = [c for c in table.columns if c.startswith(prefix)]
    return [
        ", ".join(f"{c.removeprefix(prefix)}={_short(row[c])}" for c in columns if pd.notna(row[c]))
        for _, row in table.iterrows()
    ]


def formatted(table: pd.DataFrame, bold: tuple[str, str] = ("**", "**"), hyperparameters: bool = True) -> pd.DataFrame:
    """The table as text: metrics to 4 decimals (``mean ± ci`` where a CI column exists), the best
    value of each metric column wrapped in ``bold`` (:func:`best_mask`), counts as integers, hours to 3
    significant digits, p-values with a ``*`` below ``ALPHA``, blanks where a value does not apply;
    the ``param.`` columns in one ``hyperparameters`` cell per row (left out without
    ``hyperparameters``) and the ``loss.`` columns in one ``loss metrics`` cell, ``name=value``."""
    is_best = best_mask(table)
    shown = pd.DataFrame(index=table.index)
    for column in table.columns:
        if column.endswith("_ci"):
            continue
        values = table[column]
        if column in is_best:
            ci = table.get(f"{column}_ci")
            text = [
                "" if pd.isna(v) else f"{v:.4f}" + ("" if ci is None or pd.isna(ci[i]) else f" ± {ci[i]:.4f}")
                for i, v in values.items()
            ]
            shown[column] = [f"{bold[0]}{t}{bold[1]}" if b else t for t, b in zip(text, is_best[column], strict=True)]
        elif column.startswith(PARAM):
            if hyperparameters and "hyperparameters" not in shown:
                shown["hyperparameters"] = _packed(table, PARAM)
        elif column.startswith(LOSS_METRIC):
            if "loss metrics" not in shown:
                shown["loss metrics"] = _packed(table, LOSS_METRIC)
        elif column in COUNTS:
            shown[column] = ["" if pd.isna(v) else str(int(v)) for v in values]
        elif column in LR_COLUMNS:
            shown[column] = ["" if pd.isna(v) else f"{v:.3g}" for v in values]
        elif column in ("cpu_hours", "gpu_hours"):
            shown[column] = ["" if pd.isna(v) else f"{v:.3g}" for v in values]
        elif column == "p_vs_best":
            shown[column] = ["" if pd.isna(v) else f"{v:.3f}" + (" *" if v < ALPHA else "") for v in values]
        else:
            shown[column] = ["" if pd.isna(v) else str(v) for v in values]
    return shown


def to_markdown(table: pd.DataFrame, hyperparameters: bool = True) -> str:
    """Markdown with the best value per metric in bold."""
    return formatted(table, hyperparameters=hyperparameters).to_markdown(index=False)


def to_latex(table: pd.DataFrame, extra: Sequence[str] = (), digits: int = 1) -> str:
    """The table as a paper shows it: a booktabs tabular (``\\toprule`` … ``\\bottomrule``) written by
    pandas' ``Styler`` (which also escapes the text), readable headers (:func:`analysis.names.display_name`:
    R@1, MAP@R, NMI), metrics in percent to ``digits`` decimals (``63.2 $\\pm$ 1.3`` with a CI), the
    best of each metric in ``\\textbf`` (:func:`best_mask`), numeric columns right-aligned.

    Columns: those of :func:`formatted` but ``LATEX_HIDDEN`` — for the loss tables the loss (and study,
    dataset), trials or seeds, the metrics and p_vs_best; ``extra`` brings hidden ones back by name — e.g.
    ``("cpu_hours", "gpu_hours", "mode")`` for the cost and mode, ``("hyperparameters",)`` for the best
    configuration."""
    text = formatted(table, bold=("", ""))
    metrics = list(best_mask(table).columns)
    keep = [c for c in text.columns if c not in LATEX_HIDDEN or c in extra]
    shown = text[keep].copy()
    for column in metrics:
        ci = table.get(f"{column}_ci")
        shown[column] = [
            ""
            if pd.isna(v)
            else f"{100 * v:.{digits}f}" + ("" if ci is None or pd.isna(ci[i]) else f" $\\pm$ {100 * ci[i]:.{digits}f}")
            for i, v in table[column].items()
        ]
    return _latex(shown, verbatim=metrics, bold=best_mask(table))


def _is_numeric_text(values: pd.Series) -> bool:
    """Whether every non-empty cell of a text column starts like a number (``63.2 $\\pm$ 1.3``, ``+0.012 [...]``,
    ``0.031 *``): such a column is right-aligned."""
    cells = [str(v) for v in values if str(v)]
    return bool(cells) and all(re.match(r"[+\-−]?(\d|\.\d|nan|inf)", c) for c in cells)


def _latex(shown: pd.DataFrame, verbatim: Sequence[str] = (), bold: pd.DataFrame | None = None) -> str:
    """A text table as booktabs LaTeX through pandas' ``Styler``: headers shown by
    :func:`~analysis.names.display_name` and escaped, cells escaped except the ``verbatim`` columns (already
    LaTeX), cells where ``bold`` is True in ``\\textbf``, numeric columns right-aligned."""
    shown = shown.reset_index(drop=True)
    align = "".join("r" if _is_numeric_text(shown[c]) else "l" for c in shown.columns)
    names = {c: display_name(c) for c in shown.columns}
    styler = shown.rename(columns=names).style.hide(axis="index")
    escaped = [names[c] for c in shown.columns if c not in verbatim]
    styler = styler.format(escape="latex", subset=escaped).format_index(escape="latex", axis=1)
    if bold is not None and len(bold.columns):
        props = bold.reset_index(drop=True).replace({True: "textbf: --rwrap;", False: ""}).rename(columns=names)
        styler = styler.apply(lambda _: props, axis=None, subset=list(props.columns))
    return styler.to_latex(hrules=True, column_format=align)


def to_html(table: pd.DataFrame, hyperparameters: bool = True) -> str:
    """An HTML table with the best value per metric in ``<strong>``."""
    shown = formatted(table, bold=("\0b", "\0/b"), hyperparameters=hyperparameters)
    html = shown.to_html(index=False, escape=True, border=0, classes="results")
    return html.replace("\0b", "<strong>").replace("\0/b", "</strong>")


def export(
    table: pd.DataFrame,
    folder: Storage,
    name: str,
    shown: pd.DataFrame | None = None,
    hyperparameters: bool = True,
) -> list[Storage]:
    """Write ``<name>.csv`` (full precision: the table's numbers, one column per hyperparameter),
    ``.md``, ``.tex`` (:func:`to_latex`) and ``.html`` into ``folder``; the last three show ``shown``
    (the table as text, e.g. :func:`claims_text`) when given. Without ``hyperparameters`` the Markdown and
    HTML leave the ``param.`` columns out (the CSV keeps them)."""
    if shown is None:
        rendered = {
            "md": to_markdown(table, hyperparameters) + "\n",
            "tex": to_latex(table),
            "html": to_html(table, hyperparameters),
        }
    else:
        rendered = {
            "md": (shown.to_markdown(index=False) if len(shown) else "(none)") + "\n",
            "tex": _latex(shown.astype(str)),
            "html": shown.to_html(index=False, escape=True, border=0, classes="results"),
        }
    files = {"csv": table.to_csv(index=False), **rendered}
    written = []
    for suffix, text in files.items():
        written.append(folder.child(f"{name}.{suffix}"))
        written[-1].write_text(text)
    return written


class IncomparableStudiesError(ValueError):
    """Studies combined in one table must have chosen their best trials by the same objective."""


def _number(value: float, digits: int = 4, sign: bool = False) -> str:
    return "" if pd.isna(value) else f"{value:{'+' if sign else ''}.{digits}f}"


def claims_text(table: pd.DataFrame) -> pd.DataFrame:
    """The controlled claims (:func:`analysis.claims.ablation_claims`) as text, for Markdown and HTML:
    the statement and arms once per claim, arm means to 4 decimals, the difference with its 95% CI
    as ``+0.0123 [+0.0010, +0.0236]``, p to 3 decimals."""
    rows = []
    previous = None
    for _, row in table.iterrows():
        key = (row.get("study"), row["claim"])
        first = key != previous
        previous = key
        ci = (
            ""
            if pd.isna(row["ci_low"])
            else f" [{_number(row['ci_low'], sign=True)}, {_number(row['ci_high'], sign=True)}]"
        )
        rows.append(
            ({"study": row["study"] if first else ""} if "study" in table else {})
            | {
                "claim": row["statement"] if first else "",
                "arms": row["arms"] if first and pd.notna(row["arms"]) else "",
                "metric": row["metric"],
                "expected": row["expected"] if pd.notna(row["expected"]) else "",
                "seeds": "" if pd.isna(row["seeds"]) else str(int(row["seeds"])),
                "paper": _number(row["paper"]),
                "alternative": _number(row["alternative"]),
                "difference [95% CI]": _number(row["difference"], sign=True) + ci,
                "p": _number(row["p"], 3),
                "verdict": row["verdict"],
            }
        )
    columns = (["study"] if "study" in table else []) + [
        "claim", "arms", "metric", "expected", "seeds", "paper", "alternative", "difference [95% CI]", "p", "verdict",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def claims_tables(runs: pd.DataFrame, objective: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(The controlled claims, the exploratory trends) of ``runs``: :mod:`analysis.claims`."""
    return ablation_claims(runs, objective), exploratory_trends(runs, objective)


def claims_markdown(controlled: pd.DataFrame, exploratory: pd.DataFrame) -> str:
    """The Claims part of ``results.md``: the controlled verdicts with how they are decided, then the
    exploratory trends under their own heading."""
    text = "\n## Claims\n\n"
    if len(controlled):
        text += VERDICT_RULE + "\n\n" + claims_text(controlled).to_markdown(index=False) + "\n"
    else:
        text += "No ablation runs: the study tested none of the papers' claims as a controlled experiment.\n"
    if len(exploratory):
        text += "\n### Exploratory trends (search trials)\n\n" + TREND_RULE + "\n\n"
        text += exploratory.to_markdown(index=False) + "\n"
    return text


def write_tables(runs: pd.DataFrame, out: Storage) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """Export the search table as ``results.*``, once the final stage ran the final table as
    ``final.*``, and the claims as ``claims.*`` (controlled, :func:`analysis.claims.ablation_claims`)
    and ``exploratory_trends.*``; ``results.md`` then holds them all with their captions, the claims
    last. ``runs`` may hold several studies (rows per study, dataset and loss). Returns (that Markdown,
    the search table, the final table)."""
    objectives = runs.groupby("study", sort=False)["objective"].first()
    if objectives.nunique() > 1:
        chosen = ", ".join(f"{name} ({objective})" for name, objective in objectives.items())
        raise IncomparableStudiesError(f"the studies chose their best trials by different objectives: {chosen}")
    names, objective = ", ".join(f"`{name}`" for name in objectives.index), objectives.iloc[0]
    search, final = comparison_table(runs, objective), final_table(runs, objective)
    export(search, out, "results")
    markdown = (
        f"{'Studies' if len(objectives) > 1 else 'Study'} {names}: best trial per loss on the validation "
        f"classes (objective: {objective}).\n\n" + to_markdown(search) + "\n"
    )
    if (final["loss"] != "untrained").any():  # the final stage ran
        export(final, out, "final", hyperparameters=False)  # the search table shows them
        markdown += (
            f"\nFinal stage: each loss's best configuration retrained per seed — {protocol_text(runs)} — and "
            "tested once on the test classes (mean ± 95% CI over seeds; p_vs_best: Welch's t-test against the "
            "best loss, * below 0.05)."
            "\n\n" + to_markdown(final) + "\n"
        )
    controlled, exploratory = claims_tables(runs, objective)
    export(controlled, out, "claims", shown=claims_text(controlled))
    export(exploratory, out, "exploratory_trends", shown=exploratory.astype(str))
    markdown += claims_markdown(controlled, exploratory)
    out.child("results.md").write_text(markdown)
    return markdown, search, final
