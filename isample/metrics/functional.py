"""Sampler-quality metrics as pure functions on per-example gradients (float64 inside).

Notation: N examples, per-example gradients ``G`` of shape (N, P) with rows ``g_i``,
norms ``n_i = ||g_i||``, full gradient ``g = (1/N) sum_i g_i``. One draw ``i ~ p`` with
weight ``w_i = 1 / (N p_i)`` gives the unbiased estimate ``w_i g_i`` of ``g``; a minibatch
of b i.i.d. draws averages b of them. Every *variance* here is the trace of a covariance
matrix (a sum over the P coordinates).

.. math::

    V(p) = \\sum_i \\frac{n_i^2}{N^2 p_i} - \\|g\\|^2, \\qquad
    V_u = V(1/N), \\qquad V_{opt} = \\Big(\\frac{1}{N}\\sum_i n_i\\Big)^2 - \\|g\\|^2,
    \\qquad \\kappa = V_u / V(p).

``V(p)`` is the variance of one draw; the minibatch of b draws has variance ``V(p) / b``,
so a sampler with ``kappa`` is worth a uniform batch ``kappa`` times larger.

Conventions (documented once, used everywhere):

* ``p`` must be 1-D of length N, finite, ``>= 0`` and sum to 1 within ``1e-6``
  (``ValueError`` otherwise). A ``p_i = 0`` where ``g_i != 0`` makes the weighted
  estimator biased; its variance is reported as ``inf`` (the limit ``p_i -> 0+``),
  so ``kappa = 0`` and ``Q_lin = Q_log = -inf``. Zero ``p_i`` where ``g_i = 0`` is harmless.
* NaN or infinite gradients raise ``ValueError``; shape mismatches raise ``ValueError``.
* Scale: every function first divides its gradients (or weights, or scores) by a power
  of two near their largest magnitude (exact), so kappa, the quality scores, the ESS,
  tau and the weight ratios are the same for ``G`` and ``c G`` at any scale
  (``1e-200`` to ``1e200``); variances are scaled back (``c^2 V``) and are ``inf`` only when
  the true value exceeds the float64 range.
* Degenerate problems (all norms equal, so uniform is already optimal and
  ``V_u = V_opt``): ``Q_lin`` and ``Q_log`` are ``nan`` and ``Quality.degenerate`` is
  True; ``kappa`` stays well defined.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "Quality",
    "bias",
    "effective_sample_size",
    "estimator_moments",
    "gradient_variance",
    "gradient_variance_from_norms",
    "kappa",
    "max_weight",
    "mse",
    "optimal_probabilities",
    "optimal_variance",
    "quality",
    "quality_from_norms",
    "tau",
    "two_stage_kappa",
    "two_stage_kappa_bound",
    "two_stage_variance",
    "uniform_variance",
]

#: Tolerance on ``|sum(p) - 1|``.
PROBABILITY_ATOL = 1e-6
#: Relative size (of the mean squared norm) below which a variance counts as rounding noise.
_RELATIVE_ZERO = 1e-12
#: Largest magnitudes left unscaled (their squares and sums of up to 2^400 of them stay normal floats).
_SAFE_LOW, _SAFE_HIGH = 2.0**-250, 2.0**250


class Quality(NamedTuple):
    """How good a sampler p is, relative to uniform and to the optimum (identity or D geometry).

    Attributes:
        kappa: ``V_u / V_p``, the effective batch multiplier (1 = uniform, > 1 better).
        kappa_opt: ``V_u / V_opt``, the best attainable multiplier (``inf`` if ``V_opt = 0``).
        q_lin: ``(V_u - V_p) / (V_u - V_opt)``: 1 optimal, 0 uniform, < 0 worse than uniform.
        q_log: ``log(V_u / V_p) / log(V_u / V_opt) = log kappa / log kappa_opt``.
        v_p: ``V(p)``, one-draw variance (trace) of the weighted estimator.
        v_u: ``V_u``, the same for uniform sampling.
        v_opt: ``V_opt``, the same for ``p_i proportional to ||g_i||``.
        degenerate: True when ``V_u = V_opt`` (all gradient norms equal); ``q_lin`` and
            ``q_log`` are then ``nan``.
    """

    kappa: float
    kappa_opt: float
    q_lin: float
    q_log: float
    v_p: float
    v_u: float
    v_opt: float
    degenerate: bool

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict of Python floats / bools."""
        return {k: (bool(v) if k == "degenerate" else float(v)) for k, v in self._asdict().items()}


