"""Pure analysis functions for the optimizer study (issue 15).

Everything here works on plain numbers: loss curves (per-step losses, optionally with the
step numbers or elapsed seconds at which they were recorded), paired measurements, and a
user-supplied ``run(lr)`` function. Nothing trains a model, touches a loader or uses
global random state, so the experiments built on top (effective batch, does the metric
predict the speed-up, stability) can be checked on synthetic curves whose answers are known.

* :func:`spearman`: Spearman rank correlation with a seeded percentile-bootstrap interval.
* :func:`time_to_reach`: the first step (or second) at which a curve reaches a loss level,
  ``math.inf`` for never.
* :func:`common_levels`: loss levels that two curves both reach.
* :func:`reach_ratio`: how many times fewer steps (or seconds) one run needs than another to
  reach the same loss levels (the realized speed-up).
* :func:`curve_match`: how closely two per-step loss curves match (median absolute
  log-ratio over their common step range).
* :func:`is_stable` and :func:`largest_stable_lr`: the largest stable learning rate on a grid.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.stats import rankdata

from .._validation import check_choice, check_float, check_int, param_error

__all__ = [
    "CurveMatch",
    "SpearmanResult",
    "StabilitySearch",
    "common_levels",
    "curve_match",
    "is_stable",
    "largest_stable_lr",
    "reach_ratio",
    "spearman",
    "time_to_reach",
]


# --------------------------------------------------------------------------- helpers


def _as_1d(value: Any, name: str, owner: str, *, allow_nonfinite: bool = False) -> np.ndarray:
    """Return ``value`` as a float64 NumPy vector, or raise with the project's message shape."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    if isinstance(value, (str, bytes)) or not isinstance(value, (np.ndarray, Sequence)):
        raise param_error(name, owner, "a 1-D sequence of real numbers", value, TypeError)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise param_error(name, owner, "a 1-D sequence of real numbers", value, TypeError) from None
    if arr.ndim != 1:
        raise param_error(name, owner, "a 1-D sequence of real numbers", f"shape {arr.shape}")
    if not allow_nonfinite:
        nan, inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        if nan:
            raise param_error(name, owner, "a sequence without NaN", f"{nan} NaN of {arr.size} values")
        if inf:
            raise param_error(name, owner, "a sequence of finite numbers", f"{inf} inf of {arr.size} values")
    return arr


def _curve(x: Any, losses: Any, owner: str, x_name: str = "x", loss_name: str = "losses"):
    """Validate one curve: increasing finite x, losses > 0 where finite (NaN/inf allowed)."""
    xs = _as_1d(x, x_name, owner)
    ls = _as_1d(losses, loss_name, owner, allow_nonfinite=True)
    if xs.size == 0:
        raise param_error(x_name, owner, "a non-empty sequence", x)
    if xs.size != ls.size:
        raise ValueError(
            f"The '{x_name}' and '{loss_name}' parameters of {owner} must have the same length. "
            f"Got {xs.size} and {ls.size}."
        )
    if xs.size > 1 and not (np.diff(xs) > 0).all():
        at = int(np.argmax(np.diff(xs) <= 0))
        got = f"{float(xs[at])!r} then {float(xs[at + 1])!r} at index {at}"
        raise param_error(x_name, owner, "strictly increasing", got)
    finite = np.isfinite(ls)
    if (ls[finite] <= 0).any():
        worst = float(ls[finite].min())
        raise param_error(loss_name, owner, "> 0 where finite (log-ratios need positive losses)", worst)
    return xs, ls


def _rng(rng: Any, owner: str) -> np.random.Generator:
    """Resolve an int seed or a NumPy Generator (never the global NumPy state)."""
    if isinstance(rng, np.random.Generator):
        return rng
    expected = "an int seed >= 0 or a numpy.random.Generator"
    if isinstance(rng, bool) or not isinstance(rng, numbers.Integral):
        raise param_error("rng", owner, expected, rng, TypeError)
    if rng < 0:
        raise param_error("rng", owner, expected, rng)
    return np.random.default_rng(int(rng))


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of two (R, n) arrays; NaN for a constant row."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    num = (a * b).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den == 0] = np.nan
    return np.clip(out, -1.0, 1.0)


# --------------------------------------------------------------------------- rank correlation


