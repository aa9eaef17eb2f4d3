"""The study report end to end: a study with its final stage, `dml-study report`, the HTML opened in
headless Chromium, the artifacts in MLflow, and the analysis notebook executed against the study."""

from __future__ import annotations

import base64
import io
import os
import re
import socket
from html import unescape

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from study.cli import app
from tests.chromium import PRINT_WIDTH, ensure_chromium, render
from tests.conftest import REPO, TINY_STUDY, copy_mlflow_db, write_study

pytestmark = pytest.mark.slow  # real Ray studies

runner = CliRunner()


@pytest.fixture(scope="module")
def study(tmp_path_factory, ray_instance, migrated_mlflow_db):
    """A tiny study with a final stage (2 seeds), run once for the tests of this module."""
    folder = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{copy_mlflow_db(migrated_mlflow_db, folder / 'mlflow.db')}"
    old = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        search = {**TINY_STUDY["search"], "trials_per_loss": 4}
        result = runner.invoke(app, ["run", str(write_study(folder, search=search, final={"seeds": 2}))])
        assert result.exit_code == 0, result.output
        report = runner.invoke(app, ["report", "tiny"])
        assert report.exit_code == 0, report.output
        yield folder, uri, report.output
    finally:
        os.chdir(old[0])
        if old[1] is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old[1]


