"""The ``auto`` rule: discounted gain, realized-progress check, back-off, state, and the lazy tau."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_mlp
from torch import nn

from isample import LossScorer, PoolLoader
from isample.switch import AutoSwitch, TauSwitch, discounted_gain, realized_speedup, relative_rate

# train 10 ms, read 1 ms per batch, score a pool of 3 batches 12 ms: R = (10 + 3 + 12) / 11
RATIO = 25 / 11


def timing(loss=None, was_on=False, chunks=1, score=0.012):
    return {
        "step_seconds": 0.010,
        "fetch_seconds": 0.001 * chunks,
        "chunks": chunks,
        "score_seconds": score,
        "pool_size": 96,
        "batch_size": 32,
        "train_loss": loss,
        "was_on": was_on,
    }


def drive(switch, tau, n, loss_at, start=0):
    """Feed n steps; loss_at(step, was_on) gives the previous batch's loss. Returns the decisions."""
    out = []
    for i in range(start, start + n):
        was_on = switch.on
        out.append(switch.observe(tau, timing(loss_at(i, was_on), was_on, chunks=3 if was_on else 1)))
    return out


def test_rate_speedup_and_discount_formulas():
    costs = [0.0, 1.0, 2.0, 3.0]
    assert relative_rate(costs, [4.0, 3.0, 2.0, 1.0]) == pytest.approx(1.0 / 2.5)  # slope -1, mean 2.5
    assert math.isnan(relative_rate([1.0, 1.0, 1.0], [3.0, 2.0, 1.0]))  # no spread in cost
    assert math.isnan(relative_rate([0.0, 1.0], [2.0, 1.0]))  # too few points
    assert realized_speedup(0.2, 0.1) == pytest.approx(2.0)
    assert realized_speedup(0.1, 0.0) == math.inf and realized_speedup(-0.1, -0.2) == 0.0
    assert math.isnan(realized_speedup(math.nan, 0.1))
    assert discounted_gain(5.0, 0.25) == pytest.approx(2.0) and discounted_gain(5.0, 1.0) == 5.0


def test_discounted_gain_decides():
    s = AutoSwitch(momentum=0.0, gain="kappa", efficiency=0.25)
    for _ in range(3):
        s.observe(math.sqrt(5.0), timing())  # G = 5, G_eff = 2 < R (1 + h) = 2.5
    assert s.cost_ratio() == pytest.approx(RATIO) and not s.on
    assert s.effective_gain() == pytest.approx(2.0)
    # tau on the switch's scale: G_eff = R (1 + h)  <=>  G = 1 + (R (1 + h) - 1) / alpha
    assert s.threshold == pytest.approx(math.sqrt(1 + (RATIO * 1.1 - 1) / 0.25))
    s.observe(math.sqrt(9.0), timing())  # G_eff = 3 > 2.5: on (no losses: the prediction alone)
    assert s.on and s.history[-1]["event"] == "on"
    assert AutoSwitch(efficiency=0.0).threshold != AutoSwitch(efficiency=0.0).threshold  # NaN: no costs
    zero = AutoSwitch(momentum=0.0, efficiency=0.0)
    for _ in range(3):
        zero.observe(100.0, timing())
    assert not zero.on and zero.threshold == math.inf


def test_needs_a_uniform_reference_before_switching_on():
    s = AutoSwitch(momentum=0.0, efficiency=1.0, window=10)
    decisions = drive(s, 3.0, 8, lambda i, on: 2.0 - 0.01 * i)
    assert not any(decisions)  # the gain pays, but the reference window is not full
    decisions = drive(s, 3.0, 5, lambda i, on: 2.0 - 0.01 * i, start=8)
    assert decisions[-1] and s.describe()["reference_points"] == 10


