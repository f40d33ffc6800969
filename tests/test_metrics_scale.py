"""Sampler-quality metrics are scale-free: G and c G give the same kappa, Q, ESS, tau.

Before: ``quality(G * 1e200, uniform)`` returned kappa 0 (the squared norms overflowed)
and ``effective_sample_size`` of weights ~1e200 overflowed; tiny scales (1e-200)
underflowed to a degenerate problem.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from isample import metrics as M

SCALES = st.integers(-200, 200)


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _problem(draw_ints, n, d):
    G = torch.tensor(draw_ints[: n * d], dtype=torch.float64).reshape(n, d) / 10.0
    return G


problems = st.integers(2, 6).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(st.integers(-50, 50), min_size=3 * n, max_size=3 * n),
        st.lists(st.integers(1, 100), min_size=n, max_size=n),
    )
)


@settings(max_examples=60, deadline=None)
@given(problems, SCALES)
@example((3, [3, 0, 1, -2, 5, 4, 1, 1, -7], [1, 2, 3]), 200)
@example((3, [3, 0, 1, -2, 5, 4, 1, 1, -7], [1, 2, 3]), -200)
def test_quality_is_scale_free(problem, e):
    n, ints, raw_p = problem
    G = _problem(ints, n, 3)
    p = torch.tensor(raw_p, dtype=torch.float64)
    p = p / p.sum()
    c = 10.0**e
    base, scaled = M.quality(G, p), M.quality(G * c, p)
    for field in ("kappa", "kappa_opt", "q_lin", "q_log"):
        assert _close(getattr(scaled, field), getattr(base, field)), (field, base, scaled)
    assert scaled.degenerate == base.degenerate
    assert _close(M.kappa(G * c, p), base.kappa)
    # variances scale by c^2 while representable, and are inf / 0 beyond the float range
    for field in ("v_p", "v_u", "v_opt"):
        value, ref = getattr(scaled, field), getattr(base, field)
        expected = ref * c * c
        if expected == math.inf:  # the true value is beyond the float64 range
            assert value > 1e300, (field, value, ref)
        elif expected < 1e-290:  # ... or below its normal range
            assert 0.0 <= value < 1e-280, (field, value, ref)
        else:
            assert _close(value, expected, rel=1e-8), (field, value, ref)
    if abs(e) <= 140:
        assert _close(M.gradient_variance(G * c, p), base.v_p * c * c, rel=1e-8)
        assert _close(M.uniform_variance(G * c), base.v_u * c * c, rel=1e-8)
        assert _close(M.optimal_variance(G * c), base.v_opt * c * c, rel=1e-8)
    np.testing.assert_allclose(M.optimal_probabilities(G * c), M.optimal_probabilities(G), rtol=1e-12)
    # from norms alone
    if abs(e) <= 140:  # ||g||^2 itself must be representable
        norms, gsq = G.norm(dim=1), float(G.mean(0).square().sum())
        q_norms = M.quality_from_norms(norms * c, gsq * c * c, p)
        assert _close(q_norms.kappa, base.kappa, rel=1e-8)


@pytest.mark.parametrize("c", [1e-200, 1e-100, 1.0, 1e100, 1e200, 1e300])
def test_uniform_sampler_has_kappa_one_at_any_scale(c):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(50, 4, generator=g, dtype=torch.float64)
    u = torch.full((50,), 1.0 / 50, dtype=torch.float64)
    q = M.quality(G * c, u)
    assert q.kappa == pytest.approx(1.0, rel=1e-12) and q.q_lin == pytest.approx(0.0, abs=1e-9)
    p_opt = M.optimal_probabilities(G * c)
    assert M.quality(G * c, p_opt).q_lin == pytest.approx(1.0, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=12).filter(any), SCALES)
@example([1, 2, 3], 200)
@example([1, 2, 3], -200)
@example([0, 0, 7], 300)
def test_weight_diagnostics_are_scale_free(ints, e):
    w = torch.tensor(ints, dtype=torch.float64)
    c = 10.0**e
    ess = M.effective_sample_size(w)
    assert 0.0 < ess <= 1.0 + 1e-12
    assert _close(M.effective_sample_size(w * c), ess, rel=1e-12)
    p = (w + 1.0) / (w + 1.0).sum()
    assert _close(M.effective_sample_size(w * c, p), M.effective_sample_size(w, p), rel=1e-12)
    assert _close(M.max_weight(w * c), M.max_weight(w), rel=1e-12)
    assert _close(M.tau(w * c), M.tau(w), rel=1e-12)
    # the closed form on the unscaled weights (Kish)
    assert ess == pytest.approx(float(w.sum()) ** 2 / (len(ints) * float(w.square().sum())), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(problems, SCALES, SCALES)
def test_two_stage_kappa_is_scale_free(problem, e, f):
    n, ints, raw_s = problem
    G = _problem(ints, n, 3)
    s = torch.tensor(raw_s, dtype=torch.float64)
    base = M.two_stage_kappa(G, s, 3, 2)
    assert _close(M.two_stage_kappa(G * 10.0**e, s * 10.0**f, 3, 2), base, rel=1e-8)
    if abs(e) <= 140:
        ref = M.two_stage_variance(G, s, 3, 2) * 10.0 ** (2 * e)
        assert _close(M.two_stage_variance(G * 10.0**e, s * 10.0**f, 3, 2), ref, rel=1e-8)


@pytest.mark.parametrize("c", [1e-200, 1e200])
def test_estimator_moments_scale(c):
    g = torch.Generator().manual_seed(1)
    G = torch.randn(6, 3, generator=g, dtype=torch.float64)
    p = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    p = p / p.sum()
    mean, var = M.estimator_moments(G, p)
    mean_c, var_c = M.estimator_moments(G * c, p)
    np.testing.assert_allclose(mean_c / c, mean, rtol=1e-12)
    assert (var_c == math.inf and c > 1) or (var_c == 0.0 and c < 1) or math.isclose(var_c / c / c, var)
    assert M.bias(G * c, p) / c == pytest.approx(M.bias(G, p), abs=1e-9)
