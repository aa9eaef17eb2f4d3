"""Margin loss with distance-weighted sampling (Wu, Manmatha, Smola, Krähenbühl,
"Sampling Matters in Deep Embedding Learning", ICCV 2017, Eq. 4 and Sec. 4):

    ℓ(i, j) = [α + y_ij (D_ij − β)]₊,   y = +1 for a positive pair, −1 for a negative one,

with β a learned boundary and negatives drawn with probability ∝ q(D)⁻¹, the inverse of
the density of pairwise distances of uniform points on the unit sphere.
"""

from __future__ import annotations

import torch
from torch import nn

from study.losses.base import MetricLoss, register_loss
from study.losses.pairs import check_positive, euclidean, pair_masks

# The authors' sampling constants: distances below 0.5 are weighted as 0.5 (the weight
# 1/q explodes near 0), negatives farther than 1.4 have no loss and are never drawn.
CUTOFF, NONZERO_LOSS_CUTOFF = 0.5, 1.4


@register_loss("margin")
class MarginLoss(MetricLoss):
    """Margin loss on (anchor, positive, sampled negative) triplets, β a learned scalar.

    For each positive pair (a, p) — all, or only a's nearest with ``positive="easy"`` —
    one negative of a is drawn by distance-weighted sampling (torch's global generator, so
    the trial seed fixes it; uniform over a's negatives if none is within the cutoff).
    A triplet contributes [α + D_ap − β]₊ + [α + β − D_an]₊, and the sum is divided by the
    number of non-zero terms, as the authors' code and pytorch-metric-learning do.

    ``beta`` is a parameter of the loss (float32, learned in the loss group with the lr
    multiplier); the hyperparameter ``beta`` is its initial value. Computed in float32 or
    wider with autocast off; ``num_classes`` is ignored, ``embedding_dim`` sets q(D).

    Hyperparameters (paper): ``margin`` (α = 0.2), ``beta`` (β₀ = 1.2), ``positive``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: float = 0.2,
        beta: float = 1.2,
        positive: str = "all",
    ):
        super().__init__()
        check_positive(positive)
        self.margin, self.positive, self.embedding_dim = margin, positive, embedding_dim
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def sample_triplets(self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(anchor, positive, negative) indices: every positive pair whose anchor has a negative, one weighted
        negative each. Pairs are listed once (one ``nonzero``, the sampling's one wait for the device)."""
        anchor, positive = (pos & neg.any(dim=1, keepdim=True)).nonzero(as_tuple=True)
        if len(anchor) == 0:
            return anchor, positive, positive
        d = dist.detach().clamp_min(CUTOFF)
        n = self.embedding_dim
        # log q(d)⁻¹ = −(n−2)·log d − (n−3)/2 · log(1 − d²/4); shifted per row before exp
        log_w = -(n - 2) * d.log() - (n - 3) / 2 * (1 - d.square() / 4).clamp_min(1e-8).log()
        allowed = neg & (dist.detach() < NONZERO_LOSS_CUTOFF)
        log_w = log_w.masked_fill(~allowed, float("-inf"))
        weights = (log_w - log_w.amax(dim=1, keepdim=True)).exp().nan_to_num(0.0)
        weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, neg.to(weights.dtype))
        return anchor, positive, _draw(weights[anchor])

    def compute(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = euclidean(embeddings)
        pos, neg = pair_masks(-dist, labels, self.positive)
        return self.triplet_loss(dist, *self.sample_triplets(dist, pos, neg))

    def triplet_loss(self, dist: torch.Tensor, anchor, positive, negative) -> torch.Tensor:
        beta = self.beta.to(dist.dtype)
        pull = (self.margin + dist[anchor, positive] - beta).clamp_min(0)
        push = (self.margin + beta - dist[anchor, negative]).clamp_min(0)
        active = (pull > 0).sum() + (push > 0).sum()
        return (pull.sum() + push.sum()) / active.clamp_min(1)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, beta={self.beta.item():.4g}, positive={self.positive}"


def _draw(weights: torch.Tensor) -> torch.Tensor:
    """One index per row of ``weights`` (finite, ≥ 0, each row with a positive entry), drawn with probability
    ∝ the weight: argmax(w / q) with q ~ Exp(1) i.i.d. (the Gumbel-max trick), from torch's global generator.

    This is what ``torch.multinomial(weights, 1)`` computes (the same draws for the same generator state)
    without its checks of the weights (``weights`` is valid by construction here), which on a GPU are a
    device-side assert that would end the process instead of raising."""
    return (weights / torch.empty_like(weights).exponential_(1)).argmax(dim=1)
