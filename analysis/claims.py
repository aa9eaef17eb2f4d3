"""The seed papers' claims, checked on a study's own data, each with its evidence.

Every check reads the runs frame (``analysis.runs.load_runs``) and returns one row: the claim, the
loss, a verdict — "supported", "not supported", "inconclusive" (too few trials, or no significant
trend) or "not tested" (the study has no trials that bear on it) — and the evidence in numbers.
Comparisons use COMPLETE search trials (validation classes); trends use Spearman's ρ over every
trial that reported the metric (a pruned trial's loss metrics are real, if early).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from analysis.runs import complete_search, loss_metrics
from study.vocab import Stage

ALPHA = 0.05


def _search(runs: pd.DataFrame, loss: str, complete: bool = True) -> pd.DataFrame:
    if complete:
        return complete_search(runs, loss)
    return runs[(runs["stage"] == Stage.SEARCH) & (runs["loss"] == loss)]


def _row(claim: str, loss: str, verdict: str, evidence: str) -> dict:
    return {"claim": claim, "loss": loss, "verdict": verdict, "evidence": evidence}


def compare(runs: pd.DataFrame, loss: str, objective: str, param: str, groups: dict, claim: str, better: str) -> dict:
    """Claim "``better`` group beats the other": the best and mean objective of COMPLETE trials per
    group of ``param`` values (``groups``: label → predicate on the value)."""
    trials = _search(runs, loss)
    column = f"param.{param}"
    if column not in trials:
        return _row(claim, loss, "not tested", f"no {loss} trial searched {param}")
    scores = {}
    for label, keep in groups.items():
        scores[label] = trials.loc[trials[column].map(keep).astype(bool), objective].dropna().to_numpy()
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
            return _row(claim, loss, "supported", evidence)
    verdict = "inconclusive" if scores[better].max() > scores[other].max() else "not supported"
    return _row(claim, loss, verdict, evidence + f" ({objective}, best trial per group)")


def trend(runs: pd.DataFrame, loss: str, x: str, y: str, sign: int, claim: str) -> dict:
    """Claim "``y`` moves with ``x`` in direction ``sign``" (Spearman's ρ over the loss's trials;
    all of them for a loss metric — one the ``trial_metrics`` column lists — COMPLETE ones for a
    retrieval metric)."""
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
        return _row(claim, loss, "inconclusive", evidence + f" ({y} did not vary)")
    if p < ALPHA:
        return _row(claim, loss, "supported" if np.sign(rho) == sign else "not supported", evidence)
    return _row(claim, loss, "inconclusive", evidence)


def _truthy(value) -> bool:
    return str(value).lower() in ("true", "1")


def check_claims(runs: pd.DataFrame, objective: str) -> pd.DataFrame:
    """Every claim this study's data bears on; columns claim, loss, verdict, evidence."""
    rows = [
        compare(runs, "soft_triple", objective, "centers_per_class",
                {"K > 1": lambda k: float(k) > 1, "K = 1": lambda k: float(k) == 1},
                "SoftTriple with several centers per class beats one center (K = 1)", "K > 1"),
        trend(runs, "soft_triple", "tau", "effective_centers", -1,
              "SoftTriple's L2,1 regulariser (τ) shrinks the effective number of centers"),
        trend(runs, "proxy_anchor", "so_weight", "proxy_abs_cos", -1,
              "The soft-orthogonality weight lowers the proxies' correlation (mean |cos|)"),
        trend(runs, "proxy_anchor", "so_weight", "recall_at_1", +1,
              "The soft-orthogonality weight raises Recall@1"),
        compare(runs, "multi_similarity", objective, "mining",
                {"mining": _truthy, "no mining": lambda v: not _truthy(v)},
                "Multi-Similarity's pair mining helps", "mining"),
    ]  # fmt: skip
    for loss in ("multi_similarity", "triplet", "contrastive", "margin"):
        rows.append(
            compare(runs, loss, objective, "positive",
                    {"easy": lambda v: v == "easy", "all": lambda v: v == "all"},
                    "Easy positive sampling beats all positives", "easy")
        )  # fmt: skip
    return pd.DataFrame(rows, columns=["claim", "loss", "verdict", "evidence"])
