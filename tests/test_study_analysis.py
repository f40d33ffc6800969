"""The study's analysis functions on synthetic inputs whose answers are known in closed form."""

from __future__ import annotations

import math
import pathlib
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from isample.study import (
    common_levels,
    curve_match,
    is_stable,
    largest_stable_lr,
    reach_ratio,
    spearman,
    time_to_reach,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- spearman


def test_spearman_of_a_monotone_relation_is_one_with_a_degenerate_interval():
    x = np.linspace(0.1, 5.0, 20)
    res = spearman(x, np.exp(3 * x) - 7)  # nonlinear but strictly increasing
    assert res.rho == pytest.approx(1.0, abs=1e-12)
    assert res.low == pytest.approx(1.0, abs=1e-12) and res.high == pytest.approx(1.0, abs=1e-12)
    assert res.n == 20 and res.confidence == 0.95
    down = spearman(x, 1.0 / x)
    assert down.rho == pytest.approx(-1.0, abs=1e-12) and down.high == pytest.approx(-1.0, abs=1e-12)


def test_spearman_matches_the_textbook_formula_and_scipy_with_ties():
    # No ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); ranks of y are 2 1 4 3 5, sum d^2 = 4.
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]).rho == pytest.approx(1 - 6 * 4 / (5 * 24), abs=1e-12)
    gen = np.random.default_rng(3)
    x = np.round(gen.normal(size=40), 1)  # rounding creates ties
    y = np.round(x + gen.normal(size=40), 1)
    assert spearman(x, y).rho == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(-5, 5), st.integers(-5, 5)), min_size=3, max_size=25))
def test_spearman_equals_scipy_and_is_invariant_to_increasing_maps(pairs):
    x = np.array([p[0] for p in pairs], dtype=float)
    y = np.array([p[1] for p in pairs], dtype=float)
    rho = spearman(x, y, n_boot=5).rho
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        assert math.isnan(rho)
        return
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(np.exp(x), y**3, n_boot=5).rho == pytest.approx(rho, abs=1e-12)
    assert spearman(-x, y, n_boot=5).rho == pytest.approx(-rho, abs=1e-12)


def test_spearman_interval_is_seeded_and_never_touches_global_rng():
    gen = np.random.default_rng(0)
    x = gen.normal(size=30)
    y = x + gen.normal(size=30)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    a = spearman(x, y, rng=5)
    b = spearman(x, y, rng=5)
    c = spearman(x, y, rng=np.random.default_rng(5))
    assert a == b == c
    assert spearman(x, y, rng=6) != a
    assert (np.random.get_state()[1] == np_state).all() and torch.equal(torch.get_rng_state(), torch_state)
    assert a.low <= a.rho <= a.high


def test_spearman_interval_width_matches_the_null_standard_error():
    # Independent x and y: rho is approximately normal with sd 1 / sqrt(n - 1), so the 95%
    # percentile interval has half-width close to 1.96 / sqrt(n - 1) (~0.098 for n = 400).
    gen = np.random.default_rng(11)
    x, y = gen.normal(size=400), gen.normal(size=400)
    res = spearman(x, y, n_boot=1000, rng=1)
    half = (res.high - res.low) / 2
    assert 0.07 < half < 0.13
    assert res.low < 0 < res.high


