"""Models: the timm trunk + embedding head (and, later, the PDDM similarity unit)."""

from study.models.embedding import EmbeddingNet

__all__ = ["EmbeddingNet"]
