"""Pair and triplet losses (triplet, contrastive, margin, PDDM) and easy positive sampling:
float64 plain loops and pytorch-metric-learning where the definitions coincide."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses

from study.losses import create_loss
from study.losses.margin import CUTOFF, NONZERO_LOSS_CUTOFF, _draw
from study.losses.pairs import euclidean, pair_masks
from study.losses.pddm import _arg_best
from tests.conftest import assert_matches_pml, assert_same_value_and_grads, unit

LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])  # class 3 is a singleton
DIM = 4


def _dist(x, i, j):
    return torch.sqrt(((x[i] - x[j]) ** 2).sum())


def _positives(x, labels, i, positive):
    """Anchor i's positives by the definition: all, or the nearest (ties: lowest index)."""
    same = [j for j in range(len(labels)) if j != i and labels[j] == labels[i]]
    if positive == "easy" and same:
        return [min(same, key=lambda j: (_dist(x, i, j).item(), j))]
    return same


def _mean_nonzero(terms):
    active = [t for t in terms if t.item() > 0]
    return sum(active) / len(active) if active else torch.zeros((), dtype=torch.float64)


def _x(seed=1, dim=DIM):
    """(raw leaf, its unit-norm rows). Gradients are compared on the raw leaf: the losses
    use √(2 − 2xᵢ·xⱼ) for unit rows, the loops ‖xᵢ − xⱼ‖, equal on the sphere and with the
    same tangent gradient, which is what the normalisation passes back."""
    raw = (unit(len(LABELS), dim, seed=seed, dtype=torch.float64) * 1.5).requires_grad_()
    return raw, F.normalize(raw, dim=1)


def _pml_leaf(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(32, 8, generator=g, dtype=dtype).requires_grad_()
    return raw, torch.arange(8).repeat(4)[torch.randperm(32, generator=g)]


# ---- easy positive sampling -------------------------------------------------------------


def test_easy_positive_keeps_each_anchors_nearest_positive_only():
    x = _x()[1].detach()
    pos_all, neg = pair_masks(x @ x.T, LABELS, "all")
    pos_easy, neg_easy = pair_masks(x @ x.T, LABELS, "easy")
    assert torch.equal(neg, neg_easy)
    for i in range(len(LABELS)):
        assert pos_easy[i].nonzero().flatten().tolist() == _positives(x, LABELS, i, "easy")
        assert pos_all[i].nonzero().flatten().tolist() == _positives(x, LABELS, i, "all")


# ---- triplet ----------------------------------------------------------------------------


def triplet_reference(x, labels, margin, negatives, positive):
    terms, n = [], len(labels)
    for a in range(n):
        negs = [j for j in range(n) if labels[j] != labels[a]]
        if not negs:
            continue
        for p in _positives(x, labels, a, positive):
            d_ap = _dist(x, a, p)
            if negatives == "all":
                chosen = negs
            elif negatives == "hard":
                chosen = [min(negs, key=lambda j: (_dist(x, a, j).item(), j))]
            else:
                farther = [j for j in negs if _dist(x, a, j).item() > d_ap.item()]
                chosen = [min(farther, key=lambda j: (_dist(x, a, j).item(), j))] if farther else []
            terms += [torch.relu(d_ap - _dist(x, a, j) + margin) for j in chosen]
    return _mean_nonzero(terms)


@pytest.mark.parametrize("positive", ["all", "easy"])
@pytest.mark.parametrize("negatives", ["semihard", "hard", "all"])
@pytest.mark.parametrize("margin", [0.2, 0.6])
def test_triplet_matches_plain_loop_in_float64(margin, negatives, positive):
    raw, x = _x()
    loss = create_loss("triplet", 5, DIM, margin=margin, negatives=negatives, positive=positive)
    assert_same_value_and_grads(loss(x, LABELS), triplet_reference(x, LABELS, margin, negatives, positive), [raw])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", [0.1, 0.5])
def test_triplet_batch_all_matches_pml(margin, dtype):
    raw, labels = _pml_leaf(0, dtype)
    ours = create_loss("triplet", 8, 8, margin=margin, negatives="all")(F.normalize(raw, dim=1), labels)
    theirs = pml_losses.TripletMarginLoss(margin=margin)(raw, labels)
    assert_matches_pml(ours, theirs, [raw], [raw], 1e-5 if dtype == torch.float32 else 1e-9)


# ---- contrastive -----------------------------------------------------------------------


def contrastive_reference(x, labels, pos_margin, neg_margin, positive):
    pull, push, n = [], [], len(labels)
    for i in range(n):
        pull += [torch.relu(_dist(x, i, j) - pos_margin) for j in _positives(x, labels, i, positive)]
        push += [torch.relu(neg_margin - _dist(x, i, j)) for j in range(n) if labels[j] != labels[i]]
    return _mean_nonzero(pull) + _mean_nonzero(push)


@pytest.mark.parametrize("positive", ["all", "easy"])
@pytest.mark.parametrize(("pos_margin", "neg_margin"), [(0.0, 1.0), (0.3, 1.4)])
def test_contrastive_matches_plain_loop_in_float64(pos_margin, neg_margin, positive):
    raw, x = _x()
    loss = create_loss("contrastive", 5, DIM, pos_margin=pos_margin, neg_margin=neg_margin, positive=positive)
    assert_same_value_and_grads(
        loss(x, LABELS), contrastive_reference(x, LABELS, pos_margin, neg_margin, positive), [raw]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("pos_margin", "neg_margin"), [(0.0, 1.0), (0.2, 1.3)])
def test_contrastive_matches_pml(pos_margin, neg_margin, dtype):
    raw, labels = _pml_leaf(1, dtype)
    loss = create_loss("contrastive", 8, 8, pos_margin=pos_margin, neg_margin=neg_margin)
    theirs = pml_losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin)(raw, labels)
    assert_matches_pml(
        loss(F.normalize(raw, dim=1), labels), theirs, [raw], [raw], 1e-5 if dtype == torch.float32 else 1e-9
    )


