"""isample.metrics.functional against NumPy references and exact enumeration (float64, 1e-9)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from isample import metrics as M

RTOL = 1e-9


def _problem(seed: int, n: int = 5, d: int = 3, offset: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(n, d)) * rng.uniform(0.2, 3.0, size=(n, 1)) + offset
    p = rng.uniform(0.05, 1.0, size=n)
    return G, p / p.sum()


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


# ------------------------------------------------------------------ independent references


def np_variance(G: np.ndarray, p: np.ndarray) -> float:
    """One-draw variance written as E||g_i/(N p_i) - g||^2 (a different formula from the library's)."""
    n = G.shape[0]
    g = G.mean(0)
    return float(sum(p[i] * np.sum((G[i] / (n * p[i]) - g) ** 2) for i in range(n)))


def enumerate_minibatch(G: np.ndarray, p: np.ndarray, b: int, w: np.ndarray | None = None):
    """Exact mean (P,) and covariance trace of (1/b) sum_j w_{i_j} g_{i_j} over all b-tuples."""
    n = G.shape[0]
    if w is None:
        w = np.where(p > 0, 1.0 / (n * np.where(p > 0, p, 1.0)), 0.0)
    mean = np.zeros(G.shape[1])
    second = 0.0
    for tup in itertools.product(range(n), repeat=b):
        prob = np.prod(p[list(tup)])
        if prob == 0:
            continue
        est = sum(w[i] * G[i] for i in tup) / b
        mean += prob * est
        second += prob * float(est @ est)
    return mean, second - float(mean @ mean)


def enumerate_two_stage(G, s, big_b, b, replacement):
    """Exact mean and covariance trace of the two-stage estimator over every pool and draw."""
    n = G.shape[0]
    pools = (
        list(itertools.product(range(n), repeat=big_b))
        if replacement
        else list(itertools.combinations(range(n), big_b))
    )
    pool_prob = 1.0 / len(pools)
    mean = np.zeros(G.shape[1])
    second = 0.0
    for pool in pools:
        sp = s[list(pool)]
        q = sp / sp.sum()
        for tup in itertools.product(range(big_b), repeat=b):
            prob = pool_prob * np.prod(q[list(tup)])
            est = sum(G[pool[j]] / (big_b * q[j]) for j in tup) / b
            mean += prob * est
            second += prob * float(est @ est)
    return mean, second - float(mean @ mean)


# ------------------------------------------------------------------ variance and kappa


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("b", [1, 2, 3])
def test_variance_matches_enumeration(seed: int, b: int) -> None:
    G, p = _problem(seed, n=4)
    mean, trace = enumerate_minibatch(G, p, b)
    np.testing.assert_allclose(mean, G.mean(0), rtol=RTOL, atol=1e-12)  # unbiased
    assert M.gradient_variance(_t(G), _t(p)) / b == pytest.approx(trace, rel=RTOL)
    assert M.gradient_variance(_t(G), _t(p)) == pytest.approx(np_variance(G, p), rel=RTOL)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 7).flatmap(
        lambda n: st.tuples(
            st.lists(st.floats(-5, 5, allow_nan=False), min_size=2 * n, max_size=2 * n),
            st.lists(st.floats(0.01, 1.0), min_size=n, max_size=n),
        )
    )
)
def test_variance_and_quality_property(data) -> None:
    flat, raw_p = data
    G = np.array(flat).reshape(-1, 2)
    p = np.array(raw_p) / np.sum(raw_p)
    v = M.gradient_variance(_t(G), _t(p))
    assert v == pytest.approx(max(np_variance(G, p), 0.0), rel=1e-7, abs=1e-9)
    q = M.quality(_t(G), _t(p))
    assert q.v_opt <= q.v_p * (1 + 1e-9) + 1e-12  # the optimum is a lower bound
    assert q.v_opt <= q.v_u * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_uniform_optimal_kappa_against_numpy(seed: int) -> None:
    G, p = _problem(seed, n=6, d=4)
    norms = np.linalg.norm(G, axis=1)
    gsq = float(G.mean(0) @ G.mean(0))
    v_u = float(np.mean(norms**2)) - gsq
    v_opt = float(np.mean(norms)) ** 2 - gsq
    v_p = np_variance(G, p)
    assert M.uniform_variance(_t(G)) == pytest.approx(v_u, rel=RTOL)
    assert M.optimal_variance(_t(G)) == pytest.approx(v_opt, rel=RTOL)
    np.testing.assert_allclose(M.optimal_probabilities(_t(G)).numpy(), norms / norms.sum(), rtol=RTOL)
    q = M.quality(_t(G), _t(p))
    assert q.kappa == pytest.approx(v_u / v_p, rel=RTOL)
    assert M.kappa(_t(G), _t(p)) == pytest.approx(v_u / v_p, rel=RTOL)
    assert q.kappa_opt == pytest.approx(v_u / v_opt, rel=RTOL)
    assert q.q_lin == pytest.approx((v_u - v_p) / (v_u - v_opt), rel=1e-8)
    assert q.q_log == pytest.approx(math.log(v_u / v_p) / math.log(v_u / v_opt), rel=1e-8)
    assert not q.degenerate
    # the norm-only entry point gives the same numbers
    q2 = M.quality_from_norms(_t(norms), gsq, _t(p))
    assert q2.kappa == pytest.approx(q.kappa, rel=RTOL)
    assert M.gradient_variance_from_norms(_t(norms), gsq, _t(p)) == pytest.approx(v_p, rel=RTOL)


