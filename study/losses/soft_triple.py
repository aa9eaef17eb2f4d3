"""SoftTriple loss (Qian, Shang, Sun, Hu, Li, Jin, "SoftTriple Loss: Deep Metric Learning
Without Triplet Sampling", ICCV 2019, Eq. 8–12):

    S'_{i,c} = Σ_k softmax_k(xᵢᵀw_c^k / γ) · xᵢᵀw_c^k                 (relaxed class similarity)
    L = CE(λ(S'_i − δ·1[c = yᵢ]), yᵢ) + τ · R,
    R = Σ_c Σ_{t<t'} √(2 + ε − 2 w_c^tᵀw_c^{t'}) / (C·K·(K−1))     (L2,1 center regulariser)

with K unit-norm centers per class, normalised on every forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from study.losses.base import MetricLoss, register_loss

_EPS = 1e-5  # the authors' ε inside the square root; the argument is also clamped to ≥ ε
MERGE_DISTANCE = 0.1  # two centers of a class closer than this (unit sphere) count as one


def center_regularizer(centers: torch.Tensor) -> torch.Tensor:
    """R for unit-norm centers shaped C × K × d (0 when K = 1)."""
    num_classes, k, _ = centers.shape
    if k < 2:
        return centers.new_zeros(())
    sim = centers @ centers.transpose(1, 2)  # C × K × K, small: K ≤ a few dozen
    # the pairs t < t' by index, in the row-major order a boolean triu mask gives, but without the mask's
    # nonzero (which waits for the device to count its entries)
    rows, cols = torch.triu_indices(k, k, 1, device=centers.device)
    dist = (2 + _EPS - 2 * sim[:, rows, cols]).clamp_min(_EPS).sqrt()
    return dist.sum() / (num_classes * k * (k - 1))


def effective_centers(centers: torch.Tensor, merge_distance: float = MERGE_DISTANCE) -> torch.Tensor:
    """Per class, the number of groups of centers once centers closer than ``merge_distance``
    are merged (single linkage: connected components), for unit-norm centers C × K × d."""
    k = centers.shape[1]
    close = torch.cdist(centers, centers) < merge_distance
    reach = close.float()
    for _ in range(max(1, math.ceil(math.log2(k)))):  # transitive closure by squaring
        reach = ((reach @ reach) > 0).float()
    return (1.0 / reach.sum(dim=2)).sum(dim=1)  # Σ_t 1/|component(t)| = number of components


@register_loss("soft_triple", trial_metrics=("effective_centers",))
class SoftTripleLoss(MetricLoss):
    """SoftTriple with the L2,1 center regulariser; ``centers`` (C·K × d, float32) are a
    parameter of the loss, class c owning rows c·K … c·K + K − 1.

    Computed in float32 or wider with autocast off (a float32 copy of the centers under
    autocast; the parameter's dtype never changes). ``trial_metrics()`` reports
    ``effective_centers``: the mean over classes of the centers left after merging those
    closer than ``MERGE_DISTANCE`` — the paper's claim is that a large K with τ > 0
    shrinks to a compact set.

    Hyperparameters (paper): ``centers_per_class`` (K = 10), ``la`` (λ = 20), ``gamma``
    (γ = 0.1), ``tau`` (τ = 0.2), ``margin`` (δ = 0.01). The authors train the centers
    with lr × 100 (the search space's ``loss_lr_mult``).
    """

    dtype_parameter = "centers"

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        tau: float = 0.2,
        margin: float = 0.01,
    ):
        super().__init__()
        if centers_per_class < 1:
            raise ValueError(f"centers_per_class must be ≥ 1 (got {centers_per_class})")
        self.num_classes, self.k = num_classes, int(centers_per_class)
        self.la, self.gamma, self.tau, self.margin = la, gamma, tau, margin
        self.centers = nn.Parameter(torch.empty(num_classes * self.k, embedding_dim, dtype=torch.float32))
        nn.init.normal_(self.centers)

    def unit_centers(self, dtype: torch.dtype) -> torch.Tensor:
        """The normalised centers as C × K × d."""
        return F.normalize(self.centers.to(dtype), dim=1).view(self.num_classes, self.k, -1)

    def compute(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dtype = embeddings.dtype
        centers = self.unit_centers(dtype)
        # one B × (C·K) matmul; an einsum over C × K × d lowers to a slow batched product
        sim = (embeddings @ centers.flatten(0, 1).T).view(len(embeddings), self.num_classes, self.k)
        relaxed = (F.softmax(sim / self.gamma, dim=2) * sim).sum(dim=2)  # B × C
        logits = self.la * (relaxed - self.margin * F.one_hot(labels, self.num_classes).to(dtype))
        loss = F.cross_entropy(logits, labels)
        if self.tau:
            loss = loss + self.tau * center_regularizer(centers)
        return loss

    @torch.no_grad()
    def trial_metrics(self) -> dict[str, float]:
        return {"effective_centers": effective_centers(self.unit_centers(torch.float32)).mean().item()}

    def extra_repr(self) -> str:
        return (
            f"{self.num_classes}, {self.centers.shape[1]}, centers_per_class={self.k}, la={self.la}, "
            f"gamma={self.gamma}, tau={self.tau}, margin={self.margin}"
        )
