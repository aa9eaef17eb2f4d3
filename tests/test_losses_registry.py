"""The loss base class and registry: what a loss declares matches what it does, and the shared prologue."""

from __future__ import annotations

import pytest
import torch

from study.losses import LOSSES, MetricLoss, create_loss, declared_trial_metrics, register_loss


@pytest.mark.parametrize("name", LOSSES)
def test_trial_metrics_report_exactly_the_declared_names(name):
    loss = create_loss(name, 5, 8)
    assert isinstance(loss, MetricLoss)
    if hasattr(loss, "trial_metrics"):
        assert tuple(loss.trial_metrics()) == declared_trial_metrics(name) != ()
    else:
        assert declared_trial_metrics(name) == ()


def test_declared_trial_metrics_of_the_reporting_losses():
    assert declared_trial_metrics("soft_triple") == ("effective_centers",)
    assert declared_trial_metrics("proxy_anchor") == ("proxy_abs_cos",)
    with pytest.raises(ValueError, match="unknown loss"):
        declared_trial_metrics("nope")


class _Reporting(MetricLoss):
    def compute(self, embeddings, labels):
        return embeddings.sum()

    def trial_metrics(self) -> dict[str, float]:
        return {"x": 1.0}


def test_registering_a_name_twice_raises():
    before = dict(LOSSES)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("triplet")(_Reporting)
    assert LOSSES == before


def test_registration_checks_the_class_and_its_declaration():
    before = dict(LOSSES)
    with pytest.raises(TypeError, match="not a MetricLoss"):
        register_loss("_plain")(torch.nn.Module)
    with pytest.raises(TypeError, match="declare trial_metrics"):
        register_loss("_undeclared")(_Reporting)  # reports metrics it does not declare
    with pytest.raises(TypeError, match="declare trial_metrics"):
        register_loss("_no_method", trial_metrics=("x",))(MetricLoss)  # declares metrics it never reports
    assert LOSSES == before


class _Probe(MetricLoss):
    """Records what ``compute`` receives."""

    def __init__(self, table_dtype: torch.dtype | None = None):
        super().__init__()
        if table_dtype is not None:
            self.dtype_parameter = "table"
            self.table = torch.nn.Parameter(torch.zeros(2, dtype=table_dtype))

    def compute(self, embeddings, labels):
        self.seen = (embeddings.dtype, labels.device, torch.is_autocast_enabled("cpu"))
        return embeddings.sum()


@pytest.mark.parametrize(
    ("given", "table", "computed"),
    [
        (torch.bfloat16, None, torch.float32),
        (torch.float32, None, torch.float32),
        (torch.float64, None, torch.float64),
        (torch.float32, torch.float64, torch.float64),  # a wider learned table widens the computation
        (torch.bfloat16, torch.float32, torch.float32),
    ],
)
def test_forward_promotes_and_switches_autocast_off(given, table, computed):
    probe = _Probe(table)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe(torch.ones(3, 2, dtype=given), torch.zeros(3, dtype=torch.long))
    assert probe.seen == (computed, torch.device("cpu"), False)
