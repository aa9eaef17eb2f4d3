"""The embedding network: a timm trunk, a linear embedding head, L2 normalisation.

Embeddings are L2-normalised here and only here (DESIGN.md §5): losses and
metrics receive unit vectors and never normalise again.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingNet(nn.Module):
    """``timm.create_model(backbone, num_classes=0)`` → Linear(features, embedding_dim) → L2 norm.

    ``pretrained``: False (random init), ``"hub"`` (timm's pretrained weights, downloaded
    by timm) or a path to a local weights file of the trunk (safetensors or a
    ``torch.save``-d state dict, loaded by timm with ``weights_only``).
    """

    def __init__(self, backbone: str, embedding_dim: int, pretrained: bool | str | Path = False):
        super().__init__()
        if isinstance(pretrained, (str, Path)) and pretrained != "hub":
            self.trunk = timm.create_model(
                backbone,
                pretrained=True,
                num_classes=0,
                pretrained_cfg_overlay={"file": str(pretrained)},
            )
        else:
            self.trunk = timm.create_model(backbone, pretrained=bool(pretrained), num_classes=0)
        self.head = nn.Linear(self.trunk.num_features, embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.trunk(images)), dim=1)
