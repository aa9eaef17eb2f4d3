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
# Loads one study from the tracking store and rebuilds its tables and pictures with the
# `analysis` package: the search (validation classes), the final stage (test classes, mean ±
# 95% CI over seeds), hyperparameter importance and sensitivity, and the papers' claims.
# Set `STUDY` (and `MLFLOW_TRACKING_URI`) to read another study. Kept as a jupytext
# percent script; open it in Jupyter with `jupytext --to ipynb analysis/notebooks/study.py`.

# %%
import os

import matplotlib

matplotlib.use("Agg")

from analysis import plots
from analysis.claims import ablation_claims, exploratory_trends
from analysis.runs import load_history, load_runs
from analysis.study_report import hyperparameter_tables
from analysis.tables import comparison_table, final_table, to_markdown
from study.vocab import Stage

STUDY = os.environ.get("DML_STUDY_NAME", "quickstart")
runs = load_runs(STUDY, os.environ.get("MLFLOW_TRACKING_URI"))
objective = runs["objective"].iloc[0]
history = load_history(runs)
print(f"{STUDY}: {len(runs)} runs, objective {objective}")
runs.groupby(["loss", "stage", "state"]).size()

# %% [markdown]
# ## The search: best trial per loss on the validation classes

# %%
search = comparison_table(runs, objective)
print(to_markdown(search))

# %% [markdown]
# ## The final stage: test classes, mean ± 95% CI over seeds

# %%
final = final_table(runs, objective)
print(to_markdown(final))

# %% [markdown]
# ## Hyperparameters: importance (fANOVA) and sensitivity

# %%
importance, sensitivity = hyperparameter_tables(runs, objective)
print(to_markdown(importance) if len(importance) else "too few COMPLETE trials for fANOVA")
print(to_markdown(sensitivity))

# %% [markdown]
# ## The papers' claims: controlled experiments (the ablation stage, paired by seed)

# %%
claims = ablation_claims(runs, objective)
claims

# %% [markdown]
# ## Exploratory trends in the search trials (many hyperparameters move at once: no verdict)

# %%
exploratory_trends(runs, objective)

# %% [markdown]
# ## Pictures

# %%
figures = {
    "optimization_history": plots.optimization_history(runs, objective),
    "recall_at_k": plots.recall_at_k_curves(runs, objective),
    "learning_curves": plots.learning_curves(runs, history, objective),
}
for loss in sorted(runs.loc[runs["stage"] == Stage.SEARCH, "loss"].unique()):
    figure = plots.hyperparameter_slices(runs, loss, objective)
    if figure is not None:
        figures[f"slices_{loss}"] = figure
sorted(figures)
