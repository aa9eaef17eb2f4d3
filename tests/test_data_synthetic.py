"""The embedded dataset: deterministic, 2–4 distinct sub-modes per class, hard on raw pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from study import metrics
from study.data import create_dataset, dataset_options
from study.data.synthetic import _glyphs, make_synthetic


def test_shapes_labels_and_modes():
    images, labels, modes = make_synthetic(num_classes=20, samples_per_class=12, image_size=24, seed=3)
    assert images.shape == (240, 3, 24, 24) and images.dtype == torch.uint8
    assert np.array_equal(labels, np.repeat(np.arange(20), 12))
    for c in range(20):
        class_modes = np.unique(modes[labels == c])
        assert 2 <= len(class_modes) <= 4
        assert all((labels[modes == m] == c).all() for m in class_modes)  # a sub-mode belongs to one class
    assert images.float().std() > 30  # not blank


def test_deterministic_from_the_seed():
    a = make_synthetic(num_classes=8, samples_per_class=6, seed=1)
    b = make_synthetic(num_classes=8, samples_per_class=6, seed=1)
    c = make_synthetic(num_classes=8, samples_per_class=6, seed=2)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[2], b[2])
    assert not torch.equal(a[0], c[0])


def test_glyphs_are_pairwise_distinct():
    glyphs = _glyphs(200, np.random.default_rng(0))
    flat = glyphs.reshape(len(glyphs), -1)
    distance = (flat[:, None, :] != flat[None, :, :]).sum(-1)
    assert distance[~np.eye(len(glyphs), dtype=bool)].min() >= 5
    assert ((8 <= flat.sum(1)) & (flat.sum(1) <= 17)).all()


def test_hard_on_raw_pixels():
    # Nearest neighbours on raw pixels of the test classes: far from a trained network (about 0.4–0.5
    # Recall@1 on validation classes after the quickstart's 3 epochs), though above chance (0.02).
    ds = create_dataset("synthetic")
    test, labels = np.flatnonzero(ds.split == "test"), ds.labels
    assert set(labels[test]) == set(range(50, 100))  # the second half of the classes
    x = ds.images[test].float().reshape(len(test), -1).numpy()
    x -= x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    recall = metrics.evaluate(x.astype(np.float32), labels[test], use_gpu=False)["recall_at_1"]
    assert 0.02 < recall < 0.3


def test_options_and_errors():
    assert dataset_options("synthetic") == [
        "num_classes", "samples_per_class", "image_size", "min_modes", "max_modes", "seed"
    ]  # fmt: skip
    with pytest.raises(
        ValueError,
        match="unknown dataset 'cub'; allowed: synthetic, cub200, cars196, sop, inshop, manifest, image_folder",
    ):
        create_dataset("cub")
    with pytest.raises(ValueError, match="dataset.options.colour: unknown option; allowed: num_classes"):
        create_dataset("synthetic", colour=3)
    with pytest.raises(ValueError, match="min_modes"):
        make_synthetic(num_classes=8, min_modes=3, max_modes=2)