@pytest.mark.parametrize("seed", range(3))
def test_quality_anchors(seed: int) -> None:
    G, _ = _problem(seed, n=8)
    n = G.shape[0]
    opt = M.optimal_probabilities(_t(G))
    q_opt = M.quality(_t(G), opt)
    assert q_opt.q_lin == pytest.approx(1.0, rel=1e-9)
    assert q_opt.q_log == pytest.approx(1.0, rel=1e-9)
    assert q_opt.kappa == pytest.approx(q_opt.kappa_opt, rel=1e-9)
    q_uni = M.quality(_t(G), torch.full((n,), 1.0 / n, dtype=torch.float64))
    assert q_uni.q_lin == pytest.approx(0.0, abs=1e-9)
    assert q_uni.q_log == pytest.approx(0.0, abs=1e-9)
    assert q_uni.kappa == pytest.approx(1.0, rel=1e-12)
    inv = 1.0 / np.linalg.norm(G, axis=1)  # adversarial: large p on small gradients
    q_bad = M.quality(_t(G), _t(inv / inv.sum()))
    assert q_bad.q_lin < 0 and q_bad.q_log < 0 and q_bad.kappa < 1


def test_q_lin_saturates_while_q_log_does_not() -> None:
    # kappa_opt = 100, kappa = 3.2: Q_lin ~ 0.69 but Q_log ~ 0.25 (the docs' example).
    v_u, v_opt, v_p = 1.0, 0.01, 1.0 / 3.2
    assert (v_u - v_p) / (v_u - v_opt) == pytest.approx(0.694, abs=1e-3)
    assert math.log(v_u / v_p) / math.log(v_u / v_opt) == pytest.approx(0.2526, abs=1e-3)


def test_degenerate_equal_norms() -> None:
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64) * 2.0
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = M.quality(G, p)
    assert q.degenerate and math.isnan(q.q_lin) and math.isnan(q.q_log)
    assert q.kappa_opt == pytest.approx(1.0)
    assert q.kappa == pytest.approx(
        np_variance(G.numpy(), np.full(4, 0.25)) / np_variance(G.numpy(), p.numpy())
    )
    # uniform: kappa exactly 1; all-zero gradients: kappa 1 by convention
    assert M.quality(G, torch.full((4,), 0.25, dtype=torch.float64)).kappa == pytest.approx(1.0)
    assert M.quality(torch.zeros(3, 2), torch.full((3,), 1 / 3)).kappa == 1.0


