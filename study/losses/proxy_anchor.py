"""Proxy Anchor loss (Kim, Kim, Cho, Kwak, "Proxy Anchor Loss for Deep Metric Learning",
CVPR 2020, Eq. 4) with an optional soft-orthogonality penalty on the proxies:

    L = 1/|P⁺| Σ_{p∈P⁺} log(1 + Σ_{x∈X_p⁺} e^{−α(s(x,p) − δ)})
      + 1/|P|  Σ_{p∈P}  log(1 + Σ_{x∈X_p⁻} e^{ α(s(x,p) + δ)})
      + so_weight · ‖P̂P̂ᵀ − I‖²_F / (C(C − 1)),

P⁺ the proxies with a positive in the batch, P̂ the row-normalised proxies (C × d). The
soft-orthogonality term (Saberi-Movahed et al. 2023) is divided by the number of ordered
proxy pairs: it is the mean squared cosine between distinct proxies, 1/d for random
proxies at any C, so one weight means the same on CUB (100 classes) and SOP (11,318).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from study.losses.base import MetricLoss, register_loss
from study.losses.pairs import log1p_sum_exp

_BLOCK = 4096  # proxy rows per block when the C×C cosine matrix is only read (trial metric)


def soft_orthogonality(proxies: torch.Tensor) -> torch.Tensor:
    """‖P̂P̂ᵀ − I‖²_F / (C(C − 1)) for unit-norm rows P̂: the mean squared cosine between distinct
    proxies, without the C×C matrix (‖P̂P̂ᵀ − I‖²_F = ‖P̂ᵀP̂‖²_F − 2‖P̂‖²_F + C, trace identity).

    The d×d Gram P̂ᵀP̂ costs O(C·d²) time and d² memory, so the penalty scales to tens of
    thousands of classes. Random proxies score ≈ 1/d whatever C is; when C > d the penalty
    cannot reach 0 (its minimum, (C/d − 1)/(C − 1), is ≈ 1/d too).
    """
    num = proxies.shape[0]
    gram = proxies.T @ proxies
    return (gram.square().sum() - 2 * proxies.square().sum() + num) / max(num * (num - 1), 1)


@register_loss("proxy_anchor", trial_metrics=("proxy_abs_cos",))
class ProxyAnchorLoss(MetricLoss):
    """Proxy Anchor loss; ``proxies`` (C × d, float32) are parameters of the loss.

    Proxies are normalised on every forward pass (a float32 copy under autocast, the
    parameter's dtype never changes); embeddings arrive unit-norm. log(1 + Σ e^z) is a
    logsumexp (α(s + δ) reaches 35). With ``so_weight = 0`` the penalty is skipped and the
    loss is exactly pytorch-metric-learning's ProxyAnchorLoss.

    ``trial_metrics()`` reports ``proxy_abs_cos``, the mean |cos| between distinct
    proxies, computed in blocks of rows — what a table needs to show what so_weight did.

    Hyperparameters (paper): ``alpha`` (α = 32), ``delta`` (δ = 0.1), ``so_weight`` (0: the
    plain Proxy Anchor loss; the search space's default turns the penalty on).
    The authors train proxies with lr × 100 (the search space's ``loss_lr_mult``).
    """

    dtype_parameter = "proxies"

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        alpha: float = 32.0,
        delta: float = 0.1,
        so_weight: float = 0.0,
    ):
        super().__init__()
        self.alpha, self.delta, self.so_weight = alpha, delta, so_weight
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim, dtype=torch.float32))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")  # the authors' initialisation

    def compute(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        proxies = F.normalize(self.proxies.to(embeddings.dtype), dim=1)
        cos = proxies @ embeddings.T  # C × B
        is_pos = torch.arange(len(proxies), device=cos.device)[:, None] == labels[None, :]
        pos = log1p_sum_exp(-self.alpha * (cos - self.delta), is_pos)
        neg = log1p_sum_exp(self.alpha * (cos + self.delta), ~is_pos)
        with_pos = is_pos.any(dim=1)
        loss = pos.sum() / with_pos.sum().clamp_min(1) + neg.mean()
        if self.so_weight:
            loss = loss + self.so_weight * soft_orthogonality(proxies)
        return loss

    @torch.no_grad()
    def trial_metrics(self) -> dict[str, float]:
        proxies = F.normalize(self.proxies.float(), dim=1)
        total, n = 0.0, len(proxies)
        for start in range(0, n, _BLOCK):
            cos = proxies[start : start + _BLOCK] @ proxies.T
            total += cos.abs().sum().item() - cos.diagonal(offset=start).abs().sum().item()
        return {"proxy_abs_cos": total / max(n * (n - 1), 1)}

    def extra_repr(self) -> str:
        num_classes, embedding_dim = self.proxies.shape
        return f"{num_classes}, {embedding_dim}, alpha={self.alpha}, delta={self.delta}, so_weight={self.so_weight}"