class SpearmanResult(NamedTuple):
    """Spearman rank correlation with a bootstrap interval.

    Attributes:
        rho: Spearman's rho of the full sample, in [-1, 1] (NaN when either variable is constant).
        low: Lower end of the percentile-bootstrap interval.
        high: Upper end of the percentile-bootstrap interval.
        n: Number of pairs.
        confidence: Coverage of the interval, e.g. 0.95.
        n_boot: Bootstrap resamples whose rho was defined (resamples in which either variable is
            constant have no rho and are left out).
    """

    rho: float
    low: float
    high: float
    n: int
    confidence: float
    n_boot: int


def spearman(
    x: Any,
    y: Any,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    rng: int | np.random.Generator = 0,
) -> SpearmanResult:
    """Spearman rank correlation of paired values, with a percentile-bootstrap interval.

    Ties get their average rank; rho is the Pearson correlation of the ranks:

    .. math::

        \\rho = \\frac{\\sum_i (r_i - \\bar r)(s_i - \\bar s)}
                     {\\sqrt{\\sum_i (r_i - \\bar r)^2 \\sum_i (s_i - \\bar s)^2}}

    The interval resamples the n pairs with replacement ``n_boot`` times, recomputes rho on
    each resample (ranks recomputed) and takes the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles. Resamples in which either variable is constant are
    left out (``n_boot`` in the result counts the ones kept).

    Args:
        x: Predicted values (e.g. kappa), shape (n,), n >= 3, finite.
        y: Realized values (e.g. speed-up), shape (n,), finite.
        n_boot: Number of bootstrap resamples (>= 1). Default 2000.
        confidence: Interval coverage in (0, 1). Default 0.95.
        rng: An int seed (default 0: the interval is reproducible) or a
            ``numpy.random.Generator``, which is advanced. Global random state is never used.

    Returns:
        A :class:`SpearmanResult` (rho, low, high, n, confidence, n_boot); rho and the interval
        are dimensionless, NaN when undefined.

    Example:
        >>> spearman([1, 2, 3, 4], [10, 20, 25, 100]).rho
        1.0
    """
    owner = "spearman"
    xs = _as_1d(x, "x", owner)
    ys = _as_1d(y, "y", owner)
    if xs.size != ys.size:
        raise ValueError(f"The 'x' and 'y' parameters of spearman must have the same length. "
                         f"Got {xs.size} and {ys.size}.")
    if xs.size < 3:
        raise param_error("x", owner, "a sequence of at least 3 pairs", x)
    n_boot = check_int(n_boot, "n_boot", owner, minimum=1)
    confidence = check_float(confidence, "confidence", owner, minimum=0.0, maximum=1.0,
                             min_inclusive=False, max_inclusive=False)
    gen = _rng(rng, owner)
    n = xs.size
    rho = float(_pearson_rows(rankdata(xs)[None], rankdata(ys)[None])[0])
    idx = gen.integers(0, n, size=(n_boot, n))
    boot = _pearson_rows(rankdata(xs[idx], axis=1), rankdata(ys[idx], axis=1))
    boot = boot[~np.isnan(boot)]
    if boot.size == 0:
        low = high = math.nan
    else:
        low, high = (float(q) for q in np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2]))
    return SpearmanResult(rho, low, high, int(n), float(confidence), int(boot.size))


# --------------------------------------------------------------------------- reaching a loss level


def time_to_reach(x: Any, losses: Any, level: float) -> float:
    """The first x (step or elapsed seconds) at which a loss curve reaches ``level``.

    The curve is the points ``(x_i, losses_i)``; between two recorded points the log-loss is
    interpolated linearly, so a curve decaying exponentially in x gives the exact crossing.
    A non-finite loss (a diverged run) never reaches a level, and the curve is cut there:
    points after the first NaN/inf are ignored.

    .. math::

        t(L) = x_{i-1} + (x_i - x_{i-1})
               \\frac{\\log \\ell_{i-1} - \\log L}{\\log \\ell_{i-1} - \\log \\ell_i},
        \\quad i = \\min\\{ j : \\ell_j \\le L \\}

    Args:
        x: Step numbers or elapsed seconds, shape (n,), strictly increasing, finite.
        losses: Losses at those points, shape (n,), > 0 where finite.
        level: Loss level, > 0.

    Returns:
        The first x at which the loss is <= ``level`` (``x[0]`` if it starts there), in the
        units of ``x``; ``math.inf`` if it never does ("never").
    """
    owner = "time_to_reach"
    xs, ls = _curve(x, losses, owner)
    level = check_float(level, "level", owner, minimum=0.0, min_inclusive=False)
    return _reach(xs, ls, level)


