"""A study's report from MLflow alone: tables, pictures, hyperparameter analysis and the papers' claims,
as one self-contained HTML file plus the tables (CSV, Markdown, LaTeX, HTML) and figures (PNG, SVG),
also logged as artifacts of the study's parent MLflow run (``report/``) so they open from the UI.

It opens with its conclusion (:func:`analysis.headline.headline`): the winner on the test classes, its
margin over the runner-up with a 95% CI, and whether that is significant or why it is inconclusive."""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from analysis import plots
from analysis.claims import ABLATION, TREND_RULE, VERDICT_RULE
from analysis.environment import training_machines
from analysis.headline import headline
from analysis.hyper import (
    IMPORTANCE_COLUMNS,
    MIN_TRIALS,
    SENSITIVITY_COLUMNS,
    importance,
    sensitivity,
    too_few_trials,
)
from analysis.names import metric_label
from analysis.optuna_figures import load_journal, param_importances
from analysis.report import Section, built_with, render_html
from analysis.runs import load_history, load_parent_config, load_runs, load_search_spaces
from analysis.tables import (
    LR_COLUMNS,
    claims_tables,
    claims_text,
    export,
    formatted,
    metric_columns,
    protocol_text,
    write_tables,
)
from study.storage import Storage
from study.tracking import find_parent
from study.vocab import OPTUNA_JOURNAL, Stage

ARTIFACTS = "report"  # folder of the parent run's artifacts