def test_switches_off_when_realized_progress_does_not_pay_and_backs_off():
    s = AutoSwitch(momentum=0.0, efficiency=1.0, window=10, settle=4, cooldown=20)
    loss = [2.0]

    def same_per_step(i, on):  # IS buys nothing per step: per unit cost it is R times slower
        loss[0] *= 0.99
        return loss[0]

    drive(s, 3.0, 12, same_per_step)
    assert s.on
    first_on = s.history[-1]["step"]  # step 11: 10 reference points (the first step has no loss yet)
    decisions = drive(s, 3.0, 14, same_per_step, start=12)  # settle 4 + window 10
    assert not decisions[-1] and s.failures == 1
    info = s.describe()
    assert info["realized_speedup"] == pytest.approx(1 / RATIO, rel=0.05)
    assert info["rate_off"] == pytest.approx(-math.log(0.99), rel=0.05)
    assert s.history[-1]["event"] == "off" and "realized" in s.history[-1]["reason"]
    off_at = s.history[-1]["step"]
    assert info["cooldown_until"] == off_at + 20 and off_at - first_on == 14 and first_on == 11
    assert s.alpha == pytest.approx(0.5, abs=0.05)  # S R = 1: measured alpha 0, averaged with 1.0
    # cool-down: off whatever tau says, then the reference refills and it retries
    off_steps = drive(s, 10.0, 18, same_per_step, start=26)  # steps 27-44 (off until 45)
    assert not any(off_steps)
    drive(s, 10.0, 40, same_per_step, start=44)
    assert s.failures == 2 and s.off_until - s.history[-1]["step"] == 40  # doubled
    assert [h["event"] for h in s.history] == ["on", "off", "on", "off"]


def test_stays_on_when_realized_progress_pays():
    s = AutoSwitch(momentum=0.0, efficiency=1.0, window=10, settle=4)
    loss = [2.0]

    def faster_when_on(i, on):  # an IS step does 4 uniform steps of progress, at R = 2.27 the cost
        loss[0] *= 0.99**4 if on else 0.99
        return loss[0]

    drive(s, 3.0, 12, faster_when_on)
    assert s.on
    drive(s, 3.0, 30, faster_when_on, start=12)
    assert s.on and s.failures == 0
    assert s.describe()["realized_speedup"] == pytest.approx(4 / RATIO, rel=0.05)


def test_state_dict_round_trip_mid_trial_continues_identically():
    def run(split):
        s = AutoSwitch(momentum=0.5, efficiency=1.0, window=6, settle=2, cooldown=5)
        loss = [2.0]

        def f(i, on):
            loss[0] *= 0.995 if on else 0.99
            return loss[0] + 0.01 * math.sin(i)

        out = drive(s, 3.0, split, f)
        if split < 60:
            copy = AutoSwitch(momentum=0.5, efficiency=1.0, window=6, settle=2, cooldown=5)
            copy.load_state_dict(s.state_dict())
            assert copy.describe() == s.describe()
            s = copy
            out += drive(s, 3.0, 60 - split, f, start=split)
        return out, s.describe()

    full, info = run(60)
    resumed, info2 = run(17)
    assert full == resumed and info == info2
    assert any(full) and not all(full)  # it switched on and back off along the way
    old = AutoSwitch()
    old.load_state_dict({k: AutoSwitch().state_dict()[k] for k in AutoSwitch.STATE_KEYS})  # older state
    assert old.alpha == 1.0 and old.history == type(old.history)()


def test_describe_exposes_the_rule_estimates_and_history():
    s = AutoSwitch(momentum=0.0)
    info = s.describe()
    for key in (
        "decision_rule",
        "efficiency",
        "effective_gain",
        "rate_off",
        "rate_on",
        "realized_speedup",
        "failures",
        "cooldown_until",
        "history",
    ):
        assert key in info
    assert "realized speed-up" in info["decision_rule"]
    with pytest.raises(ValueError, match="'efficiency' parameter of AutoSwitch"):
        AutoSwitch(efficiency=1.5)
    with pytest.raises(ValueError, match="'window' parameter of AutoSwitch"):
        AutoSwitch(window=2)


def test_auto_scheme_hands_the_weighted_losses_to_its_switch(classification):
    import isample.schemes as schemes

    ce = nn.CrossEntropyLoss(reduction="none")
    model = make_mlp()
    loader = schemes.build("auto", classification, model, ce, 8, optimizer=None)
    assert loader.switch.alpha == 0.1 and loader.pool.tau_every == 16
    fed = []
    for batch in loader:
        out = model(batch.inputs)
        losses = ce(out, batch.targets).detach()
        fed.append(float((batch.weights * losses).mean()))
        loader.feedback(batch, out.detach(), losses)
    history = loader.pool.tau_history
    got = [h["train_loss"] for h in history]
    assert got[0] is None and got[1:] == pytest.approx(fed[:-1], rel=1e-6)  # step t: batch t - 1
    assert loader.switch.losses_seen == len(fed) - 1


