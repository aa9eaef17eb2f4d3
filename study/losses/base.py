"""What every loss shares: :class:`MetricLoss` (the float32 prologue) and :func:`register_loss` (the registry).

Kept apart from ``study/losses/__init__.py`` so that a loss file imports it without importing the
other losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar, TypeVar

import torch
from torch import nn

LOSSES: dict[str, type[MetricLoss]] = {}  # config name → class, filled by @register_loss


class MetricLoss(nn.Module):
    """A deep-metric-learning loss: ``forward(embeddings, labels)`` returns a scalar.

    ``forward`` is the one prologue every loss needs: the embeddings are promoted to float32 (or
    wider: float64 stays float64), autocast is switched off, and the labels are moved to the
    embeddings' device; then :meth:`compute` does the loss's own work. Losses whose learned table
    sets the precision too (proxies, centers, class weights) name that parameter in
    ``dtype_parameter``: the computation then runs in the wider of the two dtypes (the parameter
    itself is never converted; the loss casts a copy).
    """

    dtype_parameter: ClassVar[str | None] = None
    declared_metrics: ClassVar[tuple[str, ...]] = ()  # what trial_metrics() reports; set by register_loss

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        if self.dtype_parameter is not None:
            dtype = torch.promote_types(dtype, getattr(self, self.dtype_parameter).dtype)
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.compute(embeddings.to(dtype), labels.to(embeddings.device))

    def compute(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of a batch: ``embeddings`` (B × d, float32 or wider, unit-norm) and ``labels`` (B,
        integer classes, on the same device), with autocast off."""
        raise NotImplementedError


L = TypeVar("L", bound=type[MetricLoss])


def register_loss(name: str, *, trial_metrics: Iterable[str] = ()) -> Callable[[L], L]:
    """Class decorator: register a :class:`MetricLoss` as loss ``name`` (its config name).

    ``trial_metrics`` are the names of the metrics its ``trial_metrics()`` reports, declared so that
    the driver can tag every trial with them (analysis reads them without importing torch); a loss
    that declares some must define ``trial_metrics()`` and one that defines it must declare them.
    ValueError when ``name`` is taken, TypeError for anything but a MetricLoss.
    """
    names = tuple(trial_metrics)

    def register(cls: L) -> L:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered (by {LOSSES[name].__qualname__})")
        if not (isinstance(cls, type) and issubclass(cls, MetricLoss)):
            raise TypeError(f"loss {name!r}: {cls!r} is not a MetricLoss subclass")
        if bool(names) != callable(getattr(cls, "trial_metrics", None)):
            raise TypeError(
                f"loss {name!r}: declare trial_metrics=(...) exactly when the class defines trial_metrics()"
            )
        cls.declared_metrics = names
        LOSSES[name] = cls
        return cls

    return register
