"""Datasets (``DATASETS`` registry), class-disjoint splits, m-per-class sampling, batch transforms.

A dataset builder is called as ``builder(root, **options)`` and returns
``(images, labels, *extras)``: the images as one uint8 tensor (N, 3, H, W), the
integer class labels (N,), then anything dataset-specific (e.g. sub-mode ids).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from study.data.synthetic import make_synthetic

DATASETS: dict[str, Callable[..., tuple]] = {"synthetic": make_synthetic}


def dataset_options(name: str) -> list[str]:
    """The options dataset ``name`` accepts (its builder's keyword arguments)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}")
    return [p for p in inspect.signature(DATASETS[name]).parameters if p != "root"]


def create_dataset(name: str, root: str | Path | None = None, **options) -> tuple[torch.Tensor, np.ndarray]:
    """Build dataset ``name``: (uint8 images, labels). Unknown names and options raise ValueError."""
    allowed = dataset_options(name)
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise ValueError(f"dataset.options.{unknown[0]}: unknown option; allowed: {', '.join(allowed)}")
    images, labels, *_ = DATASETS[name](root, **options)
    return images, labels
