"""Proxy and center losses (SoftTriple, Proxy Anchor, ProxyNCA): float64 plain loops,
pytorch-metric-learning where the definitions coincide, and their trial metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import regularizers as pml_regularizers

from study.losses import create_loss
from study.losses.proxy_anchor import soft_orthogonality
from study.losses.soft_triple import _EPS, center_regularizer, effective_centers
from tests.conftest import assert_matches_pml, assert_same_value_and_grads, unit

LABELS = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 1, 0])  # class 3 is a singleton, 5 has no sample
NUM_CLASSES, DIM = 6, 5


def _pml_leaf(seed: int, n: int = 32, dim: int = 16, classes: int = 10, dtype=torch.float32):
    """A raw (unnormalised) leaf and labels: PML normalises inside, we get F.normalize(raw)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, dim, generator=g, dtype=dtype).requires_grad_()
    return raw, torch.randint(0, classes, (n,), generator=g)


def _fit_loss_parameters(name: str, classes: int, steps: int, **hp) -> dict[str, float]:
    """Train only the loss's own parameters (Adam) on fixed 8-d embeddings, 16 per class;
    return its trial_metrics()."""
    torch.manual_seed(0)
    loss = create_loss(name, classes, 8, **hp)
    x, labels = unit(16 * classes, 8, seed=5), torch.arange(classes).repeat(16)
    opt = torch.optim.Adam(loss.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss(x, labels).backward()
        opt.step()
    return loss.trial_metrics()


# ---- SoftTriple ---------------------------------------------------------------------------


def soft_triple_reference(x, labels, centers, k, la, gamma, tau, margin):
    """Per-sample loop over classes and centers (centers: the raw C·K × d parameter)."""
    w = [c / c.norm() for c in centers]
    num_classes, total = len(w) // k, x.new_zeros(())
    for i in range(len(labels)):
        logits = []
        for c in range(num_classes):
            sims = [x[i] @ w[c * k + t] for t in range(k)]
            weights = torch.softmax(torch.stack(sims) / gamma, dim=0)
            relaxed = sum(wt * s for wt, s in zip(weights, sims, strict=True))
            logits.append(la * (relaxed - (margin if c == labels[i] else 0.0)))
        total = total - logits[labels[i]] + torch.log(sum(torch.exp(z) for z in logits))
    reg = x.new_zeros(())  # (no pairs when K = 1)
    for c in range(num_classes):
        for t in range(k):
            for u in range(t + 1, k):
                reg = reg + torch.sqrt(2 + 1e-5 - 2 * w[c * k + t] @ w[c * k + u])
    return total / len(labels) + (tau * reg / (num_classes * k * (k - 1)) if k > 1 else 0.0)


@pytest.mark.parametrize(
    "hp",
    [{}, {"centers_per_class": 3, "la": 10.0, "gamma": 0.5, "tau": 1.0, "margin": 0.05}, {"centers_per_class": 1}],
)
def test_soft_triple_matches_plain_loop_in_float64(hp):
    torch.manual_seed(0)
    loss = create_loss("soft_triple", NUM_CLASSES, DIM, **hp).double()
    x = unit(len(LABELS), DIM, seed=1, dtype=torch.float64).requires_grad_()
    full = {"centers_per_class": 10, "la": 20.0, "gamma": 0.1, "tau": 0.2, "margin": 0.01, **hp}
    reference = soft_triple_reference(
        x, LABELS, loss.centers, full["centers_per_class"], full["la"], full["gamma"], full["tau"], full["margin"]
    )
    assert_same_value_and_grads(loss(x, LABELS), reference, [x, loss.centers])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [0.0, 0.2])
def test_soft_triple_matches_pml_with_its_sparse_centers_regularizer(tau, dtype):
    """PML's regulariser puts machine epsilon where the authors put 1e-5 under the square
    root: the values then differ by about tau · 1e-5 / (2√2) — inside the tolerance."""
    torch.manual_seed(0)
    ours = create_loss("soft_triple", 10, 16, tau=tau).to(dtype)
    regularizer = pml_regularizers.SparseCentersRegularizer(10, 10) if tau else None
    theirs = pml_losses.SoftTripleLoss(10, 16, weight_regularizer=regularizer, weight_reg_weight=tau)
    with torch.no_grad():  # PML stores the centers as embedding_size × (C·K): ours transposed
        theirs.fc.copy_(ours.centers.T)
    raw, labels = _pml_leaf(0, dtype=dtype)
    ours_value, theirs_value = ours(F.normalize(raw, dim=1), labels), theirs(raw, labels)
    tol = 1e-5 if dtype == torch.float32 else 2e-6
    assert_matches_pml(ours_value, theirs_value, [raw, ours.centers], [raw, theirs.fc], tol, transposed={1})


