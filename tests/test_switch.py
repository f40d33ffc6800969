from __future__ import annotations

import math

import pytest
from conftest import make_mlp
from torch import nn

from isample import PoolLoader, UpperBoundScorer
from isample.switch import CostAwareSwitch, TauSwitch, cost_threshold, default_tau_threshold


def test_tau_switch_ema_and_threshold():
    s = TauSwitch(threshold=1.5, momentum=0.9)
    assert s.observe(1.0) is False and s.ema == 1.0
    for _ in range(200):
        on = s.observe(2.0)
    assert on and math.isclose(s.ema, 2.0 - 0.9**200, rel_tol=1e-9)
    assert s.observe(float("nan")) is on  # NaN keeps the state
    restored = TauSwitch(threshold=1.5)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()
    assert TauSwitch(threshold=100.0, always=True).observe(1.0) is True
    with pytest.raises(ValueError, match="'momentum' parameter of TauSwitch"):
        TauSwitch(1.5, momentum=1.0)


def test_cost_threshold_reduces_to_katharopoulos_fleuret():
    b, big_b, f = 32, 128, 1e-3
    assert cost_threshold(big_b * f, 3 * b * f) == pytest.approx(default_tau_threshold(big_b, b))
    with pytest.raises(ValueError, match="step_seconds > 0"):
        cost_threshold(1.0, 0.0)


def test_cost_aware_switch_uses_measured_costs():
    s = CostAwareSwitch(momentum=0.0)
    s.observe(1.2, {"score_seconds": 0.01, "step_seconds": None, "pool_size": 96, "batch_size": 32})
    assert s.describe()["threshold_source"] == "(B + 3b) / (3b)" and s.threshold == pytest.approx(2.0)
    on = s.observe(1.2, {"score_seconds": 0.01, "step_seconds": 0.09, "pool_size": 96, "batch_size": 32})
    assert s.threshold == pytest.approx(0.1 / 0.09) and on  # cheap scoring: 1.2 > 1.11
    on = s.observe(1.2, {"score_seconds": 0.2, "step_seconds": 0.1, "pool_size": 96, "batch_size": 32})
    assert s.threshold == pytest.approx(3.0) and not on  # expensive scoring: off
    info = s.describe()
    assert info["threshold_source"] == "measured" and info["score_seconds"] == pytest.approx(0.2)
    copy = CostAwareSwitch()
    copy.load_state_dict(s.state_dict())
    assert copy.describe() == info


def test_pool_loader_feeds_timings_to_the_switch(classification):
    model = make_mlp()
    switch = CostAwareSwitch()
    loader = PoolLoader(
        classification,
        model,
        UpperBoundScorer(nn.CrossEntropyLoss(reduction="none")),
        8,
        2.0,
        switch=switch,
        seed=0,
    )
    for batch in loader:
        model(batch.inputs).sum()
    hist = loader.tau_history
    assert hist[0]["step_seconds"] is None and all(h["step_seconds"] > 0 for h in list(hist)[1:])
    assert all(h["score_seconds"] > 0 for h in hist)
    assert switch.describe()["threshold_source"] == "measured"