# --------------------------------------------------------------------------- validation


def _as_tensor(x: Any, name: str, owner: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(x)
    else:
        raise TypeError(f"The '{name}' parameter of {owner} must be a torch.Tensor. Got {type(x).__name__}.")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"The '{name}' parameter of {owner} must be a real tensor. Got dtype {t.dtype}.")
    return t.to(device="cpu", dtype=torch.float64)


def _check_finite(t: torch.Tensor, name: str, owner: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        raise ValueError(
            f"The '{name}' parameter of {owner} must be finite. Got {n_nan} NaN and "
            f"{int(bad.sum()) - n_nan} infinite value(s)."
        )


def _gradients(G: Any, owner: str, name: str = "G") -> torch.Tensor:
    t = _as_tensor(G, name, owner)
    if t.dim() != 2 or t.shape[0] < 1:
        raise ValueError(
            f"The '{name}' parameter of {owner} must be a tensor of per-example gradients of shape (N, P) "
            f"with N >= 1. Got shape {tuple(t.shape)}."
        )
    _check_finite(t, name, owner)
    return t


def _vector(x: Any, n: int | None, name: str, owner: str, nonneg: bool = True) -> torch.Tensor:
    t = _as_tensor(x, name, owner)
    if t.dim() != 1 or (n is not None and t.shape[0] != n) or t.shape[0] < 1:
        want = f"({n},)" if n is not None else "(N,) with N >= 1"
        raise ValueError(
            f"The '{name}' parameter of {owner} must have shape {want}. Got shape {tuple(t.shape)}."
        )
    _check_finite(t, name, owner)
    if nonneg and bool((t < 0).any()):
        raise ValueError(
            f"The '{name}' parameter of {owner} must be >= 0. Got {int((t < 0).sum())} negative value(s) "
            f"(min {float(t.min())!r})."
        )
    return t


def _probabilities(p: Any, n: int, owner: str, name: str = "p") -> torch.Tensor:
    t = _vector(p, n, name, owner)
    total = float(t.sum())
    if abs(total - 1.0) > PROBABILITY_ATOL:
        raise ValueError(
            f"The '{name}' parameter of {owner} must sum to 1 (tolerance {PROBABILITY_ATOL:g}). "
            f"Got sum {total!r}."
        )
    return t


def _pos_int(x: Any, name: str, owner: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"The '{name}' parameter of {owner} must be an int >= 1. Got {x!r}.")
    if x < 1:
        raise ValueError(f"The '{name}' parameter of {owner} must be an int >= 1. Got {x!r}.")
    return int(x)


# --------------------------------------------------------------------------- core maths


def _pow2_scale(x: torch.Tensor) -> float:
    """A power of two ``s`` with ``max|x| / s`` in [1, 2), or 1.0 when no scaling is needed.

    Dividing by it is exact (bar subnormal results), and keeps squares and sums of the
    scaled values far from overflow and underflow. Magnitudes in ``[2^-250, 2^250]``
    (about 1e-75 to 1e75) need none: their squares and sums stay normal floats, so the
    usual inputs are computed exactly as without scaling.
    """
    if not x.numel():
        return 1.0
    top = max(float(x.max()), -float(x.min()))  # max |x| without a temporary
    if top == 0.0 or not math.isfinite(top) or _SAFE_LOW <= top <= _SAFE_HIGH:
        return 1.0
    return math.ldexp(1.0, math.frexp(top)[1] - 1)


def _unscale_sq(value: float, s: float) -> float:
    """``value * s**2`` without forming ``s**2`` (which may overflow or underflow); 0 stays 0."""
    if value == 0.0 or s == 1.0:
        return value
    return value * s * s


def _scaled_norm_stats(G: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """``(norms / s, ||g||^2 / s^2, s)`` of per-example gradients, with ``s = _pow2_scale(G)``."""
    s = _pow2_scale(G)
    norms, gsq = _norm_stats(G if s == 1.0 else G / s)
    return norms, gsq, s


def _scaled_norms(norms: torch.Tensor, gsq: float) -> tuple[torch.Tensor, float, float]:
    """``(norms / s, gsq / s^2, s)`` with ``s = _pow2_scale(norms)``."""
    s = _pow2_scale(norms)
    return norms / s, gsq / s / s, s


def _sum_sq_over_p(sq: torch.Tensor, p: torch.Tensor) -> float:
    """sum_i sq_i / p_i with 0/0 := 0 and x/0 := inf."""
    support = p > 0
    if bool((sq[~support] > 0).any()):
        return math.inf
    return float((sq[support] / p[support]).sum())


def gradient_variance_from_norms(norms: Any, mean_grad_sq_norm: float, p: Any) -> float:
    """One-draw variance ``V(p)`` from the per-example norms and ``||g||^2``.

    Args:
        norms: Tensor of shape (N,), ``n_i = ||g_i||`` (>= 0).
        mean_grad_sq_norm: ``||g||^2`` for the full gradient ``g = (1/N) sum_i g_i``.
        p: Tensor of shape (N,), the draw probabilities (sum 1).

    Returns:
        float ``V(p) >= 0`` in squared gradient units (negative rounding clamped to 0);
        ``inf`` when some ``p_i = 0`` with ``n_i > 0``.

    .. math::

        V(p) = \\sum_i \\frac{n_i^2}{N^2 p_i} - \\|g\\|^2
    """
    owner = "gradient_variance_from_norms"
    n = _vector(norms, None, "norms", owner)
    prob = _probabilities(p, n.shape[0], owner)
    if (
        isinstance(mean_grad_sq_norm, bool)
        or not math.isfinite(float(mean_grad_sq_norm))
        or mean_grad_sq_norm < 0
    ):
        raise ValueError(
            f"The 'mean_grad_sq_norm' parameter of {owner} must be a finite float >= 0. "
            f"Got {mean_grad_sq_norm!r}."
        )
    n, gsq, scale = _scaled_norms(n, float(mean_grad_sq_norm))
    return _unscale_sq(_variance(n.square(), gsq, prob), scale)


def _variance(sq: torch.Tensor, gsq: float, p: torch.Tensor) -> float:
    n = sq.shape[0]
    s = _sum_sq_over_p(sq, p)
    if math.isinf(s):
        return math.inf
    return max(s / n**2 - gsq, 0.0)


def _norm_stats(G: torch.Tensor) -> tuple[torch.Tensor, float]:
    return G.norm(dim=1), float(G.mean(0).square().sum())


def gradient_variance(G: Any, p: Any) -> float:
    """Trace of the covariance of one weighted draw, ``V(p)``.

    Args:
        G: Tensor of shape (N, P), per-example gradients (any float dtype; float64 inside).
        p: Tensor of shape (N,), draw probabilities (sum 1 within 1e-6, >= 0).

    Returns:
        float ``V(p)``; the b-draw minibatch estimate ``(1/b) sum_j w_{i_j} g_{i_j}`` has
        variance ``V(p) / b``. ``inf`` when some ``p_i = 0`` with ``g_i != 0``.

    .. math::

        V(p) = \\mathbb{E}\\big\\|\\tfrac{g_i}{N p_i} - g\\big\\|^2
             = \\sum_i \\frac{\\|g_i\\|^2}{N^2 p_i} - \\|g\\|^2

    Raises:
        ValueError: shapes do not match, p does not sum to 1, NaN / inf entries.
    """
    owner = "gradient_variance"
    g = _gradients(G, owner)
    prob = _probabilities(p, g.shape[0], owner)
    norms, gsq, scale = _scaled_norm_stats(g)
    return _unscale_sq(_variance(norms.square(), gsq, prob), scale)


def optimal_probabilities(G: Any) -> torch.Tensor:
    """The variance-minimising sampler ``p*_i = ||g_i|| / sum_j ||g_j||``.

    Args:
        G: Tensor of shape (N, P), or of shape (N,) holding the norms directly.

    Returns:
        float64 Tensor of shape (N,); uniform when every gradient is zero.

    References:
        Zhao and Zhang, "Stochastic Optimization with Importance Sampling", ICML 2015.
    """
    owner = "optimal_probabilities"
    t = _as_tensor(G, "G", owner)
    if t.dim() == 1:
        norms = _vector(t, None, "G", owner)
        norms = norms / _pow2_scale(norms)
    else:
        norms = _scaled_norm_stats(_gradients(t, owner))[0]
    total = float(norms.sum())
    if total == 0.0:
        return torch.full_like(norms, 1.0 / norms.shape[0])
    return norms / total


def uniform_variance(G: Any) -> float:
    """``V_u = (1/N) sum_i ||g_i||^2 - ||g||^2`` (one draw, uniform p), a float."""
    norms, gsq, scale = _scaled_norm_stats(_gradients(G, "uniform_variance"))
    return _unscale_sq(max(float(norms.square().mean()) - gsq, 0.0), scale)


def optimal_variance(G: Any) -> float:
    """``V_opt = ((1/N) sum_i ||g_i||)^2 - ||g||^2`` (one draw, ``p proportional to ||g_i||``)."""
    norms, gsq, scale = _scaled_norm_stats(_gradients(G, "optimal_variance"))
    return _unscale_sq(max(float(norms.mean()) ** 2 - gsq, 0.0), scale)


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 1.0 if num == 0.0 else math.inf
    return num / den


def kappa(G: Any, p: Any) -> float:
    """Effective batch multiplier ``kappa = V_u / V(p)`` (float; 1 for uniform, 0 if V(p) is inf)."""
    return quality(G, p).kappa


def quality(G: Any, p: Any) -> Quality:
    """kappa, the best attainable kappa, and the quality scores Q_lin and Q_log of sampler p.

    Args:
        G: Tensor of shape (N, P), per-example gradients.
        p: Tensor of shape (N,), draw probabilities.

    Returns:
        :class:`Quality` (floats). Q = 1 at ``p = p*``, 0 at uniform, < 0 worse than uniform.

    .. math::

        Q_{lin} = \\frac{V_u - V_p}{V_u - V_{opt}}, \\qquad
        Q_{log} = \\frac{\\log(V_u / V_p)}{\\log(V_u / V_{opt})}
                = \\frac{\\log \\kappa}{\\log \\kappa_{opt}}

    ``Q_lin`` saturates: with ``kappa_opt = 100``, ``Q_lin = 0.7`` is only ``kappa = 3.2``
    (``V_p = 0.31 V_u``) while ``Q_log = 0.25``. ``V_u - V_opt`` is the variance of the
    norms, computed directly (no cancellation); when it is zero (all norms equal) the
    problem is *degenerate*, ``q_lin = q_log = nan`` and ``degenerate = True``. When
    ``V_opt = 0`` (``kappa_opt = inf``) ``q_log`` is 0 for any finite kappa and 1 for
    ``V_p = 0``.

    References:
        T. Lahire, 2023 (arXiv:2303.16529) proposes a sampler-quality metric; only its
        abstract was available, so the forms here are isample's own and labelled as such.
    """
    owner = "quality"
    g = _gradients(G, owner)
    prob = _probabilities(p, g.shape[0], owner)
    norms, gsq, scale = _scaled_norm_stats(g)
    return _rescale_quality(_quality(norms, gsq, prob), scale)


def quality_from_norms(norms: Any, mean_grad_sq_norm: float, p: Any) -> Quality:
    """:func:`quality` from the norms ``||g_i||`` (shape (N,)) and ``||g||^2`` alone."""
    owner = "quality_from_norms"
    n = _vector(norms, None, "norms", owner)
    prob = _probabilities(p, n.shape[0], owner)
    if (
        isinstance(mean_grad_sq_norm, bool)
        or not math.isfinite(float(mean_grad_sq_norm))
        or mean_grad_sq_norm < 0
    ):
        raise ValueError(
            f"The 'mean_grad_sq_norm' parameter of {owner} must be a finite float >= 0. "
            f"Got {mean_grad_sq_norm!r}."
        )
    n, gsq, scale = _scaled_norms(n, float(mean_grad_sq_norm))
    return _rescale_quality(_quality(n, gsq, prob), scale)


def _rescale_quality(q: Quality, scale: float) -> Quality:
    """Quality of gradients scaled by ``1 / scale``, back in the original units (ratios unchanged)."""
    return q._replace(
        v_p=_unscale_sq(q.v_p, scale), v_u=_unscale_sq(q.v_u, scale), v_opt=_unscale_sq(q.v_opt, scale)
    )


def _quality(norms: torch.Tensor, gsq: float, p: torch.Tensor) -> Quality:
    n = norms.shape[0]
    sq = norms.square()
    scale = float(sq.mean())
    tol = _RELATIVE_ZERO * scale
    v_u = max(scale - gsq, 0.0)
    v_opt = max(float(norms.mean()) ** 2 - gsq, 0.0)
    v_p = _variance(sq, gsq, p)
    spread = float((norms - norms.mean()).square().mean())  # = V_u - V_opt, no cancellation
    k = _ratio(v_u, v_p)
    k_opt = _ratio(v_u, v_opt if v_opt > tol else 0.0)
    if spread <= tol:
        return Quality(k, k_opt, math.nan, math.nan, v_p, v_u, v_opt, True)
    if math.isinf(v_p):
        return Quality(0.0, k_opt, -math.inf, -math.inf, v_p, v_u, v_opt, False)
    gain = float(sq.sum()) / n - _sum_sq_over_p(sq, p) / n**2  # V_u - V_p, without ||g||^2
    q_lin = gain / spread
    if v_opt <= tol:
        q_log = 1.0 if v_p <= tol else 0.0
    else:
        q_log = math.log(v_u / v_p) / math.log(v_u / v_opt) if v_p > 0 else math.inf
    return Quality(k, k_opt, q_lin, q_log, v_p, v_u, v_opt, False)


# --------------------------------------------------------------------------- weight diagnostics


def effective_sample_size(weights: Any, probabilities: Any | None = None) -> float:
    """Normalised Kish effective sample size of importance weights, in (0, 1].

    A *stability diagnostic*, not a quality measure: small values flag weight degeneracy
    (a few examples dominate a batch), which can happen exactly when a sampler is good
    (on digits the near-optimal sampler had ESS < 0.05 when kappa >= 6).

    Args:
        weights: Tensor of shape (n,), >= 0, not all zero (e.g. a batch's weights).
        probabilities: optional Tensor of shape (n,): the weights are then one per
            candidate and the ESS is taken under draws from these probabilities (the
            large-batch limit of the Kish ESS of a drawn batch).

    Returns:
        float in (0, 1].

    .. math::

        \\mathrm{ESS} = \\frac{(\\sum_i w_i)^2}{n \\sum_i w_i^2}, \\qquad
        \\mathrm{ESS}_p = \\frac{(\\sum_i p_i w_i)^2}{\\sum_i p_i w_i^2}

    References:
        Kish, "Survey Sampling", 1965.
    """
    owner = "effective_sample_size"
    w = _vector(weights, None, "weights", owner)
    w = w / _pow2_scale(w)  # scale-free: the ESS of c w is the ESS of w
    if probabilities is None:
        prob = torch.full_like(w, 1.0 / w.shape[0])
    else:
        prob = _probabilities(probabilities, w.shape[0], owner, "probabilities")
    second = float((prob * w.square()).sum())
    if second == 0.0:
        raise ValueError(f"The 'weights' parameter of {owner} must not be all zero (on the support of p).")
    return float((prob * w).sum()) ** 2 / second


def max_weight(weights: Any) -> float:
    """Largest weight relative to the mean weight, ``max_i w_i / mean_i w_i`` (>= 1), a float.

    A diagnostic beside :func:`effective_sample_size`: with a (1/lam)-mixed sampler the
    unbiased weights ``1/(N p_i)`` are bounded by ``1/lam``.
    """
    w = _vector(weights, None, "weights", "max_weight")
    w = w / _pow2_scale(w)
    mean = float(w.mean())
    if mean == 0.0:
        raise ValueError("The 'weights' parameter of max_weight must not be all zero.")
    return float(w.max()) / mean


def tau(scores: torch.Tensor) -> float:
    """Katharopoulos-Fleuret switch-on statistic over a pool of B scores.

    Args:
        scores: Tensor of shape (B,), >= 0, not all zero.

    Returns:
        float ``tau >= 1`` (1 for equal scores, ``sqrt(B)`` for one non-zero score).
        ``tau**2`` estimates the effective batch multiplier kappa within the pool. When the
        scores are the exact gradient norms, ``tau**2 = A / B`` with ``A = mean n_i^2``,
        ``B = (mean n_i)^2`` while ``kappa = (A - ||g||^2) / (B - ||g||^2)``: equal when the
        pool's mean gradient is zero, and ``tau**2 <= kappa`` otherwise.

    .. math::

        q_i = \\frac{s_i}{\\sum_j s_j}, \\qquad \\tau = \\sqrt{B \\sum_i q_i^2}

    References:
        Katharopoulos and Fleuret, ICML 2018 (arXiv:1803.00942), eq. 26.
    """
    s = _vector(scores, None, "scores", "tau")
    s = s / _pow2_scale(s)
    total = float(s.sum())
    if total == 0.0:
        raise ValueError("The 'scores' parameter of tau must not be all zero.")
    q = s / total
    return math.sqrt(s.shape[0] * float(q.square().sum()))


# --------------------------------------------------------------------------- two-stage (pool) draws


def two_stage_variance(
    G: Any, scores: Any, pool_size: int, batch_size: int, replacement: bool = True
) -> float:
    """Exact variance (trace) of the two-stage pool estimator for a minibatch of b draws.

    Stage 1 draws a pool S of B examples uniformly from the N (``replacement=True``: B
    i.i.d. uniform indices; ``False``: a uniform B-subset). Stage 2 draws b positions
    i.i.d. from ``p_j = s_j / sum_{k in S} s_k`` and weights them ``1 / (B p_j)``. The
    estimate ``(1/b) sum_t g_{j_t} / (B p_{j_t})`` is unbiased for g, with

    .. math::

        \\operatorname{tr}\\operatorname{Cov} = \\frac{1}{b}\\big(\\mathbb{E}[A_S] - \\|g\\|^2\\big)
        + \\Big(1 - \\frac{1}{b}\\Big) \\sigma_S^2, \\qquad
        A_S = \\frac{1}{B^2} \\sum_{j \\in S} \\frac{n_j^2}{s_j} \\sum_{k \\in S} s_k,

    where ``sigma_S^2 = V_u / B`` (with replacement) or ``V_u (N - B) / (B (N - 1))``
    (without) is the variance of the pool mean, and, with ``a_i = n_i^2 / s_i``,
    ``E[A_S] = (1/(B N)) sum n_i^2 + c (sum a_i sum s_i - r sum n_i^2)`` with
    ``c = (B-1)/(B N^2), r = 0`` (with replacement) or ``c = (B-1)/(B N (N-1)), r = 1``.

    Args:
        G: Tensor of shape (N, P), per-example gradients.
        scores: Tensor of shape (N,), the (pool-independent) score of each example, >= 0.
        pool_size: B >= 1 (``<= N`` without replacement).
        batch_size: b >= 1, draws from the pool.
        replacement: how the pool is drawn.

    Returns:
        float, the trace of the covariance of the b-draw estimate (not times b); ``inf``
        when an example with a non-zero gradient has score 0.
    """
    owner = "two_stage_variance"
    g = _gradients(G, owner)
    n_ex = g.shape[0]
    s = _vector(scores, n_ex, "scores", owner)
    big_b = _pos_int(pool_size, "pool_size", owner)
    b = _pos_int(batch_size, "batch_size", owner)
    if not replacement and big_b > n_ex:
        raise ValueError(
            f"The 'pool_size' parameter of {owner} must be <= N = {n_ex} without replacement. Got {big_b}."
        )
    norms, gsq, scale = _scaled_norm_stats(g)
    s = s / _pow2_scale(s)  # the variance does not depend on the scores' scale
    sq = norms.square()
    if bool(((s == 0) & (sq > 0)).any()):
        return math.inf
    a = torch.where(s > 0, sq / s.clamp_min(1e-300), torch.zeros_like(sq))
    v_u = max(float(sq.mean()) - gsq, 0.0)
    cross = float(a.sum()) * float(s.sum())
    if replacement:
        e_a = float(sq.sum()) / (big_b * n_ex) + (big_b - 1) / (big_b * n_ex**2) * cross
        pool_var = v_u / big_b
    else:
        e_a = float(sq.sum()) / (big_b * n_ex)
        if big_b > 1:
            e_a += (big_b - 1) / (big_b * n_ex * (n_ex - 1)) * (cross - float(sq.sum()))
        pool_var = v_u * (n_ex - big_b) / (big_b * (n_ex - 1)) if n_ex > 1 else 0.0
    total = (e_a - gsq) / b + (1.0 - 1.0 / b) * pool_var
    return _unscale_sq(max(total, 0.0), scale)


def two_stage_kappa(G: Any, scores: Any, pool_size: int, batch_size: int, replacement: bool = True) -> float:
    """Effective batch multiplier of the two-stage estimator, ``V_u / (b * Var_two_stage)``.

    The uniform minibatch of b i.i.d. draws from all N has variance ``V_u / b``; kappa is
    how many times larger a uniform batch must be to match the two-stage estimate. It
    never exceeds :func:`two_stage_kappa_bound` (the pool mean's own variance is a floor),
    and equals ``1 / (1 + (b - 1) / B)`` for constant scores with a replacement pool.

    Returns:
        float >= 0 (1 when ``V_u = 0`` and the two-stage variance is 0 too).
    """
    g = _gradients(G, "two_stage_kappa")
    scale = _pow2_scale(g)
    g = g if scale == 1.0 else g / scale  # a ratio of variances: computed at unit scale
    v_u = uniform_variance(g)
    b = _pos_int(batch_size, "batch_size", "two_stage_kappa")
    return _ratio(v_u, b * two_stage_variance(g, scores, pool_size, batch_size, replacement))


def two_stage_kappa_bound(
    num_samples: int, pool_size: int, batch_size: int, replacement: bool = True
) -> float:
    """The pool-size limit on :func:`two_stage_kappa`, whatever the scores.

    The two-stage variance is at least the variance of the pool mean ``sigma_S^2`` (the
    second stage only estimates the pool mean, unbiasedly), so

    .. math::

        \\kappa_{2} \\le \\frac{V_u}{b\\,\\sigma_S^2} =
        \\begin{cases} B / b & \\text{pool with replacement} \\\\
        \\dfrac{B (N - 1)}{b (N - B)} & \\text{without replacement (inf for B = N)} \\end{cases}

    Returns:
        float > 0, possibly ``inf``.
    """
    owner = "two_stage_kappa_bound"
    n_ex = _pos_int(num_samples, "num_samples", owner)
    big_b = _pos_int(pool_size, "pool_size", owner)
    b = _pos_int(batch_size, "batch_size", owner)
    if replacement:
        return big_b / b
    if big_b > n_ex:
        raise ValueError(
            f"The 'pool_size' parameter of {owner} must be <= num_samples = {n_ex}. Got {big_b}."
        )
    if big_b == n_ex:
        return math.inf
    return big_b * (n_ex - 1) / (b * (n_ex - big_b))


# --------------------------------------------------------------------------- biased schemes


def estimator_moments(G: Any, p: Any, weights: Any | None = None) -> tuple[torch.Tensor, float]:
    """Mean and variance (trace) of one draw ``w_i g_i``, ``i ~ p``, for arbitrary weights.

    Args:
        G: Tensor of shape (N, P), per-example gradients.
        p: Tensor of shape (N,), draw probabilities.
        weights: Tensor of shape (N,), the weight attached to each example when drawn
            (>= 0; values where ``p_i = 0`` are ignored); ``None`` = unbiased ``1 / (N p_i)``.

    Returns:
        ``(mean, variance)``: float64 Tensor of shape (P,) ``E[w_i g_i] = sum_i p_i w_i g_i``
        and float ``sum_i p_i w_i^2 ||g_i||^2 - ||E[w_i g_i]||^2``. With unbiased weights
        and a zero ``p_i`` at a non-zero ``g_i`` the mean misses ``g_i / N`` and the
        variance is reported as ``inf``.

    Schemes that select without replacement (top-k, Selective Backprop) are modelled by
    i.i.d. draws from their inclusion probabilities normalised to sum 1.
    """
    owner = "estimator_moments"
    g = _gradients(G, owner)
    scale = _pow2_scale(g)
    g = g if scale == 1.0 else g / scale  # moments at unit scale, scaled back below
    n_ex = g.shape[0]
    prob = _probabilities(p, n_ex, owner)
    support = prob > 0
    if weights is None:
        w = torch.where(support, 1.0 / (n_ex * prob.clamp_min(1e-300)), torch.zeros_like(prob))
        unbiased_inf = bool((g.norm(dim=1)[~support] > 0).any())
    else:
        w = _vector(weights, n_ex, "weights", owner)
        unbiased_inf = False
    pw = prob * w
    mean = (pw.unsqueeze(1) * g).sum(0)
    if unbiased_inf:
        return mean * scale, math.inf
    second = float((pw * w * g.square().sum(1)).sum())
    return mean * scale, _unscale_sq(max(second - float(mean.square().sum()), 0.0), scale)


def bias(G: Any, p: Any, weights: Any | None = None) -> float:
    """Norm of the bias of the weighted estimate, ``|| sum_i p_i w_i g_i - g ||`` (float).

    Zero for unbiased weights ``w_i = 1 / (N p_i)`` with full support; rank-based, top-k
    and Selective Backprop schemes (no or partial weights) have a bias, and should be
    compared by :func:`mse`, never by variance alone.
    """
    mean, _ = estimator_moments(G, p, weights)
    diff = mean - _gradients(G, "bias").mean(0)
    scale = _pow2_scale(diff)
    return float((diff / scale).norm()) * scale


def mse(G: Any, p: Any, weights: Any | None = None, batch_size: int = 1) -> float:
    """Mean squared error of the b-draw minibatch estimate of g (float).

    .. math::

        \\mathrm{MSE} = \\|\\mathbb{E}[w_i g_i] - g\\|^2 + \\frac{1}{b}
        \\Big(\\sum_i p_i w_i^2 \\|g_i\\|^2 - \\|\\mathbb{E}[w_i g_i]\\|^2\\Big)
    """
    b = _pos_int(batch_size, "batch_size", "mse")
    mean, var = estimator_moments(G, p, weights)
    g = _gradients(G, "mse").mean(0)
    return float((mean - g).square().sum()) + var / b