# ---------------------------------------------------------------- tau every k steps


class _Heavy(LossScorer):
    """Scores = the losses handed to update() (tau from synthetic, growing spreads)."""


def _lazy_run(tau_every, steps=40):
    torch.manual_seed(0)
    x, y = torch.randn(640, 5), torch.randint(0, 3, (640,))
    ds = torch.utils.data.TensorDataset(x, y)
    loader = PoolLoader(
        ds,
        make_mlp(),
        _Heavy(nn.CrossEntropyLoss(reduction="none")),
        16,
        3.0,
        seed=0,
        score_when_off=False,
        switch=TauSwitch(threshold=2.0, momentum=0.8),
        tau_every=tau_every,
        check_loss_fn=False,
    )
    served = []
    for i, batch in enumerate(loader):
        served.append(bool((batch.weights != 1).any()) or len(batch) != 16)
        spread = 1.0 + 0.5 * i  # heavier and heavier tails: tau rises over the run
        scores = torch.linspace(0, 1, len(batch)) ** spread + 1e-3
        loader.update(batch.indices, scores)
        if i + 1 == steps:
            break
    return loader, served


def test_tau_every_k_steps_reaches_the_same_switch_states_and_delays_only_the_effect():
    eager, _ = _lazy_run(1)
    lazy, _ = _lazy_run(5)
    he, hl = list(eager.tau_history), list(lazy.tau_history)
    switch_on = next(i for i, h in enumerate(he) if h["on"])
    assert 5 < switch_on < 35
    # identical tau and EMA at every step up to the eager switch-on (same scores, same order)
    for a, b in zip(he[: switch_on + 1], hl[: switch_on + 1], strict=True):
        assert a["step"] == b["step"]
        assert a["tau"] == b["tau"] or (math.isnan(a["tau"]) and math.isnan(b["tau"]))
        assert a["ema"] == b["ema"]  # bit-identical: the same floats in the same order
    # the lazy loader serves the decision at its next evaluation step (a multiple of 5)
    lazy_on = next(i for i, h in enumerate(hl) if h["on"])
    assert lazy_on == 5 * math.ceil(switch_on / 5)
    assert lazy.tau_every == 5 and eager.tau_every == 1
    with pytest.raises(ValueError, match="'tau_every' parameter of PoolLoader"):
        _lazy_run(0)


def test_step_time_is_a_median_robust_to_pauses_of_the_loop():
    s = AutoSwitch(momentum=0.9)
    for i in range(40):
        t = timing()
        t["step_seconds"] = 0.5 if i % 10 == 9 else 0.010  # an evaluation every 10 steps
        s.observe(1.0, t)
    assert s.costs["train_seconds"] == pytest.approx(0.010)
    copy = AutoSwitch(momentum=0.9)
    copy.load_state_dict(s.state_dict())
    t = timing()
    assert copy.observe(1.0, t) == s.observe(1.0, t) and copy.describe() == s.describe()


def test_timed_probes_are_not_repeated_while_their_timing_awaits_the_next_decision(classification):
    import isample.schemes as schemes

    ce = nn.CrossEntropyLoss(reduction="none")
    model = make_mlp()
    loader = schemes.build("auto", classification, model, ce, 8, probe_every=20)
    steps = 0
    for _ in range(3):
        for batch in loader:
            out = model(batch.inputs)
            loader.feedback(batch, out.detach(), ce(out, batch.targets).detach())
            steps += 1
    probes = sum(1 for h in loader.pool.tau_history if h.get("source") == "probe" and h["score_seconds"])
    scored_batches = loader.cost()["scored_examples"] // 8
    # two at the start (the first is a discarded warm-up), then one per probe_every steps
    assert scored_batches <= 2 + steps // 20 + 1 and probes >= 1