def test_report_renders_in_chromium_with_every_table_and_image(study):
    folder, _, output = study
    out = folder / "runs" / "tiny"
    html = out / "report.html"
    assert f"report: {html}" in output.replace(str(folder) + "/", "") or "report.html" in output
    page = html.read_text()
    text = unescape(re.sub(r"<[^>]+>", "", page))  # the page's text as shown
    assert "<link" not in page and 'src="http' not in page  # self-contained
    (folder / "chromium").mkdir(exist_ok=True)
    chromium = ensure_chromium()
    shown = render(html, folder / "chromium", chromium=chromium)
    printed = render(html, folder / "print", chromium=chromium, width=PRINT_WIDTH, print_media=True)
    for layout in (shown, printed):  # no table wider than the page, on screen (1400 px) or printed
        assert layout["too_wide"] == [] and layout["page_width"] <= layout["viewport_width"], layout
    assert shown["images"] >= 5 and shown["images_rendered"] == shown["images"]
    final, search = pd.read_csv(out / "final.csv"), pd.read_csv(out / "results.csv")
    # tables: the final stage and the search, each in two (metrics; runs, hyperparameters and cost), then
    # those with rows among importance and sensitivity (a loss with fewer than analysis.hyper.MIN_TRIALS
    # COMPLETE trials gets a line instead), the controlled claims (ablation runs) and the exploratory
    # trends; last the training machines and their software
    optional = [
        pd.read_csv(out / f"{name}.csv") for name in ("importance", "sensitivity", "claims", "exploratory_trends")
    ]
    rows = [len(final), len(final), len(search), len(search), *(len(table) for table in optional if len(table))]
    assert shown["tables"] == len(rows) + 2 and shown["body_rows"][: len(rows)] == rows
    assert "importance and sensitivity not shown: " in page  # 4 trials per loss: below the minimum
    assert "Optuna's importance plots not shown: no loss has 10 COMPLETE trials" in text  # the journal was found
    assert "Exploratory trends" in page
    best = final.iloc[0]
    assert f"{best.map_at_r:.4f} ± {best.map_at_r_ci:.4f}" in text  # the numbers are the study's
    assert "each seed trained on every training class" in page and "all classes" in page  # the protocol used
    # the headline: the final table's winner, its margin over the runner-up with a CI and a verdict
    [headline] = re.findall(r'<p class="headline (significant|inconclusive)" role="note">(.*?)</p>', page, re.S)
    assert headline[1].startswith(f"{best.loss} {'wins' if headline[0] == 'significant' else 'leads'}")
    assert "a margin of" in headline[1] and "95% CI [" in headline[1]
    assert "<th>R@1</th>" in page and "<th>MAP@R</th>" in page and "<th>recall_at_1</th>" not in page
    # the machines that trained, recorded by the trials' workers (here: this machine, no GPU)
    assert "Environment: the training machines" in page and f"<td>{socket.gethostname()}</td>" in page
    assert "1 of " in text and "runs recorded no machine" in text  # the untrained baseline
    for name in ("recall_at_k", "final_per_seed", "optimization_history", "learning_curves"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 0 and (out / "figures" / f"{name}.svg").exists()
    assert not list((out / "figures").glob("embeddings_pca.*"))  # the PCA panels showed nothing: dropped
    for table in ("results", "final", "importance", "sensitivity", "claims", "exploratory_trends"):
        assert {p.suffix for p in out.glob(f"{table}.*")} == {".csv", ".md", ".tex", ".html"}


def test_report_is_an_artifact_of_the_study_run(study):
    _, uri, _ = study
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`dml_study.role` = 'study'")
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/final.tex", "report/claims.md", "report/figures"} <= files


def test_notebook_rebuilds_the_tables_from_the_study(study, monkeypatch):
    """The jupytext notebook, converted and executed by a real Jupyter kernel against the study."""
    import jupytext
    from nbclient import NotebookClient

    folder, uri, _ = study
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DML_STUDY_NAME", "tiny")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports the analysis package
    notebook = jupytext.read(REPO / "analysis" / "notebooks" / "study.py")
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    images = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    # figures inline: final per seed, R@K, optimization history, learning curves, a slice per loss
    assert len(images) >= 6 and all(base64.b64decode(png).startswith(b"\x89PNG") for png in images)
    # tables as HTML: final, search, claims, trends (and the run counts)
    assert html.count("<table") >= 4
    final = pd.read_csv(folder / "runs" / "tiny" / "final.csv")
    assert f"{final.iloc[0].map_at_r:.4f} ± {final.iloc[0].map_at_r_ci:.4f}" in html  # the same table
    assert "<th" in html and ">MAP@R</th>" in html and "Easy positive sampling" in html
    assert f"{final.iloc[0].loss} " in html and "a margin of" in html  # the headline


def test_load_runs_and_history_are_tidy(study):
    from analysis.runs import load_history, load_runs

    _, uri, _ = study
    runs = load_runs(["tiny"], uri)
    assert set(runs["stage"]) == {"baseline", "search", "final", "ablation"} and (runs["study"] == "tiny").all()
    assert len(runs[runs["stage"] == "search"]) == 8 and len(runs[runs["stage"] == "final"]) == 4  # 2 losses × 2 seeds
    assert (runs["wall_seconds"] > 0).all() and (runs["cpu_hours"] == runs["wall_seconds"] / 3600).all()
    assert (runs["gpu_hours"] == 0).all() and (runs["mode"] == "finetune").all()
    assert {"param.alpha", "param.seed", "recall_at_1", "map_at_r"} <= set(runs.columns)
    trained = runs[runs["stage"] != "baseline"]  # every loss trained at the study's lr (1e-3), none searched it
    assert (trained["lr"] == 1e-3).all()
    assert trained.loc[trained["loss"] == "multi_similarity", "loss_lr"].isna().all()  # MS has no parameters
    ns = trained[trained["loss"] == "normalized_softmax"]  # its class weights: lr × the searched multiplier
    assert np.allclose(ns["loss_lr"], 1e-3 * ns["param.loss_lr_mult"].astype(float))
    history = load_history(runs, uri)
    client = MlflowClient(uri)
    one = runs[runs["state"] == "COMPLETE"].iloc[0]
    expected = [(m.step, m.value) for m in client.get_metric_history(one.run_id, "map_at_r")]
    mine = history[(history["run_id"] == one.run_id) & (history["metric"] == "map_at_r")]
    assert list(zip(mine["epoch"], mine["value"], strict=True)) == sorted(expected)
    assert set(history["metric"]) >= {"map_at_r", "train_loss", "epoch_seconds"}


@pytest.fixture(scope="module")
def two_studies(study):
    """The module's study and a second, in feature mode, in the same tracking store."""
    folder, uri, _ = study
    old = os.getcwd()
    os.chdir(folder)
    try:
        path = write_study(
            folder,
            name="tiny_features",
            search={**TINY_STUDY["search"], "trials_per_loss": 2},
            train={**TINY_STUDY["train"], "mode": "features"},
            final={"seeds": 2},
            ablations=False,  # what is compared: the search and final tables
        )
        result = runner.invoke(app, ["run", str(path)], env={"MLFLOW_TRACKING_URI": uri})
        assert result.exit_code == 0, result.output
        yield folder, uri
    finally:
        os.chdir(old)


def test_compare_puts_several_studies_in_one_table(two_studies):
    from analysis.runs import load_runs
    from analysis.tables import IncomparableStudiesError, comparison_table, final_table, formatted, write_tables
    from study.storage import Storage

    folder, uri = two_studies
    out = folder / "cmp"
    result = runner.invoke(app, ["compare", "tiny", "tiny_features", "--out", str(out), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "Studies `tiny`, `tiny_features`" in result.output
    for name in ("results", "final"):
        assert {p.name for p in out.glob(f"{name}.*")} == {f"{name}.{s}" for s in ("csv", "md", "tex", "html")}
    search, final = pd.read_csv(out / "results.csv"), pd.read_csv(out / "final.csv")
    for combined, build in ((search, comparison_table), (final, final_table)):
        assert list(combined.columns[:3]) == ["study", "dataset", "loss"]
        assert list(combined["study"].unique()) == ["tiny", "tiny_features"]  # grouped, in the order given
        for name, mode in (("tiny", "finetune"), ("tiny_features", "features")):
            alone = build(load_runs(name, uri), "map_at_r")  # each study's rows are its own table's rows
            alone = pd.read_csv(io.StringIO(alone.to_csv(index=False)))  # as the file keeps it
            mine = combined[combined["study"] == name].drop(columns=["study", "dataset"]).reset_index(drop=True)
            pd.testing.assert_frame_equal(mine, alone[mine.columns], check_dtype=False)
            assert (mine["mode"] == mode).all()  # feature mode labelled per study
        shown = formatted(combined)
        for name in ("tiny", "tiny_features"):  # the best value is marked within each study
            assert shown["map_at_r"][combined["study"] == name].str.startswith("**").sum() == 1

    runs = load_runs(["tiny", "tiny_features"], uri)
    runs.loc[runs["study"] == "tiny_features", "objective"] = "recall_at_1"
    with pytest.raises(IncomparableStudiesError, match=r"tiny \(map_at_r\), tiny_features \(recall_at_1\)"):
        write_tables(runs, Storage.at(str(folder / "never")))
    assert not (folder / "never").exists()
    for args, message in (
        (["tiny"], "two or more different studies"),
        (["tiny", "nosuch"], "no study named 'nosuch'"),
    ):
        result = runner.invoke(app, ["compare", *args, "--out", str(folder / "never"), "--tracking-uri", uri])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (folder / "never").exists()
