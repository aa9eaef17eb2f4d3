"""The report figures from hand-made runs / history frames: the data each figure draws, not just that it ran."""

from __future__ import annotations

import base64
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer
from scipy import stats
from sklearn.decomposition import PCA

from analysis import plots

KS = [1, 2, 4, 8]
REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _search(loss, number, state, value, **params):
    """A search trial: map_at_r = value, recall_at_k = value + k / 100."""
    recalls = {f"recall_at_{k}": value + k / 100 for k in KS}
    return {
        "run_id": f"id-{loss}-{number}",
        "run_name": f"{loss}-{number}",
        "trial": f"{loss}/{number}",
        "loss": loss,
        "stage": "search",
        "state": state,
        "map_at_r": value,
        **recalls,
        **{f"param.{k}": v for k, v in params.items()},
    }


def _final(loss, seed, recall, fold=None):
    """A final-stage run with test_recall_at_k = recall * k (test classes: test_<metric>)."""
    return {
        "run_id": f"id-{loss}-s{seed}-f{fold}",
        "trial": f"{loss}/final/0/s{seed}" + ("" if fold is None else f"-f{fold}"),
        "loss": loss,
        "stage": "final",
        "state": "COMPLETE",
        "test_map_at_r": recall,
        **{f"test_recall_at_{k}": recall * k for k in KS},
        "param.seed": str(seed),
        "param.fold": None if fold is None else str(fold),
    }


# ms: Optuna numbers out of row order (10 after 5, not after 1), a PRUNED trial better than every
# COMPLETE one, a FAIL; alpha spans 1000x (log axis), beta 4x (linear), positive is categorical,
# margin never varies. ns: one varying hyperparameter. contrastive: nothing varies.
MS = [
    _search("ms", 3, "COMPLETE", 0.40, alpha="0.1", beta="2", positive="easy", margin="0.1"),
    _search("ms", 0, "COMPLETE", 0.30, alpha="0.01", beta="1", positive="all", margin="0.1"),
    _search("ms", 10, "COMPLETE", 0.45, alpha="10.0", beta="4", positive="easy", margin="0.1"),
    _search("ms", 1, "PRUNED", 0.50, alpha="1.0", beta="3", positive="all", margin="0.1"),
    _search("ms", 2, "COMPLETE", 0.25, alpha="0.5", beta="1.5", positive="all", margin="0.1"),
    _search("ms", 4, "FAIL", float("nan"), alpha="2.0", beta="2.5", positive="easy", margin="0.1"),
    _search("ms", 5, "COMPLETE", 0.35, alpha="5.0", beta="3.5", positive="all", margin="0.1"),
]
NS = [
    _search("ns", 0, "COMPLETE", 0.20, temperature="0.05", scale="1.0"),
    _search("ns", 1, "PRUNED", 0.10, temperature="0.5", scale="1.0"),
    _search("ns", 2, "COMPLETE", 0.22, temperature="0.1", scale="1.0"),
]
CONTRASTIVE = [_search("contrastive", 0, "COMPLETE", 0.15, pos_margin="0.0")]
BASELINE = {
    "run_id": "id-base",
    "trial": "untrained",
    "loss": "untrained",
    "stage": "baseline",
    "state": "COMPLETE",
    **{f"recall_at_{k}": 0.01 * k for k in KS},
    **{f"test_recall_at_{k}": 0.02 * k for k in KS},
}
# ms: 3 seeds; ns: 2 seeds x 2 folds, one fold run missing (the folds of a seed averaged first, so
# seed 2 counts once, not half); contrastive: 1 seed
FINAL = [
    _final("ms", 1, 0.10),
    _final("ms", 2, 0.11),
    _final("ms", 3, 0.15),
    _final("ns", 1, 0.08, fold=0),
    _final("ns", 1, 0.10, fold=1),
    _final("ns", 2, 0.06, fold=0),
    _final("contrastive", 1, 0.05),
]


