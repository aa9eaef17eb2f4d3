"""Contrastive loss (Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an
Invariant Mapping", CVPR 2006), with a margin on each side:

    L = mean_{active positive pairs} [D_ij − m₊]₊ + mean_{active negative pairs} [m₋ − D_ij]₊.
"""

from __future__ import annotations

import torch

from study.losses.base import MetricLoss, register_loss
from study.losses.pairs import check_positive, euclidean, mean_nonzero, pair_masks


@register_loss("contrastive")
class ContrastiveLoss(MetricLoss):
    """Contrastive loss over all ordered pairs of the batch, D the Euclidean distance of the
    unit-norm embeddings (not squared, as pytorch-metric-learning; Hadsell et al. square it).

    Each side is averaged over its pairs with a non-zero hinge (0 when none), so easy pairs
    do not dilute the gradient as the batch grows. ``positive="easy"`` keeps one positive
    pair per anchor, its nearest same-class sample; negative pairs are unchanged.
    Computed in float32 or wider with autocast off; ``num_classes`` / ``embedding_dim`` are
    ignored.

    Hyperparameters: ``pos_margin`` (m₊ = 0: positives are pulled together entirely),
    ``neg_margin`` (m₋ = 1, Hadsell's m), ``positive`` ("all").
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        positive: str = "all",
    ):
        super().__init__()
        check_positive(positive)
        self.pos_margin, self.neg_margin, self.positive = pos_margin, neg_margin, positive

    def compute(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = euclidean(embeddings)
        pos, neg = pair_masks(-dist, labels, self.positive)
        pull = (dist - self.pos_margin).clamp_min(0) * pos
        push = (self.neg_margin - dist).clamp_min(0) * neg
        return mean_nonzero(pull) + mean_nonzero(push)

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, positive={self.positive}"
