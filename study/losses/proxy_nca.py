"""ProxyNCA (Movshovitz-Attias, Toshev, Leung, Ioffe, Singh, "No Fuss Distance Metric
Learning using Proxies", ICCV 2017, Eq. 7):

    L(x, y) = −log( e^{−s·d(x, p̂_y)} / Σ_{z≠y} e^{−s·d(x, p̂_z)} ),   d = ‖x − p̂‖²,

one learned proxy per class, x and p̂ unit-norm, s a scale on the squared distances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from study.losses.base import MetricLoss, register_loss


@register_loss("proxy_nca")
class ProxyNCALoss(MetricLoss):
    """ProxyNCA with the paper's denominator: the positive proxy is *not* in it.

    So the loss is unbounded below (it reaches −s·4 + log(C−1) at best) — the paper's
    definition; pytorch-metric-learning puts the positive in the denominator instead
    (a softmax cross-entropy), which a test spells out. Batch mean.

    ``proxies`` (num_classes × embedding_dim, float32) are parameters of the loss,
    normalised on every forward pass; under autocast a float32 copy is used and the
    parameter's dtype never changes. Computed in float32 or wider with autocast off.

    Hyperparameter: ``scale`` (s = 1: the paper has no scale; ProxyNCA++ argues for ≈ 9).
    """

    dtype_parameter = "proxies"

    def __init__(self, num_classes: int, embedding_dim: int, *, scale: float = 1.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"proxy_nca needs at least 2 classes (got {num_classes})")
        self.scale = scale
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim, dtype=torch.float32))
        nn.init.normal_(self.proxies)

    def compute(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        proxies = F.normalize(self.proxies.to(embeddings.dtype), dim=1)
        # −s·‖x − p̂‖² = 2s·xᵀp̂ − 2s for unit vectors; the constant cancels in the loss, and the
        # scale goes on the B×d embeddings rather than on the B×C logits
        logits = (2 * self.scale * embeddings) @ proxies.T
        positive = logits.gather(1, labels[:, None]).squeeze(1)
        others = logits.scatter(1, labels[:, None], float("-inf"))
        return (torch.logsumexp(others, dim=1) - positive).mean()

    def extra_repr(self) -> str:
        num_classes, embedding_dim = self.proxies.shape
        return f"{num_classes}, {embedding_dim}, scale={self.scale}"
