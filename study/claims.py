"""The seed papers' claims, each as a controlled experiment: two arms that differ in one
hyperparameter of one loss, everything else at the loss's best search configuration.

Imports neither torch, Ray nor MLflow: the ablation stage (``study.stages``) builds the runs from it,
the analysis (``analysis.claims``) reads the verdicts with it.

For a claim, the *paper* arm holds the value the paper argues for and the *alternative* arm the value
it argues against. One of the two is the best configuration itself, whose final-stage runs (same
seeds, same training classes) serve as that arm; the ablation stage trains only the other. The
verdict compares the arms seed by seed (paired): paper − alternative.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Claim:
    id: str  # "<loss>.<factor>": also the ablation run's key segment and its MLflow tag
    loss: str
    param: str  # the search-space hyperparameter the arms differ in
    alternative: Any  # the value the paper argues against
    paper: Any | None  # the value it argues for; None: the best value unless it is the alternative, else the default
    statement: str  # what the paper claims, as the report prints it
    source: str
    metrics: tuple[str, ...] = ()  # metrics the claim is about besides the objective and Recall@1
    # those of ``metrics`` the paper's arm should LOWER (proxy correlation, effective centers); the
    # objective, Recall@1 and every other metric it should raise
    paper_lowers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not set(self.paper_lowers) <= set(self.metrics):
            raise ValueError(f"{self.id}: paper_lowers {self.paper_lowers} must be among its metrics {self.metrics}")

    def direction(self, metric: str) -> int:
        """The sign the paper predicts for paper − alternative on ``metric``: −1 for a metric the
        paper's arm should lower, +1 otherwise (the objective, Recall@1, sub-mode recall)."""
        return -1 if metric in self.paper_lowers else 1

    @property
    def factor(self) -> str:
        return self.id.split(".", 1)[1]

    def arms(self, best: Mapping[str, Any], default: Any) -> tuple[Any, Any]:
        """(paper value, alternative value) given the best configuration's values and the space's
        default for :attr:`param`."""
        if self.paper is not None:
            return self.paper, self.alternative
        chosen = best.get(self.param, default)
        return (default if chosen == self.alternative else chosen), self.alternative

    def ablated(self, best: Mapping[str, Any], default: Any) -> tuple[str, Any]:
        """The arm the ablation stage trains ("paper" or "alternative") and its value: the arm whose
        value the best configuration does not already have."""
        paper, alternative = self.arms(best, default)
        return ("paper", paper) if best.get(self.param, default) == alternative else ("alternative", alternative)


EASY_POSITIVES = "Levi et al., ICCV 2021"
_PAIR_LOSSES = ("contrastive", "triplet", "margin", "multi_similarity")

CLAIMS: tuple[Claim, ...] = (
    Claim(
        "soft_triple.centers",
        "soft_triple",
        "centers_per_class",
        alternative=1,
        paper=None,
        statement="SoftTriple: several centers per class (K > 1) beat one (K = 1)",
        source="Qian et al., ICCV 2019",
    ),
    Claim(
        "soft_triple.merge",
        "soft_triple",
        "tau",
        alternative=0.0,
        paper=None,
        statement="SoftTriple: the center-merging regulariser (τ > 0) merges centers and helps",
        source="Qian et al., ICCV 2019",
        metrics=("effective_centers",),
        paper_lowers=("effective_centers",),  # merged centers: fewer effective ones
    ),
    Claim(
        "multi_similarity.mining",
        "multi_similarity",
        "mining",
        alternative=False,
        paper=True,
        statement="Multi-Similarity: its pair mining helps",
        source="Wang et al., CVPR 2019",
    ),
    *(
        Claim(
            f"{loss}.easy_positives",
            loss,
            "positive",
            alternative="all",
            paper="easy",
            statement=f"{loss}: easy positives beat all positives and keep sub-modes apart (no class collapse)",
            source=EASY_POSITIVES,
            metrics=("submode_recall_at_1",),
        )
        for loss in _PAIR_LOSSES
    ),
    Claim(
        "proxy_anchor.soft_orthogonality",
        "proxy_anchor",
        "so_weight",
        alternative=0.0,
        paper=None,
        statement="Proxy Anchor: soft orthogonality of the proxies lowers their correlation and raises Recall@1",
        source="Saberi-Movahed et al., 2023",
        metrics=("proxy_abs_cos",),
        paper_lowers=("proxy_abs_cos",),
    ),
    Claim(
        "pddm.learned_metric",
        "pddm",
        "lam",
        alternative=0.0,
        paper=None,
        statement="PDDM: hard mining with the learned metric (λ > 0) beats the embedding loss alone (λ = 0)",
        source="Huang et al., NeurIPS 2016",
    ),
)

BY_ID = {claim.id: claim for claim in CLAIMS}


def ablation_plan(
    loss: str, searched: Iterable[str], *, ablations: bool | Sequence[str], seeds: int, train_on: str
) -> tuple[list[Claim], str]:
    """The claims the ablation stage trains for ``loss`` (each with every final seed), and why (or why
    none): it needs ``ablations`` on (true, or a list of claim ids that names the claim), a final stage
    (``seeds``) on every training class (``train_on``: the final runs are the other arm) and a claim whose
    factor the loss's space searches."""
    claims = claims_for({loss: searched})
    if not claims:
        return [], f"no claim about {loss}'s searched hyperparameters"
    if not ablations:
        return [], "ablations: false"
    if not isinstance(ablations, bool):
        claims = [c for c in claims if c.id in ablations]
        if not claims:
            return [], "none of its claims is in the study's ablations list"
    if not seeds:
        return [], "no final stage to pair with"
    if train_on != "all":
        return [], "they pair with final runs on all training classes: final.train_on: all"
    count = f"{len(claims)} claim{'s' * (len(claims) != 1)}"
    return claims, f"{count} × {seeds} seeds: {', '.join(c.factor for c in claims)}"


def claims_for(searched: Mapping[str, Iterable[str]]) -> list[Claim]:
    """The claims about the study's losses whose factor the loss's space searches (``searched``:
    loss → its searched hyperparameters); a claim about a fixed factor cannot be ablated."""
    return [c for c in CLAIMS if c.loss in searched and c.param in set(searched[c.loss])]
