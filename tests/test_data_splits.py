"""Class-disjoint splits: first half train (+ validation carved out of it), second half test."""

from __future__ import annotations

import numpy as np
import pytest

from study.data.splits import class_split


def test_golden_split():
    labels = np.repeat(np.arange(10), 3)
    split = class_split(labels, 0.4, seed=0)
    classes = {name: set(labels[idx]) for name, idx in split.items()}
    assert classes["test"] == {5, 6, 7, 8, 9}
    assert len(classes["val"]) == 2 and len(classes["train"]) == 3
    assert classes["train"] | classes["val"] == {0, 1, 2, 3, 4}
    assert not classes["train"] & classes["val"]
    assert sorted(np.concatenate(list(split.values()))) == list(range(30))  # every sample exactly once
    again = class_split(labels, 0.4, seed=0)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    others = [set(labels[class_split(labels, 0.4, seed=s)["val"]]) for s in range(1, 8)]
    assert any(o != classes["val"] for o in others)  # the seed picks the validation classes


@pytest.mark.parametrize(("fraction", "message"), [(0.0, r"in \(0, 1\)"), (1.0, r"in \(0, 1\)"), (0.1, "at least 2")])
def test_bad_fraction(fraction, message):
    with pytest.raises(ValueError, match=message):
        class_split(np.repeat(np.arange(10), 2), fraction, seed=0)
