"""m-per-class batches and tensor augmentation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from study.data.samplers import MPerClassSampler
from study.data.transforms import eval_transform, train_transform


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


def test_train_transform_is_a_flipped_or_shifted_crop():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    plain = eval_transform(images)
    assert plain.shape == images.shape and abs(plain.mean()) < 1.5
    out = train_transform(images, torch.Generator().manual_seed(0), pad=0)
    flipped = [torch.equal(o, p.flip(-1)) and not torch.equal(o, p) for o, p in zip(out, plain, strict=True)]
    assert all(torch.equal(o, p) or f for o, p, f in zip(out, plain, flipped, strict=True)) and 0 < sum(flipped) < 16
    shifted = train_transform(images, torch.Generator().manual_seed(0), pad=2)
    padded = torch.nn.functional.pad(plain, (2, 2, 2, 2))
    for o, p in zip(shifted, padded, strict=True):  # every output is an 8×8 window of the padded image, maybe flipped
        windows = [p[:, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(o, w) or torch.equal(o, w.flip(-1)) for w in windows)
