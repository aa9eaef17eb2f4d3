"""Metrics: plain-loop brute force, a hand-computed example, duplicates, NMI, PML as an oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from study import metrics

CLASS_SIZES = (1, 1, 2, 3, 5, 8, 13)  # two singletons; the largest R (12) exceeds max(ks) = 8


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _dataset(seed: int, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(CLASS_SIZES)), CLASS_SIZES)
    labels = np.random.default_rng(seed + 100).permutation(labels)
    return _unit(len(labels), dim, seed), labels


def _brute_force(emb: np.ndarray, labels: np.ndarray, ks) -> dict[str, float]:
    """Full similarity matrix; per query, sort the others (self removed by index) and walk the ranks."""
    sims = emb.astype(np.float64) @ emb.astype(np.float64).T
    recall = dict.fromkeys(ks, 0)
    aps, rps, left_out = [], [], 0
    for i in range(len(labels)):
        ranked = [j for j in np.argsort(-sims[i], kind="stable") if j != i]
        same = [labels[j] == labels[i] for j in ranked]
        for k in ks:
            recall[k] += any(same[:k])
        r = sum(same)
        if r == 0:
            left_out += 1
            continue
        hits, ap = 0, 0.0
        for rank in range(1, r + 1):
            if same[rank - 1]:
                hits += 1
                ap += hits / rank
        aps.append(ap / r)
        rps.append(hits / r)
    out = {f"recall_at_{k}": c / len(labels) for k, c in recall.items()}
    out.update(map_at_r=float(np.mean(aps)), r_precision=float(np.mean(rps)), queries_without_positives=left_out)
    return out


@pytest.mark.parametrize("ks", [(1, 2, 4, 8), (1, 3, 16, 64)])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(seed, ks):
    emb, labels = _dataset(seed)
    got = metrics.evaluate(emb, labels, ks=ks, use_gpu=False)
    want = _brute_force(emb, labels, ks)
    assert got.keys() == {*want, "nmi"}
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    assert got["queries_without_positives"] == 2


def test_knn_matches_sorted_similarities_without_self():
    emb, _ = _dataset(0)
    sims, idx = metrics.knn(emb, 10, use_gpu=False)
    full = emb.astype(np.float64) @ emb.astype(np.float64).T
    for i in range(len(emb)):
        want = [j for j in np.argsort(-full[i], kind="stable") if j != i][:10]
        assert idx[i].tolist() == want
        np.testing.assert_allclose(sims[i], full[i, want], atol=1e-6)


def test_hand_computed_points_on_a_circle():
    # Angles in degrees; cosine similarity decreases with the angle between them (all gaps < 180°).
    # Neighbour lists by angular gap (labels): 0: a b a b c   1: a b a b c   2: a a a b c
    #                                           3: b a b a c   4: a b c a a   5: singleton, left out
    angles = np.deg2rad([0, 20, 50, 60, 105, 170])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    labels = np.array(["a", "a", "b", "a", "b", "c"])
    got = metrics.evaluate(emb, labels, ks=(1, 2, 4), use_gpu=False)
    # AP@R per query (R = 2, 2, 1, 2, 1): 1/2, 1/2, 0, 1/4, 0; R-precision: 1/2, 1/2, 0, 1/2, 0.
    assert got["map_at_r"] == pytest.approx(1.25 / 5)
    assert got["r_precision"] == pytest.approx(1.5 / 5)
    assert got["queries_without_positives"] == 1
    assert got["recall_at_1"] == pytest.approx(2 / 6)
    assert got["recall_at_2"] == pytest.approx(4 / 6)
    assert got["recall_at_4"] == pytest.approx(5 / 6)


def test_self_excluded_by_index_with_duplicates_of_other_classes():
    # 0 and 1 are the same vector with different labels, so each is the other's nearest neighbour
    # at similarity exactly 1 (and faiss may rank the duplicate before self). Every query's nearest
    # other sample has another class: all zeros. Keeping self would give query 0 a hit; dropping
    # everything at similarity 1 would make 2 query 0's nearest neighbour, also a hit.
    # Only k = R = 1 is tested: further down, 0 and 1 tie for queries 2 and 3.
    angles = np.deg2rad([0, 0, 40, 70])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    labels = np.array([0, 1, 0, 1])
    got = metrics.evaluate(emb, labels, ks=(1,), use_gpu=False)
    assert got["recall_at_1"] == 0.0
    assert got["map_at_r"] == 0.0
    assert got["r_precision"] == 0.0
    sims, idx = metrics.knn(emb, 1, use_gpu=False)
    assert idx[:, 0].tolist() == [1, 0, 3, 2]
    np.testing.assert_allclose(sims[:2, 0], 1.0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_knn_never_returns_self_among_identical_vectors(k):
    # faiss orders ties arbitrarily: self may come after a duplicate, or not be among the k+1 at all.
    emb = np.vstack([np.tile(_unit(1, 4, 0), (6, 1)), _unit(3, 4, 1)])
    sims, idx = metrics.knn(emb, k, use_gpu=False)
    assert idx.shape == sims.shape == (9, k)
    assert not (idx == np.arange(9)[:, None]).any()
    assert all(len(set(row)) == k for row in idx.tolist())
    np.testing.assert_allclose(sims[:6], 1.0, atol=1e-6)
    assert set(idx[:6].ravel()) <= set(range(6))


def test_knn_keeps_the_best_others_when_self_is_not_among_the_k_plus_1():
    # Inner product on unnormalised vectors: a longer vector beats self, pushing self out of the
    # k+1 results; then the (k+1)-th result is the one to drop, not the best.
    emb = np.array([[1, 0], [2, 0], [3, 0], [4, 0]], dtype=np.float32)
    sims, idx = metrics.knn(emb, 2, use_gpu=False)
    assert idx.tolist() == [[3, 2], [3, 2], [3, 1], [2, 1]]
    np.testing.assert_allclose(sims, [[4, 3], [8, 6], [12, 6], [12, 8]])


def _pml(emb: np.ndarray, labels: np.ndarray) -> dict:
    """pytorch-metric-learning's AccuracyCalculator, every sample a query against all others."""
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    e, y = torch.from_numpy(emb), torch.from_numpy(labels)
    return calc.get_accuracy(e, y, e, y, ref_includes_query=True)