def _runs(final: bool = True) -> pd.DataFrame:
    rows = MS + NS + CONTRASTIVE + [BASELINE] + (FINAL if final else [])
    runs = pd.DataFrame(rows)
    first = ["loss", "stage", "recall_at_8"]  # K columns out of order: the curves must sort them
    runs = runs[first + [c for c in runs.columns if c not in first]]
    params = [c for c in runs.columns if c.startswith("param.")]
    runs[params] = runs[params].astype("string")  # MLflow params come back as strings
    runs["study"], runs["objective"] = "s", "map_at_r"
    return runs


def _axes_titled(fig, title):
    return next(ax for ax in fig.axes if ax.get_title().split(" ")[0].split("\n")[0] == title)


def test_loss_colours_sorted_distinct_baseline_black():
    colours = plots.loss_colours(["ns", "ms", "contrastive", "untrained", "ms"])
    assert list(colours) == ["contrastive", "ms", "ns", "untrained"]
    assert len({colours["contrastive"], colours["ms"], colours["ns"], colours["untrained"]}) == 4
    assert colours["untrained"] == "#000000"
    many = plots.loss_colours([f"loss{i:02d}" for i in range(18)])
    assert len(set(many.values()) - {"#000000"}) == 18  # tab20 without its two greys


def test_optimization_history_best_so_far_is_cumulative_max_of_complete_in_trial_order():
    fig = plots.optimization_history(_runs(), "map_at_r")
    assert len(fig.axes) == 3 and "MAP@R" in fig.get_suptitle()
    ax = _axes_titled(fig, "ms")
    best = next(line for line in ax.get_lines() if line.get_drawstyle() == "steps-post")
    np.testing.assert_array_equal(best.get_xdata(), [0, 2, 3, 5, 10])
    np.testing.assert_allclose(best.get_ydata(), [0.30, 0.30, 0.40, 0.40, 0.45])
    hollow = [line for line in ax.get_lines() if line.get_markerfacecolor() == "none"]
    assert len(hollow) == 1
    np.testing.assert_array_equal(hollow[0].get_xdata(), [1])  # the PRUNED trial, not in best-so-far
    np.testing.assert_allclose(hollow[0].get_ydata(), [0.50])
    assert "1 failed" in ax.get_title()
    assert fig.axes[0].get_ylabel() == "MAP@R" and ax.get_xlabel().startswith("trial")  # y label: first column


def test_recall_at_k_final_stage_means_over_seeds_with_ci_bars_from_two_seeds():
    fig = plots.recall_at_k_curves(_runs())
    ax = fig.axes[0]
    assert "test classes, final stage" in ax.get_title()
    lines = {line.get_label().split(" ")[0]: line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"ms", "ns", "contrastive", "untrained"}
    ms_seeds = np.array([0.10, 0.11, 0.15])
    ns_seeds = np.array([(0.08 + 0.10) / 2, 0.06])  # folds averaged within a seed, then over seeds: 0.075
    expected = {"ms": ms_seeds.mean(), "ns": ns_seeds.mean(), "contrastive": 0.05}
    for loss, scale in expected.items():
        np.testing.assert_array_equal(lines[loss].get_xdata(), KS)
        np.testing.assert_allclose(lines[loss].get_ydata(), scale * np.array(KS))
    np.testing.assert_allclose(lines["untrained"].get_ydata(), 0.02 * np.array(KS))  # test_ columns
    assert lines["ms"].get_label() == "ms (3 seeds)" and lines["ns"].get_label() == "ns (2 seeds)"
    assert lines["contrastive"].get_label() == "contrastive (1 seed)"
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert sorted(c.get_label().removeprefix("_ci ") for c in bars) == ["ms", "ns"]  # none for 1 seed
    for loss, seeds in (("ms", ms_seeds), ("ns", ns_seeds)):  # 95% CI half-widths, Student's t over seeds
        container = next(c for c in bars if c.get_label() == f"_ci {loss}")
        half = [(seg[1, 1] - seg[0, 1]) / 2 for seg in container.lines[2][0].get_segments()]
        expected_half = [stats.t.ppf(0.975, len(seeds) - 1) * (seeds * k).std(ddof=1) / np.sqrt(len(seeds)) for k in KS]
        np.testing.assert_allclose(half, expected_half)
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == KS


