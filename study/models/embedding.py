"""The embedding network: a timm trunk, a linear embedding head, L2 normalisation.

Embeddings are L2-normalised here and only here: losses and
metrics receive unit vectors and never normalise again.

The trunk is any timm model. The backbones of the papers studied here:
``resnet50``; ``inception_v3`` for the BN-Inception of Multi-Similarity,
SoftTriple and Proxy Anchor (timm has no BN-Inception; its Inception-v3 has
BatchNorm after every convolution and is the closest); ``deit_small_patch16_224``
for soft-orthogonal proxies.

Channels-last: ``model.to(memory_format=torch.channels_last)`` works for the CNN
trunks (and is harmless for ViTs); feed it channels-last images or let the first
convolution convert them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d, freeze_batch_norm_2d
from timm.models.vision_transformer import VisionTransformer
from torch import nn

POOLINGS = ("avg", "max", "avgmax", "token")
"""Global pooling of the trunk, timm's ``global_pool`` names: ``avgmax`` is the mean of the avg- and max-pooled
features (not their concatenation, so the feature size does not change); ``token`` is the class token of a ViT."""


class EmbeddingNet(nn.Module):
    """``timm.create_model(backbone, num_classes=0, global_pool=pooling)`` → Linear(features, embedding_dim) → L2 norm.

    ``pretrained``: False (random init), ``"hub"`` (timm's pretrained weights, downloaded
    by timm) or a path to a local weights file of the trunk (safetensors or a
    ``torch.save``-d state dict, loaded by timm with ``weights_only``).

    ``pooling``: one of :data:`POOLINGS`. CNNs take avg/max/avgmax; timm's ViTs (DeiT included) take
    all four where they have a class token, and ``token`` is what DeiT was trained with (the default
    ``avg`` averages DeiT's patch tokens instead). A ViT keeps its final norm where its pretrained
    weights have it (DeiT: on every token, before pooling) whatever the pooling; timm alone would
    move it after an avg/max pooling as a freshly initialised LayerNorm and drop the pretrained one.

    ``freeze_bn``: every BatchNorm becomes a FrozenBatchNorm (after the weights are loaded), so
    its running statistics and affine parameters stay as pretrained, in train mode too, and the
    optimizer never sees them (the Proxy Anchor recipe: batches of few classes give poor batch
    statistics). A no-op for trunks without BatchNorm (ViTs).
    """

    def __init__(
        self,
        backbone: str,
        embedding_dim: int,
        pretrained: bool | str | Path = False,
        *,
        pooling: str = "avg",
        freeze_bn: bool = False,
        backbone_options: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.trunk = _create_trunk(backbone, pooling, pretrained, backbone_options or {})
        if freeze_bn:
            self.trunk = freeze_batch_norm_2d(self.trunk)
        self.head = nn.Linear(self.trunk.num_features, embedding_dim)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's pooled features (B, num_features): what a feature-mode run computes once and caches."""
        return self.trunk(images)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Head + L2 normalisation of trunk features: the only trainable part in feature mode."""
        return F.normalize(self.head(features), dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.features(images))

    def set_trunk_trainable(self, trainable: bool) -> None:
        """Switch gradients of the trunk's parameters on or off, for warm-up epochs that train only the head
        (and the loss's proxies) while the trunk is frozen (Proxy Anchor). BatchNorm running statistics still
        update in train mode unless ``freeze_bn`` was set, as in the authors' code."""
        for parameter in self.trunk.parameters():
            parameter.requires_grad_(trainable)


def _create_trunk(backbone: str, pooling: str, pretrained: bool | str | Path, options: Mapping[str, Any]) -> nn.Module:
    """timm trunk without classifier, pooling as asked, built with ``options`` (more timm arguments: a
    narrower ResNet's ``channels``…); a pooling the backbone cannot do is a one-line ValueError."""
    kwargs: dict = {**options, "num_classes": 0, "global_pool": pooling}
    if isinstance(pretrained, (str, Path)) and pretrained != "hub":
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"file": str(pretrained)}}
    else:
        kwargs["pretrained"] = bool(pretrained)
    default = _default_layout(backbone)
    if isinstance(default, VisionTransformer):
        # The final norm stays where the pretrained weights have it: before pooling (class-token models such as
        # DeiT) or after it (fc_norm, average-pooled models); timm would move it with the pooling and drop it.
        kwargs["fc_norm"] = not isinstance(default.fc_norm, nn.Identity)
    try:
        trunk = timm.create_model(backbone, **kwargs)
    except (AssertionError, ValueError, TypeError) as err:  # timm asserts on a pool type it does not know
        if _accepts_pooling(backbone, pooling):
            raise  # the error is about something else (the weights file, …): keep it as it is
        raise ValueError(_pooling_message(backbone, pooling)) from err
    if _pool_type(trunk) not in (None, pooling):
        raise ValueError(_pooling_message(backbone, pooling))
    return trunk


def _default_layout(backbone: str) -> nn.Module | None:
    """The architecture as timm defines it, built on the meta device (no memory, no weights), to read its layout;
    None where that is not possible (an unknown name, a model that cannot be built on the meta device)."""
    try:
        with torch.device("meta"):
            return timm.create_model(backbone, num_classes=0)
    except (RuntimeError, NotImplementedError, AssertionError, ValueError, TypeError):
        return None


def _pool_type(trunk: nn.Module) -> str | None:
    """The global pooling the trunk really applies (ViT: a string attribute; CNN: its adaptive pool), or None."""
    if isinstance(getattr(trunk, "global_pool", None), str):
        return trunk.global_pool
    pools = [m for m in trunk.modules() if isinstance(m, SelectAdaptivePool2d)]
    return pools[-1].pool_type if pools else None


def _pooling_message(backbone: str, pooling: str) -> str:
    allowed = [p for p in POOLINGS if p != pooling and _accepts_pooling(backbone, p)]
    return f"backbone {backbone!r} cannot pool with {pooling!r}; it allows: {', '.join(allowed) or 'none of ours'}"


def _accepts_pooling(backbone: str, pooling: str) -> bool:
    """Whether timm builds ``backbone`` with this pooling; built on the meta device, so it costs no memory."""
    try:
        with torch.device("meta"):
            trunk = timm.create_model(backbone, num_classes=0, global_pool=pooling)
    except (AssertionError, ValueError, TypeError, RuntimeError, NotImplementedError):
        return False
    return _pool_type(trunk) in (None, pooling)
