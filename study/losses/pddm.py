"""PDDM: position-dependent deep metric (Huang, Loy, Tang, "Local Similarity-Aware Deep
Feature Embedding", NeurIPS 2016, Sec. 3).

A learned similarity unit scores a pair of unit-norm features fᵢ, fⱼ (Eq. 2; N(·) is L2
normalisation, every layer has a bias):

    u = |fᵢ − fⱼ|,  v = (fᵢ + fⱼ)/2,
    u' = ReLU(W_u N(u)),  v' = ReLU(W_v N(v)),
    c = ReLU(W_c [N(u'); N(v')]),  S = W_s c.

The order follows Eq. 2: u and v are L2-normalised before their layers, u' and v' before
they are concatenated (so that neither half dominates c).

A hard quadruplet is mined with S itself: (î, ĵ) the least similar positive pair, k̂ the
most similar negative of î, l̂ of ĵ. The double-header hinge loss is

    E_m = [α + S_îk̂ − S_îĵ]₊ + [α + S_ĵl̂ − S_îĵ]₊            (on the unit's scores)
    E_e = [β + D_îĵ − D_îk̂]₊ + [β + D_îĵ − D_ĵl̂]₊            (on embedding distances)
    E   = E_m + λ·E_e.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from study.losses.base import MetricLoss, register_loss
from study.losses.pairs import pair_masks

_EPS = 1e-12  # N(0) = 0: identical features (u = 0) or a dead ReLU layer give a zero vector, not NaN
_CHUNK = 16384  # pairs scored at once while mining (no grad): memory ~ _CHUNK × d


@register_loss("pddm", trial_metrics=("unit_score_std",))
class PDDMLoss(MetricLoss):
    """PDDM unit + double-header hinge loss; the unit's weights are parameters of the loss.

    Mining is per class in the batch rather than once per batch: every class with two or
    more samples gives its least similar positive pair (by S) and the two negatives, and E
    is averaged over these quadruplets. With m-per-class batches one quadruplet per batch
    would train on 4 of B samples; per class keeps the paper's hard-quadruplet rule at the
    scale of the batch. The mined pairs are scored again with gradients, so mining itself
    costs O(B²/m · d · hidden) without autograd. D is the Euclidean distance of the
    unit-norm embeddings; retrieval at evaluation uses the embedding, not the unit.

    ``trial_metrics()`` reports ``unit_score_std``: the standard deviation of the unit's scores
    (S_îĵ, S_îk̂, S_ĵl̂) over each batch's mined quadruplets, averaged over the batches since the last
    call (an epoch). A unit that tells pairs apart spreads its scores; one near 0 has collapsed to a
    constant score, so its mining is random and E_m trains nothing (docs/comparison.md, PDDM).

    Computed in float32 or wider with autocast off. Hyperparameters: ``alpha`` (metric
    margin, 1.0), ``beta`` (embedding margin, 0.5), ``lam`` (λ = 0.5), ``hidden`` (width of
    the unit, 128); values chosen for unit-norm embeddings (the paper tunes them per dataset).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        alpha: float = 1.0,
        beta: float = 0.5,
        lam: float = 0.5,
        hidden: int = 128,
    ):
        super().__init__()
        self.alpha, self.beta, self.lam, self.hidden = alpha, beta, lam, int(hidden)
        self.w_u = nn.Linear(embedding_dim, self.hidden)
        self.w_v = nn.Linear(embedding_dim, self.hidden)
        self.w_c = nn.Linear(2 * self.hidden, self.hidden)
        self.w_s = nn.Linear(self.hidden, 1)
        # Σ over the batches since trial_metrics() of the scores' std: a tensor, read once an epoch (no sync per step)
        self._score_std: torch.Tensor | None = None
        self._batches = 0

    def score(self, x: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """S(fᵢ, fⱼ) for index vectors ``i``, ``j``, in x's dtype."""
        u = F.relu(_linear(self.w_u, F.normalize((x[i] - x[j]).abs(), dim=1, eps=_EPS)))
        v = F.relu(_linear(self.w_v, F.normalize((x[i] + x[j]) / 2, dim=1, eps=_EPS)))
        c = F.relu(_linear(self.w_c, torch.cat([F.normalize(u, dim=1, eps=_EPS), F.normalize(v, dim=1, eps=_EPS)], 1)))
        return _linear(self.w_s, c).squeeze(1)

    @torch.no_grad()
    def mine(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Quadruplet indices (î, ĵ, k̂, l̂), one per class that has a positive pair and negatives."""
        pos, neg = pair_masks(x @ x.T, labels, "all")
        i, j = (pos.triu(1) & neg.any(dim=1, keepdim=True)).nonzero(as_tuple=True)
        if len(i) == 0:
            return (i,) * 4
        classes, cls = torch.unique(labels[i], return_inverse=True)
        hard = _arg_best(cls, -self._scores(x, i, j), len(classes))  # per class, the least similar positive pair
        i_hat, j_hat = i[hard], j[hard]
        # î and ĵ are of one class, so they have the same negatives: listed once for both
        a, n = neg[i_hat].nonzero(as_tuple=True)  # a indexes i_hat (and j_hat)
        return i_hat, j_hat, self._hardest_negative(x, i_hat, a, n), self._hardest_negative(x, j_hat, a, n)

    def _scores(self, x: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.score(x, i[s : s + _CHUNK], j[s : s + _CHUNK]) for s in range(0, len(i), _CHUNK)])

    def _hardest_negative(
        self, x: torch.Tensor, anchors: torch.Tensor, a: torch.Tensor, n: torch.Tensor
    ) -> torch.Tensor:
        """For each anchor, its negative of highest score; (``a``, ``n``): every (position in ``anchors``, negative)
        pair, each anchor with at least one."""
        return n[_arg_best(a, self._scores(x, anchors[a], n), len(anchors))]

    def compute(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = embeddings
        i, j, k, l_ = self.mine(x, labels)
        s_ij, s_ik, s_jl = self.score(x, i, j), self.score(x, i, k), self.score(x, j, l_)
        e_m = (self.alpha + s_ik - s_ij).clamp_min(0) + (self.alpha + s_jl - s_ij).clamp_min(0)
        d_ij, d_ik, d_jl = (_distance(x[a], x[b]) for a, b in ((i, j), (i, k), (j, l_)))
        e_e = (self.beta + d_ij - d_ik).clamp_min(0) + (self.beta + d_ij - d_jl).clamp_min(0)
        total = e_m + self.lam * e_e
        if len(total):
            std = torch.cat([s_ij, s_ik, s_jl]).detach().std()
            self._score_std = std if self._score_std is None else self._score_std + std
            self._batches += 1
        return total.sum() / max(len(total), 1)

    @torch.no_grad()
    def trial_metrics(self) -> dict[str, float]:
        """``unit_score_std`` of the batches since the last call (NaN if none had a quadruplet); starts over."""
        value = float("nan") if self._score_std is None else self._score_std.item() / self._batches
        self._score_std, self._batches = None, 0
        return {"unit_score_std": value}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, lam={self.lam}, hidden={self.hidden}"


def _linear(layer: nn.Linear, t: torch.Tensor) -> torch.Tensor:
    """``layer`` applied in t's dtype (a cast copy of the float32 weights; autocast is off)."""
    return F.linear(t, layer.weight.to(t.dtype), layer.bias.to(t.dtype))


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Euclidean distance with a finite gradient when a = b."""
    return (a - b).square().sum(dim=1).clamp_min(1e-12).sqrt()


def _arg_best(groups: torch.Tensor, values: torch.Tensor, num: int) -> torch.Tensor:
    """For groups 0…``num``−1, each non-empty, the index of each group's largest value (ties: the lowest index).

    Nothing reads the device: ``num`` comes from the caller, who knows it (a shape), and the entries that are
    not their group's best take part in the minimum as ``len(values)``, more than any index, instead of being
    filtered out (a boolean mask's nonzero). NaN counts as −∞, so that every group has an index in range even
    for a diverged model's scores (its loss is then not finite and ends the trial; an index out of range would
    instead be an IndexError, or on a GPU a device-side assert that ends the process)."""
    values = torch.where(values.isnan(), float("-inf"), values)
    best = values.new_full((num,), float("-inf")).scatter_reduce(0, groups, values, reduce="amax")
    index = torch.arange(len(values), device=values.device)
    candidates = torch.where(values == best[groups], index, len(values))
    first = torch.full((num,), len(values), dtype=torch.long, device=values.device)
    return first.scatter_reduce(0, groups, candidates, reduce="amin")