def _reach(xs: np.ndarray, ls: np.ndarray, level: float) -> float:
    bad = ~np.isfinite(ls)
    if bad.any():
        cut = int(np.argmax(bad))
        xs, ls = xs[:cut], ls[:cut]
    hit = np.flatnonzero(ls <= level)
    if hit.size == 0:
        return math.inf
    i = int(hit[0])
    if i == 0:
        return float(xs[0])
    la, lb, lv = math.log(ls[i - 1]), math.log(ls[i]), math.log(level)
    return float(xs[i - 1] + (xs[i] - xs[i - 1]) * (la - lv) / (la - lb))


def common_levels(losses_a: Any, losses_b: Any, n: int = 5) -> np.ndarray:
    """``n`` loss levels, geometrically spaced, that both curves reach.

    The levels run from just below the smaller initial loss down to the larger of the two
    best (minimum finite) losses, so :func:`reach_ratio` is finite at every level.

    Args:
        losses_a: First loss curve, shape (n_a,), > 0 where finite, first value finite.
        losses_b: Second loss curve, shape (n_b,), same rules.
        n: Number of levels (>= 1). Default 5.

    Returns:
        Array of shape (n,), decreasing; empty if the curves share no level below their
        starting losses (e.g. one of them never improves).
    """
    owner = "common_levels"
    n = check_int(n, "n", owner, minimum=1)
    a = _as_1d(losses_a, "losses_a", owner, allow_nonfinite=True)
    b = _as_1d(losses_b, "losses_b", owner, allow_nonfinite=True)
    for name, arr in (("losses_a", a), ("losses_b", b)):
        if arr.size == 0 or not np.isfinite(arr[0]) or arr[0] <= 0:
            expected = "a non-empty curve starting at a finite loss > 0"
            raise param_error(name, owner, expected, arr[:3].tolist())
    best = []
    for arr in (a, b):
        bad = ~np.isfinite(arr)
        kept = arr[: int(np.argmax(bad))] if bad.any() else arr
        best.append(float(kept.min()))
    top = min(a[0], b[0])
    bottom = max(best)
    if not bottom < top:
        return np.empty(0)
    # Stop just short of the start so that a level is a genuine improvement on both curves.
    return np.geomspace(top, bottom, n + 1)[1:]


def reach_ratio(x_ref: Any, losses_ref: Any, x_new: Any, losses_new: Any, levels: Any) -> np.ndarray:
    """Realized speed-up: x needed by the reference run over x needed by the new run, per level.

    For each level L, ``time_to_reach(x_ref, losses_ref, L) / time_to_reach(x_new, losses_new, L)``.
    With x in steps this is the step ratio; with x in seconds, the time ratio. A value of 2
    means the new run (e.g. importance sampling) reaches L in half the steps of the reference
    (e.g. uniform sampling).

    Conventions for "never": the reference never reaches L but the new run does -> ``inf``;
    the new run never does -> 0 (the reference did) or NaN (neither did). Levels reached at
    x = 0 by both runs give NaN (0 / 0): choose levels below the initial losses
    (see :func:`common_levels`).

    Args:
        x_ref: Reference run's steps or seconds, shape (n,), strictly increasing.
        losses_ref: Reference run's losses, shape (n,).
        x_new: New run's steps or seconds, shape (m,), same units as ``x_ref``.
        losses_new: New run's losses, shape (m,).
        levels: Loss levels, shape (k,), > 0.

    Returns:
        Float array of shape (k,): dimensionless speed-ups of the new run over the reference.
    """
    owner = "reach_ratio"
    xr, lr = _curve(x_ref, losses_ref, owner, "x_ref", "losses_ref")
    xn, ln = _curve(x_new, losses_new, owner, "x_new", "losses_new")
    lv = _as_1d(levels, "levels", owner)
    if (lv <= 0).any():
        raise param_error("levels", owner, "a sequence of floats > 0", levels)
    out = np.empty(lv.size)
    for k, level in enumerate(lv):
        tr, tn = _reach(xr, lr, float(level)), _reach(xn, ln, float(level))
        if math.isinf(tr) and math.isinf(tn):
            out[k] = math.nan
        elif math.isinf(tn):
            out[k] = 0.0
        elif math.isinf(tr):
            out[k] = math.inf
        elif tn == 0.0:
            out[k] = math.nan if tr == 0.0 else math.inf
        else:
            out[k] = tr / tn
    return out


# --------------------------------------------------------------------------- curve matching


