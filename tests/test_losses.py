"""Losses: the registry, edge-case batches, plain-loop references in float64, PML as an oracle."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from study.config import LOSS_SEARCHABLE_TRAIN
from study.losses import LOSSES, create_loss, has_parameters, loss_hyperparameters
from study.search_space import load_search_space
from tests.conftest import REPO, assert_matches_pml, assert_same_value_and_grads, unit

SPACES = {name: load_search_space(REPO / "search_spaces" / f"{name}.yaml", LOSS_SEARCHABLE_TRAIN) for name in LOSSES}

NUM_CLASSES, DIM = 6, 8


def _unit(n: int, dim: int = DIM, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return unit(n, dim, seed, dtype)


EDGE_BATCHES = {
    "random": (_unit(16), torch.arange(4).repeat_interleave(4)),
    "singleton_classes": (_unit(8), torch.tensor([0, 0, 0, 1, 2, 3, 3, 5])),
    "all_same_class": (_unit(8), torch.full((8,), 2)),
    "collapsed": (_unit(1).expand(12, DIM).clone(), torch.arange(3).repeat(4)),
    "all_singletons": (_unit(6), torch.arange(6)),
}


def _grads(loss: torch.nn.Module, emb: torch.Tensor, labels: torch.Tensor, autocast: torch.dtype | None = None):
    """Loss value and grads w.r.t. (embeddings, *loss parameters). With ``autocast`` the forward
    runs under CPU autocast to that dtype and the backward outside it, as in a training step. The global
    generator is reseeded so that sampling losses (margin) draw the same pairs on every call."""
    emb = emb.clone().requires_grad_()
    torch.manual_seed(1234)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        value = loss(emb, labels)
    grads = torch.autograd.grad(value, [emb, *loss.parameters()])
    return value, grads


# ---- registry ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
def test_constructor_convention(name):
    params = list(inspect.signature(LOSSES[name]).parameters.values())
    assert [p.name for p in params[:2]] == ["num_classes", "embedding_dim"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:2])
    rest = params[2:]
    assert rest and all(p.kind is p.KEYWORD_ONLY for p in rest), "hyperparameters: keyword-only"
    assert all(p.default is not p.empty for p in rest), "every hyperparameter needs a default"
    assert loss_hyperparameters(name) == {p.name: p.default for p in rest}


def test_losses_with_parameters_of_their_own():
    """These train at lr × loss_lr_mult; the others have no parameter group of their own."""
    with_parameters = {name for name in LOSSES if has_parameters(name)}
    assert with_parameters == {"margin", "normalized_softmax", "pddm", "proxy_anchor", "proxy_nca", "soft_triple"}


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="unknown loss 'nope'") as err:
        create_loss("nope", NUM_CLASSES, DIM)
    assert all(name in str(err.value) for name in LOSSES)
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        loss_hyperparameters("nope")


@pytest.mark.parametrize("name", LOSSES)
def test_unknown_hyperparameter_is_named_with_the_allowed_ones(name):
    with pytest.raises(ValueError, match="'gamma_typo'") as err:
        create_loss(name, NUM_CLASSES, DIM, gamma_typo=1.0)
    assert name in str(err.value)
    assert all(key in str(err.value) for key in loss_hyperparameters(name))


@pytest.mark.parametrize("name", LOSSES)
def test_every_choice_hyperparameter_reaches_the_loss(name):
    """Each value of a string option (negatives, positive) gives a different loss on a batch."""
    emb, labels = EDGE_BATCHES["random"]
    for key, default in loss_hyperparameters(name).items():
        if not isinstance(default, str):
            continue
        values = set()
        for choice in SPACES[name].params[key].choices:
            torch.manual_seed(0)
            values.add(create_loss(name, NUM_CLASSES, DIM, **{key: choice})(emb, labels).item())
        assert len(values) == len(SPACES[name].params[key].choices), f"{key}: choices give equal losses"
        with pytest.raises(ValueError, match=f"{key} must be one of"):
            create_loss(name, NUM_CLASSES, DIM, **{key: "typo"})


@pytest.mark.parametrize("name", LOSSES)
def test_every_float_hyperparameter_reaches_the_loss(name):
    emb, labels = EDGE_BATCHES["random"]
    torch.manual_seed(0)
    base = create_loss(name, NUM_CLASSES, DIM)(emb, labels)
    for key, default in loss_hyperparameters(name).items():
        if not isinstance(default, float):
            continue
        torch.manual_seed(0)  # same parameter init, only the hyperparameter differs
        changed = create_loss(name, NUM_CLASSES, DIM, **{key: default * 0.2 or 0.1})(emb, labels)
        assert not torch.isclose(changed, base), f"{key} has no effect"


# ---- every loss: finite values and gradients on awkward batches -------------------------


@pytest.mark.parametrize("batch", EDGE_BATCHES)
@pytest.mark.parametrize("name", LOSSES)
def test_finite_value_and_grads(name, batch):
    torch.manual_seed(0)
    emb, labels = EDGE_BATCHES[batch]
    value, grads = _grads(create_loss(name, NUM_CLASSES, DIM), emb, labels)
    assert value.ndim == 0 and torch.isfinite(value)
    assert all(torch.isfinite(g).all() for g in grads)
    if batch == "random":
        assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_autocast_is_finite_close_to_float32_and_keeps_parameters_float32(name, half):
    torch.manual_seed(0)
    loss = create_loss(name, NUM_CLASSES, DIM)
    emb, labels = _unit(24, seed=3), torch.arange(6).repeat(4)
    reference, ref_grads = _grads(loss, emb, labels)
    # float32 embeddings under autocast: the loss turns autocast off, so nothing is rounded
    same, same_grads = _grads(loss, emb, labels, autocast=half)
    rounded, rounded_grads = _grads(loss, emb.to(half), labels, autocast=half)
    assert same.dtype == torch.float32 and rounded.dtype == torch.float32
    torch.testing.assert_close(same, reference, rtol=1e-6, atol=1e-6)
    for g, r in zip(same_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(rounded) and all(torch.isfinite(g).all() for g in rounded_grads)
    torch.testing.assert_close(rounded, reference, rtol=0.0, atol=3e-2)
    assert all(p.dtype == torch.float32 for p in loss.parameters())
    assert all(g.dtype == torch.float32 for g in rounded_grads[1:])


# ---- Multi-Similarity -------------------------------------------------------------------

MS_SETTINGS = [
    {},
    {"alpha": 1.0, "beta": 40.0, "base": 1.0, "epsilon": 0.05},
    {"alpha": 3.0, "beta": 60.0, "base": 0.3, "epsilon": 0.3},
]


def ms_reference(x, labels, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, positive="all"):
    """Per-anchor loop straight from the definition; returns (loss, kept pairs)."""
    n, total, kept = len(labels), x.new_zeros(()), set()
    for i in range(n):
        s = [x[i] @ x[j] for j in range(n)]
        pos = [k for k in range(n) if k != i and labels[k] == labels[i]]
        neg = [j for j in range(n) if labels[j] != labels[i]]
        min_pos = min((s[k].item() for k in pos), default=math.inf)
        max_neg = max((s[j].item() for j in neg), default=-math.inf)
        kept_pos = [k for k in pos if s[k].item() - epsilon < max_neg]
        if positive == "easy":  # the most similar positive replaces the mined ones; negatives mined against it
            kept_pos = [max(pos, key=lambda j: (s[j].item(), -j))] if pos else []
            min_pos = s[kept_pos[0]].item() if pos else math.inf
        kept_neg = [j for j in neg if s[j].item() + epsilon > min_pos]
        kept |= {(i, k, "+") for k in kept_pos} | {(i, j, "-") for j in kept_neg}
        if kept_pos:
            pos_sum = sum(torch.exp(-alpha * (s[k] - base)) for k in kept_pos)
            total = total + torch.log(1 + pos_sum) / alpha
        if kept_neg:
            neg_sum = sum(torch.exp(beta * (s[j] - base)) for j in kept_neg)
            total = total + torch.log(1 + neg_sum) / beta
    return total / n, kept


@pytest.mark.parametrize("hp", [*MS_SETTINGS, {"positive": "easy"}, {"epsilon": 0.3, "positive": "easy"}])
def test_multi_similarity_matches_plain_loop_in_float64(hp):
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 1, 0])  # classes 3 and 4 are singletons
    x = _unit(len(labels), dim=3, seed=1, dtype=torch.float64).requires_grad_()
    loss = create_loss("multi_similarity", 5, 3, **hp)
    expected, kept = ms_reference(x, labels, **hp)
    keep_pos, keep_neg = loss.mine(x @ x.T, labels)
    ours = {(i, k, "+") for i, k in keep_pos.nonzero().tolist()}
    ours |= {(i, j, "-") for i, j in keep_neg.nonzero().tolist()}
    assert ours == kept
    all_pairs = len(labels) * (len(labels) - 1)  # every ordered (i, j), i ≠ j, is + or −
    assert 0 < len(kept) < all_pairs, "the batch must exercise mining (keep some, drop some)"
    assert_same_value_and_grads(loss(x, labels), expected, [x])


@pytest.mark.parametrize("positive", ["all", "easy"])
def test_multi_similarity_without_mining_keeps_every_pair(positive):
    """The paper's ablation: no pair mining — the plain loop with a margin no similarity can beat
    (no singleton class: the loop's mining drops a singleton's negatives, having no positive)."""
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 1, 0])
    x = _unit(len(labels), dim=3, seed=1, dtype=torch.float64).requires_grad_()
    loss = create_loss("multi_similarity", 5, 3, mining=False, positive=positive)
    expected, kept = ms_reference(x, labels, epsilon=2.0, positive=positive)
    if positive == "all":
        assert len(kept) == len(labels) * (len(labels) - 1)  # every ordered pair
    assert_same_value_and_grads(loss(x, labels), expected, [x])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 1, 0])  # where mining drops pairs
    x = _unit(len(labels), dim=3, seed=1, dtype=torch.float64)
    kept = [int(sum(m.sum() for m in create_loss("multi_similarity", 5, 3, mining=on).mine(x @ x.T, labels)))
            for on in (True, False)]  # fmt: skip
    assert kept[0] < kept[1] == len(labels) * (len(labels) - 1)


def test_multi_similarity_without_kept_pairs_is_exactly_zero():
    emb, labels = EDGE_BATCHES["all_same_class"]
    value, (grad,) = _grads(create_loss("multi_similarity", 1, DIM), emb, labels)
    assert value.item() == 0.0 and not grad.any()


def _pml_ms(emb, labels, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    mined = pml_miners.MultiSimilarityMiner(epsilon=epsilon)(emb, labels)
    return pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)(emb, labels, mined)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hp", MS_SETTINGS)
@pytest.mark.parametrize("seed", range(3))
def test_multi_similarity_matches_pml(seed, hp, dtype):
    # PML normalises inside its distance, so both see the same raw leaf: the grads then
    # agree (normalising a unit vector again only re-applies the same tangent projection).
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(32, 16, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, 10, (32,), generator=g)
    ours = create_loss("multi_similarity", 10, 16, **hp)(F.normalize(raw, dim=1), labels)
    theirs = _pml_ms(raw, labels, **hp)
    assert_matches_pml(ours, theirs, [raw], [raw], 1e-5 if dtype == torch.float32 else 1e-10)


def test_multi_similarity_differs_from_pml_when_one_pair_of_each_kind_is_mined():
    """Deliberate difference: PML returns 0 whenever at most one positive and one negative
    pair are mined in the whole batch (GenericPairLoss's early exit); we compute the loss."""
    gram = torch.tensor([[1.0, 0.5, 0.45], [0.5, 1.0, 0.3], [0.45, 0.3, 1.0]], dtype=torch.float64)
    emb = torch.linalg.cholesky(gram)  # rows are unit vectors with exactly these similarities
    labels = torch.tensor([0, 0, 1])  # only anchor 0 keeps pairs: (0,1) positive, (0,2) negative
    ours = create_loss("multi_similarity", 2, 3)(emb, labels)
    expected = (math.log(2) / 2 + math.log1p(math.exp(50 * (0.45 - 0.5))) / 50) / 3
    assert abs(ours.item() - expected) < 1e-12
    assert _pml_ms(emb, labels).item() == 0.0


def test_multi_similarity_mining_inequalities_are_strict():
    """With ε = 0 on collapsed embeddings every similarity ties with min/max: nothing is kept."""
    emb, labels = EDGE_BATCHES["collapsed"]
    ours = create_loss("multi_similarity", 3, DIM, epsilon=0.0)(emb, labels)
    assert ours.item() == 0.0 == _pml_ms(emb, labels, epsilon=0.0).item()
    assert create_loss("multi_similarity", 3, DIM, epsilon=1e-3)(emb, labels).item() > 0


# ---- Normalized softmax -----------------------------------------------------------------


def ns_reference(x, labels, weights, temperature):
    total = x.new_zeros(())
    for i in range(len(labels)):
        logits = [x[i] @ (w / w.norm()) / temperature for w in weights]
        total = total - logits[labels[i]] + torch.log(sum(torch.exp(z) for z in logits))
    return total / len(labels)


@pytest.mark.parametrize("temperature", [0.05, 0.3])
def test_normalized_softmax_matches_plain_loop_in_float64(temperature):
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 1])
    x = _unit(len(labels), seed=2, dtype=torch.float64).requires_grad_()
    loss = create_loss("normalized_softmax", 5, DIM, temperature=temperature).double()
    assert_same_value_and_grads(loss(x, labels), ns_reference(x, labels, loss.W, temperature), [x, loss.W])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.05, 0.2])
def test_normalized_softmax_matches_pml(temperature, dtype):
    torch.manual_seed(0)
    ours = create_loss("normalized_softmax", 10, 16, temperature=temperature).to(dtype)
    theirs = pml_losses.NormalizedSoftmaxLoss(10, 16, temperature=temperature)
    with torch.no_grad():  # PML stores W as embedding_size × num_classes: ours transposed
        theirs.W.copy_(ours.W.T)
    raw = torch.randn(32, 16, dtype=dtype).requires_grad_()
    labels = torch.randint(0, 10, (32,))
    ours_value = ours(F.normalize(raw, dim=1), labels)
    theirs_value = theirs(raw, labels)  # PML normalises the embeddings itself
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_matches_pml(ours_value, theirs_value, [raw, ours.W], [raw, theirs.W], tol, transposed={1})
