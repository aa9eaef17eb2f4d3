"""The seed papers' claims (``study.claims``), judged on a study's own data.

Two kinds of evidence, kept apart because they are not worth the same:

* :func:`ablation_claims` — the controlled experiments. The ablation stage trains each claim's one arm
  (its hyperparameter changed alone from the loss's best configuration); the loss's final-stage runs
  with the same seeds are the other arm. Pairing by seed cancels what the seed decides (initialisation,
  batches), so the mean paired difference paper − alternative, with its 95 % confidence interval, is
  the effect of that one hyperparameter. These are the verdicts.
* :func:`exploratory_trends` — patterns in the search trials. TPE moves every hyperparameter at once
  and ASHA stops trials at different epochs, so a trend there may come from any of them; its verdicts
  are worded "(exploratory)" so they cannot be read as a controlled result.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from analysis.names import final_column
from analysis.runs import complete_search, loss_metrics
from study.claims import BY_ID, CLAIMS, Claim
from study.vocab import Stage, State

ALPHA = 0.05
LEVEL = 0.95  # of the confidence interval of the mean paired difference
ABLATION = Stage.ABLATION  # the stage of the runs that train one arm of a claim
PAPER, ALTERNATIVE = "paper", "alternative"
CLAIM_COLUMNS = [
    "claim", "loss", "statement", "metric", "expected", "arms", "seeds", "paper", "alternative", "difference",
    "ci_low", "ci_high", "p", "verdict",
]  # fmt: skip
TREND_COLUMNS = ["claim", "loss", "verdict", "evidence"]
VERDICT_RULE = (
    "Each claim is a controlled experiment: its hyperparameter changed alone from the loss's best configuration, "
    "both arms trained with the same seeds and tested once on the test classes. Verdicts pair the arms by seed: "
    "difference = paper − alternative, with the 95% confidence interval of its mean (Student's t, n − 1 degrees "
    "of freedom) and the paired t-test's p; supported or refuted only when the interval excludes 0 (supported "
    "on the side the claim predicts), else inconclusive."
)
TREND_RULE = (
    "Exploratory trends, not controlled experiments: read off the search trials (validation classes), where "
    "TPE moves many hyperparameters at once, so a trend here may come from any of them and no verdict is drawn."
)


# --- controlled: the ablation stage against the final stage, paired by seed ---


def _seed(value) -> str | None:
    """A seed as one spelling ("3", whether MLflow kept "3" or "3.0"); None when missing."""
    if pd.isna(value):
        return None
    try:
        return str(int(float(value)))
    except ValueError:
        return str(value)


def _number(key) -> int | None:
    """The search trial a final or ablation run's key names (``<loss>/<stage>/<number>/…``): the
    configuration it retrains or varies. None for another key, or none."""
    parts = str(key).split("/") if isinstance(key, str) else []
    return int(parts[2]) if len(parts) >= 4 and parts[2].isdigit() else None


def _arm_runs(runs: pd.DataFrame, claim_id: str, loss: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The claim's COMPLETE ablation runs and the loss's COMPLETE fold-free final runs, each with
    ``_seed`` and ``_number`` columns, and why there is no pair when there is none ("" otherwise).

    Only final runs that load_runs kept are used (it drops stale ones: a superseded best's); on top
    of that an ablation run pairs only with a final run of the same search trial where both keys
    name one, so an ablation of an earlier best is never compared with a later best's runs.
    """
    stage = runs["stage"].astype(str)
    ablation = runs[(stage == ABLATION) & (runs["claim"] == claim_id)]
    done = ablation[ablation["state"] == State.COMPLETE]
    final = runs[(stage == Stage.FINAL) & (runs["loss"] == loss) & (runs["state"] == State.COMPLETE)]
    if "param.fold" in final:
        final = final[final["param.fold"].isna()]
    frames = []
    for frame in (done, final):
        frame = frame.copy()
        frame["_seed"] = [_seed(v) for v in frame["param.seed"]] if "param.seed" in frame else None
        frame["_number"] = [_number(k) for k in frame["trial"]] if "trial" in frame else None
        frames.append(frame)
    why = ""
    if done.empty:
        states = ", ".join(f"{n} {s}" for s, n in ablation["state"].value_counts().items())
        why = f"no COMPLETE ablation run ({states})"
    elif final.empty:
        why = f"no COMPLETE fold-free final run of {loss} to pair with"
    return frames[0], frames[1], why