def test_recall_at_k_without_final_stage_uses_best_complete_trial_on_validation():
    fig = plots.recall_at_k_curves(_runs(final=False))
    ax = fig.axes[0]
    assert "validation classes, best trial" in ax.get_title()
    lines = {line.get_label(): line for line in ax.get_lines()}
    # ms: the COMPLETE trial 10 (0.45), not the PRUNED 0.50
    np.testing.assert_allclose(lines["ms"].get_ydata(), 0.45 + np.array(KS) / 100)
    np.testing.assert_allclose(lines["ns"].get_ydata(), 0.22 + np.array(KS) / 100)
    np.testing.assert_allclose(lines["untrained"].get_ydata(), 0.01 * np.array(KS))  # validation columns
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_recall_at_k_detects_other_ks():
    runs = _runs().drop(columns=[f"{prefix}recall_at_{k}" for k in (2, 4) for prefix in ("", "test_")])
    runs["test_recall_at_1000"] = 0.9
    ax = plots.recall_at_k_curves(runs).axes[0]
    line = next(line for line in ax.get_lines() if line.get_label().startswith("ms"))
    np.testing.assert_array_equal(line.get_xdata(), [1, 8, 1000])


def test_hyperparameter_slices_one_panel_per_varying_hyperparameter():
    fig = plots.hyperparameter_slices(_runs(), "ms", "map_at_r")
    # margin never varies; a log axis says so
    assert [ax.get_xlabel() for ax in fig.axes] == ["alpha (log scale)", "beta", "positive"]
    alpha, beta, positive = fig.axes
    assert alpha.get_xscale() == "log" and beta.get_xscale() == "linear"
    assert [t.get_text() for t in positive.get_xticklabels()] == ["all", "easy"]
    star = next(line for line in alpha.get_lines() if line.get_marker() == "*")
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (10.0, 0.45)  # best COMPLETE trial, not the PRUNED
    star = next(line for line in positive.get_lines() if line.get_marker() == "*")
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (1.0, 0.45)  # "easy"
    drawn = np.concatenate([line.get_xdata() for line in alpha.get_lines() if line.get_marker() == "o"])
    assert sorted(drawn) == [0.01, 0.1, 0.5, 1.0, 5.0, 10.0]  # the FAIL trial has no objective to draw
    assert alpha.get_ylabel() == "MAP@R"


def test_hyperparameter_slices_none_when_nothing_varies_and_symlog_with_zeros():
    runs = _runs()
    assert plots.hyperparameter_slices(runs, "contrastive", "map_at_r") is None
    assert [ax.get_xlabel() for ax in plots.hyperparameter_slices(runs, "ns", "map_at_r").axes] == ["temperature"]
    runs.loc[(runs["loss"] == "ns") & (runs["stage"] == "search"), "param.temperature"] = ["0.0", "0.001", "0.5"]
    assert plots.hyperparameter_slices(runs, "ns", "map_at_r").axes[0].get_xscale() == "symlog"


def test_hyperparameter_slices_follow_the_log_params_tag():
    runs = _runs().assign(log_params="")
    runs.loc[runs["loss"] == "ms", "log_params"] = "beta,other"  # beta spans 4x, alpha 1000x
    alpha, beta, _ = plots.hyperparameter_slices(runs, "ms", "map_at_r").axes
    assert alpha.get_xscale() == "linear" and beta.get_xscale() == "log"
    runs.loc[runs["loss"] == "ns", "log_params"] = "temperature"
    runs.loc[(runs["loss"] == "ns") & (runs["stage"] == "search"), "param.temperature"] = ["0.0", "0.05", "0.5"]
    assert plots.hyperparameter_slices(runs, "ns", "map_at_r").axes[0].get_xscale() == "symlog"  # 0 kept in view