# ---- margin ----------------------------------------------------------------------------


def margin_reference(x, triplets, margin, beta):
    terms = []
    for a, p, n in zip(*triplets, strict=True):
        terms += [torch.relu(margin + _dist(x, a, p) - beta), torch.relu(margin + beta - _dist(x, a, n))]
    return _mean_nonzero(terms)


@pytest.mark.parametrize("positive", ["all", "easy"])
@pytest.mark.parametrize(("margin", "beta"), [(0.2, 1.2), (0.4, 0.9)])
def test_margin_matches_plain_loop_on_its_sampled_triplets(margin, beta, positive):
    raw, x = _x(dim=3)
    loss = create_loss("margin", 5, 3, margin=margin, beta=beta, positive=positive).double()
    dist = euclidean(x)
    pos, neg = pair_masks(-dist, LABELS, positive)
    torch.manual_seed(0)
    triplets = loss.sample_triplets(dist, pos, neg)
    expected_pairs = [(a, p) for a in range(len(LABELS)) for p in _positives(x, LABELS, a, positive)]
    expected_pairs = [(a, p) for a, p in expected_pairs if (LABELS != LABELS[a]).any()]
    assert list(zip(triplets[0].tolist(), triplets[1].tolist(), strict=True)) == expected_pairs
    assert all(LABELS[a] != LABELS[n] for a, n in zip(triplets[0], triplets[2], strict=True))
    torch.manual_seed(0)
    value = loss(x, LABELS)
    reference = margin_reference(x, [t.tolist() for t in triplets], margin, loss.beta)
    assert_same_value_and_grads(value, reference, [raw, loss.beta])


@pytest.mark.parametrize("positive", ["all", "easy"])
def test_margin_matches_pml_on_the_same_triplets(positive):
    """PML's MarginLoss given our sampled triplets (its miner samples differently) and our β."""
    raw, labels = _pml_leaf(2)
    x = F.normalize(raw, dim=1)
    loss = create_loss("margin", 8, 8, positive=positive).double()
    dist = euclidean(x)
    torch.manual_seed(0)
    triplets = loss.sample_triplets(dist, *pair_masks(-dist, labels, positive))
    torch.manual_seed(0)
    ours = loss(x, labels)
    theirs = pml_losses.MarginLoss(margin=0.2, beta=1.2)(raw, labels, triplets)
    assert_matches_pml(ours, theirs, [raw], [raw], 1e-9)


def test_margin_beta_is_learned():
    x = _x(dim=3)[1].detach()
    loss = create_loss("margin", 5, 3, beta=1.5)
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        loss(x.float(), LABELS).backward()
        opt.step()
    assert loss.beta.item() != 1.5