def _pairs(ablation: pd.DataFrame, final: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per seed present in both arms with a finite ``metric`` in both: columns ``paper`` and
    ``alternative`` (each arm's value; a seed's runs averaged should one arm have several). A seed
    missing in either arm is dropped from both. Both arms were tested on the test classes: a retrieval
    metric is read as ``test_<metric>`` (:func:`analysis.names.final_column`)."""
    metric = final_column(ablation.columns, metric)
    if metric not in ablation or metric not in final:
        return pd.DataFrame(columns=[PAPER, ALTERNATIVE])
    rows = []
    for _, run in ablation.iterrows():
        value = float(run[metric]) if pd.notna(run[metric]) else float("nan")
        seed, number = run["_seed"], run["_number"]
        same = final[final["_seed"] == seed] if pd.notna(seed) else final.iloc[:0]
        if pd.notna(number):  # the same search trial's configuration, where the final run's key names one
            same = same[same["_number"].isna() | (same["_number"] == number)]
        other = pd.to_numeric(same[metric], errors="coerce").mean() if len(same) else float("nan")
        paper, alternative = (value, other) if run["arm"] == PAPER else (other, value)
        if run["arm"] in (PAPER, ALTERNATIVE) and np.isfinite(paper) and np.isfinite(alternative):
            rows.append({"seed": seed, PAPER: paper, ALTERNATIVE: alternative})
    pairs = pd.DataFrame(rows, columns=["seed", PAPER, ALTERNATIVE])
    return pairs.groupby("seed", sort=True)[[PAPER, ALTERNATIVE]].mean()


def verdict(ci_low: float, ci_high: float, n: int, direction: int = 1) -> str:
    """supported / refuted when the CI of paper − alternative lies wholly on the side the claim
    predicts (``direction`` +1: above 0, −1: below) / on the other; else inconclusive, with n."""
    if n < 2:
        return f"inconclusive ({n} seed{'s' * (n != 1)}: no confidence interval)"
    low, high = sorted((direction * ci_low, direction * ci_high))
    if low > 0:
        return "supported"
    if high < 0:
        return "refuted"
    return f"inconclusive ({n} seeds)"


def paired(paper: np.ndarray, alternative: np.ndarray, level: float = LEVEL) -> dict[str, float]:
    """Mean of each arm, mean paired difference paper − alternative, its ``level`` CI (Student's t,
    n − 1 df) and the paired t-test's two-sided p; CI and p NaN for fewer than 2 pairs."""
    paper, alternative = np.asarray(paper, float), np.asarray(alternative, float)
    d, n = paper - alternative, len(paper)
    out = {"seeds": n, PAPER: paper.mean(), ALTERNATIVE: alternative.mean(), "difference": d.mean()}
    if n < 2:
        return out | {"ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan")}
    half = stats.t.ppf((1 + level) / 2, n - 1) * d.std(ddof=1) / np.sqrt(n)
    with warnings.catch_warnings():  # equal differences: no variance, p is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_rel(paper, alternative).pvalue)
    return out | {"ci_low": d.mean() - half, "ci_high": d.mean() + half, "p": p}


def _arms_text(claim: Claim, ablation: pd.DataFrame, final: pd.DataFrame) -> str:
    """The values the arms took, e.g. "so_weight: paper 10, alternative 0" (as MLflow kept them)."""
    column = f"param.{claim.param}"
    values: dict[str, set[str]] = {PAPER: set(), ALTERNATIVE: set()}
    for _, run in ablation.iterrows():
        if run["arm"] not in values:
            continue
        other = ALTERNATIVE if run["arm"] == PAPER else PAPER
        if column in ablation and pd.notna(run[column]):
            values[run["arm"]].add(str(run[column]))
        if column in final:
            values[other] |= {str(v) for v in final[column].dropna()}
    shown = {arm: "/".join(sorted(v)) or "?" for arm, v in values.items()}
    return f"{claim.param}: paper {shown[PAPER]}, alternative {shown[ALTERNATIVE]}"


def _claim(claim_id: str, runs: pd.DataFrame) -> Claim:
    """The claim ``claim_id`` names, or a stand-in for an id ``study.claims`` no longer knows (its
    ablation runs still count, on the objective and Recall@1)."""
    if claim_id in BY_ID:
        return BY_ID[claim_id]
    loss = runs.loc[runs["claim"] == claim_id, "loss"].dropna()
    return Claim(claim_id, loss.iloc[0] if len(loss) else "", "", None, None, "(not in study.claims)", "")