class CurveMatch(NamedTuple):
    """How closely two loss curves match over their common x range.

    Attributes:
        median_abs_log_ratio: Median over the common grid of ``|log(loss_a / loss_b)|``
            (0 = identical; log(2) ~ 0.69 = typically a factor 2 apart); ``inf`` when at least
            half the grid has a non-finite loss on either curve.
        max_abs_log_ratio: Largest ``|log(loss_a / loss_b)|`` on the grid.
        n_points: Number of grid points compared.
        start: First x of the common range.
        end: Last x of the common range.
    """

    median_abs_log_ratio: float
    max_abs_log_ratio: float
    n_points: int
    start: float
    end: float


def curve_match(
    x_a: Any,
    losses_a: Any,
    x_b: Any,
    losses_b: Any,
    *,
    start: float | None = None,
    end: float | None = None,
) -> CurveMatch:
    """Compare two per-step loss curves over their common step range.

    Both curves are evaluated on the union of their recorded x values that fall inside the
    common range ``[max(x_a[0], x_b[0], start), min(x_a[-1], x_b[-1], end)]``, log-loss
    interpolated linearly between recorded points, and compared by

    .. math::

        d = \\operatorname{median}_{t} \\left| \\log \\ell_a(t) - \\log \\ell_b(t) \\right|.

    A constant factor c between the curves gives d = |log c| exactly. A non-finite loss
    (divergence) makes the points it touches count as an infinite mismatch.

    Args:
        x_a: Steps (or seconds) of curve a, shape (n,), strictly increasing.
        losses_a: Losses of curve a, shape (n,), > 0 where finite.
        x_b: Steps of curve b, shape (m,), strictly increasing, same units.
        losses_b: Losses of curve b, shape (m,).
        start: Optional lower bound of the compared range.
        end: Optional upper bound of the compared range.

    Returns:
        A :class:`CurveMatch`; the log-ratios are dimensionless (natural log).
    """
    owner = "curve_match"
    xa, la = _curve(x_a, losses_a, owner, "x_a", "losses_a")
    xb, lb = _curve(x_b, losses_b, owner, "x_b", "losses_b")
    lo = max(xa[0], xb[0])
    hi = min(xa[-1], xb[-1])
    if start is not None:
        lo = max(lo, check_float(start, "start", owner))
    if end is not None:
        hi = min(hi, check_float(end, "end", owner))
    if not lo <= hi:
        raise ValueError(
            f"The curves given to curve_match share no x range: [{lo!r}, {hi!r}] is empty."
        )
    grid = np.union1d(xa, xb)
    grid = grid[(grid >= lo) & (grid <= hi)]
    if grid.size == 0:  # the range falls between recorded points
        grid = np.array([lo, hi]) if lo < hi else np.array([lo])
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(_log_interp(grid, xa, la) - _log_interp(grid, xb, lb))
    diff[np.isnan(diff)] = math.inf
    return CurveMatch(float(np.median(diff)), float(diff.max()), int(grid.size), float(lo), float(hi))