def test_pytorch_metric_learning_oracle():
    emb, labels = _dataset(7, dim=16)
    got = metrics.evaluate(emb, labels, use_gpu=False)
    want = _pml(emb, labels)
    assert got["map_at_r"] == pytest.approx(want["mean_average_precision_at_r"], abs=1e-6)
    assert got["r_precision"] == pytest.approx(want["r_precision"], abs=1e-6)
    # PML leaves singleton queries out of precision_at_1; our recall_at_1 counts them as misses.
    n, left_out = len(labels), got["queries_without_positives"]
    assert got["recall_at_1"] * n == pytest.approx(want["precision_at_1"] * (n - left_out), abs=1e-6)


def test_pytorch_metric_learning_oracle_without_singletons():
    labels = np.repeat(np.arange(6), [2, 3, 4, 5, 6, 7])
    emb = _unit(len(labels), 16, 3)
    got = metrics.evaluate(emb, labels, use_gpu=False)
    want = _pml(emb, labels)
    assert got["recall_at_1"] == pytest.approx(want["precision_at_1"], abs=1e-6)
    assert got["map_at_r"] == pytest.approx(want["mean_average_precision_at_r"], abs=1e-6)
    assert got["r_precision"] == pytest.approx(want["r_precision"], abs=1e-6)
    assert got["queries_without_positives"] == 0


