"""Stale score tables that are never worse than uniform: a uniform mixing level tuned from measured staleness.

A score table draws with the stale scores ``t_i`` it holds (written when example i was
last drawn), from the mixture

.. math::

    q_{\\lambda, i} = \\frac{u(\\lambda)}{N} + (1 - u(\\lambda)) \\frac{t_i}{T}, \\qquad
    u(\\lambda) = \\lambda + (1 - \\lambda) c, \\qquad T = \\sum_j t_j

(``c`` is the uniform share that the table's smoothing already adds, see
:meth:`isample.policies.ScorePolicy.uniform_share`). Whether sampling by the table beats
uniform depends on how well the *stale* ``t`` still predicts the *current* per-example
gradient norms. Every drawn example comes back with a fresh score ``s_i`` (its training
loss or upper bound, a proxy for ``||g_i||``), so for every candidate level on a grid the
second moment of the importance-sampling estimator

.. math::

    M(\\lambda) = \\frac{1}{N}\\sum_i \\frac{s_i^2}{N q_{\\lambda,i}}
    = \\mathbb{E}_{i \\sim p}\\big[w_p(i)\\, w_\\lambda(i)\\, s_i^2\\big], \\qquad
    w_p(i) = \\frac{1}{N p_i},\\; w_\\lambda(i) = \\frac{1}{N q_{\\lambda,i}}

is estimated without bias from the batch drawn under the current distribution ``p``
(:func:`mixing_second_moments`). ``lambda = 1`` is uniform sampling, so the level that
minimises an exponential moving average of ``M`` is never predicted to be worse than
uniform: examples whose stale score collapsed while their gradient did not (the cause of
tables worse than uniform, see docs/methods/history-is.md) make ``M`` large at small
``lambda`` and push the level up; a table that predicts the fresh scores well lets it
fall to the floor of the grid. The weights always use the exact ``p`` of the draw, so
the estimator stays exactly unbiased whatever level is chosen.

References:
    Needell, Srebro and Ward, NeurIPS 2014 (uniform mixing); Katharopoulos and Fleuret,
    ICML 2018 (variance of importance sampling with stale scores).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._validation import check_float, check_int, param_error

__all__ = ["AdaptiveMixing", "mixing_second_moments", "compiled_observe", "DEFAULT_LEVELS"]


@functools.cache
def compiled_observe(engine: str) -> Any:
    """The compiled update :func:`isample._engine_kernels.mixing_observe`, or None.

    Args:
        engine: a table engine backend (``"numba"``, ``"numpy"``, ``"auto"``) or ``""`` for
            the ``ISAMPLE_ENGINE`` default (see :func:`isample.engine.resolve_backend`).

    Returns:
        The kernel when that backend is numba and the kernel reproduces the NumPy path bit
        for bit on a random check (once per process); else None (the NumPy path).
    """
    from . import engine as _engine

    if _engine.resolve_backend(engine or None) != "numba":
        return None
    kernel = _engine._kernels().mixing_observe
    return kernel if _kernel_agrees(kernel) else None


def _kernel_agrees(kernel: Any) -> bool:
    rng = np.random.default_rng(12)
    for k, full, total in ((300, False, 7.5), (5, True, 3.0), (64, False, 0.0), (1000, False, 1e-300)):
        stale = np.exp(rng.uniform(-5.0, 5.0, k)) * (rng.random(k) < 0.9)
        fresh = np.exp(rng.uniform(-5.0, 5.0, k))
        reference, compiled = AdaptiveMixing(warmup=0), AdaptiveMixing(warmup=0)
        for step in range(3):
            reference.level = compiled.level = float(reference.levels[step])
            args = (stale, fresh * (step + 1), total, 1000, 0.05)
            (reference.observe_full if full else reference.observe)(*args, _kernel=None)  # type: ignore[operator]
            (compiled.observe_full if full else compiled.observe)(*args, _kernel=kernel)  # type: ignore[operator]
        if not (
            reference.level == compiled.level
            and reference.moments.tobytes() == compiled.moments.tobytes()
            and reference.spread.tobytes() == compiled.spread.tobytes()
        ):
            return False
    return True


def _kernel_for_env() -> Any:
    return compiled_observe(os.environ.get("ISAMPLE_ENGINE", "").strip().lower())


#: Default grid of mixing levels, from uniform (1) down to the former fixed level 0.1 (weights <= 10).
DEFAULT_LEVELS = (1.0, 0.7, 0.5, 0.35, 0.25, 0.15, 0.1)


def _mixture(stale: np.ndarray, total: float, n: int, share: np.ndarray) -> np.ndarray:
    """``N q`` for uniform shares ``share`` (L,) and stale values (k,): array (L, k)."""
    share = share[:, None]
    if total <= 0:
        return np.ones((share.shape[0], stale.shape[0]))
    return share + (1.0 - share) * (n * (stale[None, :] / total))


def mixing_second_moments(
    stale: np.ndarray,
    fresh: np.ndarray,
    total: float,
    num_samples: int,
    base_share: float,
    draw_level: float | None,
    levels: np.ndarray,
) -> np.ndarray:
    """Unbiased estimates of ``M(lambda)`` (see module docstring) for every level: array (L,).

    Args:
        stale: transformed table values ``t_i`` used when the examples were drawn, shape (k,).
        fresh: fresh raw scores ``s_i`` of the same examples (the proxy of ``||g_i||``), shape (k,).
        total: ``T``, the table's total at draw time (unvisited examples included).
        num_samples: N.
        base_share: the smoothing's own uniform share ``c`` in [0, 1].
        draw_level: the level ``lambda`` the examples were drawn with (i.i.d. from
            ``q_lambda``), or ``None`` when ``stale`` / ``fresh`` cover every example exactly
            once (a full re-scoring pass): then the value is exact, not estimated.
        levels: candidate levels, shape (L,).

    Returns:
        float64 array (L,): ``mean_j w_p(j) w_lambda(j) s_j^2`` (``mean_i w_lambda(i) s_i^2``
        for a full pass). Dimensionless up to the squared unit of the scores.
    """
    shares = levels + (1.0 - levels) * base_share
    nq = _mixture(stale, total, num_samples, shares)  # (L, k), > 0 since every level is > 0
    with np.errstate(over="ignore"):  # overflowing scores give inf, which the caller skips
        s2 = np.square(np.asarray(fresh, dtype=np.float64))
        if draw_level is None:
            return (s2[None, :] / nq).mean(axis=1)
        draw_share = np.array([draw_level + (1.0 - draw_level) * base_share])
        np_draw = _mixture(stale, total, num_samples, draw_share)[0]  # (k,)
        return (s2[None, :] / (np_draw[None, :] * nq)).mean(axis=1)


class AdaptiveMixing:
    """Chooses the table's uniform mixing level ``lambda`` from measured staleness.

    After every score update the table hands over, for the updated examples, the stale
    values they were drawn with and their fresh scores; :func:`mixing_second_moments`
    turns them into one estimate of ``M(lambda)`` per level. Exponential moving averages
    (bias-corrected) keep the mean of each level's estimate and of its squared difference
    to uniform's, estimated on the same draws, so the change against uniform gets a
    standard error. The level chosen minimises the pessimistic relative change

    .. math::

        r(\\lambda) = \\frac{\\overline{M(\\lambda) - M(1)} + z\\,\\mathrm{se}}{\\overline{M(1)}}

    (``r(1) = 0``: a level is only taken when it beats uniform with confidence ``z``), after
    ``warmup`` updates. The level falls only when ``r`` improves by at least ``hysteresis``
    and rises (towards uniform) on any improvement; ties favour the larger level.

    Args:
        levels: candidate levels in (0, 1]; must include 1.0 (uniform). Default
            :data:`DEFAULT_LEVELS` (1 down to 0.1: weights never exceed 10).
        initial: level before enough evidence (default 1.0: start uniform).
        momentum: EMA momentum in [0, 1) of the second-moment estimates (default 0.95,
            about 40 updates of memory: reacts within an epoch to scores going stale).
        hysteresis: improvement of ``r`` in [0, 1) needed to move to a smaller level
            (default 0.1: at least a 10% pessimistic reduction); a larger level, closer to
            uniform, is taken on any improvement.
        confidence: ``z`` >= 0, standard errors of pessimism (default 3.0; 0 = plain arg-min).
        warmup: updates observed before the level may leave ``initial`` (default 20).

    Example:
        >>> sampler = TableSampler(len(ds), batch_size=64, mixing="auto", seed=0)
        >>> sampler.mixing_level   # 1.0 until the measured staleness allows less
    """

    STATE_KEYS = ("levels", "level", "moments", "spread", "updates")

    def __init__(
        self,
        levels: Sequence[float] = DEFAULT_LEVELS,
        *,
        initial: float = 1.0,
        momentum: float = 0.95,
        hysteresis: float = 0.1,
        confidence: float = 3.0,
        warmup: int = 20,
    ) -> None:
        owner = "AdaptiveMixing"
        if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
            raise param_error("levels", owner, "a non-empty sequence of floats in (0, 1]", levels, TypeError)
        checked = sorted(
            {check_float(v, "levels", owner, minimum=0.0, maximum=1.0, min_inclusive=False) for v in levels},
            reverse=True,
        )
        if checked[0] != 1.0:
            raise param_error("levels", owner, "a sequence that includes 1.0 (uniform)", list(levels))
        self.levels = np.array(checked, dtype=np.float64)
        initial = check_float(initial, "initial", owner, minimum=0.0, maximum=1.0)
        if initial not in checked:
            raise param_error("initial", owner, f"one of the levels {checked}", initial)
        self.initial = initial
        self.momentum = check_float(
            momentum, "momentum", owner, minimum=0.0, maximum=1.0, max_inclusive=False
        )
        self.hysteresis = check_float(
            hysteresis, "hysteresis", owner, minimum=0.0, maximum=1.0, max_inclusive=False
        )
        self.confidence = check_float(confidence, "confidence", owner, minimum=0.0)
        self.warmup = check_int(warmup, "warmup", owner, minimum=0)
        self.reset()

    def reset(self) -> None:
        """Forget every observation and return to the initial level."""
        self.level = self.initial
        self.moments = np.zeros_like(self.levels)
        self.spread = np.zeros_like(self.levels)
        self.updates = 0

    def share(self, base_share: float) -> float:
        """Uniform share of the draw distribution: ``lambda + (1 - lambda) base_share``."""
        return self.level + (1.0 - self.level) * base_share

    def observe(
        self,
        stale: np.ndarray,
        fresh: np.ndarray,
        total: float,
        num_samples: int,
        base_share: float,
        *,
        _kernel: Any = "env",
    ) -> None:
        """Feed one score update (see :func:`mixing_second_moments`) and re-choose the level.

        ``stale`` and ``fresh`` (shape (k,)) are taken as i.i.d. draws from the table at
        its current level (a training batch). Non-finite estimates (overflowing scores)
        are skipped.

        With the table engine's compiled backend (numba, see :mod:`isample.engine`) the
        whole update runs in one compiled call
        (:func:`isample._engine_kernels.mixing_observe`) with the same float64 operations
        in the same order: the moments, the spread and every level chosen are bit for bit
        those of the NumPy path (checked once per process; the NumPy path is used if not).
        """
        self._observe(stale, fresh, total, num_samples, base_share, self.level, _kernel)

    def observe_full(
        self,
        stale: np.ndarray,
        fresh: np.ndarray,
        total: float,
        num_samples: int,
        base_share: float,
        *,
        _kernel: Any = "env",
    ) -> None:
        """Like :meth:`observe` for a pass over every example once (exact ``M``, no draw)."""
        self._observe(stale, fresh, total, num_samples, base_share, None, _kernel)

    def _observe(
        self,
        stale: np.ndarray,
        fresh: np.ndarray,
        total: float,
        num_samples: int,
        base_share: float,
        draw_level: float | None,
        kernel: Any,
    ) -> None:
        # draw_level: the level the examples were drawn at (None: a full pass, no draw)
        kernel = _kernel_for_env() if kernel == "env" else kernel
        if kernel is not None:
            level = -1.0 if draw_level is None else draw_level
            self._compiled_add(kernel, stale, fresh, total, num_samples, base_share, level)
            return
        self._add(
            mixing_second_moments(stale, fresh, total, num_samples, base_share, draw_level, self.levels)
        )

    def _compiled_add(
        self,
        kernel: Any,
        stale: np.ndarray,
        fresh: np.ndarray,
        total: float,
        num_samples: int,
        base_share: float,
        draw_level: float,
    ) -> None:
        # The compiled twin of mixing_second_moments + _add (same results bit for bit).
        a = self.momentum
        updates = self.updates + 1
        decide = updates >= max(self.warmup, 1)
        current = self._current_index()
        # moments and spread are always fresh contiguous float64 arrays (reset, _add and
        # load_state_dict make them so): the kernel updates them in place.
        chosen = kernel(
            np.ascontiguousarray(stale, dtype=np.float64),
            np.ascontiguousarray(fresh, dtype=np.float64),
            float(total),
            float(num_samples),
            float(base_share),
            float(draw_level),
            self.levels,
            self.moments,
            self.spread,
            a,
            decide,
            1.0 - a**updates,
            min((1.0 + a) / (1.0 - a), float(updates)),
            self.confidence,
            self.hysteresis,
            current,
        )
        if chosen == -2:  # empty or non-finite estimate: skipped, nothing changed
            return
        self.updates = updates
        if chosen >= 0:
            self.level = float(self.levels[chosen])

    def _current_index(self) -> int:
        return self.levels.tolist().index(self.level)

    def _add(self, estimate: np.ndarray) -> None:
        if estimate.size == 0 or not np.isfinite(estimate).all():
            return
        a = self.momentum
        self.moments = a * self.moments + (1.0 - a) * estimate
        self.spread = a * self.spread + (1.0 - a) * np.square(estimate - estimate[0])
        self.updates += 1
        if self.updates < max(self.warmup, 1):
            return
        r = self.relative_change()
        best = int(np.argmin(r))  # first minimum: the largest level among ties
        current = int(np.flatnonzero(self.levels == self.level)[0])
        # towards less uniform mixing only with a margin; back towards uniform on any predicted gain
        margin = self.hysteresis if self.levels[best] < self.level else 0.0
        if best != current and r[best] < r[current] - margin:
            self.level = float(self.levels[best])

    def relative_change(self) -> np.ndarray:
        """Pessimistic relative change ``r(lambda)`` of the second moment vs uniform, array (L,).

        Negative where a level is predicted to beat uniform with confidence ``z``; all zeros
        before any observation (``levels[0]`` is uniform, always 0).
        """
        if self.updates == 0:
            return np.zeros_like(self.levels)
        a = self.momentum
        debias = 1.0 - a**self.updates
        mean = self.moments / debias
        diff = mean - mean[0]
        var = np.maximum(self.spread / debias - np.square(diff), 0.0)
        # standard error of an EMA of i.i.d. terms: var * (1 - a) / (1 + a) (n_eff = (1 + a) / (1 - a))
        n_eff = min((1.0 + a) / (1.0 - a), float(self.updates))
        upper = diff + self.confidence * np.sqrt(var / n_eff)
        return upper / mean[0] if mean[0] > 0 else np.zeros_like(self.levels)

    def estimated_gain(self) -> float:
        """``M(1) / M(lambda)`` at the current level: a lower bound on the variance ratio kappa
        of the table vs uniform when it is >= 1 (``nan`` before any observation)."""
        current = self.moments[self.levels == self.level][0]
        return float(self.moments[0] / current) if current > 0 else float("nan")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The state: ``levels``, ``moments``, ``spread`` (float64 Tensors (L,)), ``level``, ``updates``."""
        return {
            "levels": torch.from_numpy(self.levels.copy()),
            "level": self.level,
            "moments": torch.from_numpy(self.moments.copy()),
            "spread": torch.from_numpy(self.spread.copy()),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            KeyError: a key is missing.
            ValueError: the state was saved with other levels, or holds a level not on the grid.
        """
        for key in self.STATE_KEYS:
            if key not in state:
                raise KeyError(f"AdaptiveMixing state is missing '{key}'.")
        levels = np.asarray(state["levels"], dtype=np.float64)
        if levels.shape != self.levels.shape or not np.array_equal(levels, self.levels):
            raise ValueError(
                f"AdaptiveMixing state was saved with levels {levels.tolist()}; this one has "
                f"{self.levels.tolist()}."
            )
        level = float(state["level"])
        moments = np.asarray(state["moments"], dtype=np.float64)
        spread = np.asarray(state["spread"], dtype=np.float64)
        if (
            level not in self.levels
            or moments.shape != self.levels.shape
            or spread.shape != self.levels.shape
            or not (np.isfinite(moments).all() and np.isfinite(spread).all())
        ):
            raise ValueError("AdaptiveMixing state has a level off the grid or invalid moments.")
        self.level = level
        self.moments = moments.copy()
        self.spread = spread.copy()
        self.updates = int(state["updates"])

    def __repr__(self) -> str:
        return (
            f"AdaptiveMixing(level={self.level}, levels={self.levels.tolist()}, momentum={self.momentum}, "
            f"updates={self.updates})"
        )