@pytest.mark.parametrize("k", [2, 3, 10])
def test_soft_triple_regularizer_takes_the_pairs_of_a_boolean_triu_mask_in_its_order(k):
    """The center pairs t < t' are indexed (no boolean mask, whose nonzero waits for a GPU), in the mask's
    row-major order: the same value and gradient, bit for bit."""
    centers = F.normalize(torch.randn(4, k, 6, generator=torch.Generator().manual_seed(k)), dim=2).requires_grad_()
    ours = center_regularizer(centers)
    (grad,) = torch.autograd.grad(ours, centers)
    sim = centers @ centers.transpose(1, 2)
    upper = torch.ones(k, k, dtype=torch.bool).triu(1)
    masked = (2 + _EPS - 2 * sim[:, upper]).clamp_min(_EPS).sqrt().sum() / (4 * k * (k - 1))
    (masked_grad,) = torch.autograd.grad(masked, centers)
    assert torch.equal(ours, masked) and torch.equal(grad, masked_grad)


def _on_sphere(*angles: float) -> torch.Tensor:
    return torch.tensor([[math.cos(a), math.sin(a), 0.0] for a in angles])


def test_effective_centers_merges_close_centers_transitively():
    centers = torch.stack(
        [
            _on_sphere(0.0, 0.0, 0.0, 0.0),  # one point, four times → 1
            _on_sphere(0.0, 0.05, 2.0, 2.05),  # two tight pairs → 2
            _on_sphere(0.0, 0.08, 0.16, 3.0),  # a chain a–b–c (a, c 0.16 apart) and a loner → 2
            _on_sphere(0.0, 1.0, 2.0, 3.0),  # all apart → 4
        ]
    )
    assert effective_centers(centers).tolist() == [1.0, 2.0, 2.0, 4.0]
    loss = create_loss("soft_triple", 4, 3, centers_per_class=4)
    with torch.no_grad():
        loss.centers.copy_(centers.reshape(16, 3) * 3.0)  # the norm does not matter
    assert loss.trial_metrics() == {"effective_centers": 2.25}


def test_soft_triple_regularizer_shrinks_a_large_k_to_few_centers():
    """The paper's claim, on fixed embeddings: with τ > 0 the centers of a class merge, the
    more the larger τ; with τ = 0 (same start, same steps) all K stay apart."""

    def train(tau: float) -> float:
        return _fit_loss_parameters("soft_triple", 4, 300, centers_per_class=10, tau=tau)["effective_centers"]

    assert train(0.0) == 10.0 > train(1.0) > train(3.0)


# ---- Proxy Anchor ----------------------------------------------------------------------


def proxy_anchor_reference(x, labels, proxies, alpha, delta, so_weight):
    p = [q / q.norm() for q in proxies]
    with_pos = [c for c in range(len(p)) if (labels == c).any()]
    pos = sum(
        torch.log(1 + sum(torch.exp(-alpha * (x[i] @ p[c] - delta)) for i in range(len(x)) if labels[i] == c))
        for c in with_pos
    )
    neg = sum(
        torch.log(1 + sum(torch.exp(alpha * (x[i] @ p[c] + delta)) for i in range(len(x)) if labels[i] != c))
        for c in range(len(p))
    )
    so = sum((p[a] @ p[b] - (1.0 if a == b else 0.0)) ** 2 for a in range(len(p)) for b in range(len(p)))
    return pos / len(with_pos) + neg / len(p) + so_weight * so / (len(p) * (len(p) - 1))


@pytest.mark.parametrize("hp", [{}, {"alpha": 8.0, "delta": 0.3, "so_weight": 0.5}])
def test_proxy_anchor_matches_plain_loop_in_float64(hp):
    torch.manual_seed(0)
    loss = create_loss("proxy_anchor", NUM_CLASSES, DIM, **hp).double()
    x = unit(len(LABELS), DIM, seed=1, dtype=torch.float64).requires_grad_()
    full = {"alpha": 32.0, "delta": 0.1, "so_weight": 0.0, **hp}
    reference = proxy_anchor_reference(x, LABELS, loss.proxies, **full)
    assert_same_value_and_grads(loss(x, LABELS), reference, [x, loss.proxies])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hp", [{}, {"alpha": 16.0, "delta": 0.2}])
def test_proxy_anchor_without_so_matches_pml(hp, dtype):
    torch.manual_seed(0)
    ours = create_loss("proxy_anchor", 10, 16, **hp).to(dtype)
    theirs = pml_losses.ProxyAnchorLoss(10, 16, margin=hp.get("delta", 0.1), alpha=hp.get("alpha", 32.0))
    with torch.no_grad():
        theirs.proxies.copy_(ours.proxies)
    raw, labels = _pml_leaf(1, dtype=dtype)
    ours_value, theirs_value = ours(F.normalize(raw, dim=1), labels), theirs(raw, labels)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_matches_pml(ours_value, theirs_value, [raw, ours.proxies], [raw, theirs.proxies], tol)


