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


# ---------------------------------------------------------------- History (tau_history)


def test_history_is_bounded_and_list_like():
    from isample.switch import History

    h = History(range(10), maxlen=4)
    assert len(h) == 4 and list(h) == [6, 7, 8, 9] and h == [6, 7, 8, 9]
    assert h[-3:] == [7, 8, 9] and h[0] == 6 and h[-1] == 9 and h[::2] == [6, 8] and h[::-1] == [9, 8, 7, 6]
    assert h[5:] == [] and h[1:3] == [7, 8]
    h.append(10)
    assert h[-1] == 10 and len(h) == 4
    with pytest.raises(IndexError):
        h[4]
    with pytest.raises(ValueError, match="'maxlen' parameter of History"):
        History(maxlen=0)


# ---------------------------------------------------------------- the auto rule


def test_pool_cost_ratio_formula():
    from isample.switch import pool_cost_ratio

    # train 10 ms, read 1 ms per batch, score a pool of 3 batches 6 ms: (10 + 3 + 6) / (10 + 1)
    assert pool_cost_ratio(0.010, 0.001, 0.006, 3) == pytest.approx(19 / 11)
    assert pool_cost_ratio(1.0, 0.0, 0.0, 3) == 1.0
    with pytest.raises(ValueError, match="train_seconds \\+ fetch_seconds > 0"):
        pool_cost_ratio(0.0, 0.0, 1.0, 3)


def test_auto_decision_has_hysteresis():
    from isample.switch import auto_decision

    assert auto_decision(2.0, 1.5, on=False, hysteresis=0.1)  # 2.0 > 1.65
    assert not auto_decision(1.6, 1.5, on=False, hysteresis=0.1)  # inside the band: stays off
    assert auto_decision(1.6, 1.5, on=True, hysteresis=0.1)  # inside the band: stays on
    assert not auto_decision(1.4, 1.5, on=True, hysteresis=0.1)
    assert auto_decision(math.nan, 1.5, on=True, hysteresis=0.1) and not auto_decision(
        3.0, math.nan, False, 0.1
    )


def timing(train, fetch, score=None, chunks=1):
    return {
        "step_seconds": train,
        "fetch_seconds": fetch * chunks,
        "chunks": chunks,
        "score_seconds": score,
        "pool_size": 96,
        "batch_size": 32,
    }


def test_auto_switch_decides_from_synthetic_timings():
    from isample.switch import AutoSwitch

    s = AutoSwitch(momentum=0.0, hysteresis=0.1, gain="kappa")
    assert s.wants_score_timing
    # warm-up measurements (10x too slow) are discarded; costs unknown: off whatever tau says
    assert s.observe(5.0, timing(1.0, 0.1, 1.0)) is False and s.costs["train_seconds"] is None
    assert math.isnan(s.cost_ratio()) and s.describe()["decision"] == "uniform"
    s.observe(5.0, timing(0.010, 0.001))  # train and fetch known, scoring not yet
    assert s.on is False and s.wants_score_timing
    # scoring a pool of 3 batches costs 12 ms: R = (10 + 3 + 12) / 11 = 25/11 = 2.27
    ratio = 25 / 11
    assert s.observe(math.sqrt(ratio * 1.05), timing(0.010, 0.001, 0.012)) is False  # gain in the band
    assert s.cost_ratio() == pytest.approx(ratio) and not s.wants_score_timing
    assert s.observe(math.sqrt(ratio * 1.2), timing(0.010, 0.001, chunks=3)) is True
    info = s.describe()
    assert info["decision"] == "pool-is" and info["gain"] == pytest.approx(ratio * 1.2)
    assert info["gain_threshold"] == pytest.approx(ratio) and info["threshold"] == pytest.approx(
        math.sqrt(ratio)
    )
    assert info["costs"] == pytest.approx(
        {"train_seconds": 0.010, "fetch_seconds": 0.001, "score_seconds": 0.012}
    )
    assert s.observe(math.sqrt(ratio * 1.02), timing(0.010, 0.001, 0.012, chunks=3)) is True  # band: stays on
    assert s.observe(math.sqrt(ratio * 0.9), timing(0.010, 0.001, 0.012, chunks=3)) is False
    # expensive scoring (60 ms): the same tau no longer pays
    s.observe(math.sqrt(3.0), timing(0.010, 0.001, 0.060))
    assert s.cost_ratio() == pytest.approx(73 / 11) and s.on is False
    copy = AutoSwitch(momentum=0.0)
    copy.load_state_dict(s.state_dict())
    assert copy.describe() == s.describe()


