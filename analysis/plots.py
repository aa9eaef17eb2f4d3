"""Figures for a study report, drawn from the :func:`analysis.runs.load_runs` / :func:`load_history` frames.

Each function takes DataFrames (or arrays) and returns a :class:`matplotlib.figure.Figure` on the Agg
canvas: no pyplot, no global state, nothing to close. Every loss keeps one colour in every figure
(:func:`loss_colours`, sorted loss order). :func:`save_figure`, :func:`figure_to_svg` and
:func:`figure_to_png_base64` are the I/O edge. One study per frame: filter ``runs[runs.study == name]``.
"""

from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, ScalarFormatter
from matplotlib.transforms import ScaledTranslation
from sklearn.decomposition import PCA

from analysis.names import TEST_PREFIX, final_column, metric_label
from analysis.runs import best_trial, complete_search, is_log_scale
from analysis.tables import mean_ci, seed_means
from study.vocab import Stage, State, TrialKey

WIDTH = 10.0  # inches: one report column
BASELINE = "untrained"  # the baseline row's loss; drawn grey, never takes a palette colour
BASELINE_COLOUR = "#000000"
_GREYS = {"tab10": {7}, "tab20": {14, 15}}  # left out of the palette: grey reads as "faded" or as the baseline
MAX_CLASSES = 20  # classes shown in an embedding projection (tab20 has 20 distinct colours)
DPI = 120
_RECALL = re.compile(r"recall_at_(\d+)")


def loss_colours(losses) -> dict[str, str]:
    """One hex colour per loss, in sorted loss order: tab10 without its grey for up to 9 losses, tab20
    without its greys beyond (cycling past 18); the ``untrained`` baseline is black."""
    names = sorted({str(loss) for loss in losses if pd.notna(loss)} - {BASELINE})
    name = "tab10" if len(names) <= 9 else "tab20"
    cmap = colormaps[name]
    palette = [to_hex(cmap(i)) for i in range(cmap.N) if i not in _GREYS[name]]
    return {loss: palette[i % len(palette)] for i, loss in enumerate(names)} | {BASELINE: BASELINE_COLOUR}