def _log_interp(grid: np.ndarray, xs: np.ndarray, ls: np.ndarray) -> np.ndarray:
    """Linear interpolation of log-loss; a segment touching a non-finite loss is +inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(np.isfinite(ls), np.log(np.where(np.isfinite(ls), ls, 1.0)), math.inf)
    out = np.interp(grid, xs, np.where(np.isfinite(logs), logs, 0.0))
    if not np.isfinite(logs).all():
        # Mark every grid point whose bracketing recorded points include a non-finite loss.
        right = np.clip(np.searchsorted(xs, grid, side="left"), 0, xs.size - 1)
        left = np.clip(np.searchsorted(xs, grid, side="right") - 1, 0, xs.size - 1)
        bad = ~np.isfinite(logs)
        out[bad[left] | bad[right]] = math.inf
    return out


# --------------------------------------------------------------------------- stability


def is_stable(losses: Any, divergence_factor: float = 10.0) -> bool:
    """Whether a training run was stable: every loss finite and none above k x the initial loss.

    Args:
        losses: The run's per-step losses, shape (n,), n >= 1, first value finite and > 0.
        divergence_factor: k > 1; a loss above ``k * losses[0]`` counts as divergence. Default 10.

    Returns:
        ``True`` if all losses are finite and ``max(losses) <= k * losses[0]``.
    """
    owner = "is_stable"
    k = check_float(divergence_factor, "divergence_factor", owner, minimum=1.0, min_inclusive=False)
    ls = _as_1d(losses, "losses", owner, allow_nonfinite=True)
    return _stable(ls, k, owner)


def _stable(ls: np.ndarray, k: float, owner: str) -> bool:
    if ls.size == 0:
        raise ValueError(f"The run given to {owner} returned no losses; it must return at least one.")
    if not np.isfinite(ls[0]) or ls[0] <= 0:
        raise ValueError(
            f"The first loss given to {owner} must be finite and > 0 (the reference for divergence). "
            f"Got {float(ls[0])!r}."
        )
    return bool(np.isfinite(ls).all() and ls.max() <= k * ls[0])


class StabilitySearch(NamedTuple):
    """Result of :func:`largest_stable_lr`.

    Attributes:
        lr: Largest learning rate of the grid found stable, or ``None`` if none was.
        tested: ``{lr: stable}`` for every learning rate actually run, in increasing lr order.
        monotone: Whether the tested results are consistent with one threshold (stable up to
            some lr, unstable above). With ``search="bisect"`` this is assumed, not checked.
        at_edge: ``True`` when ``lr`` is the largest grid value: the true limit may be higher.
    """

    lr: float | None
    tested: dict[float, bool]
    monotone: bool
    at_edge: bool


def largest_stable_lr(
    run: Callable[[float], Any],
    lrs: Any,
    *,
    divergence_factor: float = 10.0,
    search: str = "grid",
) -> StabilitySearch:
    """The largest learning rate on a grid at which ``run(lr)`` trains stably.

    ``run(lr)`` trains with learning rate ``lr`` and returns its per-step losses (any 1-D
    sequence or tensor); the run is stable when :func:`is_stable` says so (all finite, none
    above ``divergence_factor`` x the first loss). A run may stop early once it has diverged.

    Args:
        run: Callable ``lr -> losses``.
        lrs: Candidate learning rates, shape (n,), finite, > 0, distinct (any order).
        divergence_factor: k > 1 of :func:`is_stable`. Default 10.
        search: ``"grid"`` runs every learning rate and reports whether stability was
            monotone in lr; ``"bisect"`` assumes it is (stable below a threshold, unstable
            above) and runs about log2(n) + 1 of them.

    Returns:
        A :class:`StabilitySearch`; ``lr`` is in the units of ``lrs``.
    """
    owner = "largest_stable_lr"
    if not callable(run):
        raise param_error("run", owner, "a callable lr -> losses", run, TypeError)
    grid = _as_1d(lrs, "lrs", owner)
    if grid.size == 0 or (grid <= 0).any():
        raise param_error("lrs", owner, "a non-empty sequence of floats > 0", lrs)
    grid = np.sort(grid)
    if (np.diff(grid) == 0).any():
        raise param_error("lrs", owner, "a sequence of distinct values", lrs)
    k = check_float(divergence_factor, "divergence_factor", owner, minimum=1.0, min_inclusive=False)
    check_choice(search, "search", owner, ("grid", "bisect"))

    tested: dict[float, bool] = {}

    def stable_at(i: int) -> bool:
        lr = float(grid[i])
        if lr not in tested:
            out = run(lr)
            if isinstance(out, torch.Tensor):
                out = out.detach().to("cpu", torch.float64).reshape(-1).numpy()
            try:
                losses = np.asarray(out, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise TypeError(
                    f"The run given to {owner} must return a 1-D sequence of losses. Got {out!r}."
                ) from None
            tested[lr] = _stable(losses, k, owner)
        return tested[lr]

    if search == "grid":
        for i in range(grid.size):
            stable_at(i)
        flags = [tested[float(v)] for v in grid]
        stable_idx = [i for i, f in enumerate(flags) if f]
        best = stable_idx[-1] if stable_idx else None
        first_bad = next((i for i, f in enumerate(flags) if not f), grid.size)
        monotone = all(flags[:first_bad]) and not any(flags[first_bad:])
    else:
        # Invariant: every index < lo is known stable, every index >= hi is known unstable.
        lo, hi = 0, grid.size
        while lo < hi:
            mid = (lo + hi) // 2
            if stable_at(mid):
                lo = mid + 1
            else:
                hi = mid
        best = lo - 1 if lo > 0 else None
        monotone = True
    ordered = {lr: tested[lr] for lr in sorted(tested)}
    if best is None:
        return StabilitySearch(None, ordered, monotone, False)
    return StabilitySearch(float(grid[best]), ordered, monotone, best == grid.size - 1)