def test_spearman_of_a_constant_variable_is_nan():
    res = spearman([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0], n_boot=50)
    assert math.isnan(res.rho) and math.isnan(res.low) and res.n_boot == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=[1, 2, 3], y=[1, 2]), ValueError, "same length"),
        (dict(x=[1, 2], y=[1, 2]), ValueError, "at least 3 pairs"),
        (dict(x=[1, 2, math.nan], y=[1, 2, 3]), ValueError, "without NaN"),
        (dict(x=[1, 2, math.inf], y=[1, 2, 3]), ValueError, "finite"),
        (dict(x="abc", y=[1, 2, 3]), TypeError, "1-D sequence"),
        (dict(x=[[1, 2, 3]], y=[1, 2, 3]), ValueError, "1-D sequence"),
        (dict(x=[1, 2, 3], y=[1, 2, 3], rng=True), TypeError, "'rng' parameter of spearman"),
        (dict(x=[1, 2, 3], y=[1, 2, 3], rng=-1), ValueError, "'rng' parameter of spearman"),
        (dict(x=[1, 2, 3], y=[1, 2, 3], confidence=1.0), ValueError, "'confidence' parameter"),
        (dict(x=[1, 2, 3], y=[1, 2, 3], n_boot=0), ValueError, "'n_boot' parameter"),
    ],
)
def test_spearman_rejects_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        spearman(**kwargs)


# --------------------------------------------------------------------------- time to reach a level


def test_time_to_reach_is_exact_for_an_exponential_curve_on_a_sparse_grid():
    x = np.array([0.0, 7.0, 19.0, 40.0, 90.0])
    losses = np.exp(-x / 10)
    for level in (0.9, 0.3, 0.05, 0.001):
        assert time_to_reach(x, losses, level) == pytest.approx(10 * math.log(1 / level), rel=1e-12)


def test_time_to_reach_hand_computed_start_and_never():
    # log-linear between (0, 1) and (10, 0.01): log 0.1 is halfway between log 1 and log 0.01.
    assert time_to_reach([0, 10], [1.0, 0.01], 0.1) == pytest.approx(5.0)
    assert time_to_reach([3, 4, 5], [0.5, 0.4, 0.3], 0.6) == 3.0  # already there at the start
    assert time_to_reach([0, 1, 2], [1.0, 0.9, 0.8], 0.5) == math.inf  # never
    # A diverged run never reaches a level, even if garbage after the NaN would.
    assert time_to_reach([0, 1, 2, 3], [1.0, 0.9, math.nan, 0.01], 0.5) == math.inf
    assert time_to_reach(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.25]), 0.5) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (([0, 1], [1.0], 0.5), ValueError, "same length"),
        (([0, 0], [1.0, 0.5], 0.5), ValueError, "strictly increasing"),
        (([0, 1], [1.0, -0.5], 0.5), ValueError, "> 0 where finite"),
        (([0, 1], [1.0, 0.5], 0.0), ValueError, "'level' parameter of time_to_reach"),
        (([0, 1], [1.0, 0.5], "0.1"), TypeError, "'level' parameter of time_to_reach"),
        (([], [], 0.5), ValueError, "non-empty"),
    ],
)
def test_time_to_reach_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        time_to_reach(*args)


# --------------------------------------------------------------------------- speed-up at equal loss


def test_reach_ratio_recovers_a_known_time_stretch_in_steps_and_in_seconds():
    # The new run follows exp(-t / 10), the reference exp(-t / 25): the new run is 2.5x faster
    # in steps at every level. If each of its steps costs 1.25x as much, it is 2x faster in time.
    steps_new = np.arange(0, 200, 3.0)
    steps_ref = np.arange(0, 500, 7.0)
    loss_new = np.exp(-steps_new / 10)
    loss_ref = np.exp(-steps_ref / 25)
    levels = common_levels(loss_ref, loss_new, n=6)
    assert levels.shape == (6,)
    np.testing.assert_allclose(reach_ratio(steps_ref, loss_ref, steps_new, loss_new, levels), 2.5, rtol=1e-12)
    seconds_new, seconds_ref = 1.25 * steps_new, 1.0 * steps_ref
    np.testing.assert_allclose(
        reach_ratio(seconds_ref, loss_ref, seconds_new, loss_new, levels), 2.0, rtol=1e-12
    )


