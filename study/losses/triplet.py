"""Triplet margin loss (Schroff, Kalenichenko, Philbin, "FaceNet", CVPR 2015; batch
mining as in Hermans, Beyer, Leibe, "In Defense of the Triplet Loss", 2017):

    ℓ(a, p, n) = [D_ap − D_an + m]₊,   D the Euclidean distance of unit-norm embeddings.
"""

from __future__ import annotations

import torch

from study.losses.base import MetricLoss, register_loss
from study.losses.pairs import check_positive, euclidean, mean_nonzero, pair_masks

NEGATIVES = ("semihard", "hard", "all")


@register_loss("triplet")
class TripletLoss(MetricLoss):
    """Triplet loss over the batch's (anchor, positive) pairs with one of three negative choices.

    For every positive pair (a, p) — all of them, or only a's nearest one with
    ``positive="easy"`` — the negatives are:

    - ``all``: every negative of a (Hermans' batch-all);
    - ``hard``: a's nearest negative (batch-hard on the negative side; with
      ``positive="easy"`` this is Xuan et al.'s easy-positive / hard-negative triplet);
    - ``semihard``: a's nearest negative farther than p (FaceNet, Sec. 3.2); a pair with
      no such negative contributes no triplet.

    The loss is the mean over the triplets with a non-zero hinge (0 when there is none),
    the reduction of Hermans et al. and of pytorch-metric-learning. Computed in float32 or
    wider with autocast off; ``num_classes`` / ``embedding_dim`` are ignored.

    Hyperparameters: ``margin`` (m = 0.2, FaceNet's α), ``negatives`` ("semihard",
    FaceNet's choice), ``positive`` ("all").
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: float = 0.2,
        negatives: str = "semihard",
        positive: str = "all",
    ):
        super().__init__()
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)} (got {negatives!r})")
        check_positive(positive)
        self.margin, self.negatives, self.positive = margin, negatives, positive

    def compute(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = euclidean(embeddings)
        pos, neg = pair_masks(-dist, labels, self.positive)
        if self.negatives == "all":
            return self._batch_all(dist, pos, neg)
        anchor, positive = pos.nonzero(as_tuple=True)
        negative, found = self._pick_negatives(dist.detach(), neg, anchor, positive)
        hinge = dist[anchor, positive] - dist[anchor, negative] + self.margin
        return mean_nonzero(hinge.clamp_min(0) * found)

    def _pick_negatives(
        self, dist: torch.Tensor, neg: torch.Tensor, anchor: torch.Tensor, positive: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One negative index per (anchor, positive) pair and whether it exists."""
        neg_dist = dist.masked_fill(~neg, float("inf"))
        if self.negatives == "hard":
            nearest = neg_dist.amin(dim=1)
            return neg_dist.argmin(dim=1)[anchor], torch.isfinite(nearest)[anchor]
        # semihard: sort each anchor's negative distances, binary-search D_ap (B² memory, not B³)
        sorted_dist, order = neg_dist.sort(dim=1)
        d_ap = dist[anchor, positive].unsqueeze(1).contiguous()
        slot = torch.searchsorted(sorted_dist[anchor], d_ap, right=True).squeeze(1)
        slot = slot.clamp_max(dist.shape[1] - 1)
        found = torch.isfinite(sorted_dist[anchor, slot]) & (sorted_dist[anchor, slot] > d_ap.squeeze(1))
        return order[anchor, slot], found

    def _batch_all(self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Mean non-zero hinge over all (a, p, n): a P × B matrix (P positive pairs), not B³."""
        anchor, positive = pos.nonzero(as_tuple=True)
        hinge = dist[anchor, positive][:, None] - dist[anchor] + self.margin
        return mean_nonzero(hinge.clamp_min(0) * neg[anchor])

    def extra_repr(self) -> str:
        return f"margin={self.margin}, negatives={self.negatives}, positive={self.positive}"
