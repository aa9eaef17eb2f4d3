# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A dml-study study, rebuilt from MLflow
#
# Loads one study from the tracking store and rebuilds its conclusion, tables and figures with the
# `analysis` package: the headline (winner, margin, significance), the final stage (test classes, mean ±
# 95% CI over seeds), the search (validation classes), hyperparameter importance and sensitivity, and
# the papers' claims. Set `DML_STUDY_NAME` (and `MLFLOW_TRACKING_URI`) to read another study.
#
# Kept as a jupytext percent script. To open it: `pip install -e '.[notebook]'`, then
# `jupytext --to ipynb analysis/notebooks/study.py && jupyter lab analysis/notebooks/study.ipynb`.
# Tables show as HTML, figures inline.

# %%
import html
import os

from IPython.display import HTML, Image, display

from analysis import plots
from analysis.claims import ablation_claims, exploratory_trends
from analysis.headline import headline
from analysis.names import column_label
from analysis.runs import load_history, load_runs, load_search_spaces
from analysis.study_report import hyperparameter_tables
from analysis.tables import claims_text, comparison_table, final_table, formatted
from study.vocab import Stage

STUDY = os.environ.get("DML_STUDY_NAME", "quickstart")
runs = load_runs(STUDY, os.environ.get("MLFLOW_TRACKING_URI"))
objective = runs["objective"].iloc[0]
history = load_history(runs)
spaces = load_search_spaces(STUDY, os.environ.get("MLFLOW_TRACKING_URI")) or {}  # bounds and scales as searched


def table(frame):
    """A table as the report shows it (HTML): readable headers, the best value of each metric in bold, no index."""
    shown = formatted(frame, bold=("\0b", "\0/b")) if "loss" in frame else frame.astype(str)
    shown = shown.map(lambda text: html.escape(text).replace("\0b", "<b>").replace("\0/b", "</b>"))
    return shown.rename(columns=column_label).style.hide(axis="index")


def show(figure):
    """An analysis figure (drawn without pyplot) inline, as PNG."""
    display(Image(data=plots.figure_to_png(figure)))


print(f"{STUDY}: {len(runs)} runs, objective {objective}")
runs.groupby(["loss", "stage", "state"]).size().to_frame("runs")

# %% [markdown]
# ## The conclusion

# %%
search = comparison_table(runs, objective)
final = final_table(runs, objective)
verdict = headline(runs, final, objective, search)
display(HTML(f"<p><b>{verdict.verdict}</b>: {html.escape(verdict.text)}</p>"))

# %% [markdown]
# ## The final stage: test classes, mean ± 95% CI over seeds

# %%
table(final)

# %%
per_seed = plots.final_per_seed(runs, objective)
if per_seed is not None:
    show(per_seed)
show(plots.recall_at_k_curves(runs, objective))

# %% [markdown]
# ## The search: best trial per loss on the validation classes

# %%
table(search)

# %%
show(plots.optimization_history(runs, objective))
show(plots.learning_curves(runs, history, objective))

# %% [markdown]
# ## Hyperparameters: importance (fANOVA), sensitivity, and each loss's slices

# %%
importance, sensitivity = hyperparameter_tables(runs, objective, spaces)
if len(importance):
    display(table(importance))
    display(table(sensitivity))
else:
    print("importance and sensitivity: too few COMPLETE trials for fANOVA")
for loss in sorted(runs.loc[runs["stage"] == Stage.SEARCH, "loss"].unique()):
    figure = plots.hyperparameter_slices(runs, loss, objective, spaces.get(loss))
    if figure is not None:
        show(figure)

# %% [markdown]
# ## The papers' claims: controlled experiments (the ablation stage, paired by seed)

# %%
claims = ablation_claims(runs, objective)
table(claims_text(claims)) if len(claims) else print("no ablation runs")

# %% [markdown]
# ## Exploratory trends in the search trials (many hyperparameters move at once: no verdict)

# %%
table(exploratory_trends(runs, objective))
