"""The loss registry: one loss per file, ``LOSSES`` maps a config name to its class.

Every loss follows one constructor convention::

    __init__(self, num_classes: int, embedding_dim: int, *, <hyperparameters>)

The two positional arguments come from the data and the model (most pair-based losses
ignore them); the keyword-only arguments are exactly the searchable hyperparameters, with the
paper's values as defaults. ``forward(embeddings, labels)`` returns a scalar; embeddings
arrive L2-normalised from the model head. A loss with learned state worth reporting
(effective centers, proxy correlation) may define ``trial_metrics() -> dict[str, float]``:
the trial logs it after every epoch next to the retrieval metrics.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from study.losses.contrastive import ContrastiveLoss
from study.losses.margin import MarginLoss
from study.losses.multi_similarity import MultiSimilarityLoss
from study.losses.normalized_softmax import NormalizedSoftmaxLoss
from study.losses.pddm import PDDMLoss
from study.losses.proxy_anchor import ProxyAnchorLoss
from study.losses.proxy_nca import ProxyNCALoss
from study.losses.soft_triple import SoftTripleLoss
from study.losses.triplet import TripletLoss

LOSSES: dict[str, type[nn.Module]] = {
    "contrastive": ContrastiveLoss,
    "margin": MarginLoss,
    "multi_similarity": MultiSimilarityLoss,
    "normalized_softmax": NormalizedSoftmaxLoss,
    "pddm": PDDMLoss,
    "proxy_anchor": ProxyAnchorLoss,
    "proxy_nca": ProxyNCALoss,
    "soft_triple": SoftTripleLoss,
    "triplet": TripletLoss,
}

__all__ = [
    "LOSSES",
    "ContrastiveLoss",
    "MarginLoss",
    "MultiSimilarityLoss",
    "NormalizedSoftmaxLoss",
    "PDDMLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "TripletLoss",
    "create_loss",
    "has_parameters",
    "loss_hyperparameters",
]


def _loss_class(name: str) -> type[nn.Module]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def loss_hyperparameters(name: str) -> dict[str, Any]:
    """The searchable hyperparameters of loss ``name`` and their defaults, in signature order."""
    params = inspect.signature(_loss_class(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def has_parameters(name: str) -> bool:
    """Whether loss ``name`` learns parameters of its own (proxies, centers, a unit): they train at
    ``lr × loss_lr_mult``."""
    return any(p.requires_grad for p in create_loss(name, 2, 4).parameters())


def create_loss(name: str, num_classes: int, embedding_dim: int, **hparams: Any) -> nn.Module:
    """Build loss ``name``; ``hparams`` must be a subset of ``loss_hyperparameters(name)``."""
    cls = _loss_class(name)
    allowed = loss_hyperparameters(name)
    unknown = [key for key in hparams if key not in allowed]
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for loss {name!r}; "
            f"allowed: {', '.join(allowed) or '(none)'}"
        )
    return cls(num_classes, embedding_dim, **hparams)