def test_distance_weighted_sampling_follows_the_inverse_sphere_density():
    """One anchor, negatives at known distances: draw frequencies ∝ q(d)⁻¹ (d clamped at the
    cutoff), never a negative at or beyond the non-zero-loss cutoff."""
    dim = 8
    angles = torch.tensor([0.3, 0.6, 0.8, 1.0, 1.3, 2.0], dtype=torch.float64)  # distances 2·sin(θ/2)
    x = torch.zeros(len(angles) + 2, dim, dtype=torch.float64)
    x[0, 0] = x[1, 0] = 1.0  # anchor 0 and its positive 1 coincide
    x[2:, 0], x[2:, 1] = torch.cos(angles), torch.sin(angles)
    labels = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    loss = create_loss("margin", 7, dim).double()
    dist = euclidean(x)
    pos, neg = pair_masks(-dist, labels, "all")
    pos[1] = False  # only anchor 0
    torch.manual_seed(0)
    draws = torch.stack([loss.sample_triplets(dist, pos, neg)[2][0] for _ in range(20_000)])
    d = dist[0, 2:]
    weight = d.clamp_min(CUTOFF) ** -(dim - 2) * (1 - d.clamp_min(CUTOFF) ** 2 / 4) ** (-(dim - 3) / 2)
    weight = weight * (d < NONZERO_LOSS_CUTOFF)
    expected = weight / weight.sum()
    observed = torch.bincount(draws - 2, minlength=len(angles)).double() / len(draws)
    torch.testing.assert_close(observed, expected, rtol=0.0, atol=0.015)
    assert observed[d >= NONZERO_LOSS_CUTOFF].sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_margin_draws_what_torch_multinomial_draws(dtype):
    """The negatives are drawn as torch.multinomial(weights, 1) draws them, from the same generator state (same
    draws, same state after), only without its checks of the weights: seeded trials keep their triplets."""
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(200, 48, generator=g, dtype=dtype) * (torch.rand(200, 48, generator=g) < 0.3)
    weights[torch.arange(200), torch.randint(0, 48, (200,), generator=g)] += 0.01  # every row can draw
    for seed in range(5):
        torch.manual_seed(seed)
        expected, after = torch.multinomial(weights, 1).squeeze(1), torch.rand(3)
        torch.manual_seed(seed)
        assert torch.equal(_draw(weights), expected) and torch.equal(torch.rand(3), after)


def _tight_clusters():
    """3 classes of 4 samples within ~0.01 of orthogonal centres, plus a singleton: every same-class
    pair is far more similar than any negative pair (the case where hard-positive mining keeps none)."""
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3])
    centres = torch.eye(8, dtype=torch.float64)[labels]
    raw = (centres + 0.01 * torch.randn(len(labels), 8, generator=g, dtype=torch.float64)).requires_grad_()
    return raw, labels  # a raw leaf, normalised in the test (gradients compared on the leaf: see _x)


def _easy_terms(x, labels):
    """Per anchor with a same-class sample: (anchor, its nearest positive, its nearest negative)."""
    rows = []
    for i in range(len(labels)):
        pos = _positives(x, labels, i, "easy")
        if pos:
            neg = min((j for j in range(len(labels)) if labels[j] != labels[i]), key=lambda j: _dist(x, i, j).item())
            rows.append((i, pos[0], neg))
    return rows


@pytest.mark.parametrize(
    ("name", "hp", "expected"),
    [  # hyperparameters under which every easy positive term is active and no negative term is
        ("multi_similarity", {}, lambda x, i, p, n: torch.log1p(torch.exp(-2.0 * (x[i] @ x[p] - 0.5))) / 2.0),
        ("contrastive", {}, lambda x, i, p, n: _dist(x, i, p)),
        ("triplet", {"negatives": "hard", "margin": 3.0}, lambda x, i, p, n: _dist(x, i, p) - _dist(x, i, n) + 3.0),
        ("margin", {"margin": 1.0, "beta": 0.0}, lambda x, i, p, n: 1.0 + _dist(x, i, p)),
    ],
)
def test_easy_positive_gives_every_anchor_with_a_same_class_sample_its_positive_term(name, hp, expected):
    """On tight clusters with far negatives: one term per anchor (the singleton has none), on its nearest
    positive — MS included, whose own positive mining (S − ε < max_neg) would keep none here."""
    raw, labels = _tight_clusters()
    x = F.normalize(raw, dim=1)
    loss = create_loss(name, 4, 8, positive="easy", **hp).double()
    terms = [expected(x, i, p, n) for i, p, n in _easy_terms(x, labels)]
    assert len(terms) == 12
    # MS averages over every anchor of the batch; the others over their active terms
    reference = sum(terms) / (len(labels) if name == "multi_similarity" else len(terms))
    assert_same_value_and_grads(loss(x, labels), reference, [raw])
    if name == "multi_similarity":
        x = x.detach()
        keep_pos, keep_neg = loss.mine(x @ x.T, labels)
        assert keep_pos.sum(dim=1).tolist() == [1] * 12 + [0] and not keep_neg.any()
        hard_mined, _ = create_loss(name, 4, 8).mine(x @ x.T, labels)
        assert not hard_mined.any()  # why the easy positive must replace MS's mining, not meet it


# ---- PDDM ------------------------------------------------------------------------------


