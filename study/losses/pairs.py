"""What the pair-based losses share: pair masks with easy positive sampling, distances,
reductions, and a stable log(1 + Σ eᶻ).

Easy positive sampling (Levi, Xiao, Zhou, Hirschmann, "Rethinking preventing
class-collapsing in metric learning with margin-based losses", ICCV 2021; the same rule as
Xuan, Stylianou, Pless, "Improved Embeddings with Easy Positive Triplet Mining", WACV 2020):
each anchor's positive is its most similar same-class sample in the batch. It *replaces* the
base loss's positive selection (never intersected with a hard-positive miner); negatives
stay as the base loss mines them, relative to that positive. It is the ``positive="easy"``
option of triplet, contrastive, margin and Multi-Similarity, so that one search space
compares it with ``positive="all"``.
"""

from __future__ import annotations

from typing import Literal

import torch

Positive = Literal["all", "easy"]
POSITIVE_CHOICES = ("all", "easy")


def check_positive(positive: str) -> None:
    if positive not in POSITIVE_CHOICES:
        raise ValueError(f"positive must be one of {', '.join(POSITIVE_CHOICES)} (got {positive!r})")


def pair_masks(sim: torch.Tensor, labels: torch.Tensor, positive: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean B×B masks (positive pairs, negative pairs) for the similarity matrix ``sim``.

    Self-pairs are excluded by index. With ``positive="easy"`` row i keeps only the
    positive of highest similarity (ties: the lowest index); an anchor without a
    same-class sample keeps none.
    """
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=sim.device)
    pos, neg = same & ~eye, ~same
    if positive == "easy":
        nearest = sim.detach().masked_fill(~pos, float("-inf")).argmax(dim=1, keepdim=True)
        easy = torch.zeros_like(pos).scatter_(1, nearest, True)
        pos = pos & easy
    return pos, neg


def euclidean(x: torch.Tensor) -> torch.Tensor:
    """B×B Euclidean distances of unit-norm rows, √(2 − 2·xᵢ·xⱼ), with a finite gradient at 0.

    The clamp keeps the sqrt argument ≥ 1e-12 so collapsed embeddings (distance 0) give
    a zero, not NaN, gradient; exact self-distances are set to 0 by index.
    """
    sq = (2 - 2 * x @ x.T).clamp_min(1e-12)
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    return sq.sqrt().masked_fill(eye, 0.0)


def mean_nonzero(losses: torch.Tensor) -> torch.Tensor:
    """Mean over the strictly positive entries (0 when none): the average over the active
    pairs or triplets, as Hermans et al. (2017) and pytorch-metric-learning reduce."""
    active = losses > 0
    return losses.sum() / active.sum().clamp_min(1)


def log1p_sum_exp(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row-wise log(1 + Σ_{keep} e^z), as a logsumexp with an appended 0 (exponents reach 25–35)."""
    z = z.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(torch.cat([z, z.new_zeros(z.shape[0], 1)], dim=1), dim=1)