def test_auto_switch_sqrt_gain_and_probe_schedule():
    from isample.switch import AutoSwitch

    s = AutoSwitch(momentum=0.0, gain="sqrt-kappa", probe_every=3)
    for _ in range(2):
        s.observe(2.0, timing(0.010, 0.0, 0.005))
    # R = (10 + 5) / 10 = 1.5; gain = tau = 2.0 > 1.65 (kappa rule would give 4.0)
    assert s.on and s.gain() == 2.0 and s.threshold == pytest.approx(1.5)
    assert not s.wants_score_timing
    for _ in range(3):
        s.observe(2.0, timing(0.010, 0.0))
    assert s.wants_score_timing  # 3 steps without a scoring measurement
    with pytest.raises(ValueError, match="'gain' parameter of AutoSwitch"):
        AutoSwitch(gain="tau")
    with pytest.raises(ValueError, match="'hysteresis' parameter of AutoSwitch"):
        AutoSwitch(hysteresis=-0.1)


def test_auto_scheme_picks_the_gain_rule_and_reports_its_decision(classification):
    import torch

    import isample.schemes as schemes

    ce = nn.CrossEntropyLoss(reduction="none")
    model = make_mlp()
    sgd = schemes.build(
        "auto", classification, model, ce, 8, optimizer=torch.optim.SGD(model.parameters(), 0.1)
    )
    adam = schemes.build("auto", classification, model, ce, 8, optimizer=torch.optim.Adam(model.parameters()))
    assert sgd.switch.gain_rule == "kappa" and adam.switch.gain_rule == "sqrt-kappa"
    steps = 0
    for _ in range(5):  # two timed probes observed (the first is a warm-up) at decisions 16 steps apart
        for batch in sgd:
            out = model(batch.inputs)
            sgd.feedback(batch, out.detach(), ce(out, batch.targets).detach())
            steps += 1
    info = sgd.describe()
    assert info["scheme"] == "auto" and info["mode"] == "algorithm-1" and info["switch"]["rule"] == "auto"
    assert set(info["switch"]["costs"]) == {"train_seconds", "fetch_seconds", "score_seconds"}
    assert info["switch"]["costs"]["score_seconds"] is not None  # measured by the probes
    history = sgd.pool.tau_history
    assert all(h["chunks"] >= 1 for h in history[1:])
    # while off one step and one read in PoolLoader.TIME_EVERY are timed (the step after a timed read
    # carries its time); every step is timed while on
    every = sgd.pool.TIME_EVERY
    timed = [h for h in history[1:] if h["fetch_seconds"] is not None]
    assert timed and all(h["on"] or h["step"] % every == 1 for h in timed)
    assert any(h["step_seconds"] is not None for h in history)
    probes = sum(1 for h in history if h.get("source") == "probe")
    assert probes >= 1
    on_steps = sum(bool(h["on"]) for h in history)
    # scoring work: a pool of 3b at each step with IS on, b per timed probe while off
    assert sgd.cost()["scored_examples"] <= 3 * 8 * on_steps + 8 * (steps - on_steps)
    assert sgd.status().startswith("IS ")
    with pytest.raises(ValueError, match="'gain' parameter of Auto"):
        schemes.build("auto", classification, model, ce, 8, gain="fast")


def test_cost_aware_switch_in_algorithm1_gets_timed_probes_while_off(classification):
    model = make_mlp()
    ce = nn.CrossEntropyLoss(reduction="none")
    switch = CostAwareSwitch()
    loader = PoolLoader(
        classification, model, UpperBoundScorer(ce), 8, 3.0, switch=switch, seed=0, score_when_off=False
    )
    for batch in loader:
        loader.feedback(batch, model(batch.inputs).detach())
    probes = [h for h in loader.tau_history if h.get("source") == "probe"]
    assert probes and switch.score_seconds is not None and not switch.wants_score_timing
    assert switch.describe()["threshold_source"] == "measured"
    assert loader.scored_examples == 8 * len(probes) + 24 * sum(bool(h["on"]) for h in loader.tau_history)