def pddm_score(loss, x, i, j):
    """The unit by its definition (Eq. 2), one pair at a time: u, v normalised before their layers,
    u', v' normalised before the concatenation."""

    def unit_norm(t):
        return t / t.norm().clamp_min(1e-12)

    u, v = unit_norm((x[i] - x[j]).abs()), unit_norm((x[i] + x[j]) / 2)
    w = {name: (layer.weight.double(), layer.bias.double()) for name, layer in loss.named_children()}
    u = unit_norm(torch.relu(w["w_u"][0] @ u + w["w_u"][1]))
    v = unit_norm(torch.relu(w["w_v"][0] @ v + w["w_v"][1]))
    c = torch.relu(w["w_c"][0] @ torch.cat([u, v]) + w["w_c"][1])
    return (w["w_s"][0] @ c + w["w_s"][1])[0]


def pddm_reference(loss, x, labels, alpha, beta, lam):
    n, terms = len(labels), []
    for cls in sorted(set(labels.tolist())):
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j] == cls]
        negs = [k for k in range(n) if labels[k] != cls]
        if not pairs or not negs:
            continue
        with torch.no_grad():
            i, j = min(pairs, key=lambda p: (pddm_score(loss, x, *p).item(), p))
            k = max(negs, key=lambda q: (pddm_score(loss, x, i, q).item(), -q))
            m = max(negs, key=lambda q: (pddm_score(loss, x, j, q).item(), -q))
        s_ij = pddm_score(loss, x, i, j)
        s_ik, s_jm = pddm_score(loss, x, i, k), pddm_score(loss, x, j, m)
        e_m = torch.relu(alpha + s_ik - s_ij) + torch.relu(alpha + s_jm - s_ij)
        d_ij = _dist(x, i, j)
        e_e = torch.relu(beta + d_ij - _dist(x, i, k)) + torch.relu(beta + d_ij - _dist(x, j, m))
        terms.append(e_m + lam * e_e)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("hp", [{}, {"alpha": 0.2, "beta": 1.5, "lam": 2.0, "hidden": 8}])
def test_pddm_matches_plain_loop_in_float64(hp):
    torch.manual_seed(0)
    loss = create_loss("pddm", 5, DIM, **hp)
    raw, x = _x()
    full = {"alpha": 1.0, "beta": 0.5, "lam": 0.5, **hp}
    reference = pddm_reference(loss, x, LABELS, full["alpha"], full["beta"], full["lam"])
    # the unit's weights are float32 parameters, so their gradients are float32 sums
    assert_same_value_and_grads(loss(x, LABELS), reference, [raw, *loss.parameters()], atol=1e-7, rtol=1e-5)


def test_pddm_mines_one_quadruplet_per_class_by_the_units_score():
    torch.manual_seed(0)
    loss = create_loss("pddm", 5, DIM, hidden=8)
    x = _x()[1].detach()
    i, j, k, m = loss.mine(x, LABELS)
    assert sorted(LABELS[i].tolist()) == [0, 1, 2, 4]  # the singleton class 3 has no pair
    assert (LABELS[i] == LABELS[j]).all() and (LABELS[k] != LABELS[i]).all() and (LABELS[m] != LABELS[j]).all()
    assert not math.isnan(loss(x, LABELS).item())


def test_pddm_mining_stays_in_range_on_non_finite_scores():
    """A diverged model's NaN embeddings give a NaN loss (which ends the trial as non-finite), not an index out
    of range (an IndexError, or on a GPU a device-side assert): NaN scores count as −∞ in the mining."""
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    values = torch.tensor([1.0, float("nan"), float("nan"), float("nan"), float("nan"), 3.0])
    assert _arg_best(groups, values, 3).tolist() == [0, 2, 5]
    assert _arg_best(groups, torch.tensor([2.0, 5.0, 1.0, 4.0, 4.0, -1.0]), 3).tolist() == [1, 3, 5]  # ties: lowest
    torch.manual_seed(0)
    loss = create_loss("pddm", 5, DIM, hidden=8)
    assert math.isnan(loss(torch.full((len(LABELS), DIM), float("nan")), LABELS).item())


def test_pddm_reports_the_spread_of_its_units_scores_per_epoch():
    """unit_score_std: per batch, the std of S over the mined quadruplets' three pairs; the mean over the
    batches since the last read, then it starts over (NaN before a batch)."""
    torch.manual_seed(0)
    loss = create_loss("pddm", 5, DIM, hidden=8)
    assert math.isnan(loss.trial_metrics()["unit_score_std"])
    batches = [_x(seed)[1].detach() for seed in (1, 2)]
    expected = []
    for x in batches:
        i, j, k, m = loss.mine(x, LABELS)
        scores = [
            pddm_score(loss, x, *pair).item() for a, b in ((i, j), (i, k), (j, m)) for pair in zip(a, b, strict=True)
        ]
        expected.append(statistics.stdev(scores))
        loss(x, LABELS)
    assert loss.trial_metrics()["unit_score_std"] == pytest.approx(statistics.mean(expected), rel=1e-6)
    assert math.isnan(loss.trial_metrics()["unit_score_std"])
