"""Class-disjoint splits: the official train/test split, validation classes carved
out of the training classes.

Hyperparameters are chosen on validation classes only; test classes are never seen during the
search. Validation is either a seeded random ``val_fraction`` of the training classes, or ``folds``
class-disjoint folds as in the Reality Check protocol (Musgrave et al. 2020): the sorted training
classes cut into ``folds`` contiguous blocks; fold f validates on block f and trains on the others.
The fold blocks do not depend on the seed, so every study on a dataset uses the same folds.
"""

from __future__ import annotations

import numpy as np


def first_half_split(labels: np.ndarray) -> np.ndarray:
    """The standard DML split where a dataset has no other: sorted classes, first half "train"."""
    classes = np.unique(labels)
    return np.where(np.isin(labels, classes[: len(classes) // 2]), "train", "test")


def validation_folds(
    labels: np.ndarray, split: np.ndarray, *, val_fraction: float, folds: int | None, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, validation indices) per fold, both within the official "train" split.

    With ``folds`` None: one fold, ``val_fraction`` of the training classes drawn with ``seed``.
    """
    train_classes = np.unique(labels[split == "train"])
    if folds is None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_val = round(len(train_classes) * val_fraction)
        blocks = [np.random.default_rng(seed).choice(train_classes, size=n_val, replace=False)]
    else:
        if folds < 2:
            raise ValueError(f"folds must be at least 2, got {folds}")
        blocks = np.array_split(train_classes, folds)
    result = []
    for val in blocks:
        fit = np.setdiff1d(train_classes, val)
        if len(val) < 2 or len(fit) < 2:
            raise ValueError(
                f"{len(train_classes)} training classes leave {len(fit)} training and {len(val)} validation "
                "classes in a fold; each needs at least 2"
            )
        result.append((np.flatnonzero(np.isin(labels, fit)), np.flatnonzero(np.isin(labels, val))))
    return result


def shared_classes(labels: np.ndarray, split: np.ndarray) -> np.ndarray:
    """The classes (sorted) with images in both the "train" and the "test" split: empty when the splits
    are class-disjoint, as every protocol here needs (a test class seen in training inflates recall)."""
    return np.intersect1d(labels[split == "train"], labels[split == "test"])


def require_disjoint(labels: np.ndarray, split: np.ndarray, where: str, name=lambda c: f"class id {c}") -> None:
    """DatasetLayoutError (``where``: the dataset or file) unless the splits are class-disjoint;
    ``name(class)`` spells the first shared class."""
    from study.data.images import DatasetLayoutError

    shared = shared_classes(labels, split)
    if len(shared):
        count = "1 class has" if len(shared) == 1 else f"{len(shared)} classes have"
        raise DatasetLayoutError(
            f"{where}: {count} images in both train and test (first: {name(shared[0])}); "
            "the splits must be class-disjoint"
        )


def single_image_classes(labels: np.ndarray, split: np.ndarray) -> dict[str, int]:
    """Per split ("train", "test"), how many classes have exactly one image; splits with none are left out.

    Such a class can never be a query with an answer (retrieval excludes the query itself) and gives no
    positive pair in training: worth a warning, not an error, as real datasets have a few.
    """
    counts = {}
    for name in ("train", "test"):
        _, sizes = np.unique(labels[split == name], return_counts=True)
        if (single := int((sizes == 1).sum())) > 0:
            counts[name] = single
    return counts
