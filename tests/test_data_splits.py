"""Class-disjoint splits: the official train/test split, validation classes carved out of training."""

from __future__ import annotations

import numpy as np
import pytest

from study.data.splits import first_half_split, validation_folds


def test_first_half_split():
    labels = np.repeat([3, 1, 7, 5], 2)
    assert list(first_half_split(labels)) == ["train"] * 4 + ["test"] * 4  # classes 1, 3 of 1, 3, 5, 7


def test_golden_fraction_split():
    labels = np.repeat(np.arange(10), 3)
    split = first_half_split(labels)
    [(train, val)] = validation_folds(labels, split, val_fraction=0.4, folds=None, seed=0)
    classes = {"train": set(labels[train]), "val": set(labels[val])}
    assert len(classes["val"]) == 2 and len(classes["train"]) == 3
    assert classes["train"] | classes["val"] == {0, 1, 2, 3, 4}  # test classes never appear
    assert not classes["train"] & classes["val"]
    assert sorted(np.concatenate([train, val])) == list(range(15))  # every training sample exactly once
    [(train2, val2)] = validation_folds(labels, split, val_fraction=0.4, folds=None, seed=0)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    others = [
        set(labels[validation_folds(labels, split, val_fraction=0.4, folds=None, seed=s)[0][1]]) for s in range(8)
    ]
    assert any(o != classes["val"] for o in others)  # the seed picks the validation classes


def test_golden_folds():
    """Reality Check folds: the sorted training classes in contiguous blocks, whatever the seed."""
    labels = np.repeat(np.arange(1, 21), 2)  # classes 1..20, 1..10 train
    split = np.where(labels <= 10, "train", "test")
    folds = validation_folds(labels, split, val_fraction=0.5, folds=4, seed=0)
    val_classes = [sorted(set(labels[val])) for _, val in folds]
    assert val_classes == [[1, 2, 3], [4, 5, 6], [7, 8], [9, 10]]
    assert [v.tolist() for _, v in folds][1] == [6, 7, 8, 9, 10, 11]  # the sample indices, fixed
    for train, val in folds:
        assert sorted(np.concatenate([train, val])) == list(range(20))
        assert not set(labels[train]) & set(labels[val])
    again = validation_folds(labels, split, val_fraction=0.1, folds=4, seed=9)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))


@pytest.mark.parametrize(
    ("fraction", "folds", "message"),
    [
        (0.0, None, r"in \(0, 1\)"),
        (1.0, None, r"in \(0, 1\)"),
        (0.1, None, "at least 2"),
        (0.5, 1, "at least 2"),
        (0.5, 4, "each needs at least 2"),
    ],
)
def test_bad_validation(fraction, folds, message):
    labels = np.repeat(np.arange(12), 2)
    with pytest.raises(ValueError, match=message):
        validation_folds(labels, first_half_split(labels), val_fraction=fraction, folds=folds, seed=0)