def test_zero_probability_conventions() -> None:
    G = torch.tensor([[1.0, 2.0], [0.5, -1.0], [0.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    # p = 0 where g = 0 is harmless: the formula holds on the support
    p = torch.tensor([0.3, 0.3, 0.0, 0.4], dtype=torch.float64)
    v = M.gradient_variance(G, p)
    gn = G.numpy()
    ref = sum(float(gn[i] @ gn[i]) / (16 * p[i].item()) for i in (0, 1, 3)) - float(gn.mean(0) @ gn.mean(0))
    assert v == pytest.approx(ref, rel=RTOL)
    _, trace = enumerate_minibatch(gn, p.numpy(), 2)
    assert v / 2 == pytest.approx(trace, rel=RTOL)
    # p = 0 where g != 0: infinite variance, kappa 0, Q = -inf (documented), never garbage
    p_bad = torch.tensor([0.5, 0.0, 0.25, 0.25], dtype=torch.float64)
    assert M.gradient_variance(G, p_bad) == math.inf
    q = M.quality(G, p_bad)
    assert q.kappa == 0.0 and q.q_lin == -math.inf and q.q_log == -math.inf
    mean, var = M.estimator_moments(G, p_bad)
    assert var == math.inf
    assert M.bias(G, p_bad) == pytest.approx(float(np.linalg.norm(gn[1] / 4)), rel=RTOL)


@pytest.mark.parametrize(
    "G, p, match",
    [
        (torch.ones(3, 2), torch.full((4,), 0.25), "shape"),
        (torch.ones(3), torch.full((3,), 1 / 3), "shape"),
        (torch.ones(3, 2), torch.tensor([0.5, 0.5, 1e-5]), "sum to 1"),
        (torch.ones(3, 2), torch.tensor([0.7, 0.5, -0.2]), ">= 0"),
        (torch.tensor([[1.0, float("nan")], [1.0, 1.0]]), torch.tensor([0.5, 0.5]), "NaN"),
        (torch.tensor([[1.0, float("inf")], [1.0, 1.0]]), torch.tensor([0.5, 0.5]), "infinite"),
        (torch.ones(2, 2), torch.tensor([float("nan"), 0.5]), "NaN"),
    ],
)
def test_bad_input(G, p, match) -> None:
    for fn in (M.gradient_variance, M.quality, M.kappa, M.bias, M.estimator_moments):
        with pytest.raises(ValueError, match=match):
            fn(G, p)


def test_bad_input_types_and_tolerance() -> None:
    G = torch.ones(3, 2)
    with pytest.raises(TypeError, match="'G' parameter of quality"):
        M.quality([[1.0, 2.0]], torch.ones(1))
    with pytest.raises(TypeError, match="real tensor"):
        M.quality(torch.ones(2, 2, dtype=torch.bool), torch.tensor([0.5, 0.5]))
    # 1e-7 off sums to 1 within tolerance; 1e-5 off does not
    M.quality(G, torch.tensor([0.5, 0.25, 0.25 + 1e-7], dtype=torch.float64))
    with pytest.raises(ValueError, match="tolerance"):
        M.quality(G, torch.tensor([0.5, 0.25, 0.25 + 1e-5], dtype=torch.float64))
    with pytest.raises(ValueError, match="mean_grad_sq_norm"):
        M.quality_from_norms(torch.ones(2), -1.0, torch.tensor([0.5, 0.5]))
    # float32 input is accepted and computed in float64
    G32, p = _problem(0)
    q32 = M.quality(_t(G32).float(), _t(p))
    q64 = M.quality(_t(G32).float().double(), _t(p))
    assert q32 == q64


# ------------------------------------------------------------------ ESS, max weight, tau


def test_effective_sample_size() -> None:
    rng = np.random.default_rng(0)
    w = rng.uniform(0.1, 5.0, size=10)
    assert M.effective_sample_size(_t(w)) == pytest.approx(w.sum() ** 2 / (10 * np.sum(w**2)), rel=RTOL)
    assert M.effective_sample_size(torch.full((7,), 3.0)) == pytest.approx(1.0)
    assert M.effective_sample_size(torch.tensor([0.0, 0.0, 2.0, 0.0])) == pytest.approx(0.25)
    p = rng.uniform(0.1, 1.0, size=10)
    p /= p.sum()
    ref = float(np.sum(p * w)) ** 2 / float(np.sum(p * w**2))
    assert M.effective_sample_size(_t(w), _t(p)) == pytest.approx(ref, rel=RTOL)
    # unbiased weights under their own p: ESS_p = 1 / E_p[w^2] = N^2 / sum_i 1/p_i
    wu = 1.0 / (10 * p)
    assert M.effective_sample_size(_t(wu), _t(p)) == pytest.approx(100.0 / np.sum(1.0 / p), rel=RTOL)
    assert M.max_weight(_t(w)) == pytest.approx(w.max() / w.mean(), rel=RTOL)
    with pytest.raises(ValueError, match="all zero"):
        M.effective_sample_size(torch.zeros(3))
    with pytest.raises(ValueError, match=">= 0"):
        M.effective_sample_size(torch.tensor([1.0, -1.0]))


def test_tau_values() -> None:
    s = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    q = s.numpy() / 10.0
    assert M.tau(s) == pytest.approx(math.sqrt(4 * np.sum(q**2)), rel=RTOL)
    assert M.tau(torch.full((8,), 0.3)) == pytest.approx(1.0, rel=RTOL)
    assert M.tau(torch.tensor([0.0, 0.0, 5.0, 0.0])) == pytest.approx(2.0, rel=RTOL)
    assert isinstance(M.tau(torch.ones(3)), float)
    with pytest.raises(ValueError, match="all zero"):
        M.tau(torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        M.tau(torch.ones(2, 2))


@pytest.mark.parametrize("seed", range(4))
def test_tau_squared_is_kappa_when_pool_mean_gradient_is_zero(seed: int) -> None:
    # Exact relation: scores s_i = ||g_i|| over the pool and sum_i g_i = 0 give
    # kappa(p = s / sum s) = V_u / V_opt = B sum n_i^2 / (sum n_i)^2 = tau(s)^2.
    G, _ = _problem(seed, n=12, d=5)
    G = G - G.mean(0)
    norms = np.linalg.norm(G, axis=1)
    k = M.kappa(_t(G), _t(norms / norms.sum()))
    assert M.tau(_t(norms)) ** 2 == pytest.approx(k, rel=RTOL)
    # with a non-zero mean gradient tau^2 = A/B under-estimates kappa = (A - x)/(B - x),
    # A = mean n^2 >= B = (mean n)^2, x = ||g||^2 > 0
    G2 = G + 0.5
    n2 = np.linalg.norm(G2, axis=1)
    assert M.tau(_t(n2)) ** 2 < M.kappa(_t(G2), _t(n2 / n2.sum()))


# ------------------------------------------------------------------ two-stage draws


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize(
    "seed, n, big_b, b", [(0, 4, 2, 2), (1, 4, 3, 2), (2, 5, 3, 1), (3, 3, 3, 3), (4, 4, 1, 2)]
)
def test_two_stage_variance_matches_enumeration(replacement, seed, n, big_b, b) -> None:
    G, _ = _problem(seed, n=n, d=2)
    s = np.random.default_rng(seed + 100).uniform(0.1, 2.0, size=n)
    mean, trace = enumerate_two_stage(G, s, big_b, b, replacement)
    np.testing.assert_allclose(mean, G.mean(0), rtol=RTOL, atol=1e-12)  # unbiased for g
    got = M.two_stage_variance(_t(G), _t(s), big_b, b, replacement=replacement)
    assert got == pytest.approx(trace, rel=RTOL)
    k = M.two_stage_kappa(_t(G), _t(s), big_b, b, replacement=replacement)
    v_u = float(np.mean(np.sum(G**2, 1))) - float(G.mean(0) @ G.mean(0))
    assert k == pytest.approx(v_u / (b * trace), rel=RTOL)


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_two_stage_kappa_never_beats_pool_limit(replacement: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, big_b, b = 30, 8, 2
    # heavy-tailed norms: the optimal sampler is strong, so the bound is what stops kappa
    G = rng.normal(size=(n, 4)) * np.exp(3 * rng.normal(size=(n, 1)))
    bound = M.two_stage_kappa_bound(n, big_b, b, replacement=replacement)
    norms = np.linalg.norm(G, axis=1)
    for scores in (norms, norms**2, np.sqrt(norms), rng.uniform(0.1, 1, size=n)):
        k = M.two_stage_kappa(_t(G), _t(scores), big_b, b, replacement=replacement)
        assert 0 < k <= bound * (1 + 1e-12)
    assert M.two_stage_kappa(_t(G), _t(norms), big_b, b, replacement) > 0.5 * bound  # near the limit
    if replacement:
        assert bound == big_b / b
    else:
        assert bound == pytest.approx(big_b * (n - 1) / (b * (n - big_b)))


def test_two_stage_constant_scores_and_edges() -> None:
    G, _ = _problem(7, n=6, d=3)
    for big_b, b in ((4, 2), (8, 4), (3, 1)):
        k = M.two_stage_kappa(_t(G), torch.ones(6, dtype=torch.float64), big_b, b, replacement=True)
        assert k == pytest.approx(1.0 / (1.0 + (b - 1) / big_b), rel=RTOL)
    assert M.two_stage_kappa_bound(6, 6, 2, replacement=False) == math.inf
    s = torch.tensor([0.0, 1, 1, 1, 1, 1], dtype=torch.float64)
    assert M.two_stage_variance(_t(G), s, 3, 2) == math.inf  # score 0 on a non-zero gradient
    with pytest.raises(ValueError, match="pool_size"):
        M.two_stage_variance(_t(G), torch.ones(6), 7, 2, replacement=False)
    with pytest.raises(TypeError, match="batch_size"):
        M.two_stage_variance(_t(G), torch.ones(6), 3, True)
    with pytest.raises(ValueError, match="scores"):
        M.two_stage_variance(_t(G), torch.ones(5), 3, 2)


# ------------------------------------------------------------------ biased schemes


@pytest.mark.parametrize("seed", range(3))
def test_bias_and_mse_against_enumeration(seed: int) -> None:
    G, p = _problem(seed, n=4)
    n, b = 4, 2
    # a rank-like biased scheme: no weights at all, and a top-k scheme (p = 0 off the top 2)
    top = np.argsort(-np.linalg.norm(G, axis=1))[:2]
    p_top = np.zeros(n)
    p_top[top] = 0.5
    for prob, w in ((p, np.ones(n)), (p_top, np.ones(n)), (p, 1.0 / (n * p))):
        mean, trace = enumerate_minibatch(G, prob, b, w)
        g = G.mean(0)
        assert M.bias(_t(G), _t(prob), _t(w)) == pytest.approx(
            float(np.linalg.norm(mean - g)), rel=1e-8, abs=1e-12
        )
        m, var = M.estimator_moments(_t(G), _t(prob), _t(w))
        np.testing.assert_allclose(m.numpy(), mean, rtol=RTOL, atol=1e-12)
        assert var / b == pytest.approx(trace, rel=RTOL)
        mse_ref = float(np.sum((mean - g) ** 2)) + trace
        assert M.mse(_t(G), _t(prob), _t(w), batch_size=b) == pytest.approx(mse_ref, rel=RTOL)
    # unbiased weights: zero bias, and mse = V / b
    assert M.bias(_t(G), _t(p)) == pytest.approx(0.0, abs=1e-12)
    assert M.mse(_t(G), _t(p), batch_size=3) == pytest.approx(M.gradient_variance(_t(G), _t(p)) / 3, rel=RTOL)


def test_biased_scheme_cannot_win_on_variance_alone() -> None:
    # top-1 selection has zero variance but a large bias: its MSE is worse than uniform's
    G, _ = _problem(11, n=6)
    n = 6
    p_top = np.zeros(n)
    p_top[int(np.argmax(np.linalg.norm(G, axis=1)))] = 1.0
    _, var = M.estimator_moments(_t(G), _t(p_top), torch.ones(n, dtype=torch.float64))
    assert var == pytest.approx(0.0, abs=1e-12)
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    assert M.mse(_t(G), _t(p_top), torch.ones(n, dtype=torch.float64), 4) > M.mse(
        _t(G), uniform, batch_size=4
    )