def hyperparameter_analysis(
    runs: pd.DataFrame, objective: str, spaces: dict | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Importance and sensitivity of every searched loss, one frame each with a ``loss`` column, and
    one line per loss left out saying why (:func:`analysis.hyper.too_few_trials`), for the report to
    print instead: "importance and sensitivity not shown: 3 COMPLETE trials of multi_similarity, 10 needed"."""
    losses = runs.loc[runs["stage"] == Stage.SEARCH, "loss"].unique()
    imp, sens, notes = [], [], []
    for loss in losses:
        if (why := too_few_trials(runs, loss, objective)) is not None:
            notes.append(f"importance and sensitivity not shown: {why}")
            continue
        space = (spaces or {}).get(loss)  # the searched bounds, where the study logged them
        imp.append(importance(runs, loss, objective, space=space).assign(loss=loss))
        sens.append(sensitivity(runs, loss, objective, space=space).assign(loss=loss))
    columns_imp, columns_sens = ["loss", *IMPORTANCE_COLUMNS], ["loss", *SENSITIVITY_COLUMNS]
    return (
        pd.concat(imp)[columns_imp] if imp else pd.DataFrame(columns=columns_imp),
        pd.concat(sens)[columns_sens] if sens else pd.DataFrame(columns=columns_sens),
        notes,
    )


def hyperparameter_tables(
    runs: pd.DataFrame, objective: str, spaces: dict | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Importance and sensitivity, as :func:`hyperparameter_analysis` without the notes."""
    imp, sens, _ = hyperparameter_analysis(runs, objective, spaces)
    return imp, sens


def find_journal(name: str, config: dict, near: list[Path]) -> tuple[Path | None, str]:
    """The study's Optuna journal: ``optuna.journal`` in one of the ``near`` folders (the report's own
    output folder, usually the study folder) or in the study folder its config names (relative to
    here); else None and one line saying why, for the report to print."""
    search = config.get("search", {})
    if search.get("optuna_storage"):
        return None, "Optuna's figures not shown: the study kept its trials in a database (search.optuna_storage)."
    candidates = [*near, Path(str(config.get("output_dir", "runs"))) / name]
    for folder in candidates:
        if "://" not in str(folder) and (folder / OPTUNA_JOURNAL).is_file():
            return folder / OPTUNA_JOURNAL, ""
    where = ", ".join(str(folder / OPTUNA_JOURNAL) for folder in dict.fromkeys(candidates) if "://" not in str(folder))
    return None, f"Optuna's figures not shown: no Optuna journal here ({where}); run the report next to the study."


def study_only(table: pd.DataFrame, losses: list[str]) -> pd.DataFrame:
    """The rows of a claims or trends table about the study's own ``losses``."""
    return table[table["loss"].isin(losses)] if "loss" in table and len(table) else table


def _columns(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return table[[c for c in columns if c in table.columns]]


def build_report(name: str, tracking_uri: str | None, folder: Path, near: list[Path] = ()) -> str:
    """Write ``report.html``, the tables and ``figures/`` for study ``name`` into ``folder``; return
    the comparison tables as Markdown (``results.md``). ``near``: folders where the study's Optuna
    journal may be (:func:`find_journal`)."""
    runs = load_runs(name, tracking_uri)
    objective = runs["objective"].iloc[0]
    history = load_history(runs, tracking_uri)
    config = load_parent_config(name, tracking_uri)
    spaces = load_search_spaces(name, tracking_uri) or {}
    storage = Storage.at(str(folder))
    markdown, search, final = write_tables(runs, storage)  # and claims.*, exploratory_trends.*
    imp, sens, hyper_notes = hyperparameter_analysis(runs, objective, spaces)
    losses = list(config.get("search", {}).get("losses") or sorted(runs["loss"].dropna().unique()))
    claims, trends = (study_only(table, losses) for table in claims_tables(runs, objective))
    for table_name, table in {"importance": imp, "sensitivity": sens}.items():
        export(table, storage, table_name)
    verdict = headline(runs, final, objective, search)

    searched = sorted(runs.loc[runs["stage"] == Stage.SEARCH, "loss"].unique())
    figures = {"recall_at_k": plots.recall_at_k_curves(runs, objective)}
    if (per_seed := plots.final_per_seed(runs, objective)) is not None:
        figures["final_per_seed"] = per_seed
    figures["optimization_history"] = plots.optimization_history(runs, objective)
    figures["learning_curves"] = plots.learning_curves(runs, history, objective)
    slices = {}
    for loss in searched:
        figure = plots.hyperparameter_slices(runs, loss, objective, spaces.get(loss))
        if figure is not None:
            slices[loss] = figures[f"slices_{loss}"] = figure
    journal, journal_note = find_journal(name, config, list(near))
    optuna_importance = {}
    if journal is not None:
        for loss, study in load_journal(journal, name, searched).items():
            if (figure := param_importances(study, loss, objective)) is not None:
                optuna_importance[loss] = figures[f"optuna_importance_{loss}"] = figure
    for figure_name, figure in figures.items():
        plots.save_figure(figure, folder / "figures", figure_name)

    name_objective = metric_label(objective)
    cost = runs[["cpu_hours", "gpu_hours"]].sum()
    ablations = runs[runs["stage"].astype(str) == ABLATION]
    ablated = (
        f"; {len(ablations)} ablation runs testing {ablations['claim'].nunique()} of the papers' claims "
        f"({ablations['cpu_hours'].sum():.2f} CPU-hours, {ablations['gpu_hours'].sum():.2f} GPU-hours of the "
        "cost below)"
        if len(ablations)
        else ""
    )
    features = "FEATURE MODE: the trunk was frozen; only the embedding head and the loss trained. "
    mode = features if runs["mode"].iloc[0] == "features" else ""
    overview = (
        f"Study {name} on {runs['dataset'].iloc[0]}: {len(runs[runs['stage'] == Stage.SEARCH])} search trials over "
        f"{len(searched)} losses ({', '.join(searched)}), objective {name_objective} on the validation "
        f"classes; {len(runs[runs['stage'] == Stage.FINAL])} final-stage runs on the test classes{ablated}. "
        f"{mode}"
        f"Cost: {cost['cpu_hours']:.2f} CPU-hours, {cost['gpu_hours']:.2f} GPU-hours (wall time × resources per trial)."
        "\n\nBold: the best value of each column. Final-stage cells are the mean over seeds with its 95% CI below "
        "(Student's t); p vs best is Welch's t-test of the loss's per-seed objective against the best loss's "
        "(* below 0.05). Columns with the same value in every row are listed under a table's caption."
    )  # fmt: skip
    sections = [Section("Overview", overview)]
    metrics = metric_columns(runs)
    if (final["loss"] != "untrained").any():
        shown = formatted(final)
        key = [c for c in ("study", "dataset", "loss") if c in shown]
        sections.append(
            Section(
                "Final stage: test classes",
                f"Each loss's best configuration, retrained with several seeds — {protocol_text(runs)} — and "
                f"tested once. The headline above compares the best two on {name_objective}.",
                tables=[
                    ("Final stage (mean, 95% CI over seeds below it)",
                     _columns(shown, [*key, "seeds", *metrics, "p_vs_best"])),
                    ("Final stage: runs, protocol and cost",
                     _columns(shown, [*key, "protocol", "runs", "cpu_hours", "gpu_hours", "mode"])),
                ],
                figures=[(caption, figures[key]) for caption, key in (
                    (f"{name_objective} of each final seed", "final_per_seed"),
                    ("R@K on the test classes", "recall_at_k"),
                ) if key in figures],
            )
        )  # fmt: skip
    shown = formatted(search)
    key = [c for c in ("study", "dataset", "loss") if c in shown]
    sections.append(
        Section(
            "Search: validation classes",
            "The best trial of each loss, chosen on the validation classes.",
            tables=[
                ("Best trial per loss", _columns(shown, [*key, *metrics])),
                ("Best trial per loss: trials, hyperparameters and cost",
                 _columns(shown, [*key, "trials", "complete", "pruned", "failed", *LR_COLUMNS, "hyperparameters",
                                  "loss metrics", "cpu_hours", "gpu_hours", "mode"])),
            ],
            figures=[("Optimization history", figures["optimization_history"]),
                     ("Learning curves of the best trials", figures["learning_curves"])]
            + ([] if "final_per_seed" in figures else [("R@K of the best trials", figures["recall_at_k"])]),
        )
    )  # fmt: skip
    optuna_text = (
        "Optuna's own importance plot, from the study's journal (the hyperparameters' real distributions): "
        + ", ".join(optuna_importance)
        + "."
        if optuna_importance
        else journal_note
        or f"Optuna's importance plots not shown: no loss has {MIN_TRIALS} COMPLETE trials in the journal."
    )
    sections.append(
        Section(
            "Hyperparameters",
            "Importance: fANOVA on the COMPLETE search trials of each loss (sums to 1 per loss). Sensitivity: how "
            "much the objective falls, on average, in trials whose value lies more than a quarter of the searched "
            "range (spanned by all the loss's search trials) from the best trial's — a small drop means the loss is "
            f"robust to that hyperparameter. Both need {MIN_TRIALS} COMPLETE trials of a loss; the trial counts "
            "are shown. The slices' x axes are the searched ranges, on a log scale where the search space sampled "
            "one.\n\n" + "\n\n".join([*hyper_notes, optuna_text]),
            tables=[(caption, table) for caption, table in (("Importance", imp), ("Sensitivity", sens)) if len(table)],
            figures=[(f"{loss}: objective against each hyperparameter", fig) for loss, fig in slices.items()]
            + [(f"{loss}: hyperparameter importance (Optuna)", fig) for loss, fig in optuna_importance.items()],
        )
    )
    claims_shown = claims_text(claims)
    claims_shown["metric"] = claims_shown["metric"].map(metric_label)
    sections.append(
        Section(
            "The papers' claims: controlled experiments",
            VERDICT_RULE
            if len(claims)
            else "No ablation runs: the study tested none of the papers' claims as a controlled experiment.",
            tables=[("Claims (paired by seed, test classes)", claims_shown)] if len(claims) else [],
        )
    )
    if len(trends):
        sections.append(
            Section(
                "Exploratory trends in the search trials",
                TREND_RULE,
                tables=[("Exploratory trends (not controlled experiments)", trends)],
            )
        )
    sections.append(Section("Configuration", code=yaml.safe_dump(config, sort_keys=False)))
    sections.append(environment_section(runs))
    subtitle = f"dml-study report, built {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    page = render_html(f"Study {name}", sections, subtitle=subtitle, headline=(verdict.verdict, verdict.text))
    (folder / "report.html").write_text(page)
    return markdown


def environment_section(runs: pd.DataFrame) -> Section:
    """The machines that trained the study, as its runs recorded them (:mod:`study.machine`)."""
    hardware, software, unrecorded = training_machines(runs)
    missing = (
        f"{unrecorded} of {len(runs)} runs recorded no machine (the untrained baseline is evaluated outside a "
        "trial; runs logged by dml-study before it recorded machines have none)."
        if unrecorded
        else ""
    )
    text = (
        "The machines the trials trained on, as each trial's worker recorded them (its host, CPU, the CPUs and "
        "GPUs it was given, the NVIDIA driver) and the software that computed its numbers.\n\n"
        f"{missing}\n\n{built_with()}"
    )
    tables = [("Machines", hardware), ("Software", software)] if len(hardware) else []
    return Section("Environment: the training machines", text, tables=tables)


def write_report(name: str, tracking_uri: str | None, out: Storage) -> tuple[str, Storage]:
    """Build the report, copy it to ``out`` (a folder or an object-store URI) and log it as the
    parent run's ``report/`` artifacts. Returns the tables as Markdown and where report.html went."""
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        near = [Path(out.root)] if out.is_local else []
        markdown = build_report(name, tracking_uri, folder, near)
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            out.child(*file.relative_to(folder).parts).write_bytes(file.read_bytes())
        client = MlflowClient(tracking_uri=tracking_uri)
        client.log_artifacts(find_parent(client, name).info.run_id, str(folder), ARTIFACTS)
    return markdown, out.child("report.html")
