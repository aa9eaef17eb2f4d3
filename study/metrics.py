"""Retrieval and clustering metrics on L2-normalised embeddings, with faiss.

Every sample is a query against all others; self is excluded by index (never by a
similarity threshold); similarity is the inner product, i.e. cosine similarity,
because the embeddings arrive already L2-normalised (by the model head) and are
not normalised again here.

- ``recall_at_k``: fraction of queries with a same-class sample among their k
  nearest neighbours (the DML definition, not IR recall).
- ``map_at_r`` and ``r_precision`` (Musgrave, Belongie, Lim, "A Metric Learning
  Reality Check", ECCV 2020, Sec. 3.2): R = number of other samples of the
  query's class; queries with R = 0 are left out and counted.
- ``nmi``: faiss k-means (fixed seed, k = number of classes) against the labels,
  sklearn's arithmetic normalisation.
- ``submode_recall_at_1`` and ``submode_chance``, when the data says which sub-mode
  of its class each sample shows: class collapse (Levi et al., "Rethinking
  Preventing Class-Collapsing in Metric Learning with Margin-Based Losses", ICCV
  2021). Recall@1 cannot see it: a class squeezed to one point still retrieves
  its own class first. Whether the nearest *same-class* sample is of the query's
  own sub-mode can: 1 when sub-modes stay apart, the chance level when the class
  collapsed and its samples lie in random order.

Metric names are MLflow-safe (``recall_at_1``, never ``recall@1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
from sklearn.metrics import normalized_mutual_info_score

# faiss's GPU k-selection handles at most this many neighbours; beyond it, search on CPU.
_GPU_MAX_K = 2048


def _use_gpu(use_gpu: bool | None) -> bool:
    return faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu


def knn(
    embeddings: np.ndarray, k: int, use_gpu: bool | None = None, database: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest neighbours of every sample among the *other* samples, by inner product.

    Returns (similarities, indices), both N×k, best first. Searches k+1 and removes the
    query's own index wherever it landed (with duplicate embeddings it need not be first);
    where it is absent from the k+1 results, the last column is dropped instead.
    With a ``database`` (a gallery), the samples are queries against it and nothing is excluded.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    base = x if database is None else np.ascontiguousarray(database, dtype=np.float32)
    n, exclude = len(x), int(database is None)
    if not 1 <= k <= len(base) - exclude:
        raise ValueError(f"k must be between 1 and {len(base) - exclude}, got {k}")
    index = faiss.IndexFlatIP(x.shape[1])
    if _use_gpu(use_gpu) and k + 1 <= _GPU_MAX_K:
        resources = faiss.StandardGpuResources()  # must outlive the GPU index
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    index.add(base)
    sims, idx = index.search(x, k + exclude)
    if not exclude:
        return sims, idx
    is_self = idx == np.arange(n)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(is_self)
    keep[np.arange(n), drop] = False
    return sims[keep].reshape(n, k), idx[keep].reshape(n, k)


def recall_at_k(knn_labels: np.ndarray, labels: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """``{"recall_at_k": fraction of queries with a same-class sample among the first k neighbours}``.

    ``knn_labels`` (N×K) are the neighbours' labels, best first; a k larger than K uses all K.
    """
    hits = knn_labels == np.asarray(labels)[:, None]
    return {f"recall_at_{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


def map_at_r(
    knn_labels: np.ndarray, labels: np.ndarray, gallery_labels: np.ndarray | None = None
) -> tuple[float, float, int]:
    """(MAP@R, R-Precision, number of queries left out because R = 0), Musgrave et al. 2020.

    For a query with R other samples of its class, MAP@R = (1/R) Σ_{i≤R} P(i)·rel(i) and
    R-Precision = (1/R) Σ_{i≤R} rel(i), over its neighbours sorted by similarity; both are
    averaged over the queries with R > 0 (NaN if there are none). ``knn_labels`` must have
    at least max R columns. With ``gallery_labels`` (query/gallery protocols) R is the number of
    gallery samples of the query's class.
    """
    labels = np.asarray(labels)
    if gallery_labels is None:
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        r = counts[inverse] - 1
    else:
        classes, counts = np.unique(gallery_labels, return_counts=True)
        pos = np.searchsorted(classes, labels).clip(0, len(classes) - 1)
        r = np.where(classes[pos] == labels, counts[pos], 0)
    valid = r > 0
    n_left_out = int((~valid).sum())
    if not valid.any():
        return float("nan"), float("nan"), n_left_out
    r = r[valid]
    if knn_labels.shape[1] < r.max():
        raise ValueError(f"map_at_r needs at least R = {r.max()} neighbours per query, got {knn_labels.shape[1]}")
    ranks = np.arange(1, knn_labels.shape[1] + 1)
    hits = (knn_labels[valid] == labels[valid, None]) & (ranks[None, :] <= r[:, None])
    precision_at_i = np.cumsum(hits, axis=1) / ranks
    ap = (precision_at_i * hits).sum(axis=1) / r
    rp = hits.sum(axis=1) / r
    return float(ap.mean()), float(rp.mean()), n_left_out


def nmi(embeddings: np.ndarray, labels: np.ndarray, seed: int = 0, use_gpu: bool | None = None) -> float:
    """NMI (arithmetic mean normalisation) between faiss k-means clusters, k = number of classes, and the labels."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    k = len(np.unique(labels))
    # k-means++ seeding (as sklearn's KMeans): faiss's default uniform seeding often puts two
    # centroids in one class and misses another, even on perfectly separated classes.
    # Train on every point (no subsampling) and without faiss's "too few points" warning.
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=20,
        seed=seed,
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
        gpu=_use_gpu(use_gpu),
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=len(x),
    )
    kmeans.train(x)
    _, assignment = kmeans.index.search(x, 1)
    return float(normalized_mutual_info_score(labels, assignment[:, 0], average_method="arithmetic"))


