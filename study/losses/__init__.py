"""The loss registry: one loss per file, ``LOSSES`` maps a config name to its class.

Every loss follows one constructor convention::

    __init__(self, num_classes: int, embedding_dim: int, *, <hyperparameters>)

The two positional arguments come from the data and the model (most pair-based losses
ignore them); the keyword-only arguments are exactly the searchable hyperparameters, with the
paper's values as defaults. ``forward(embeddings, labels)`` returns a scalar; embeddings
arrive L2-normalised from the model head. A loss with learned state worth reporting
(effective centers, proxy correlation) may define ``trial_metrics() -> dict[str, float]``:
the trial logs it after every epoch next to the retrieval metrics.

To add a loss:

1. Write one file, ``study/losses/<name>.py``, with a subclass of
   :class:`~study.losses.base.MetricLoss`. Implement ``compute(embeddings, labels)``, not
   ``forward``: the base class's ``forward`` promotes the embeddings to float32 (or wider),
   switches autocast off and moves the labels to the embeddings' device first. A loss whose
   learned table should widen that dtype too (proxies, centers) names it in ``dtype_parameter``.
2. Register it with the decorator ``@register_loss("<name>")``; if it defines
   ``trial_metrics()``, declare the names it reports: ``@register_loss("<name>",
   trial_metrics=("<metric>", ...))`` (the driver tags each trial with them, so analysis finds
   them without importing torch; ``tests/test_losses.py`` checks the declaration).
3. Import the module below, so that importing ``study.losses`` registers it.
4. Add its search space, ``search_spaces/<name>.yaml`` (see ``study.search_space``): the
   hyperparameters' ranges, their paper defaults and which are searched on a log scale.
"""

from __future__ import annotations

import inspect
from typing import Any

from study.losses.base import LOSSES, MetricLoss, register_loss
from study.losses.contrastive import ContrastiveLoss
from study.losses.margin import MarginLoss
from study.losses.multi_similarity import MultiSimilarityLoss
from study.losses.normalized_softmax import NormalizedSoftmaxLoss
from study.losses.pddm import PDDMLoss
from study.losses.proxy_anchor import ProxyAnchorLoss
from study.losses.proxy_nca import ProxyNCALoss
from study.losses.soft_triple import SoftTripleLoss
from study.losses.triplet import TripletLoss

__all__ = [
    "LOSSES",
    "ContrastiveLoss",
    "MarginLoss",
    "MetricLoss",
    "MultiSimilarityLoss",
    "NormalizedSoftmaxLoss",
    "PDDMLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "TripletLoss",
    "create_loss",
    "declared_trial_metrics",
    "has_parameters",
    "loss_hyperparameters",
    "register_loss",
]


def _loss_class(name: str) -> type[MetricLoss]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def loss_hyperparameters(name: str) -> dict[str, Any]:
    """The searchable hyperparameters of loss ``name`` and their defaults, in signature order."""
    params = inspect.signature(_loss_class(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def declared_trial_metrics(name: str) -> tuple[str, ...]:
    """The names of the metrics loss ``name``'s ``trial_metrics()`` reports, as its registration
    declares them (empty for a loss without trial metrics)."""
    return getattr(_loss_class(name), "declared_metrics", ())


def has_parameters(name: str) -> bool:
    """Whether loss ``name`` learns parameters of its own (proxies, centers, a unit): they train at
    ``lr × loss_lr_mult``."""
    return any(p.requires_grad for p in create_loss(name, 2, 4).parameters())


def create_loss(name: str, num_classes: int, embedding_dim: int, **hparams: Any) -> MetricLoss:
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