def test_hyperparameter_slices_take_scale_and_range_from_the_search_space():
    """The logged search space wins over the tag and the data: its scale, its whole range, its choices."""
    runs = _runs().assign(log_params="alpha")  # the tag says alpha; the space says beta
    space = {
        "alpha": {"type": "float", "low": 0.001, "high": 20.0, "log": False},
        "beta": {"type": "float", "low": 0.5, "high": 8.0, "log": True},
        "positive": {"type": "categorical", "choices": ["easy", "all"]},
    }
    alpha, beta, positive = plots.hyperparameter_slices(runs, "ms", "map_at_r", space).axes
    assert alpha.get_xscale() == "linear" and beta.get_xscale() == "log"
    low, high = beta.get_xlim()
    assert low < 0.5 and high > 8.0 and low > 0.4 and high < 10  # the searched range, not just the trials' 1..4
    low, high = alpha.get_xlim()
    assert low < 0.001 and high > 20.0
    assert [t.get_text() for t in positive.get_xticklabels()] == ["easy", "all"]  # the space's order
    star = next(line for line in positive.get_lines() if line.get_marker() == "*")
    assert star.get_xdata()[0] == 0.0  # the best trial's "easy" is the first category now
    zero = {"temperature": {"type": "float", "low": 0.01, "high": 1.0, "log": True, "zero": True}}
    ns = plots.hyperparameter_slices(runs, "ns", "map_at_r", zero).axes[0]
    assert ns.get_xscale() == "symlog" and ns.get_xlabel() == "temperature (log scale, 0 allowed)"


def test_final_per_seed_draws_each_seed_and_the_mean_with_its_ci():
    runs = _runs()
    runs.loc[runs["stage"] == "baseline", "test_map_at_r"] = 0.01
    fig = plots.final_per_seed(runs, "map_at_r")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["contrastive (1 seeds)", "ns (2 seeds)", "ms (3 seeds)"]  # best at the top
    colours = plots.loss_colours(runs["loss"])
    seeds = {
        loss: sorted(np.concatenate([line.get_xdata() for line in ax.get_lines()
                                     if line.get_label() == "_seeds" and to_hex(line.get_markeredgecolor()) == c]))
        for loss, c in colours.items() if loss != "untrained"
    }  # fmt: skip
    assert seeds["ms"] == [0.10, 0.11, 0.15] and seeds["ns"] == [0.06, 0.09] and seeds["contrastive"] == [0.05]
    ms = next(c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.get_label() == "_mean ms")
    np.testing.assert_allclose(np.asarray(ms.lines[0].get_xdata(), float), [np.mean([0.10, 0.11, 0.15])])
    segment = ms.lines[2][0].get_segments()[0]
    half = stats.t.ppf(0.975, 2) * np.std([0.10, 0.11, 0.15], ddof=1) / np.sqrt(3)
    np.testing.assert_allclose((segment[1, 0] - segment[0, 0]) / 2, half)
    baseline = [line for line in ax.get_lines() if line.get_label() == "untrained"]
    assert len(baseline) == 1 and list(baseline[0].get_xdata()) == [0.01, 0.01]
    assert ax.get_xlabel() == "MAP@R on the test classes"
    assert plots.final_per_seed(_runs(final=False), "map_at_r") is None


def test_search_trials_are_numbered_by_their_trial_key():
    runs = _runs()
    runs.loc[runs["trial"] == "ms/10", "trial"] = "not a key"
    search = plots._search(runs)
    assert search.loc[search["loss"] == "ms", "number"].tolist()[:6] == [0, 1, 2, 3, 4, 5]
    assert np.isnan(search.loc[search["run_name"] == "ms-10", "number"].iloc[0])