def _per_study(check, runs: pd.DataFrame, objective: str, columns: list[str]) -> pd.DataFrame:
    """``check`` on each study of a frame holding several (a ``study`` column first), else on the
    frame: seeds and search trials of different studies never meet."""
    if "study" not in runs or runs["study"].nunique() < 2:
        return check(runs, objective)
    parts = [check(group, objective).assign(study=name) for name, group in runs.groupby("study", sort=False)]
    return pd.concat(parts, ignore_index=True)[["study", *columns]]


def ablation_claims(runs: pd.DataFrame, objective: str) -> pd.DataFrame:
    """One row per (claim, metric) with ablation runs: the controlled verdicts.

    Metrics: ``objective``, Recall@1 and the claim's own (``Claim.metrics``) where the runs report
    them, on the test classes (read from ``test_<metric>``, named without the prefix here). Columns:
    claim (id), loss, statement, metric, expected (the sign the claim predicts for paper − alternative),
    arms (the hyperparameter's values), seeds (pairs), paper, alternative (each arm's mean over those
    seeds), difference (mean paired difference), ci_low, ci_high (its 95 % CI), p (paired t-test),
    verdict (:func:`verdict`). Claims without ablation runs are not listed; a claim whose ablation runs
    found no pair gets one row, "not run: <why>". Several studies: per study, with a ``study`` column
    first.
    """
    return _per_study(_ablation_claims, runs, objective, CLAIM_COLUMNS)


def _ablation_claims(runs: pd.DataFrame, objective: str) -> pd.DataFrame:
    if not {"claim", "arm", "stage"} <= set(runs.columns):
        return pd.DataFrame(columns=CLAIM_COLUMNS)
    ablated = runs.loc[runs["stage"].astype(str) == ABLATION, "claim"].dropna().unique()
    order = [c.id for c in CLAIMS if c.id in ablated] + sorted(set(ablated) - set(BY_ID))
    rows = []
    for claim_id in order:
        claim = _claim(claim_id, runs)
        ablation, final, why = _arm_runs(runs, claim_id, claim.loss)
        base = {"claim": claim.id, "loss": claim.loss, "statement": claim.statement}
        base["arms"] = "" if why else _arms_text(claim, ablation, final)
        found = []
        if not why:
            for metric in dict.fromkeys([objective, "recall_at_1", *claim.metrics]):
                pairs = _pairs(ablation, final, metric)
                if len(pairs):
                    found.append((metric, pairs))
        if not found:
            why = why or f"no seed with a COMPLETE run in both arms reporting {objective}"
            rows.append(base | {"metric": objective, "seeds": 0, "verdict": f"not run: {why}"})
            continue
        for metric, pairs in found:
            numbers = paired(pairs[PAPER].to_numpy(), pairs[ALTERNATIVE].to_numpy())
            sign = claim.direction(metric)
            rows.append(
                base
                | {"metric": metric, "expected": "paper > alternative" if sign > 0 else "paper < alternative"}
                | numbers
                | {"verdict": verdict(numbers["ci_low"], numbers["ci_high"], numbers["seeds"], sign)}
            )
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


# --- exploratory: trends among the search trials ---


def _search(runs: pd.DataFrame, loss: str, complete: bool = True) -> pd.DataFrame:
    if complete:
        return complete_search(runs, loss)
    return runs[(runs["stage"] == Stage.SEARCH) & (runs["loss"] == loss)]


def _row(claim: str, loss: str, verdict: str, evidence: str) -> dict:
    return {"claim": claim, "loss": loss, "verdict": f"{verdict} (exploratory)", "evidence": evidence}


def compare(runs: pd.DataFrame, loss: str, objective: str, param: str, groups: dict, claim: str, better: str) -> dict:
    """Does the ``better`` group of ``param`` values score higher among the loss's COMPLETE search
    trials? (``groups``: label → predicate on the value.) The best and mean objective per group, and
    a one-sided Mann–Whitney test: "trend" below ``ALPHA``, else "no trend"."""
    trials = _search(runs, loss)
    column = f"param.{param}"
    if column not in trials:
        return _row(claim, loss, "not tested", f"no {loss} trial searched {param}")
    scores = {}
    for label, keep in groups.items():
        chosen = trials[column].map(lambda v, keep=keep: pd.notna(v) and keep(v)).astype(bool)  # typed: NA unset
        scores[label] = trials.loc[chosen, objective].dropna().to_numpy()
    evidence = "; ".join(
        f"{label}: {len(v)} trials, best {v.max():.4f}, mean {v.mean():.4f}" if len(v) else f"{label}: 0 trials"
        for label, v in scores.items()
    )
    if any(len(v) == 0 for v in scores.values()):
        return _row(claim, loss, "not tested", evidence)
    other = next(label for label in scores if label != better)
    if len(scores[better]) >= 2 and len(scores[other]) >= 2:
        p = stats.mannwhitneyu(scores[better], scores[other], alternative="greater").pvalue
        evidence += f"; Mann–Whitney one-sided p = {p:.3f}"
        if p < ALPHA:
            return _row(claim, loss, "trend", evidence)
    return _row(claim, loss, "no trend", evidence + f" ({objective}, best trial per group)")


