"""m-per-class batches and random batches."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from study.data.samplers import MPerClassSampler, RandomBatchSampler


def test_every_batch_has_batch_size_over_m_classes_with_m_each():
    labels = np.repeat(np.arange(12), [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])  # some classes smaller than m
    sampler = MPerClassSampler(labels, m=4, batch_size=16, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 16
    for batch in batches:
        counts = Counter(labels[batch])
        assert len(batch) == 16 and len(counts) == 4 and set(counts.values()) == {4}
        for c in counts:  # without replacement whenever the class has at least m samples
            members = [i for i in batch if labels[i] == c]
            assert len(set(members)) == min(4, (labels == c).sum())


def test_deterministic_per_epoch():
    labels = np.repeat(np.arange(10), 8)
    a, b = MPerClassSampler(labels, 4, 16, seed=1), MPerClassSampler(labels, 4, 16, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)


def test_sampler_errors():
    with pytest.raises(ValueError, match="multiple of m"):
        MPerClassSampler(np.arange(10), 4, 18, 0)
    with pytest.raises(ValueError, match="needs 4 classes but the data has 3"):
        MPerClassSampler(np.repeat(np.arange(3), 5), 4, 16, 0)


def test_random_batches_cover_a_fresh_permutation_each_epoch():
    sampler = RandomBatchSampler(num_samples=50, batch_size=16, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 3 and all(len(b) == 16 for b in first)
    flat = [i for b in first for i in b]
    assert len(set(flat)) == 48 and set(flat) <= set(range(50))  # without replacement, last partial batch dropped
    assert list(sampler) == first  # deterministic for (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != first
    with pytest.raises(ValueError, match="a batch needs 16 samples but the data has 8"):
        RandomBatchSampler(num_samples=8, batch_size=16, seed=0)