@pytest.mark.parametrize(("classes", "dim"), [(7, 16), (300, 8)])  # C < d and C > d
def test_soft_orthogonality_equals_the_dense_frobenius_norm_per_proxy_pair(classes, dim):
    p = unit(classes, dim, seed=2, dtype=torch.float64).requires_grad_()
    dense = (p @ p.T - torch.eye(classes, dtype=torch.float64)).square().sum() / (classes * (classes - 1))
    assert_same_value_and_grads(soft_orthogonality(p), dense, [p], atol=1e-10)
    if classes > dim:  # cannot reach 0: at least (C/d − 1)/(C − 1)
        assert dense.item() >= (classes / dim - 1) / (classes - 1) - 1e-9


def test_soft_orthogonality_of_random_proxies_does_not_depend_on_the_number_of_classes():
    """One so_weight means the same at 100 classes (CUB) and 11,318 (SOP): random proxies score ≈ 1/d."""
    dim = 512
    values = {c: soft_orthogonality(unit(c, dim, seed=c)).item() for c in (100, 1000, 11_318)}
    for classes, value in values.items():
        assert value == pytest.approx(1 / dim, rel=0.1), (classes, values)


def test_soft_orthogonality_never_holds_a_class_by_class_matrix():
    """Every tensor autograd saves (the penalty's memory) is far below C×C."""
    classes, dim, largest = 20_000, 32, 0
    loss = create_loss("proxy_anchor", classes, dim, so_weight=1.0)

    def pack(t):
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    x, labels = unit(16, dim, seed=0), torch.arange(16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss(x, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(loss.proxies.grad).all()
    assert largest <= classes * 16 * 2  # C × B, not C × C = 4·10⁸


def test_proxy_abs_cos_is_the_mean_absolute_off_diagonal_cosine():
    loss = create_loss("proxy_anchor", 9000, 4)  # 9000 rows: more than one block
    p = F.normalize(loss.proxies.detach().double(), dim=1)
    cos = (p @ p.T).abs()
    expected = (cos.sum() - cos.diagonal().sum()) / (9000 * 8999)
    assert loss.trial_metrics()["proxy_abs_cos"] == pytest.approx(expected.item(), rel=1e-5)


def test_so_weight_drives_proxies_apart():
    """Trained on the penalty and the loss, proxies of a large so_weight end up less correlated."""

    def train(so_weight: float) -> float:
        return _fit_loss_parameters("proxy_anchor", 8, 100, so_weight=so_weight)["proxy_abs_cos"]

    assert train(100.0) < 0.5 * train(0.0)


# ---- ProxyNCA ----------------------------------------------------------------------------


def proxy_nca_reference(x, labels, proxies, scale):
    p = [q / q.norm() for q in proxies]
    total = x.new_zeros(())
    for i in range(len(labels)):
        d = [((x[i] - q) ** 2).sum() for q in p]
        others = sum(torch.exp(-scale * d[z]) for z in range(len(p)) if z != labels[i])
        total = total - torch.log(torch.exp(-scale * d[labels[i]]) / others)
    return total / len(labels)


@pytest.mark.parametrize("scale", [1.0, 9.0])
def test_proxy_nca_matches_plain_loop_in_float64(scale):
    torch.manual_seed(0)
    loss = create_loss("proxy_nca", NUM_CLASSES, DIM, scale=scale).double()
    x = unit(len(LABELS), DIM, seed=1, dtype=torch.float64).requires_grad_()
    assert_same_value_and_grads(loss(x, LABELS), proxy_nca_reference(x, LABELS, loss.proxies, scale), [x, loss.proxies])


@pytest.mark.parametrize("scale", [1.0, 9.0])
def test_proxy_nca_differs_from_pml_only_by_the_positive_in_the_denominator(scale):
    """Deliberate difference: PML's ProxyNCALoss is −log softmax over all proxies (the
    positive included); the paper's Eq. 7, ours, leaves the positive out. So per sample
    PML = ours + log(1 + e^{−ours}) exactly, i.e. softplus(−ours) + ours."""
    torch.manual_seed(0)
    ours = create_loss("proxy_nca", 10, 16, scale=scale).double()
    theirs = pml_losses.ProxyNCALoss(10, 16, softmax_scale=scale).double()
    with torch.no_grad():
        theirs.proxies.copy_(ours.proxies)
    raw, labels = _pml_leaf(2, dtype=torch.float64)
    x = F.normalize(raw, dim=1)
    per_sample = torch.stack([ours(x[i : i + 1], labels[i : i + 1]) for i in range(len(x))])
    expected = (per_sample + F.softplus(-per_sample)).mean()
    torch.testing.assert_close(theirs(raw, labels), expected, rtol=1e-10, atol=1e-10)
    assert not torch.isclose(ours(x, labels), expected)
