"""Normalized softmax loss (Zhai & Wu, BMVC 2019).

"Classification is a Strong Baseline for Deep Metric Learning": cross-entropy over
cosine logits between the embedding x and L2-normalised class weights p_c, sharpened by
a temperature σ:

    L = −log( e^{xᵀp̂_y / σ} / Σ_c e^{xᵀp̂_c / σ} ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from study.losses.base import MetricLoss, register_loss


@register_loss("normalized_softmax")
class NormalizedSoftmaxLoss(MetricLoss):
    """Cross-entropy of x·Ŵᵀ / temperature, Ŵ the row-normalised class weights, batch mean.

    ``W`` (num_classes × embedding_dim, float32) is a parameter of the loss, so the
    optimizer must include the loss's parameters. The rows are normalised on every forward
    pass; embeddings must arrive L2-normalised (the model head does it) and are not
    normalised again.

    Computed in (at least) float32 with autocast off: under bfloat16 autocast a float32
    copy of the weights is used and the parameter's dtype never changes. Float64 inputs
    are computed in float64.

    Hyperparameter: ``temperature`` (σ = 0.05, the paper's value).
    """

    dtype_parameter = "W"

    def __init__(self, num_classes: int, embedding_dim: int, *, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature
        self.W = nn.Parameter(torch.empty(num_classes, embedding_dim, dtype=torch.float32))
        # Only the direction matters (rows are normalised); unit-variance rows keep the
        # initial cosine logits spread around 0.
        nn.init.normal_(self.W)

    def compute(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch; ``labels`` are class indices in [0, num_classes)."""
        weights = F.normalize(self.W.to(embeddings.dtype), dim=1)
        logits = (embeddings / self.temperature) @ weights.T  # cosine logits / σ: scale B×d, not B×C
        return F.cross_entropy(logits, labels)

    def extra_repr(self) -> str:
        num_classes, embedding_dim = self.W.shape
        return f"{num_classes}, {embedding_dim}, temperature={self.temperature}"