def trend(runs: pd.DataFrame, loss: str, x: str, y: str, sign: int, claim: str) -> dict:
    """Does ``y`` move with ``x`` in direction ``sign``? Spearman's ρ over the loss's trials: all of
    them for a loss metric (one the ``trial_metrics`` column lists; a pruned trial's is real, if
    early), COMPLETE ones for a retrieval metric. "trend" / "opposite trend" below ``ALPHA``, else
    "no trend"."""
    trials = _search(runs, loss, complete=y not in loss_metrics(runs))
    column = f"param.{x}"
    if column not in trials or y not in trials:
        return _row(claim, loss, "not tested", f"no {loss} trial with both {x} and {y}")
    data = pd.DataFrame({"x": pd.to_numeric(trials[column], errors="coerce"), "y": trials[y]}).dropna()
    if len(data) < 3 or data["x"].nunique() < 2:
        return _row(claim, loss, "not tested", f"{len(data)} trials with {x} and {y}, too few to see a trend")
    rho, p = stats.spearmanr(data["x"], data["y"])
    evidence = f"Spearman ρ({x}, {y}) = {rho:+.2f}, p = {p:.3f}, {len(data)} trials"
    if np.isnan(rho):
        return _row(claim, loss, "no trend", evidence + f" ({y} did not vary)")
    if p < ALPHA:
        return _row(claim, loss, "trend" if np.sign(rho) == sign else "opposite trend", evidence)
    return _row(claim, loss, "no trend", evidence)


def _truthy(value) -> bool:
    return str(value).lower() in ("true", "1")


def exploratory_trends(runs: pd.DataFrame, objective: str) -> pd.DataFrame:
    """The search trials' trends that bear on the claims, for the losses the study searched only;
    columns claim, loss, verdict ("… (exploratory)"), evidence. Not a verdict on any claim: see
    :func:`ablation_claims` for those. Several studies: per study, with a ``study`` column first."""
    return _per_study(_exploratory_trends, runs, objective, TREND_COLUMNS)


def _exploratory_trends(runs: pd.DataFrame, objective: str) -> pd.DataFrame:
    searched = set(runs.loc[runs["stage"] == Stage.SEARCH, "loss"].dropna())
    checks = [
        ("soft_triple", lambda: compare(runs, "soft_triple", objective, "centers_per_class",
                                        {"K > 1": lambda k: float(k) > 1, "K = 1": lambda k: float(k) == 1},
                                        "SoftTriple with several centers per class beats one center (K = 1)",
                                        "K > 1")),
        ("soft_triple", lambda: trend(runs, "soft_triple", "tau", "effective_centers", -1,
                                      "SoftTriple's L2,1 regulariser (τ) shrinks the effective number of centers")),
        ("proxy_anchor", lambda: trend(runs, "proxy_anchor", "so_weight", "proxy_abs_cos", -1,
                                       "The soft-orthogonality weight lowers the proxies' correlation (mean |cos|)")),
        ("proxy_anchor", lambda: trend(runs, "proxy_anchor", "so_weight", "recall_at_1", +1,
                                       "The soft-orthogonality weight raises Recall@1")),
        ("multi_similarity", lambda: compare(runs, "multi_similarity", objective, "mining",
                                             {"mining": _truthy, "no mining": lambda v: not _truthy(v)},
                                             "Multi-Similarity's pair mining helps", "mining")),
    ]  # fmt: skip
    for loss in ("multi_similarity", "triplet", "contrastive", "margin"):
        checks.append(
            (loss, lambda loss=loss: compare(runs, loss, objective, "positive",
                                             {"easy": lambda v: v == "easy", "all": lambda v: v == "all"},
                                             "Easy positive sampling beats all positives", "easy"))
        )  # fmt: skip
    return pd.DataFrame([check() for loss, check in checks if loss in searched], columns=TREND_COLUMNS)
