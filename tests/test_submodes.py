"""Class collapse: the sub-mode metric on constructed embeddings, and sub-mode ids travelling with the data
(synthetic, manifest, every other loader, the prepared folds and test split, the baseline's evaluation)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from study import metrics
from study.config import load_study
from study.data import create_dataset
from study.data.images import DatasetLayoutError
from study.data.loaders import INDEXES
from study.train import evaluate_untrained, prepare_data
from tests.conftest import write_study
from tests.test_data_checks import one_line, write_manifest
from tests.test_data_datasets import FIXTURES

# --- the metric ---------------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _classes_with_submodes(rng: np.random.Generator, classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and global sub-mode ids: each class 2–4 sub-modes, each image in one of its class's at random."""
    labels = np.repeat(np.arange(classes), per_class)
    modes_per_class = rng.integers(2, 5, size=classes)
    first = np.concatenate([[0], np.cumsum(modes_per_class)[:-1]])
    return labels, first[labels] + rng.integers(0, 1 << 20, size=len(labels)) % modes_per_class[labels]


def _reference(emb: np.ndarray, labels: np.ndarray, submodes: np.ndarray) -> tuple[float, float, int]:
    """A plain loop over queries: the nearest other same-class sample (float64 cosine, first index on a tie)."""
    x = emb.astype(np.float64)
    hits, chances = 0, []
    for i in range(len(labels)):
        same_class = [j for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        own = [j for j in same_class if submodes[j] == submodes[i]]
        if not own or len(own) == len(same_class):
            continue
        best, best_sim = -1, -np.inf
        for j in same_class:
            sim = float(x[i] @ x[j])
            if sim > best_sim:
                best, best_sim = j, sim
        hits += submodes[best] == submodes[i]
        chances.append(len(own) / len(same_class))  # (s − 1)/(c − 1): s and c count the query itself
    if not chances:
        return float("nan"), float("nan"), 0
    return hits / len(chances), float(np.mean(chances)), len(chances)


def test_separated_submodes_score_one():
    rng = np.random.default_rng(0)
    labels, submodes = _classes_with_submodes(rng, classes=30, per_class=20)
    centers = _unit(rng.standard_normal((submodes.max() + 1, 32)))  # every sub-mode far from every other
    emb = _unit(centers[submodes] + 0.01 * rng.standard_normal((len(labels), 32)))
    recall, chance, counted = metrics.submode_recall_at_1(emb, labels, submodes)
    assert recall == 1.0
    assert 0.1 < chance < 0.6 and counted > 0.9 * len(labels)


def test_a_collapsed_class_scores_chance():
    # Each class one tiny ball, its images at random positions in it whatever their sub-mode: the nearest
    # same-class image is a uniformly random other one, so the expectation is exactly the chance level.
    rng = np.random.default_rng(1)
    labels, submodes = _classes_with_submodes(rng, classes=300, per_class=30)
    centers = _unit(rng.standard_normal((300, 32)))
    emb = _unit(centers[labels] + 1e-3 * rng.standard_normal((len(labels), 32)))
    recall, chance, counted = metrics.submode_recall_at_1(emb, labels, submodes)
    assert counted > 8000
    # Bernoulli noise over ~9000 queries: sd ≈ sqrt(0.35 · 0.65 / 9000) ≈ 0.005 (seeds 0–4: |Δ| ≤ 0.009); 0.03 is ~6 sd
    assert recall == pytest.approx(chance, abs=0.03)
    assert recall < 0.6 and 0.3 < chance < 0.5  # far from separated sub-modes (1.0)


@pytest.mark.parametrize("seed", range(4))
def test_matches_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 12, size=90)  # uneven classes, some tiny
    submodes = rng.integers(0, 3, size=90)  # the same ids in every class: compared within a class only
    emb = _unit(rng.standard_normal((90, 6)))
    got = metrics.submode_recall_at_1(emb, labels, submodes)
    want = _reference(emb, labels, submodes)
    assert got[0] == want[0] and got[2] == want[2] > 0
    assert got[1] == pytest.approx(want[1], rel=1e-12)


def _circle(degrees: list[float]) -> np.ndarray:
    angles = np.radians(degrees)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def test_only_queries_with_a_partner_of_each_kind_count():
    # class 0: A B (sub-mode 0), C (1): A and B count (C has no other of its sub-mode)
    # class 1: D E, one sub-mode: none counts (no other sub-mode); class 2: F alone
    # class 3: P Q R (7), T (8): P, Q and R count
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    submodes = np.array([0, 0, 1, 5, 5, 0, 7, 7, 7, 8])
    emb = _circle([0, 20, -30, 100, 101, 200, 0, 100, 170, 20])
    # A: B (20°) before C (30°), hit; B: A (20°) before C (50°), hit; P: T (20°), miss;
    # Q: R (70°) before T (80°), hit; R: Q (70°), hit. C, D, E, F, T are not queries: their answer is forced.
    recall, chance, counted = metrics.submode_recall_at_1(emb, labels, submodes)
    assert counted == 5 and recall == pytest.approx(4 / 5)
    assert chance == pytest.approx((1 / 2 + 1 / 2 + 3 * (2 / 3)) / 5)  # (s − 1)/(c − 1) per query
    assert metrics.submode_recall_at_1(emb, labels, submodes) == _reference(emb, labels, submodes)


