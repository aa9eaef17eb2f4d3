"""Search spaces: every file loads, every parameter is sampled in range, conditions hold, defaults come first."""

from __future__ import annotations

import math

import optuna
import pytest
import torch
import yaml

from study.config import LOSS_SEARCHABLE_TRAIN
from study.losses import LOSSES, create_loss
from study.search_space import load_search_space
from tests.conftest import REPO

SPACE_FILES = sorted(p for p in (REPO / "search_spaces").glob("*.yaml") if p.stem in LOSSES)


def _sample(space, n: int, seed: int = 0) -> list[dict]:
    """Parameter values of ``n`` random trials, the first one enqueued from the defaults."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    study.enqueue_trial(space.to_optuna(space.defaults()))
    study.optimize(lambda t: (space.define_by_run(t), 0.0)[1], n_trials=n)
    return [space.from_optuna(t.params) for t in study.trials]


def test_every_registered_loss_has_a_search_space():
    assert {p.stem for p in SPACE_FILES} == set(LOSSES)


@pytest.mark.parametrize("path", SPACE_FILES, ids=lambda p: p.stem)
def test_space_samples_every_parameter_within_bounds(path):
    space = load_search_space(path, LOSS_SEARCHABLE_TRAIN)
    trials = _sample(space, 40)
    assert trials[0] == space.defaults()  # the paper's defaults are the first trial
    for name, param in space.params.items():
        values = [t[name] for t in trials if name in t]
        assert values, f"{name} was never sampled"
        if param.type == "categorical":
            assert set(values) <= set(param.choices)
            assert len(set(values)) == len(param.choices), f"{name}: not every choice was sampled"
        else:
            if param.zero:
                assert 0.0 in values, f"{name}: 0 was never sampled"
                values = [v for v in values if v != 0.0]
            assert all(param.low <= v <= param.high for v in values)
            assert len(set(values)) > 1 or param.low == param.high
            if param.log and param.high / param.low > 100:  # log scale: lower decades get samples
                assert min(values) < math.sqrt(param.low * param.high)


@pytest.mark.parametrize("path", SPACE_FILES, ids=lambda p: p.stem)
def test_loss_builds_from_defaults_and_samples(path):
    space = load_search_space(path, LOSS_SEARCHABLE_TRAIN)
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(16, 8), dim=1).requires_grad_()
    labels = torch.arange(4).repeat_interleave(4)
    for point in _sample(space, 5):
        loss_kwargs, train = space.split(point)
        assert set(train) <= set(LOSS_SEARCHABLE_TRAIN)
        value = create_loss(space.loss, 4, 8, **loss_kwargs)(emb, labels)
        (grad,) = torch.autograd.grad(value, emb)
        assert torch.isfinite(value) and torch.isfinite(grad).all()


def _write(tmp_path, spec) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_conditional_parameter_is_sampled_only_when_its_condition_holds(tmp_path):
    spec = {
        "loss": "multi_similarity",
        "params": {
            "alpha": {"type": "float", "low": 1, "high": 4, "default": 2},
            "beta": {"type": "categorical", "choices": [40.0, 50.0], "default": 50.0},
            "epsilon": {"type": "float", "low": 0.0, "high": 0.2, "default": 0.1, "when": {"beta": [40.0]}},
        },
        "train": {"loss_lr_mult": {"type": "float", "low": 1, "high": 100, "log": True, "default": 10}},
    }
    space = load_search_space(_write(tmp_path, spec), LOSS_SEARCHABLE_TRAIN)
    assert space.defaults() == {"alpha": 2, "beta": 50.0, "loss_lr_mult": 10}  # epsilon inactive under beta=50
    trials = _sample(space, 30)
    assert all(("epsilon" in t) == (t["beta"] == 40.0) for t in trials)
    assert {t["beta"] for t in trials} == {40.0, 50.0}
    assert space.split({"alpha": 3, "loss_lr_mult": 3.0}) == ({"alpha": 3}, {"loss_lr_mult": 3.0})


def test_zero_allows_exactly_zero_besides_a_log_range(tmp_path):
    so = {"type": "float", "low": 1e-4, "high": 1.0, "log": True, "zero": True, "default": 0.0}
    space = load_search_space(_write(tmp_path, {"loss": "proxy_anchor", "params": {"so_weight": so}}), [])
    assert space.defaults() == {"so_weight": 0.0}
    assert space.to_optuna({"so_weight": 0.0}) == {"so_weight_is_zero": True}
    assert space.to_optuna({"so_weight": 0.01}) == {"so_weight_is_zero": False, "so_weight": 0.01}
    values = [t["so_weight"] for t in _sample(space, 40)]
    assert values[0] == 0.0 and 0 < values.count(0.0) < 40
    assert all(1e-4 <= v <= 1.0 for v in values if v)
    with pytest.raises(ValueError, match="'zero' is for log-scale floats"):
        load_search_space(_write(tmp_path, {"loss": "proxy_anchor", "params": {"so_weight": {**so, "log": False}}}), [])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"alpha": {"type": "float", "low": 3, "high": 1, "default": 2}}, "low (3.0) is above high (1.0)"),
        ({"alpha": {"type": "float", "low": 1, "high": 3, "default": 9}}, "outside [1.0, 3.0]"),
        ({"alpha": {"type": "float", "low": 0, "high": 3, "log": True, "default": 1}}, "log scale needs low > 0"),
        ({"alpha": {"type": "categorical", "choices": [1, 2], "default": 3}}, "default 3 is not one of"),
        ({"alpha": {"type": "float", "lo": 1, "high": 3, "default": 2}}, "params.alpha.lo"),
        ({"gamma": {"type": "float", "low": 1, "high": 3, "default": 2}}, "not a hyperparameter of multi_similarity"),
        (
            {"alpha": {"type": "float", "low": 1, "high": 3, "default": 2, "when": {"beta": [1]}}},
            "'beta' must be a parameter listed before 'alpha'",
        ),
    ],
)
def test_bad_space_is_rejected_with_file_and_key(tmp_path, params, message):
    path = _write(tmp_path, {"loss": "multi_similarity", "params": params})
    with pytest.raises(ValueError, match="space.yaml") as err:
        load_search_space(path, LOSS_SEARCHABLE_TRAIN)
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["epochs", "lr", "weight_decay"])
def test_a_loss_space_may_search_only_its_own_parameters_lr_multiplier(tmp_path, name):
    """Equal tuning: the lr, weight decay and schedule every loss shares are never in one loss's space."""
    spec = {"type": "float", "low": 1e-5, "high": 1e-2, "log": True, "default": 1e-4}
    path = _write(tmp_path, {"loss": "multi_similarity", "train": {name: spec}})
    with pytest.raises(ValueError, match=f"train.{name}: not searchable in a loss's space; allowed: loss_lr_mult"):
        load_search_space(path, LOSS_SEARCHABLE_TRAIN)
