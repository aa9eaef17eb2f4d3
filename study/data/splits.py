"""Class-disjoint splits (DESIGN.md §8): first half of the classes for training, second half for test.

Validation classes are a seeded random ``val_fraction`` of the training half;
hyperparameters are chosen on them, and test classes are never seen during the search.
"""

from __future__ import annotations

import numpy as np


def class_split(labels: np.ndarray, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Sample indices of the "train", "val" and "test" classes (sorted class ids split in half)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    classes = np.unique(labels)
    train_half, test = classes[: len(classes) // 2], classes[len(classes) // 2 :]
    n_val = round(len(train_half) * val_fraction)
    if n_val < 2 or len(train_half) - n_val < 2:
        raise ValueError(
            f"{len(classes)} classes with val_fraction {val_fraction} leave {len(train_half) - n_val} training "
            f"and {n_val} validation classes; each needs at least 2"
        )
    val = np.random.default_rng(seed).choice(train_half, size=n_val, replace=False)
    train = np.setdiff1d(train_half, val)
    return {
        name: np.flatnonzero(np.isin(labels, part)) for name, part in (("train", train), ("val", val), ("test", test))
    }