def test_reach_ratio_conventions_for_never():
    x = np.arange(5.0)
    fast = np.array([1.0, 0.5, 0.25, 0.125, 0.0625])
    slow = np.array([1.0, 0.9, 0.8, 0.7, 0.6])
    out = reach_ratio(x, slow, x, fast, [0.5, 0.01])
    assert out[0] == math.inf  # reference never reaches 0.5, the new run does
    assert math.isnan(out[1])  # neither reaches 0.01
    assert reach_ratio(x, fast, x, slow, [0.5])[0] == 0.0  # the new run never does


def test_common_levels_are_reached_by_both_curves_and_empty_when_one_never_improves():
    a = np.exp(-np.arange(50) / 5)
    b = 2 * np.exp(-np.arange(50) / 20)
    levels = common_levels(a, b, n=4)
    assert (np.diff(levels) < 0).all()
    assert levels[0] < 1.0 and levels[-1] == pytest.approx(b.min())
    assert np.isfinite(reach_ratio(np.arange(50), a, np.arange(50), b, levels)).all()
    assert common_levels(a, np.full(50, 0.5)).size == 0
    with pytest.raises(ValueError, match="finite loss > 0"):
        common_levels([math.nan, 1.0], a)


# --------------------------------------------------------------------------- curve matching


def test_curve_match_of_a_constant_factor_is_its_log_on_different_grids():
    xa, xb = np.arange(0, 100, 2.0), np.arange(1, 100, 3.0)
    la = np.exp(-xa / 30) + 0.1
    lb = 3.0 * (np.exp(-xb / 30) + 0.1)
    res = curve_match(xa, la, xb, lb)
    # Interpolation of log-loss between grid points is not exact for this curve, but the
    # constant factor dominates: every point differs by log 3 up to the interpolation error.
    assert res.median_abs_log_ratio == pytest.approx(math.log(3), abs=1e-3)
    assert (res.start, res.end) == (1.0, 97.0)  # xb ends at 97, xa at 98
    exact = curve_match(xa, np.exp(-xa / 30), xa, 3.0 * np.exp(-xa / 30))
    assert exact.median_abs_log_ratio == pytest.approx(math.log(3), rel=1e-12)
    assert exact.max_abs_log_ratio == pytest.approx(math.log(3), rel=1e-12)
    assert curve_match(xa, la, xa, la).median_abs_log_ratio == 0.0


def test_curve_match_of_a_time_stretch_is_known():
    # log a = -t / 10, log b = -t / 20: |log ratio| = t / 20, median over t = 0..99 is 49.5 / 20.
    t = np.arange(100.0)
    res = curve_match(t, np.exp(-t / 10), t, np.exp(-t / 20))
    assert res.median_abs_log_ratio == pytest.approx(49.5 / 20, rel=1e-12)
    assert res.max_abs_log_ratio == pytest.approx(99 / 20, rel=1e-12)
    assert res.n_points == 100


def test_curve_match_uses_only_the_common_range_and_counts_divergence_as_infinite():
    t = np.arange(100.0)
    late = np.arange(50.0, 200.0)
    res = curve_match(t, np.ones(100), late, np.full(150, 2.0))
    assert (res.start, res.end, res.n_points) == (50.0, 99.0, 50)
    assert res.median_abs_log_ratio == pytest.approx(math.log(2))
    part = curve_match(t, np.ones(100), t, np.ones(100), start=10, end=19)
    assert part.n_points == 10
    diverged = np.ones(100)
    diverged[70:] = math.nan  # 30% of the grid: median still finite, max infinite
    res = curve_match(t, np.ones(100), t, diverged)
    assert res.median_abs_log_ratio == 0.0 and res.max_abs_log_ratio == math.inf
    diverged[30:] = math.inf  # 70% of the grid
    assert curve_match(t, np.ones(100), t, diverged).median_abs_log_ratio == math.inf
    with pytest.raises(ValueError, match="share no x range"):
        curve_match([0, 1], [1, 1], [5, 6], [1, 1])


# --------------------------------------------------------------------------- stability


