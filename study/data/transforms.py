"""Batch augmentation on tensors (CPU or GPU): random crop with padding + horizontal flip, then normalise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def eval_transform(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float, normalised with the ImageNet mean and std."""
    x = images.float().div_(255)
    return (x - MEAN.to(x.device)) / STD.to(x.device)


def train_transform(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Per-sample random crop (zero padding of ``pad`` px) and horizontal flip, seeded by ``generator``."""
    b, _, h, w = images.shape
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
    x = F.pad(eval_transform(images), (pad, pad, pad, pad))
    rows = (offsets[:, 0, None] + torch.arange(h)).to(x.device)
    cols = (offsets[:, 1, None] + torch.arange(w)).to(x.device)
    cols = torch.where(flips.to(x.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