def optimization_history(runs: pd.DataFrame, objective: str) -> Figure:
    """Per loss, the objective of each search trial in Optuna order: COMPLETE filled, PRUNED hollow
    (their value when stopped), and the best COMPLETE value so far as a step line."""
    search, colours = _search(runs), _colours(runs)
    losses = sorted(search["loss"].unique())
    fig, axes = _grid(len(losses), row_height=2.4, sharey=True)
    for ax, loss in zip(axes, losses, strict=True):
        trials, colour = search[search["loss"] == loss], colours[loss]
        done = complete_search(trials, objective=objective)
        pruned = trials[(trials["state"] == State.PRUNED) & trials[objective].notna()]
        ax.plot(pruned["number"], pruned[objective], "o", mfc="none", mec=colour, mew=1.3, label="pruned")
        ax.plot(done["number"], done[objective], "o", color=colour, label="complete")
        ax.plot(done["number"], done[objective].cummax(), color=colour, drawstyle="steps-post", label="best so far")
        failed = int((trials["state"] == State.FAIL).sum())
        ax.set_title(f"{loss}" + (f" ({failed} failed)" if failed else ""), color=colour)
        ax.set_xlabel("trial (Optuna number)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _label_first_column(axes, metric_label(objective))
    handles = [
        Line2D([], [], marker="o", ls="", color="0.3", label="complete"),
        Line2D([], [], marker="o", ls="", mfc="none", mec="0.3", label="pruned (value when stopped)"),
        Line2D([], [], color="0.3", drawstyle="steps-post", label="best complete so far"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    fig.suptitle(f"Optimization history: {metric_label(objective)} of each search trial (validation classes)")
    return fig


def recall_at_k_curves(runs: pd.DataFrame, objective: str | None = None) -> Figure:
    """R@K (Recall@K) against K per loss: the final stage on the test classes (mean over seeds, folds averaged
    within a seed first, 95% CI error bars with ≥ 2 seeds); without a final stage, each loss's best COMPLETE
    search trial by ``objective`` (default: the ``objective`` column) on the validation classes."""
    colours = _colours(runs)
    final = runs[(runs["stage"] == Stage.FINAL) & (runs["state"] == State.COMPLETE)]
    if len(final):  # final runs log test_recall_at_<k>
        columns = _recall_columns(final, test=True)
        curves = {loss: _seed_stats(group, columns) for loss, group in final.groupby("loss")}
        where = "test classes, final stage"
    else:
        columns = _recall_columns(runs)
        objective = objective or runs["objective"].iloc[0]
        search = _search(runs)
        curves = {}
        for loss, group in search.groupby("loss"):
            if (best := best_trial(group, loss, objective)) is not None:
                curves[loss] = (best[columns].to_numpy(float), np.full(len(columns), np.nan), 1)
        where = "validation classes, best trial"
    ks = np.array([int(_RECALL.fullmatch(c.removeprefix(TEST_PREFIX))[1]) for c in columns])
    fig = _figure(WIDTH, 4.8)
    ax = fig.subplots()
    for i, loss in enumerate(sorted(curves)):
        mean, ci, seeds = curves[loss]
        ok = np.isfinite(mean)
        # with CI bars, dodge each loss a few points sideways to keep them apart; the data x remain the Ks
        dodge = (i - (len(curves) - 1) / 2) * 3 / 72 if len(final) else 0.0
        shift = ax.transData + ScaledTranslation(dodge, 0, fig.dpi_scale_trans)
        label = f"{loss} ({seeds} seed{'s' * (seeds != 1)})" if len(final) else loss
        ax.plot(ks[ok], mean[ok], marker="o", ms=4, color=colours[loss], label=label, transform=shift)
        ax.update_datalim(np.column_stack([ks[ok], mean[ok]]))  # a shifted line is left out of autoscaling
        if seeds >= 2 and np.isfinite(ci[ok]).any():
            bars = ax.errorbar(ks[ok], mean[ok], yerr=ci[ok], fmt="none", ecolor=colours[loss], capsize=2, lw=1)
            bars.set_label(f"_ci {loss}")
            for artist in bars.lines[1] + bars.lines[2]:
                artist.set_transform(shift)
    _draw_baseline(ax, runs, columns, ks)  # the baseline logs both: validation and test_ names
    ax.autoscale_view()
    ax.set_xscale("log", base=2 if all(k & (k - 1) == 0 for k in ks) else 10)
    ax.xaxis.set_major_locator(FixedLocator(ks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel="K (neighbours retrieved)", ylabel="R@K")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")
    band = " (mean and 95% CI over seeds)" if len(final) else ""
    ax.set_title(f"R@K — {where}{band}")
    return fig


def hyperparameter_slices(
    runs: pd.DataFrame, loss: str, objective: str, space: dict[str, dict] | None = None
) -> Figure | None:
    """One panel per hyperparameter of ``loss`` that takes ≥ 2 values among its search trials with an
    objective value: objective against the value, COMPLETE filled, PRUNED hollow, the best COMPLETE
    trial (:func:`analysis.runs.best_trial`) a star; categories for non-numbers.

    The x axis is the search space's: ``space`` (the loss's entry of the study's ``search_spaces.json``,
    ``{param: {type, low, high, log, zero, …}}``) gives the scale and the searched range (the whole
    range is shown, not only where trials landed); without it the runs' ``log_params`` tag says which
    were searched on a log scale (:func:`analysis.runs.is_log_scale`). A log-scale weight that may be
    exactly 0 gets a symlog axis that keeps 0 in view. None when nothing varies."""
    search = _search(runs)
    trials = search[(search["loss"] == loss) & search[objective].notna()]
    params = [c for c in sorted(trials.columns) if c.startswith("param.") and trials[c].dropna().nunique() >= 2]
    if not params:
        return None
    colour, best = _colours(runs)[loss], best_trial(trials, loss, objective)
    fig, axes = _grid(len(params), row_height=2.6, sharey=True)
    for ax, param in zip(axes, params, strict=True):
        shown = trials[trials[param].notna()]
        spec = (space or {}).get(param.removeprefix("param."))
        log = bool(spec.get("log")) if spec is not None else is_log_scale(trials, param, shown[param])
        x = _slice_axis(ax, shown[param], log, spec)
        done = (shown["state"] == State.COMPLETE).to_numpy()
        y = shown[objective].to_numpy(float)
        ax.plot(x[~done], y[~done], "o", mfc="none", mec=colour, mew=1.3, label="pruned")
        ax.plot(x[done], y[done], "o", color=colour, alpha=0.8, label="complete")
        if best is not None and best.name in shown.index:
            at = shown.index.get_loc(best.name)
            ax.plot([x[at]], [y[at]], "*", ms=15, color=colour, mec="black", zorder=3, label="best")
        scale = {"log": " (log scale)", "symlog": " (log scale, 0 allowed)"}.get(ax.get_xscale(), "")
        ax.set_xlabel(param.removeprefix("param.") + scale)
        ax.grid(alpha=0.3)
    _label_first_column(axes, metric_label(objective))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, frameon=False)
    fig.suptitle(f"{loss}: {metric_label(objective)} against each hyperparameter ({len(trials)} search trials)")
    return fig


def final_per_seed(runs: pd.DataFrame, objective: str) -> Figure | None:
    """The final stage's test ``objective``, one point per seed (folds averaged within a seed) and per
    loss, with the mean and its 95% CI (Student's t, ≥ 2 seeds) beside them; losses best first, the
    untrained network as a dashed line. The spread the headline's verdict rests on. None without a
    final stage."""
    column = final_column(runs.columns, objective)  # test_<objective>
    if column not in runs:
        return None
    final = runs[(runs["stage"] == Stage.FINAL) & (runs["state"] == State.COMPLETE) & runs[column].notna()]
    if final.empty:
        return None
    colours = _colours(runs)
    per_seed = {loss: seed_means(group, [column])[column].to_numpy(float) for loss, group in final.groupby("loss")}
    order = sorted(per_seed, key=lambda loss: -np.nanmean(per_seed[loss]))
    fig = _figure(WIDTH, 0.5 * len(order) + 1.6)
    ax = fig.subplots()
    for row, loss in enumerate(order):
        values = per_seed[loss]
        mean, ci = mean_ci(values)
        y = len(order) - 1 - row
        ax.plot(values, np.full(len(values), y + 0.15), "o", mfc="none", mec=colours[loss], label="_seeds")
        ax.errorbar([mean], [y - 0.15], xerr=None if np.isnan(ci) else [[ci], [ci]], fmt="D", color=colours[loss],
                    capsize=4, label=f"_mean {loss}")  # fmt: skip
    base = runs.loc[runs["stage"] == Stage.BASELINE, column]
    for value in pd.Series(base).dropna():
        ax.axvline(value, ls="--", color=BASELINE_COLOUR, lw=1, label=BASELINE)
    ax.set_yticks(range(len(order)), labels=[f"{loss} ({len(per_seed[loss])} seeds)" for loss in reversed(order)])
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.set_xlabel(f"{metric_label(objective)} on the test classes")
    ax.grid(axis="x", alpha=0.3)
    handles = [
        Line2D([], [], marker="o", ls="", mfc="none", mec="0.3", label="one seed"),
        Line2D([], [], marker="D", color="0.3", label="mean ± 95% CI"),
    ]
    if len(base) and pd.Series(base).notna().any():
        handles.append(Line2D([], [], ls="--", color=BASELINE_COLOUR, label=BASELINE))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    ax.set_title(f"Final stage: {metric_label(objective)} per seed (test classes)")
    return fig


def learning_curves(runs: pd.DataFrame, history: pd.DataFrame, objective: str) -> Figure:
    """Each loss's best COMPLETE search trial: ``objective`` per epoch (left) and its training loss (right;
    log y when every value is positive and they span ≥ 20×, since losses live on very different scales)."""
    search, colours = _search(runs), _colours(runs)
    fig = _figure(WIDTH, 4.4)
    ax_objective, ax_train = fig.subplots(1, 2)
    train_values = []
    for loss, group in sorted(search.groupby("loss")):
        if (best := best_trial(group, loss, objective)) is None:
            continue
        curves = history[history["run_id"] == best["run_id"]]
        for ax, metric in ((ax_objective, objective), (ax_train, "train_loss")):
            curve = curves[curves["metric"] == metric].sort_values("epoch")
            label = f"{loss} (trial {int(best['number'])})" if ax is ax_objective else None
            ax.plot(curve["epoch"], curve["value"], marker="o", ms=3, color=colours[loss], label=label)
        train_values.extend(curves.loc[curves["metric"] == "train_loss", "value"])
    values = np.asarray(train_values, float)
    if len(values) and values.min() > 0 and values.max() / values.min() >= 20:
        ax_train.set_yscale("log")
    for ax, metric, title in (
        (ax_objective, objective, f"{metric_label(objective)} (validation classes)"),
        (ax_train, "train_loss", "training loss" + (" (log scale)" if ax_train.get_yscale() == "log" else "")),
    ):
        ax.set(xlabel="epoch", ylabel=metric_label(metric), title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")
    fig.suptitle("Learning curves of each loss's best complete search trial")
    return fig


def embedding_projection(
    embeddings: dict[str, tuple[np.ndarray, np.ndarray]], colours: dict[str, str] | None = None
) -> Figure:
    """Per loss (test embeddings N×d, labels N): a 2-D PCA of all the embeddings, drawn for the
    ``MAX_CLASSES`` most frequent classes only (ties: smaller label first), coloured by class.
    ``colours``: the loss colours of the other figures (default: :func:`loss_colours` of the keys)."""
    colours = colours or loss_colours(embeddings)
    losses = sorted(embeddings)
    fig, axes = _grid(len(losses), row_height=3.3)
    cmap = colormaps["tab20"]
    for ax, loss in zip(axes, losses, strict=True):
        vectors, labels = np.asarray(embeddings[loss][0], float), np.asarray(embeddings[loss][1])
        pca = PCA(n_components=2).fit(vectors)
        points = pca.transform(vectors)
        classes = _most_frequent(labels, MAX_CLASSES)
        index = {c: i for i, c in enumerate(classes)}
        mask = np.isin(labels, classes)
        class_colours = [cmap(index[label] % cmap.N) for label in labels[mask]]
        ax.scatter(points[mask, 0], points[mask, 1], c=class_colours, s=6, alpha=0.75, lw=0, rasterized=True)
        total = len(np.unique(labels))
        shown = f"{len(classes)} most frequent of {total} classes" if total > len(classes) else f"all {total} classes"
        variance = pca.explained_variance_ratio_
        title = f"{loss}\nexplained variance PC1 {variance[0]:.1%}, PC2 {variance[1]:.1%}\n{shown}"
        ax.set_title(title, color=colours.get(loss, "black"), fontsize="small")
        ax.set(xlabel="PC1", ylabel="PC2")
        ax.tick_params(labelsize="x-small")
    fig.suptitle("Test embeddings: 2-D PCA per loss, points coloured by class")
    return fig


def save_figure(fig: Figure, folder: Path, name: str) -> list[Path]:
    """Write ``<name>.png`` (dpi 120) and ``<name>.svg`` into ``folder`` (created); return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    for path in paths:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return paths


def figure_to_svg(fig: Figure) -> str:
    """The figure as SVG text to inline in HTML: starts at ``<svg`` (XML prolog and DOCTYPE dropped)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def figure_to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (dpi 120), e.g. for ``IPython.display.Image`` in a notebook."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def figure_to_png_base64(fig: Figure) -> str:
    """The figure as a base64 PNG (dpi 120), for ``<img src="data:image/png;base64,…">``."""
    return base64.b64encode(figure_to_png(fig)).decode("ascii")


# --- helpers ---------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg canvas: rendering never goes through pyplot
    return fig


def _grid(n: int, *, row_height: float, ncols: int = 3, sharey: bool = False) -> tuple[Figure, list]:
    """Small multiples: ``n`` axes, up to ``ncols`` a row; unused cells removed."""
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = _figure(WIDTH, row_height * nrows + 0.9)
    axes = list(fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel())
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, axes[:n]


def _label_first_column(axes: list, label: str) -> None:
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(label)


def _colours(runs: pd.DataFrame) -> dict[str, str]:
    """Colours from every loss of the study, so one loss has the same colour in every figure."""
    return loss_colours(runs["loss"].unique())


def _search(runs: pd.DataFrame) -> pd.DataFrame:
    """The search trials in Optuna order, with their Optuna ``number`` (their trial key's; NaN where
    the ``trial`` column holds no search key)."""
    search = runs[runs["stage"] == Stage.SEARCH].copy()
    keys = search["trial"] if "trial" in search else [None] * len(search)
    search["number"] = [_trial_number(key) for key in keys]
    return search.sort_values(["loss", "number"], kind="stable")


def _trial_number(key) -> float:
    try:
        number = TrialKey.parse(str(key)).number
    except ValueError:
        return float("nan")
    return float("nan") if number is None else float(number)


def _recall_columns(rows: pd.DataFrame, test: bool = False) -> list[str]:
    """The ``recall_at_<k>`` columns (``test``: ``test_recall_at_<k>``) with a value in ``rows``, by K."""
    prefix = TEST_PREFIX if test else ""
    found = {c: _RECALL.fullmatch(c.removeprefix(prefix)) for c in rows.columns if c.startswith(prefix)}
    columns = [c for c, match in found.items() if match and rows[c].notna().any()]
    return sorted(columns, key=lambda c: int(found[c][1]))


def _seed_stats(group: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per column, the mean over seeds and its 95% CI half-width (folds averaged within a seed first)."""
    per_seed = seed_means(group, columns)
    stats = np.array([mean_ci(per_seed[c].to_numpy(float)) for c in columns]).reshape(-1, 2)
    return stats[:, 0], stats[:, 1], len(per_seed)


def _draw_baseline(ax, runs: pd.DataFrame, columns: list[str], ks: np.ndarray) -> None:
    """The untrained network's Recall@K as a grey dashed reference, where the baseline logged it."""
    for _, base in runs[runs["stage"] == Stage.BASELINE].iterrows():
        values = np.array([base.get(c, np.nan) for c in columns], float)
        if np.isfinite(values).any():
            ok = np.isfinite(values)
            ax.plot(ks[ok], values[ok], "--", marker=".", color=BASELINE_COLOUR, label=BASELINE)


def _slice_axis(ax, values: pd.Series, log: bool, spec: dict | None = None) -> np.ndarray:
    """x positions of a hyperparameter's values: floats (a log axis when ``log`` and no value is negative;
    symlog when 0 is among the values or allowed by ``spec``), else category positions labelled with the
    sorted categories (``spec``'s choices first, in their order). With ``spec``'s ``low``/``high`` the
    axis spans the searched range."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all() and not pd.api.types.is_bool_dtype(values):  # True/False: two categories
        x = numbers.to_numpy(float)
        low, high = (spec or {}).get("low"), (spec or {}).get("high")
        ranged = isinstance(low, int | float) and isinstance(high, int | float) and high > low
        positive = np.r_[x[x > 0], [low] if ranged and low > 0 else []]
        if log and len(positive) and x.min() >= 0:
            # a log axis; with zeros among the values (a switched-off term), symlog keeps them in view
            if x.min() > 0 and not (spec or {}).get("zero"):
                ax.set_xscale("log")
            else:
                ax.set_xscale("symlog", linthresh=positive.min())
        if ranged:
            lo, hi = min(low, x.min()), max(high, x.max())
            pad = (hi / lo) ** 0.04 if ax.get_xscale() == "log" and lo > 0 else None
            ax.set_xlim(*((lo / pad, hi * pad) if pad else (lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo))))
        return x
    choices = [str(c) for c in (spec or {}).get("choices") or []]
    categories = choices + sorted(set(values.astype(str)) - set(choices))
    ax.set_xticks(range(len(categories)), labels=categories)
    ax.set_xlim(-0.5, len(categories) - 0.5)
    return values.astype(str).map({c: i for i, c in enumerate(categories)}).to_numpy(float)


def _most_frequent(labels: np.ndarray, limit: int) -> list:
    classes, counts = np.unique(labels, return_counts=True)
    order = np.lexsort((classes, -counts))  # by count descending, then label
    return sorted(classes[order[:limit]].tolist())
