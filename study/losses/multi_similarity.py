"""Multi-Similarity loss (Wang, Han, Huang, Dong, Scott, CVPR 2019).

"Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning",
Sec. 4: hard-pair mining with margin ε, then the MS loss

    L = 1/m Σ_i [ 1/α · log(1 + Σ_{k∈P_i} e^{−α(S_ik − λ)})
                + 1/β · log(1 + Σ_{k∈N_i} e^{ β(S_ik − λ)}) ].
"""

from __future__ import annotations

import torch

from study.losses.base import MetricLoss, register_loss
from study.losses.pairs import check_positive, log1p_sum_exp, pair_masks


@register_loss("multi_similarity")
class MultiSimilarityLoss(MetricLoss):
    """Multi-Similarity loss with its ε-mining, vectorised over the B×B similarity matrix.

    Embeddings must arrive L2-normalised (the model head does it, and only it); S = x·xᵀ
    is used as the cosine similarity and they are *not* normalised again here.

    Mining, per anchor i over the un-mined sets (self excluded by index, not by a
    similarity threshold):

    - negative j is kept if S_ij + ε > min_{k positive} S_ik,
    - positive k is kept if S_ik − ε < max_{j negative} S_ij.

    An empty min is +∞ and an empty max is −∞, so a singleton anchor (no positives) keeps
    no negatives and an anchor of an all-same-class batch keeps no positives. In exact
    arithmetic an anchor keeps a positive iff it keeps a negative.

    Reduction: the mean over *all* B anchors; an anchor with no kept pair contributes 0.
    This is what the authors' code (sum over anchors / batch size) and
    pytorch-metric-learning (MultiSimilarityLoss + MultiSimilarityMiner, MeanReducer) do.

    The loss is computed in (at least) float32 with autocast off: β = 50 magnifies a
    bfloat16 rounding of S (~4e-3) into ~0.2 in the exponent.

    Hyperparameters (paper / authors' code defaults): ``alpha`` (α = 2) and ``beta``
    (β = 50; 40 in the authors' config) weight positives and negatives, ``base`` (λ = 0.5)
    is the similarity margin, ``epsilon`` (ε = 0.1) the mining margin. ``positive="easy"``
    (easy positive sampling, Levi et al. ICCV 2021; ``pairs.py``) *replaces* the positive
    mining: each anchor's one positive is its most similar same-class sample — the pair MS's
    own rule (S − ε < max_neg) would drop first — and negatives are mined against it
    (kept if S_ij + ε > S(i, easy positive)). ``mining=False`` keeps every negative (and every
    positive, or the easy one): the paper's ablation of its pair mining, the same as ε ≥ 2 on
    unit vectors.
    ``num_classes`` and ``embedding_dim`` are ignored (registry convention).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        positive: str = "all",
        mining: bool = True,
    ):
        super().__init__()
        check_positive(positive)
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon
        self.positive, self.mining = positive, mining

    def mine(self, sim: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean B×B masks (kept positives, kept negatives) for the similarity matrix ``sim``."""
        sim = sim.detach()
        pos, neg = pair_masks(sim, labels, self.positive)
        if not self.mining:
            return pos, neg
        # the similarity negatives are mined against: the least similar positive, or the easy one
        ref_pos = sim.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
        if self.positive == "easy":  # the easy positive replaces MS's positive mining, never meets it
            return pos, neg & (sim + self.epsilon > ref_pos)
        max_neg = sim.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
        return pos & (sim - self.epsilon < max_neg), neg & (sim + self.epsilon > ref_pos)

    def compute(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean MS loss of a batch of unit-norm ``embeddings`` (B×d) with integer ``labels`` (B)."""
        sim = embeddings @ embeddings.T
        keep_pos, keep_neg = self.mine(sim, labels)
        pos = log1p_sum_exp(-self.alpha * (sim - self.base), keep_pos) / self.alpha
        neg = log1p_sum_exp(self.beta * (sim - self.base), keep_neg) / self.beta
        return (pos + neg).mean()

    def extra_repr(self) -> str:
        hp = f"alpha={self.alpha}, beta={self.beta}, base={self.base}, epsilon={self.epsilon}"
        return f"{hp}, positive={self.positive}, mining={self.mining}"