def submode_recall_at_1(embeddings: np.ndarray, labels: np.ndarray, submodes: np.ndarray) -> tuple[float, float, int]:
    """(sub-mode Recall@1, its chance level, number of queries counted): how far classes keep their sub-modes.

    A query counts when its class has another sample of its sub-mode and one of another sub-mode (else the
    answer is forced, or undefined). Sub-mode Recall@1 is the fraction of those queries whose nearest other
    sample *of the same class* (inner product, i.e. cosine on the unit embeddings, as every metric here;
    the query itself excluded by index; a tie goes to the lower index) is of the query's sub-mode. The chance
    level is the same fraction if a class's other samples came in random order: the mean over the same
    queries of (s − 1)/(c − 1), s the number of samples of the query's sub-mode in its class, c the number
    of its class. Equal to chance: the class collapsed onto one blob, its sub-modes mixed (what Levi et al.
    2021 say margin losses do); 1: each sub-mode its own cluster. Both are NaN when no query counts.

    ``submodes`` are compared within a class only (the same id in two classes names two sub-modes). The
    neighbours are searched by brute force per class, in float64: classes are small, and a search over
    everything would need as many neighbours as the largest class to find the nearest of one's own.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    _, classes = np.unique(np.asarray(labels), return_inverse=True)
    submodes = np.asarray(submodes)
    hits: list[np.ndarray] = []
    chance: list[np.ndarray] = []
    order = np.argsort(classes, kind="stable")  # each class's members in index order: ties to the lower index
    for members in np.split(order, np.flatnonzero(np.diff(classes[order])) + 1):
        c = len(members)
        same = submodes[members][:, None] == submodes[members][None, :]
        s = same.sum(axis=1)  # the query's sub-mode in its class, itself included
        counted = (s >= 2) & (s < c)
        if not counted.any():
            continue
        sims = x[members] @ x[members].T
        np.fill_diagonal(sims, -np.inf)
        nearest = sims.argmax(axis=1)
        hits.append(same[np.arange(c), nearest][counted])
        chance.append(((s - 1) / (c - 1))[counted])
    if not hits:
        return float("nan"), float("nan"), 0
    hit, level = np.concatenate(hits), np.concatenate(chance)
    return float(hit.mean()), float(level.mean()), len(hit)


def evaluate(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
    seed: int = 0,
    use_gpu: bool | None = None,
    gallery: tuple[np.ndarray, np.ndarray] | None = None,
    submodes: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@k for each k, MAP@R, R-Precision, the R = 0 count and NMI, as MLflow-safe names; with
    ``submodes`` (one per sample), also ``submode_recall_at_1`` and ``submode_chance``
    (:func:`submode_recall_at_1`), absent without them.

    ``embeddings`` (N×d) must already be L2-normalised; they are not normalised here.
    ``use_gpu=None`` uses a GPU when faiss sees one. With ``gallery`` = (embeddings, labels) the
    samples are queries retrieved from the gallery (In-Shop); NMI then clusters queries and gallery, and
    ``submodes`` are ignored: a query/gallery protocol has its own retrieval set, which the sub-mode
    metric, a within-set search, does not model.
    """
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N×d), got shape {embeddings.shape}")
    if labels.ndim != 1 or len(embeddings) != len(labels):
        raise ValueError(f"need one label per embedding: embeddings {embeddings.shape}, labels {labels.shape}")
    if len(labels) < 2:
        raise ValueError(f"need at least 2 samples to evaluate retrieval, got {len(labels)}")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    if submodes is not None and np.shape(submodes) != labels.shape:
        raise ValueError(f"need one sub-mode per label: labels {labels.shape}, submodes {np.shape(submodes)}")
    base, base_labels = (embeddings, labels) if gallery is None else (np.asarray(gallery[0]), np.asarray(gallery[1]))
    exclude = int(gallery is None)
    max_r = int(np.unique(base_labels, return_counts=True)[1].max()) - exclude
    k = min(len(base_labels) - exclude, max(max(ks), max_r))
    _, idx = knn(embeddings, k, use_gpu, database=None if gallery is None else base)
    knn_labels = base_labels[idx]
    result = recall_at_k(knn_labels, labels, ks)
    result["map_at_r"], result["r_precision"], left_out = map_at_r(
        knn_labels, labels, None if gallery is None else base_labels
    )
    result["queries_without_positives"] = float(left_out)
    everything = embeddings if gallery is None else np.concatenate([embeddings, base])
    result["nmi"] = nmi(everything, labels if gallery is None else np.concatenate([labels, base_labels]), seed, use_gpu)
    if submodes is not None and gallery is None:
        result["submode_recall_at_1"], result["submode_chance"], _ = submode_recall_at_1(embeddings, labels, submodes)
    return result