def _quadratic_run(curvature: float, steps: int = 30):
    """Gradient descent on f(w) = curvature / 2 * w^2 with torch.optim.SGD: stable iff lr <= 2 / h."""
    calls = []

    def run(lr: float) -> list[float]:
        calls.append(lr)
        w = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([w], lr=lr)
        losses = []
        for _ in range(steps):
            loss = 0.5 * curvature * (w * w).sum()
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return losses

    return run, calls


@pytest.mark.parametrize("search", ["grid", "bisect"])
def test_largest_stable_lr_finds_the_known_threshold_of_gradient_descent(search):
    # h = 4: |1 - lr h| <= 1 iff lr <= 0.5. At 0.5 the loss stays constant (stable); at 0.6 it
    # grows by 1.96 per step and passes 10x the initial loss within 4 steps.
    run, calls = _quadratic_run(4.0)
    grid = [2.0, 0.05, 0.1, 0.2, 0.5, 0.6, 1.0]  # any order
    res = largest_stable_lr(run, grid, search=search)
    assert res.lr == 0.5 and res.monotone and not res.at_edge
    assert list(res.tested) == sorted(res.tested)
    if search == "grid":
        assert len(calls) == 7 and res.tested == {0.05: True, 0.1: True, 0.2: True, 0.5: True,
                                                  0.6: False, 1.0: False, 2.0: False}
    else:
        assert len(calls) <= math.ceil(math.log2(7)) + 1
        assert all(res.tested[lr] == (lr <= 0.5) for lr in res.tested)


def test_largest_stable_lr_edges_and_non_monotone_results():
    run, _ = _quadratic_run(4.0)
    everything = largest_stable_lr(run, [0.01, 0.1])
    assert everything.lr == 0.1 and everything.at_edge
    nothing = largest_stable_lr(run, [1.0, 3.0], search="bisect")
    assert nothing.lr is None and not nothing.at_edge
    flaky = largest_stable_lr(lambda lr: [1.0, math.nan if lr == 0.2 else 1.0], [0.1, 0.2, 0.3])
    assert flaky.lr == 0.3 and not flaky.monotone


def test_is_stable_rule():
    assert is_stable([1.0, 5.0, 0.1])
    assert not is_stable([1.0, 11.0, 0.1])  # a spike above 10x the initial loss counts
    assert is_stable([1.0, 11.0, 0.1], divergence_factor=20)
    assert not is_stable([1.0, 0.5, math.nan])
    assert not is_stable([1.0, math.inf])
    assert is_stable(torch.tensor([2.0, 1.0]))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: largest_stable_lr(lambda lr: [1.0], []), ValueError, "non-empty"),
        (lambda: largest_stable_lr(lambda lr: [1.0], [0.1, -1]), ValueError, "floats > 0"),
        (lambda: largest_stable_lr(lambda lr: [1.0], [0.1, 0.1]), ValueError, "distinct"),
        (lambda: largest_stable_lr(lambda lr: [1.0], [0.1], search="scan"), ValueError, "'search'"),
        (lambda: largest_stable_lr(lambda lr: [1.0], [0.1], divergence_factor=1), ValueError, "factor"),
        (lambda: largest_stable_lr("run", [0.1]), TypeError, "'run' parameter"),
        (lambda: largest_stable_lr(lambda lr: object(), [0.1]), TypeError, "1-D sequence of losses"),
        (lambda: largest_stable_lr(lambda lr: [], [0.1]), ValueError, "no losses"),
        (lambda: largest_stable_lr(lambda lr: [math.nan, 1.0], [0.1]), ValueError, "first loss"),
        (lambda: is_stable([1.0], divergence_factor=True), TypeError, "'divergence_factor'"),
    ],
)
def test_stability_rejects_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- docs


def test_docs_study_snippets_run():
    text = (ROOT / "docs" / "study.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/study.md should show a runnable example"
    for block in blocks:
        exec(compile(block, "docs/study.md", "exec"), {})