def _blobs(sizes, dim: int = 16, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """Tight, well-separated unit-norm blobs around the first len(sizes) basis vectors."""
    blob = np.repeat(np.arange(len(sizes)), sizes)
    x = np.eye(dim)[blob] + noise * np.random.default_rng(seed).standard_normal((len(blob), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _nmi_arithmetic(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) / ((H(a) + H(b)) / 2), from the contingency table."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum()
    entropy = lambda p: -(p[p > 0] * np.log(p[p > 0])).sum()  # noqa: E731
    return float(mi / ((entropy(pa) + entropy(pb)) / 2))


@pytest.mark.parametrize("seed", range(3))
def test_nmi_is_one_for_separated_clusters(seed):
    labels = np.repeat(np.arange(8), 12)
    emb = _blobs([12] * 8, seed=seed)
    assert metrics.nmi(emb, labels, seed=seed, use_gpu=False) == pytest.approx(1.0, abs=1e-9)
    assert metrics.evaluate(emb, labels, seed=seed, use_gpu=False)["nmi"] == pytest.approx(1.0, abs=1e-9)


def test_nmi_is_near_zero_for_random_labels():
    emb = _unit(400, 8, 0)
    labels = np.random.default_rng(1).integers(0, 4, 400)
    assert 0.0 <= metrics.nmi(emb, labels, use_gpu=False) < 0.05


def test_nmi_against_a_known_contingency_table():
    # Three blobs (k-means finds them: k = 3 labels) whose labels are mixed, so NMI is
    # strictly between 0 and 1, and the arithmetic mean differs from the geometric one.
    blob = np.repeat(np.arange(3), [10, 10, 10])
    labels = np.array([0] * 10 + [1] * 7 + [0] * 3 + [2] * 10)
    got = metrics.nmi(_blobs([10, 10, 10]), labels, seed=0, use_gpu=False)
    assert got == pytest.approx(_nmi_arithmetic(labels, blob), abs=1e-9)
    assert 0.5 < got < 0.95


def test_nmi_is_deterministic_given_the_seed():
    emb, labels = _dataset(2)
    assert metrics.nmi(emb, labels, seed=5, use_gpu=False) == metrics.nmi(emb, labels, seed=5, use_gpu=False)


def test_all_singletons_leave_every_query_out():
    got = metrics.evaluate(_unit(5, 4, 0), np.arange(5), ks=(1,), use_gpu=False)
    assert math.isnan(got["map_at_r"]) and math.isnan(got["r_precision"])
    assert got["queries_without_positives"] == 5
    assert got["recall_at_1"] == 0.0


def test_metric_names_are_mlflow_safe():
    emb, labels = _dataset(0)
    names = metrics.evaluate(emb, labels, use_gpu=False).keys()
    assert names == {"recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r", "r_precision",
                     "queries_without_positives", "nmi"}  # fmt: skip


@pytest.mark.parametrize(
    ("emb", "labels", "ks"),
    [
        (_unit(1, 4, 0), np.array([0]), (1,)),  # fewer than 2 samples
        (_unit(5, 4, 0), np.array([0, 0, 1, 1]), (1,)),  # mismatched lengths
        (_unit(5, 4, 0)[:, 0], np.array([0, 0, 1, 1, 1]), (1,)),  # 1-D embeddings
        (_unit(5, 4, 0)[None], np.array([0, 0, 1, 1, 1]), (1,)),  # 3-D embeddings
        (_unit(5, 4, 0), np.array([[0, 0, 1, 1, 1]]), (1,)),  # 2-D labels
        (_unit(5, 4, 0), np.array([0, 0, 1, 1, 1]), ()),  # no ks
        (_unit(5, 4, 0), np.array([0, 0, 1, 1, 1]), (0, 1)),  # k < 1
    ],
)
def test_evaluate_rejects_bad_input(emb, labels, ks):
    with pytest.raises(ValueError):
        metrics.evaluate(emb, labels, ks=ks, use_gpu=False)


@pytest.mark.parametrize("k", [0, 5])
def test_knn_rejects_k_outside_1_to_n_minus_1(k):
    with pytest.raises(ValueError, match="k must be"):
        metrics.knn(_unit(5, 4, 0), k, use_gpu=False)


def test_map_at_r_rejects_too_few_neighbours():
    labels = np.array([0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="R = 2"):
        metrics.map_at_r(labels[np.zeros((5, 1), dtype=int)], labels)
