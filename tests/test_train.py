"""One trial as a plain function: deterministic, learns, reports every epoch, stops on a non-finite loss."""

from __future__ import annotations

import pytest

from study.config import SEARCHABLE_TRAIN, load_study
from study.losses import LOSSES, MultiSimilarityLoss
from study.search_space import load_search_space
from study.storage import Storage
from study.train import NonFiniteLossError, evaluate_untrained, prepare_data, run_trial
from tests.conftest import REPO, TINY_STUDY, write_study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    # Large enough to learn in seconds on a CPU: resnet10t on 32 px glyphs of 24 training classes.
    dataset = {**TINY_STUDY["dataset"], "options": {"num_classes": 48, "samples_per_class": 24}}
    model = {"backbone": "resnet10t", "embedding_dim": 32}
    train = {"epochs": 2, "batch_size": 32, "m_per_class": 4, "lr": 3e-3}
    return load_study(write_study(tmp_path_factory.mktemp("s"), dataset=dataset, model=model, train=train))


@pytest.fixture(scope="module")
def data(study):
    return prepare_data(study.dataset, study.seed)


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "epoch_seconds"}


def test_trial_is_deterministic_and_reports_each_epoch(study, data):
    reports = []
    first = run_trial(study, "multi_similarity", {}, data=data, report=reports.append)
    second = run_trial(study, "multi_similarity", {}, data=data)
    assert _without_timing(first) == _without_timing(second)
    assert [r["epoch"] for r in reports] == [1, 2]
    assert _without_timing(reports[-1]) == _without_timing(first)
    assert {"recall_at_1", "recall_at_8", "map_at_r", "r_precision", "nmi", "train_loss"} <= set(first)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The embedded dataset at its default size with the quickstart's training settings."""
    study = load_study(REPO / "search_spaces" / "quickstart.yaml", ["train.epochs=2"])
    return study, prepare_data(study.dataset, study.seed)


@pytest.mark.parametrize("loss", LOSSES)
def test_two_epochs_of_every_loss_beat_the_untrained_network(quickstart, loss):
    """Each loss with its search space's defaults (paper values, e.g. proxies at lr × 100)."""
    study, data = quickstart
    space = load_search_space(REPO / "search_spaces" / f"{loss}.yaml", SEARCHABLE_TRAIN)
    loss_kwargs, overrides = space.split(space.defaults())
    trained = run_trial(study, loss, loss_kwargs, study.train.model_copy(update=overrides), data=data)
    untrained = evaluate_untrained(study, data)
    assert trained["recall_at_1"] > untrained["recall_at_1"] + 0.03, (trained, untrained)
    assert trained["map_at_r"] > untrained["map_at_r"], (trained, untrained)


def test_diverging_trial_raises(study, data):
    train = study.train.model_copy(update={"lr": 1e30})
    with pytest.raises(NonFiniteLossError, match="normalized_softmax"):
        run_trial(study, "normalized_softmax", {}, train, data=data)


class _ReportingLoss(MultiSimilarityLoss):
    def trial_metrics(self) -> dict[str, float]:
        return {"mean_alpha": self.alpha}


def test_loss_trial_metrics_are_reported_each_epoch(study, data, monkeypatch):
    monkeypatch.setitem(LOSSES, "reporting", _ReportingLoss)
    reports = []
    run_trial(study, "reporting", {"alpha": 3.0}, data=data, report=reports.append)
    assert [r["mean_alpha"] for r in reports] == [3.0, 3.0]


class _Crash(Exception):
    pass


def test_a_trial_resumed_from_its_checkpoint_ends_as_if_never_interrupted(study, data, tmp_path):
    train = study.train.model_copy(update={"epochs": 3})
    whole = run_trial(study, "margin", {}, train, data=data, checkpoint_dir=Storage.at(tmp_path / "a"))

    def crash_after_first_epoch(result):
        if result["epoch"] == 1:
            raise _Crash  # the checkpoint of epoch 1 is already on disk

    folder = Storage.at(tmp_path / "b")
    with pytest.raises(_Crash):
        run_trial(study, "margin", {}, train, data=data, report=crash_after_first_epoch, checkpoint_dir=folder)
    reports = []
    resumed = run_trial(study, "margin", {}, train, data=data, report=reports.append, checkpoint_dir=folder)
    assert [r["epoch"] for r in reports] == [1, 2, 3]  # epoch 1 re-reported from the checkpoint
    assert _without_timing(resumed) == _without_timing(whole)  # margin also draws from torch's global RNG
    assert not list((tmp_path / "b").glob(".*.tmp"))