def test_without_any_query_both_numbers_are_nan():
    recall, chance, counted = metrics.submode_recall_at_1(_circle([0, 10, 20]), np.array([0, 0, 1]), np.zeros(3))
    assert np.isnan(recall) and np.isnan(chance) and counted == 0


def test_evaluate_reports_it_only_with_submodes_and_without_a_gallery():
    rng = np.random.default_rng(2)
    labels, submodes = _classes_with_submodes(rng, classes=10, per_class=12)
    emb = _unit(rng.standard_normal((len(labels), 8)))
    plain = metrics.evaluate(emb, labels, use_gpu=False)
    assert "submode_recall_at_1" not in plain and "submode_chance" not in plain
    with_modes = metrics.evaluate(emb, labels, use_gpu=False, submodes=submodes)
    recall, chance, _ = metrics.submode_recall_at_1(emb, labels, submodes)
    assert with_modes == plain | {"submode_recall_at_1": recall, "submode_chance": chance}
    gallery = metrics.evaluate(
        emb[:60], labels[:60], use_gpu=False, gallery=(emb[60:], labels[60:]), submodes=submodes[:60]
    )
    assert "submode_recall_at_1" not in gallery
    with pytest.raises(ValueError, match="one sub-mode per label"):
        metrics.evaluate(emb, labels, use_gpu=False, submodes=submodes[1:])


# --- the data -------------------------------------------------------------------------------------------------


def test_the_synthetic_datasets_submodes_come_with_it():
    ds = create_dataset("synthetic", num_classes=12, samples_per_class=10, image_size=16, seed=4)
    assert ds.submodes.dtype == np.int64 and ds.submodes.shape == ds.labels.shape
    for c in np.unique(ds.labels):
        modes = np.unique(ds.submodes[ds.labels == c])
        assert 2 <= len(modes) <= 4
        assert all((ds.labels[ds.submodes == m] == c).all() for m in modes)  # a sub-mode belongs to one class


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_a_manifests_submode_column_round_trips(suffix, tmp_path):
    modes = ["front", "back", "front", "1", "01", "01", "NA", "front"]  # text: 1 and 01 differ, NA is a value
    labels = ["a", "a", "a", "b", "b", "b", "c", "c"]
    rows = [
        {"path": f"{i}.png", "label": label, "submode": mode}
        for i, (label, mode) in enumerate(zip(labels, modes, strict=True))
    ]
    path = write_manifest(tmp_path, rows, f"m.{suffix}")
    index = INDEXES["manifest"](path)
    assert index.submodes.dtype == np.int64
    same = np.array(modes)[:, None] == np.array(modes)[None, :]
    assert np.array_equal(index.submodes[:, None] == index.submodes[None, :], same)
    ds = create_dataset("manifest", path, decode_size=8, cache_dir=tmp_path / "cache")
    assert np.array_equal(ds.submodes, index.submodes)
    without = write_manifest(tmp_path, [{"path": r["path"], "label": r["label"]} for r in rows], f"w.{suffix}")
    assert INDEXES["manifest"](without).submodes is None


def test_a_manifests_submode_column_has_no_empty_cells(tmp_path):
    path = write_manifest(tmp_path, [{"path": f"{i}.png", "label": "a", "submode": "x"} for i in range(3)])
    path.write_text(path.read_text().replace("2.png,a,x", "2.png,a,"))
    with pytest.raises(DatasetLayoutError) as error:
        INDEXES["manifest"](path)
    assert one_line(error) == (
        f"manifest: {path}: column submode has an empty value (row 3); fill every row or drop the column"
    )


@pytest.mark.parametrize("name", sorted(set(FIXTURES) - {"manifest"}))
def test_other_loaders_know_no_submodes(name, tmp_path):
    assert INDEXES[name](FIXTURES[name](tmp_path).root).submodes is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    study = load_study(write_study(tmp_path_factory.mktemp("s")))
    return study, prepare_data(study.dataset, study.model, study.train, study.seed)


def test_prepared_data_carries_the_submodes_of_every_evaluated_set(tiny):
    study, data = tiny
    ds = create_dataset(study.dataset.name, **study.dataset.options)
    assert np.array_equal(data.submodes, ds.submodes)
    for _, val in data.folds:
        assert np.array_equal(data.submodes_of(val), ds.submodes[val])
        assert (ds.split[val] == "train").all()
    assert np.array_equal(data.submodes_of(data.test), ds.submodes[ds.split == "test"])
    assert replace(data, submodes=None).submodes_of(data.test) is None


def test_the_untrained_baseline_is_measured_on_validation_and_test(tiny):
    study, data = tiny
    val, test = evaluate_untrained(study.model, study.train, data, study.seed)
    for result in (val, test):
        assert 0 <= result["submode_recall_at_1"] <= 1 and 0 < result["submode_chance"] < 1
    # a query/gallery protocol: no sub-mode metric on the test set, still on validation
    gallery = replace(data, test=data.test[::2], gallery=data.test[1::2])
    val, test = evaluate_untrained(study.model, study.train, gallery, study.seed)
    assert "submode_recall_at_1" in val and "submode_recall_at_1" not in test
    unknown = replace(data, submodes=None)
    val, test = evaluate_untrained(study.model, study.train, unknown, study.seed)
    assert "submode_recall_at_1" not in val and "submode_chance" not in test
