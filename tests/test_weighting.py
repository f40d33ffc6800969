"""Unbiasedness and the probability rules, by exact enumeration in float64."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from isample.policies import ScorePolicy, check_scores
from isample.weighting import importance_weights

POLICIES = [
    ScorePolicy(),
    ScorePolicy(power=0.5),
    ScorePolicy(additive=0.3),
    ScorePolicy(relative=0.5),
    ScorePolicy(mixing=0.5),
    ScorePolicy(power=2.0, additive=0.1, relative=0.2, mixing=0.25),
]


def per_example_gradients_linear(n=5, d=3, seed=0):
    """Per-example gradients of squared error for a linear model, analytic, float64."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=n)
    w = rng.normal(size=d)
    residual = x @ w - y
    return 2 * residual[:, None] * x  # g_i = d/dw (x_i.w - y_i)^2


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("b", [1, 2, 3])
def test_weighted_minibatch_is_unbiased_by_enumeration(policy, b):
    G = per_example_gradients_linear()
    n = G.shape[0]
    scores = torch.tensor(np.linalg.norm(G, axis=1) * np.array([0.1, 3.0, 1.0, 0.0, 2.0]))
    p = policy.probabilities(scores).numpy()
    if policy.mixing == 0 and policy.additive == 0 and policy.relative == 0:
        keep = p > 0  # an example with p = 0 is never drawn; unbiased only if its gradient is 0
        G = G.copy()
        G[~keep] = 0.0
    w = np.zeros(n)
    w[p > 0] = importance_weights(torch.tensor(p[p > 0]), n, dtype=torch.float64).numpy()
    exact = np.zeros(G.shape[1])
    for draw in itertools.product(range(n), repeat=b):
        prob = np.prod(p[list(draw)])
        if prob == 0:
            continue
        exact += prob * np.mean([w[i] * G[i] for i in draw], axis=0)
    np.testing.assert_allclose(exact, G.mean(0), rtol=0, atol=1e-10)


def test_two_stage_pool_estimator_is_unbiased_by_enumeration():
    """Uniform pool of B without replacement, then b i.i.d. from p over the pool."""
    G = per_example_gradients_linear(n=5)
    norms = np.linalg.norm(G, axis=1)
    pool_size, b = 3, 2
    exact = np.zeros(G.shape[1])
    pools = list(itertools.combinations(range(5), pool_size))
    for pool in pools:
        p = ScorePolicy(power=0.7, mixing=0.1).probabilities(torch.tensor(norms[list(pool)])).numpy()
        w = importance_weights(torch.tensor(p), pool_size, dtype=torch.float64).numpy()
        for draw in itertools.product(range(pool_size), repeat=b):
            prob = np.prod(p[list(draw)]) / len(pools)
            exact += prob * np.mean([w[j] * G[pool[j]] for j in draw], axis=0)
    np.testing.assert_allclose(exact, G.mean(0), rtol=0, atol=1e-10)


def test_bias_exponent_and_normalisation_are_biased_and_bounded():
    G = per_example_gradients_linear()
    p = ScorePolicy().probabilities(torch.tensor(np.linalg.norm(G, axis=1) + 0.1)).numpy()
    for k in (0.0, 0.5):
        w = importance_weights(torch.tensor(p), 5, bias_exponent=k).double().numpy()
        mean = (p[:, None] * w[:, None] * G).sum(0)
        assert np.linalg.norm(mean - G.mean(0)) > 1e-6
    w0 = importance_weights(torch.tensor(p), 5, bias_exponent=0.0)
    assert torch.all(w0 == 1)
    clipped = importance_weights(torch.tensor(p), 5, max_weight=1.5)
    assert float(clipped.max()) <= 1.5 + 1e-6
    assert float(importance_weights(torch.tensor(p), 5, normalize="max").max()) == pytest.approx(1.0)
    assert float(importance_weights(torch.tensor(p), 5, normalize="mean").mean()) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=30),
    power=st.sampled_from([0.5, 1.0, 2.0]),
    additive=st.sampled_from([0.0, 0.5]),
    relative=st.sampled_from([0.0, 0.5]),
    mixing=st.one_of(st.just(0.0), st.floats(1e-3, 1)),
)
@example(scores=[0.0, 0.0, 0.0], power=1.0, additive=0.0, relative=0.0, mixing=0.0)
@example(scores=[5e-324], power=1.0, additive=0.0, relative=0.0, mixing=0.5)  # subnormal total
def test_policy_matches_formula(scores, power, additive, relative, mixing):
    s = np.array(scores, dtype=np.float64)
    p = ScorePolicy(power, additive, relative, mixing).probabilities(torch.tensor(s)).numpy()
    t = s**power
    m = len(s)
    c = additive + relative * t.mean()
    if t.sum() + m * c == 0:
        want = np.full(m, 1.0 / m)
    else:
        want = mixing / m + (1 - mixing) * ((t + c) / (t.sum() + m * c))
    np.testing.assert_allclose(p, want, rtol=1e-9, atol=1e-15)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-9)
    if mixing > 0:
        w = importance_weights(torch.tensor(p), m)
        assert float(w.max()) <= 1.0 / mixing * (1 + 1e-5)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="'mixing' parameter of ScorePolicy"):
        ScorePolicy(mixing=1.5)
    with pytest.raises(ValueError, match="'power' parameter"):
        ScorePolicy(power=0.0)
    with pytest.raises(TypeError, match="'mixing'"):
        ScorePolicy(mixing=True)
    with pytest.raises(ValueError, match="'bias_exponent' parameter"):
        importance_weights(torch.tensor([0.5, 0.5]), 2, bias_exponent=1.5)
    with pytest.raises(ValueError, match="negative"):
        check_scores(torch.tensor([1.0, -1.0]), "X")
    with pytest.raises(ValueError, match="NaN"):
        check_scores(torch.tensor([1.0, float("nan")]), "X")
    with pytest.raises(ValueError, match="probabilities > 0"):
        importance_weights(torch.tensor([0.0, 1.0]), 2)
