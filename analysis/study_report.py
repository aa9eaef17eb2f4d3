"""A study's report from MLflow alone: tables, pictures, hyperparameter analysis and the papers' claims,
as one self-contained HTML file plus the tables (CSV, Markdown, LaTeX, HTML) and figures (PNG, SVG),
also logged as artifacts of the study's parent MLflow run (``report/``) so they open from the UI."""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from analysis import plots
from analysis.claims import ABLATION, TREND_RULE, VERDICT_RULE
from analysis.hyper import (
    IMPORTANCE_COLUMNS,
    MIN_TRIALS,
    SENSITIVITY_COLUMNS,
    importance,
    sensitivity,
    too_few_trials,
)
from analysis.names import as_test_name
from analysis.report import Section, environment_info, render_html
from analysis.runs import find_parent, load_history, load_parent_config, load_runs
from analysis.tables import claims_tables, claims_text, export, formatted, protocol_text, write_tables
from study.storage import Storage
from study.vocab import EMBEDDINGS_ARTIFACT, Stage, State, read_embeddings

ARTIFACTS = "report"  # folder of the parent run's artifacts


def hyperparameter_analysis(runs: pd.DataFrame, objective: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Importance and sensitivity of every searched loss, one frame each with a ``loss`` column, and
    one line per loss left out saying why (:func:`analysis.hyper.too_few_trials`), for the report to
    print instead: "importance and sensitivity not shown: 3 COMPLETE trials of multi_similarity, 10 needed"."""
    losses = runs.loc[runs["stage"] == Stage.SEARCH, "loss"].unique()
    imp, sens, notes = [], [], []
    for loss in losses:
        if (why := too_few_trials(runs, loss, objective)) is not None:
            notes.append(f"importance and sensitivity not shown: {why}")
            continue
        imp.append(importance(runs, loss, objective).assign(loss=loss))
        sens.append(sensitivity(runs, loss, objective).assign(loss=loss))
    columns_imp, columns_sens = ["loss", *IMPORTANCE_COLUMNS], ["loss", *SENSITIVITY_COLUMNS]
    return (
        pd.concat(imp)[columns_imp] if imp else pd.DataFrame(columns=columns_imp),
        pd.concat(sens)[columns_sens] if sens else pd.DataFrame(columns=columns_sens),
        notes,
    )


def hyperparameter_tables(runs: pd.DataFrame, objective: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Importance and sensitivity, as :func:`hyperparameter_analysis` without the notes."""
    imp, sens, _ = hyperparameter_analysis(runs, objective)
    return imp, sens


def best_embeddings(runs: pd.DataFrame, objective: str, tracking_uri: str | None) -> dict:
    """Per loss, the test embeddings (and labels) of its best final-stage run, where they were kept."""
    client = MlflowClient(tracking_uri=tracking_uri)
    tested = as_test_name(objective)  # what final runs log their test score as
    final = runs[(runs["stage"] == Stage.FINAL) & (runs["state"] == State.COMPLETE)]
    final = final.dropna(subset=[tested]) if tested in final else final.iloc[:0]
    found = {}
    for loss, group in final.groupby("loss"):
        run_id = group.loc[group[tested].idxmax(), "run_id"]
        if EMBEDDINGS_ARTIFACT not in {a.path for a in client.list_artifacts(run_id)}:
            continue
        with tempfile.TemporaryDirectory() as folder:
            data = read_embeddings(Path(client.download_artifacts(run_id, EMBEDDINGS_ARTIFACT, folder)).read_bytes())
        found[loss] = (data["test"], data["test_labels"])
    return found


def build_report(name: str, tracking_uri: str | None, folder: Path) -> str:
    """Write ``report.html``, the tables and ``figures/`` for study ``name`` into ``folder``; return
    the comparison tables as Markdown (``results.md``)."""
    runs = load_runs(name, tracking_uri)
    objective = runs["objective"].iloc[0]
    history = load_history(runs, tracking_uri)
    config = load_parent_config(name, tracking_uri)
    storage = Storage.at(str(folder))
    markdown, search, final = write_tables(runs, storage)  # and claims.*, exploratory_trends.*
    imp, sens, hyper_notes = hyperparameter_analysis(runs, objective)
    claims, trends = claims_tables(runs, objective)
    for table_name, table in {"importance": imp, "sensitivity": sens}.items():
        export(table, storage, table_name)

    colours = plots.loss_colours(sorted(runs["loss"].dropna().unique()))
    figures = {"recall_at_k": plots.recall_at_k_curves(runs, objective)}
    embeddings = best_embeddings(runs, objective, tracking_uri)
    if embeddings:
        figures["embeddings_pca"] = plots.embedding_projection(embeddings, colours)
    figures["optimization_history"] = plots.optimization_history(runs, objective)
    figures["learning_curves"] = plots.learning_curves(runs, history, objective)
    slices = {}
    for loss in sorted(runs.loc[runs["stage"] == Stage.SEARCH, "loss"].unique()):
        figure = plots.hyperparameter_slices(runs, loss, objective)
        if figure is not None:
            slices[loss] = figures[f"slices_{loss}"] = figure
    for figure_name, figure in figures.items():
        plots.save_figure(figure, folder / "figures", figure_name)

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
        f"{runs.loc[runs['stage'] == Stage.SEARCH, 'loss'].nunique()} losses, objective {objective} on the validation "
        f"classes; {len(runs[runs['stage'] == Stage.FINAL])} final-stage runs on the test classes{ablated}. "
        f"{mode}"
        f"Cost: {cost['cpu_hours']:.2f} CPU-hours, {cost['gpu_hours']:.2f} GPU-hours (wall time × resources per trial)."
        "\n\nBold: the best value of each column. Final-stage cells are mean ± 95% CI over seeds (Student's t); "
        "p_vs_best is Welch's t-test of the loss's per-seed objective against the best loss's (* below 0.05)."
    )  # fmt: skip
    sections = [Section("Overview", overview)]
    if (final["loss"] != "untrained").any():
        sections.append(
            Section(
                "Final stage: test classes",
                f"Each loss's best configuration, retrained with several seeds — {protocol_text(runs)} — and "
                "tested once.",
                tables=[("Final stage (mean ± 95% CI over seeds)", formatted(final, hyperparameters=False))],
                figures=[("Recall@K on the test classes", figures["recall_at_k"])]
                + ([("2-D PCA of the best model's test embeddings", figures["embeddings_pca"])] if embeddings else []),
            )
        )
    sections.append(
        Section(
            "Search: validation classes",
            "The best trial of each loss, chosen on the validation classes.",
            tables=[("Best trial per loss", formatted(search))],
            figures=[("Optimization history", figures["optimization_history"]),
                     ("Learning curves of the best trials", figures["learning_curves"])],
        )
    )  # fmt: skip
    sections.append(
        Section(
            "Hyperparameters",
            "Importance: fANOVA on the COMPLETE search trials of each loss (sums to 1 per loss). Sensitivity: how "
            "much the objective falls, on average, in trials whose value lies more than a quarter of the searched "
            "range (spanned by all the loss's search trials) from the best trial's — a small drop means the loss is "
            f"robust to that hyperparameter. Both need {MIN_TRIALS} COMPLETE trials of a loss; the trial counts "
            "are shown.\n\n" + "\n\n".join(hyper_notes),
            tables=[(caption, table) for caption, table in (("Importance", imp), ("Sensitivity", sens)) if len(table)],
            figures=[(f"{loss}: objective against each hyperparameter", fig) for loss, fig in slices.items()],
        )
    )
    sections.append(
        Section(
            "The papers' claims: controlled experiments",
            VERDICT_RULE
            if len(claims)
            else "No ablation runs: the study tested none of the papers' claims as a controlled experiment.",
            tables=[("Claims (paired by seed, test classes)", claims_text(claims))] if len(claims) else [],
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
    environment = pd.DataFrame(environment_info().items(), columns=["component", "version"])
    sections.append(
        Section("Environment (where this report was built)", tables=[("Versions and machine", environment)])
    )
    subtitle = f"dml-study report, built {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    (folder / "report.html").write_text(render_html(f"Study {name}", sections, subtitle=subtitle))
    return markdown


def write_report(name: str, tracking_uri: str | None, out: Storage) -> tuple[str, Storage]:
    """Build the report, copy it to ``out`` (a folder or an object-store URI) and log it as the
    parent run's ``report/`` artifacts. Returns the tables as Markdown and where report.html went."""
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        markdown = build_report(name, tracking_uri, folder)
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            out.child(*file.relative_to(folder).parts).write_bytes(file.read_bytes())
        client = MlflowClient(tracking_uri=tracking_uri)
        client.log_artifacts(find_parent(client, name).info.run_id, str(folder), ARTIFACTS)
    return markdown, out.child("report.html")