def test_learning_curves_draw_the_best_trials_history():
    epochs = [1, 2, 3]
    history = pd.DataFrame(
        [("id-ms-10", "ms", e, "map_at_r", 0.1 * e) for e in epochs]
        + [("id-ms-10", "ms", e, "train_loss", 5.0 / e) for e in epochs]
        + [("id-ms-1", "ms", e, "map_at_r", 0.9) for e in epochs]  # the PRUNED trial, better but not eligible
        + [("id-ns-2", "ns", e, "map_at_r", 0.05 * e) for e in reversed(epochs)]
        + [("id-ns-2", "ns", e, "train_loss", 0.01 * e) for e in epochs],
        columns=["run_id", "loss", "epoch", "metric", "value"],
    )
    fig = plots.learning_curves(_runs(), history, "map_at_r")
    objective, train = fig.axes
    assert objective.get_ylabel() == "MAP@R" and train.get_ylabel() == "training loss"
    ms = [line for line in objective.get_lines() if line.get_label() == "ms (trial 10)"]
    np.testing.assert_array_equal(ms[0].get_xdata(), epochs)
    np.testing.assert_allclose(ms[0].get_ydata(), [0.1, 0.2, 0.3])
    ns = next(line for line in objective.get_lines() if line.get_label() == "ns (trial 2)")
    np.testing.assert_allclose(ns.get_ydata(), [0.05, 0.10, 0.15])  # sorted by epoch
    ms_colour = ms[0].get_color()
    train_ms = next(line for line in train.get_lines() if line.get_color() == ms_colour)
    np.testing.assert_allclose(train_ms.get_ydata(), [5.0, 2.5, 5.0 / 3])
    assert train.get_yscale() == "log"  # 0.01 … 5: 500x apart


def test_embedding_projection_is_sklearn_pca_of_the_top_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(25), np.r_[np.full(20, 6), np.full(5, 3)])  # 20 frequent classes, 5 rare
    vectors = rng.normal(size=(len(labels), 8)) + labels[:, None] * 0.1
    small = rng.normal(size=(30, 4)), np.repeat([0, 1, 2], 10)
    fig = plots.embedding_projection({"ms": (vectors, labels), "ns": small})
    ax = _axes_titled(fig, "ms")
    pca = PCA(n_components=2).fit(vectors)
    keep = labels < 20
    np.testing.assert_allclose(ax.collections[0].get_offsets(), pca.transform(vectors)[keep])
    ratio = pca.explained_variance_ratio_
    assert f"PC1 {ratio[0]:.1%}, PC2 {ratio[1]:.1%}" in ax.get_title()
    assert "20 most frequent of 25 classes" in ax.get_title()
    assert "all 3 classes" in _axes_titled(fig, "ns").get_title()
    assert len({tuple(c) for c in ax.collections[0].get_facecolors()}) == 20  # one colour per class shown


def test_a_loss_keeps_its_colour_across_figures():
    runs = _runs()
    history = plots.optimization_history(runs, "map_at_r")
    recall = plots.recall_at_k_curves(runs)
    slices = plots.hyperparameter_slices(runs, "ns", "map_at_r")
    embeddings = plots.embedding_projection({"ns": (np.eye(4), np.arange(4))}, plots.loss_colours(runs["loss"]))
    expected = plots.loss_colours(runs["loss"])["ns"]
    colours = {
        to_hex(_axes_titled(history, "ns").get_lines()[0].get_markeredgecolor()),
        to_hex(next(line for line in recall.axes[0].get_lines() if line.get_label().startswith("ns")).get_color()),
        to_hex(slices.axes[0].get_lines()[0].get_markeredgecolor()),
        to_hex(embeddings.axes[0].title.get_color()),
    }
    assert colours == {expected}
    assert expected != plots.loss_colours(runs["loss"])["ms"]


def test_save_figure_and_inline_exports(tmp_path):
    fig = plots.recall_at_k_curves(_runs())
    png, svg = plots.save_figure(fig, tmp_path / "figures", "recall")
    assert (png.name, svg.name) == ("recall.png", "recall.svg")
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 1000
    root = ET.fromstring(svg.read_bytes())
    assert root.tag.endswith("svg")
    inline = plots.figure_to_svg(fig)
    assert inline.startswith("<svg") and ET.fromstring(inline).tag.endswith("svg")
    assert base64.b64decode(plots.figure_to_png_base64(fig)).startswith(PNG_MAGIC)


def test_plots_import_neither_torch_nor_pyplot():
    code = "import sys, analysis.plots; print(sorted({'torch', 'matplotlib.pyplot'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
